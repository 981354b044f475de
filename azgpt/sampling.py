"""Sampling text from a GPT with its tokenizer: the decoding loop shared by ``generate``, ``chat`` and the training
callback that writes text samples (KV cache, temperature / top-k / top-p, text streamed as valid UTF-8)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from azgpt.artifact import load_model
from azgpt.data.tokenizer import EOT, encode_text
from azgpt.errors import AzGPTError
from azgpt.model import GPT


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

    def __init__(self, model: GPT, tokenizer: Tokenizer, stop_ids: tuple[int, ...] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.token_to_id(EOT)
        self.stop_ids = {self.eot_id, *stop_ids}  # generation ends at any of them (not yielded)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> Generator:
        """Load a ``.ckpt`` written by ``azgpt fit`` (safely: tensors and plain data only)."""
        checkpoint = load_model(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        template = checkpoint.chat_template  # a fine-tuned model: its reply also ends at the template's end token
        stops = (checkpoint.tokenizer.token_to_id(template["end_token"]),) if template else ()
        return cls(checkpoint.build_model(device), checkpoint.tokenizer, stops)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    def encode_prompt(self, prompt: str) -> tuple[list[int], int]:
        """Token ids of ``prompt`` cropped from the left to the block size, and how many were dropped.

        The prompt is text: special tokens spelled in it (``<|endoftext|>``, a chat template's) stay characters.
        """
        if not isinstance(prompt, str) or not prompt:
            raise AzGPTError("the prompt is empty: give some text to continue, e.g. --prompt \"Azərbaycan\"")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # undecodable bytes of argv arrive as lone surrogates
            raise AzGPTError(f"the prompt is not valid UTF-8 text (bad byte at character {exc.start}): pass the "
                             f"text in UTF-8") from None
        ids = encode_text(self.tokenizer, prompt)
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

        Stops at end-of-text or another of ``stop_ids`` (not yielded) or after ``max_new_tokens`` tokens. A
        prompt longer than the block size is cropped from the left with a warning. ``seed`` makes sampling reproducible; ``use_cache=False``
        recomputes every position each step (slow; for checking the KV cache).
        """
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p)
        check_seed(seed)
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
            if token_id in self.stop_ids:
                break
            new_ids.append(token_id)
            piece = stream.step(self.tokenizer, token_id)
            if piece:
                emitted += len(piece)
                yield piece
        tail = self.tokenizer.decode(new_ids, skip_special_tokens=False)[emitted:]
        if tail:
            yield tail


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def check_seed(seed: int | None, count: int = 1) -> None:
    """Refuse a seed torch cannot take (``count`` seeds from ``seed`` on are used)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - (count - 1):
        raise AzGPTError(f"seed must be an integer from 0 to {MAX_SEED - (count - 1)} (64 bits), got {seed!r}")


def crop_note(total: int, kept: int) -> str:
    return f"the prompt has {total} tokens, more than the model's block size: kept the last {kept}"
