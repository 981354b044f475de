"""Write text with a trained model: a prompt in, a continuation out, streamed piece by piece.

    from azgpt.use.generate import Generator, generate_text
    text = generate_text("last.ckpt", "Azərbaycan", max_new_tokens=100, seed=1)
    gen = Generator.from_checkpoint("last.ckpt")
    for piece in gen.stream("Bakı", temperature=0.8, top_k=50):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch

from azgpt.errors import AzGPTError
from azgpt.sampling import Generator, Sampling, check_seed, crop_note


def generate_text(checkpoint: str | Path, prompt: str, device: str | torch.device | None = None, **kwargs) -> str:
    """Load ``checkpoint`` and return the continuation of ``prompt`` (keyword arguments as ``Generator.stream``)."""
    return Generator.from_checkpoint(checkpoint, device=device).generate(prompt, **kwargs)


def generate_command(ckpt: Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     num_samples: int = 1, device: str | None = None, no_cache: bool = False) -> int:
    """Continue a prompt with a trained model, printing the text as it is written. Stops at <|endoftext|> or
    after max_new_tokens tokens.

    Args:
        ckpt: checkpoint written by azgpt fit.
        prompt: text to continue (cropped from the left to the model's block size).
        max_new_tokens: tokens to add.
        temperature: sampling temperature; 0 = greedy.
        top_k: sample among the K likeliest tokens.
        top_p: sample among the likeliest tokens holding probability P, in (0, 1].
        seed: seed for reproducible sampling (sample i uses seed + i - 1).
        num_samples: continuations to write.
        device: cpu, cuda, cuda:1... (default: cuda if available).
        no_cache: recompute every position at each step instead of using the KV cache (slow).
    """
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p)
    if num_samples < 1:
        raise AzGPTError(f"--num_samples must be >= 1, got {num_samples}")
    check_seed(seed, num_samples)
    generator = Generator.from_checkpoint(ckpt, device=parse_device(device))
    ids, dropped = generator.encode_prompt(prompt)
    if dropped:
        print(f"azgpt: note: {crop_note(dropped + len(ids), len(ids))}", file=sys.stderr)
    prompt_text = generator.tokenizer.decode(ids, skip_special_tokens=False)
    base_seed = seed if seed is not None else random.randrange(2**31)
    out = utf8_stdout()
    try:
        for i in range(num_samples):
            if num_samples > 1:
                separator = "\n" if i else ""
                out.write(f"{separator}--- sample {i + 1} of {num_samples} (seed {base_seed + i}) ---\n")
            out.write(prompt_text)
            out.flush()
            pieces = generator.stream(ids, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                      top_k=sampling.top_k, top_p=sampling.top_p, seed=base_seed + i,
                                      use_cache=not no_cache)
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
            out.flush()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, without a traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def parse_device(name: str | None) -> torch.device | None:
    """``--device`` as a torch device (None: let the caller choose), or a clear error."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AzGPTError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AzGPTError(f"--device {name}: no CUDA device is available here")
    return device


def utf8_stdout():
    """stdout that can print Azerbaijani letters even where the locale's encoding cannot."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    if encoding != "utf8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    return sys.stdout
