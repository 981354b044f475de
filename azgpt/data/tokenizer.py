"""Byte-level BPE tokenizer for Azerbaijani, trained and run by Hugging Face ``tokenizers``."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from azgpt.errors import AzGPTError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT,)
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + 1 + len(SPECIAL_TOKENS)
# Longest piece a document is cut into before it reaches the Rust side (see split_at_line_breaks).
PIECE_CHARS = 16_384


def check_vocab_size(vocab_size: object) -> int:
    """Return ``vocab_size`` as an int, or explain why it cannot be one."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise AzGPTError(
            f"--vocab_size must be an integer of at least {MIN_VOCAB_SIZE} (256 bytes + 1 merge + "
            f"{len(SPECIAL_TOKENS)} special token), got {vocab_size!r}"
        )
    return vocab_size


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with azgpt's normalisation built in.

    The normaliser repeats the corpus reader's NFC and schwa folding so prompts typed at generation time
    are tokenised exactly like the training text.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace("\u04d9", "\u0259"), normalizers.Replace("\u04d8", "\u018f")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(documents: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    normalized: bool = False) -> Tokenizer:
    """Train byte-level BPE on streamed documents; ``<|endoftext|>`` gets id 0.

    ``normalized=True`` says the documents come from ``azgpt.data.corpus`` already normalised, so the
    tokenizer's own normaliser (which would change nothing) is skipped while training.
    """
    check_vocab_size(vocab_size)
    tokenizer = new_tokenizer()
    normalizer = tokenizer.normalizer
    if normalized:
        tokenizer.normalizer = None
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    # Pieces, not whole documents: the word counts are identical (see split_at_line_breaks) and a
    # megabyte-long document no longer costs tens of megabytes of per-byte alignment tables at once.
    pieces = (piece for document in documents for piece in split_at_line_breaks(document))
    tokenizer.train_from_iterator(_batched(pieces), trainer=trainer)
    tokenizer.normalizer = normalizer
    return tokenizer


def split_at_line_breaks(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` whose token ids, concatenated, are the text's own.

    A cut falls just after a newline with non-whitespace on both sides, else just before a space with
    non-whitespace on both sides (the newline or the space-led word is a token of its own for the byte-level
    pre-tokenizer's regex, and NFC never composes across either), so azgpt's pipeline (``new_tokenizer``)
    gives the same ids whether or not the text was cut. Where the piece has no such place, the first one
    within ``4 * max_chars`` is taken; only text with none at all there (no usable whitespace) is cut at that
    limit, which may change a token or two at the cut, and is what bounds memory whatever the input. Written by hand because ``tokenizers`` parallelises over input
    strings only, and builds per-byte tables for each.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        for low in (start + max_chars // 2, start + 1):
            cut = _safe_cut_before(text, low, end)
            if cut < 0:
                cut = _space_cut_before(text, low, end)
            if cut > start:
                break
        else:
            cut = _first_cut_after(text, end, start + 4 * max_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _is_safe_cut(text: str, newline: int) -> bool:
    return 0 < newline < len(text) - 1 and not text[newline - 1].isspace() and not text[newline + 1].isspace()


def _safe_cut_before(text: str, low: int, high: int) -> int:
    """Index just after the last safe newline in ``text[low:high]``, or -1."""
    newline = text.rfind("\n", low, high)
    while newline >= 0:
        if _is_safe_cut(text, newline):
            return newline + 1
        newline = text.rfind("\n", low, newline)
    return -1


def _first_cut_after(text: str, low: int, high: int) -> int:
    """The first safe newline or space cut in ``text[low:high]``, else ``high``."""
    for index in range(low, min(high, len(text) - 1)):
        if text[index] in "\n " and _is_safe_cut(text, index):
            return index + 1 if text[index] == "\n" else index
    return high


def _space_cut_before(text: str, low: int, high: int) -> int:
    """Index of the last space in ``text[low:high]`` with non-whitespace on both sides, or -1."""
    space = text.rfind(" ", low, high)
    while space >= 0:
        if _is_safe_cut(text, space):
            return space
        space = text.rfind(" ", low, space)
    return -1


def splits_like_azgpt(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` normalises and pre-tokenises exactly as azgpt's own, so that
    ``split_at_line_breaks`` leaves its ids unchanged (a foreign ``--tokenizer`` may not)."""
    ours, theirs = json.loads(new_tokenizer().to_str()), json.loads(tokenizer.to_str())
    same_pipeline = all(ours[key] == theirs[key] for key in ("normalizer", "pre_tokenizer"))
    return same_pipeline and not any("\n" in t.content for t in tokenizer.get_added_tokens_decoder().values())


def _batched(texts: Iterable[str], max_items: int = 1000, max_chars: int = 1 << 18) -> Iterator[list[str]]:
    """Lists of texts for ``train_from_iterator``: few Python calls, yet little text held at once."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` and check it has azgpt's end-of-text token."""
    path = Path(path)
    if not path.is_file():
        raise AzGPTError(f"tokenizer file {path} does not exist: pass the tokenizer.json written by prepare")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise AzGPTError(f"{path} is not a Hugging Face tokenizer.json ({exc})") from None
    return check_tokenizer(tokenizer, str(path))


def tokenizer_from_json(content: str, origin: str = "checkpoint") -> Tokenizer:
    """Rebuild a tokenizer from its JSON text (as carried inside a checkpoint)."""
    try:
        tokenizer = Tokenizer.from_str(content)
    except Exception as exc:
        raise AzGPTError(f"the tokenizer stored in {origin} cannot be read ({exc})") from None
    return check_tokenizer(tokenizer, origin)


def check_tokenizer(tokenizer: Tokenizer, origin: str) -> Tokenizer:
    if tokenizer.token_to_id(EOT) is None:
        raise AzGPTError(f"tokenizer from {origin} has no {EOT} token: train it with azgpt prepare")
    return tokenizer


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """Fingerprint of the tokenizer's content (not its file formatting)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def other_tokenizer(recorded_sha256: object, tokenizer: Tokenizer) -> str | None:
    """None when ``recorded_sha256`` (a meta.json's ``tokenizer_sha256``) fingerprints ``tokenizer``; else both
    fingerprints, shortened, for the message that refuses the pair."""
    sha = tokenizer_sha256(tokenizer)
    if recorded_sha256 == sha:
        return None
    return f"sha256 {str(recorded_sha256)[:12]}..., this one {sha[:12]}..."


def eot_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(EOT)


def bits_per_byte(nll: Any, n_bytes: Any) -> Any:
    """Bits per UTF-8 byte from a total NLL in nats over text of ``n_bytes`` bytes (floats or tensors): comparable
    across tokenizers and vocabulary sizes, unlike a loss per token."""
    return nll / (math.log(2) * n_bytes)


# id(tokenizer) -> (tokenizer, its vocabulary size with added tokens, a copy that reads special tokens as text)
_TEXT_ONLY: dict[int, tuple[Tokenizer, int, Tokenizer]] = {}


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of ``text`` as plain text: a special token spelled in it (``<|endoftext|>``, ``<|user|>``...) is
    encoded as its characters, never as the token, so user text cannot forge a document or a chat turn.

    ``tokenizers`` has the switch (``encode_special_tokens``) only on the tokenizer object; it is set on a cached
    copy so that the caller's tokenizer, possibly shared between threads, is never toggled.
    """
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    cached = _TEXT_ONLY.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer or cached[1] != size:
        copy = Tokenizer.from_str(tokenizer.to_str())
        copy.encode_special_tokens = True
        if len(_TEXT_ONLY) >= 8:
            _TEXT_ONLY.clear()
        cached = _TEXT_ONLY[id(tokenizer)] = (tokenizer, size, copy)
    return cached[2].encode(text, add_special_tokens=False).ids


def token_byte_lengths(tokenizer: Tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits-per-byte.

    In byte-level BPE every character of a token's string stands for exactly one byte.
    """
    special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    # and any special token added later, e.g. a chat template's <|user|> / <|end|> (azgpt/data/chat.py)
    special |= {index for index, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    lengths = [0] * tokenizer.get_vocab_size()
    for token, index in tokenizer.get_vocab().items():
        lengths[index] = 0 if index in special else len(token)
    return lengths


def fertility_report(words: int, characters: int, tokens: int) -> str:
    """One line: how many tokens a word costs and how many characters a token holds."""
    tokens_per_word = tokens / max(words, 1)
    chars_per_token = characters / max(tokens, 1)
    return (f"tokenizer: {tokens_per_word:.2f} tokens per word, {chars_per_token:.2f} characters per token "
            f"({tokens:,} tokens, {words:,} words)")
