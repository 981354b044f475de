"""Write text with a trained model: a prompt in, a continuation out, streamed piece by piece.

    from azgpt.use.generate import Generator, generate_text
    text = generate_text("last.ckpt", "Azərbaycan", max_new_tokens=100, seed=1)
    gen = Generator.from_checkpoint("last.ckpt")
    for piece in gen.stream("Bakı", temperature=0.8, top_k=50):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import math
import os
import random
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from azgpt.checkpoint import load_checkpoint
from azgpt.errors import AzGPTError
from azgpt.model import GPT
from azgpt.data.tokenizer import EOT


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token. ``temperature == 0`` means greedy (argmax); top_k / top_p None: no cut."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise AzGPTError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise AzGPTError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise AzGPTError(f"top_k must be an integer >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise AzGPTError(f"top_p must be in (0, 1], got {p!r}")


class Generator:
    """A GPT and its tokenizer, ready to continue prompts.

    The model is used as given (its device, dtype and train/eval mode); ``from_checkpoint`` puts it in eval mode.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.token_to_id(EOT)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> Generator:
        """Load a ``.ckpt`` written by ``azgpt fit`` (safely: tensors and plain data only)."""
        checkpoint = load_checkpoint(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(checkpoint.build_model(device), checkpoint.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    def encode_prompt(self, prompt: str) -> tuple[list[int], int]:
        """Token ids of ``prompt`` cropped from the left to the block size, and how many were dropped."""
        if not isinstance(prompt, str) or not prompt:
            raise AzGPTError("the prompt is empty: give some text to continue, e.g. --prompt \"Azərbaycan\"")
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise AzGPTError(f"the prompt {prompt!r} has no tokens: give some text to continue")
        block_size = self.model.config.block_size
        dropped = max(0, len(ids) - block_size)
        return ids[dropped:], dropped

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[str]:
        """Yield the continuation of ``prompt`` (text or token ids) as text pieces, as soon as each is whole.

        Stops at end-of-text (not yielded) or after ``max_new_tokens`` tokens. A prompt longer than the block
        size is cropped from the left with a warning. ``seed`` makes sampling reproducible; ``use_cache=False``
        recomputes every position each step (slow; for checking the KV cache).
        """
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p)
        ids = self._prompt_ids(prompt)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        tokens = self.model.generate(
            idx, sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, stop_token=self.eot_id, use_cache=use_cache, generator=generator,
        )
        return self._decode(int(token[0]) for token in tokens)

    def generate(self, prompt: str | list[int], **kwargs) -> str:
        """The whole continuation as one string (same arguments as ``stream``)."""
        return "".join(self.stream(prompt, **kwargs))

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids, dropped = self.encode_prompt(prompt)
        else:
            ids = [int(i) for i in prompt]
            if not ids:
                raise AzGPTError("the prompt is empty: give at least one token")
            vocab = self.model.config.vocab_size
            if not all(0 <= i < vocab for i in ids):
                raise AzGPTError(f"prompt token ids must be in [0, {vocab})")
            dropped = max(0, len(ids) - self.model.config.block_size)
            ids = ids[dropped:]
        if dropped:
            warnings.warn(crop_note(dropped + len(ids), len(ids)), stacklevel=3)
        return ids

    def _decode(self, token_ids: Iterator[int]) -> Iterator[str]:
        # DecodeStream holds back tokens that end inside a multi-byte UTF-8 character; whatever it still holds
        # when generation ends is flushed from a full decode of the continuation.
        stream = DecodeStream(skip_special_tokens=False)
        new_ids: list[int] = []
        emitted = 0
        for token_id in token_ids:
            if token_id == self.eot_id:
                break
            new_ids.append(token_id)
            piece = stream.step(self.tokenizer, token_id)
            if piece:
                emitted += len(piece)
                yield piece
        tail = self.tokenizer.decode(new_ids, skip_special_tokens=False)[emitted:]
        if tail:
            yield tail


def crop_note(total: int, kept: int) -> str:
    return f"the prompt has {total} tokens, more than the model's block size: kept the last {kept}"


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
