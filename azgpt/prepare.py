"""Turn a corpus into ``train.npy``, ``val.npy``, ``tokenizer.json`` and ``meta.json``.

Documents stream through the tokenizer in batches and their ids stream to disk, so memory does not
grow with the corpus. Every file is written under a temporary name and renamed only when all are
complete: an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer

from azgpt import __version__
from azgpt.corpus import CorpusStats, iter_documents, resolve_corpus_files
from azgpt.errors import AzGPTError
from azgpt.tokenizer import (
    check_vocab_size,
    eot_id,
    fertility_report,
    load_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)

META_VERSION = 1
SPLITS = ("train", "val")
OUTPUT_FILES = ("train.npy", "val.npy", "tokenizer.json", "meta.json")
_ENCODE_BATCH_CHARS = 2_000_000
# A 1-D .npy header is 128 bytes for any length below 10**40: reserve it, stream the ids, then fill it in.
_NPY_HEADER_BYTES = 128


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class PrepareConfig:
    """Options of ``azgpt prepare``."""

    out: Path
    corpus: list[str] | None = None  # None: the sample corpus shipped with azgpt
    vocab_size: int = 8192
    val_fraction: float = 0.05
    seed: int = 1337
    tokenizer: Path | None = None  # reuse this tokenizer.json instead of training one
    block_size: int = 256  # both splits must hold at least one block of block_size + 1 tokens
    text_field: str = "text"
    errors: str = "strict"
    overwrite: bool = False


@dataclass
class SplitCounts:
    documents: int = 0
    characters: int = 0
    words: int = 0
    bytes: int = 0
    tokens: int = 0


@dataclass
class PrepareSummary:
    """What ``prepare`` wrote and how long it took."""

    out: Path
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    vocab_size: int = 0
    dtype: str = ""
    tokenizer_seconds: float = 0.0
    encode_seconds: float = 0.0
    total_seconds: float = 0.0
    replaced_chars: int = 0

    def table(self) -> str:
        """A closing summary a person reads at the end of the run."""
        rows = [f"{'split':<6} {'documents':>10} {'characters':>13} {'tokens':>12} {'chars/token':>12}"]
        for name, c in self.splits.items():
            rows.append(f"{name:<6} {c.documents:>10,} {c.characters:>13,} {c.tokens:>12,} "
                        f"{c.characters / max(c.tokens, 1):>12.2f}")
        mb = sum(c.bytes for c in self.splits.values()) / 1e6
        rows.append(f"vocab {self.vocab_size:,} ({self.dtype}); tokenizer {self.tokenizer_seconds:.1f}s, "
                    f"encode {self.encode_seconds:.1f}s ({mb / max(self.encode_seconds, 1e-9):.2f} MB/s), "
                    f"total {self.total_seconds:.1f}s for {mb:.2f} MB")
        if self.replaced_chars:
            rows.append(f"replaced {self.replaced_chars:,} invalid UTF-8 sequences with U+FFFD")
        rows.append(f"wrote {self.out}/{{{','.join(OUTPUT_FILES)}}}")
        return "\n".join(rows)


def read_meta(data_dir: Path) -> dict | None:
    """The ``meta.json`` of a prepared folder, or None when it has none."""
    path = data_dir / "meta.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AzGPTError(f"{path} is not valid JSON ({exc}): delete {data_dir} and run prepare again") from None


def prepare(config: PrepareConfig) -> PrepareSummary:
    """Train or load the tokenizer, encode the corpus and write the token files; see the module doc."""
    started = time.perf_counter()
    _check_options(config)
    sources = resolve_corpus_files(config.corpus)  # fails early on a missing path
    summary = PrepareSummary(out=config.out)
    stats = CorpusStats()

    tokenizer_started = time.perf_counter()
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        documents = iter_documents(config.corpus, text_field=config.text_field, errors=config.errors)
        tokenizer = _train_checked(documents, config)
    summary.tokenizer_seconds = time.perf_counter() - tokenizer_started
    sha = tokenizer_sha256(tokenizer)
    _check_existing_output(config, sha)

    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    summary.vocab_size, summary.dtype = vocab_size, dtype.name
    config.out.mkdir(parents=True, exist_ok=True)
    partial = {name: config.out / f".{name}.partial" for name in OUTPUT_FILES}
    try:
        encode_started = time.perf_counter()
        documents = iter_documents(config.corpus, text_field=config.text_field, errors=config.errors, stats=stats)
        summary.splits = _encode_to_files(documents, tokenizer, dtype, config, partial)
        summary.encode_seconds = time.perf_counter() - encode_started
        summary.replaced_chars = stats.replaced_chars
        _check_split_sizes(summary.splits, config)
        tokenizer.save(str(partial["tokenizer.json"]))
        meta = _meta(config, sources, tokenizer, sha, dtype, summary.splits)
        partial["meta.json"].write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for path in partial.values():
            _fsync(path)
        # meta.json goes first and comes back last: its presence marks a complete, consistent folder.
        (config.out / "meta.json").unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            os.replace(partial[name], config.out / name)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    words = sum(c.words for c in summary.splits.values())
    chars = sum(c.characters for c in summary.splits.values())
    tokens = sum(c.tokens for c in summary.splits.values())
    print(fertility_report(words, chars, tokens))
    summary.total_seconds = time.perf_counter() - started
    return summary


def _check_options(config: PrepareConfig) -> None:
    check_vocab_size(config.vocab_size)
    if not 0.0 < config.val_fraction < 1.0:
        raise AzGPTError(f"--val-fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    if isinstance(config.block_size, bool) or not isinstance(config.block_size, int) or config.block_size < 1:
        raise AzGPTError(f"--block-size must be a positive integer, got {config.block_size!r}")
    if config.out.exists() and not config.out.is_dir():
        raise AzGPTError(f"--out {config.out} exists and is not a folder: choose another path")


def _train_checked(documents, config: PrepareConfig) -> Tokenizer:
    counter = _CountingIterator(documents)
    tokenizer = train_tokenizer(counter, config.vocab_size)
    if counter.count == 0:
        where = ", ".join(config.corpus) if config.corpus else "the sample corpus"
        raise AzGPTError(f"corpus {where} has no text (empty or only whitespace): point --corpus at real text")
    return tokenizer


class _CountingIterator:
    """Counts what passes through, so an empty corpus is noticed after tokenizer training streams it."""

    def __init__(self, items):
        self._items = iter(items)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.count += 1
        return item


def _check_existing_output(config: PrepareConfig, sha: str) -> None:
    if config.overwrite or not config.out.is_dir():
        return
    meta = read_meta(config.out)
    if meta is None:
        leftovers = [n for n in OUTPUT_FILES if (config.out / n).exists()]
        if leftovers:
            raise AzGPTError(f"--out {config.out} already holds {', '.join(leftovers)} without a meta.json: "
                             f"pass --overwrite to replace them, or choose another folder")
        return
    if meta.get("tokenizer_sha256") != sha:
        raise AzGPTError(f"--out {config.out} holds token files made by a different tokenizer "
                         f"(sha256 {str(meta.get('tokenizer_sha256'))[:12]}..., this one {sha[:12]}...): "
                         f"pass --overwrite to replace them, or choose another folder")


def _split_of_documents(seed: int, val_fraction: float):
    """Deterministic per-document assignment: the k-th document's split depends on (seed, k) only."""
    rng = np.random.default_rng(seed)
    while True:
        for draw in rng.random(4096):
            yield "val" if draw < val_fraction else "train"


def _encode_to_files(documents, tokenizer: Tokenizer, dtype: np.dtype, config: PrepareConfig,
                     partial: dict[str, Path]) -> dict[str, SplitCounts]:
    from tqdm.auto import tqdm  # a dependency of lightning; imported here to keep import time low

    counts = {name: SplitCounts() for name in SPLITS}
    eot = eot_id(tokenizer)
    splits = _split_of_documents(config.seed, config.val_fraction)
    handles = {name: open(partial[f"{name}.npy"], "wb") for name in SPLITS}
    pending: dict[str, list[str]] = {name: [] for name in SPLITS}
    pending_chars = 0
    try:
        for handle in handles.values():
            handle.write(b"\0" * _NPY_HEADER_BYTES)
        with tqdm(desc="encode", unit="B", unit_scale=True, disable=None) as progress:
            for document in documents:
                split = next(splits)
                pending[split].append(document)
                pending_chars += len(document)
                if pending_chars >= _ENCODE_BATCH_CHARS:
                    progress.update(_flush(pending, tokenizer, eot, dtype, handles, counts))
                    pending_chars = 0
            progress.update(_flush(pending, tokenizer, eot, dtype, handles, counts))
        for name, handle in handles.items():
            _write_npy_header(handle, dtype, counts[name].tokens)
    finally:
        for handle in handles.values():
            handle.close()
    return counts


def _flush(pending: dict[str, list[str]], tokenizer: Tokenizer, eot: int, dtype: np.dtype,
           handles: dict[str, BinaryIO], counts: dict[str, SplitCounts]) -> int:
    """Encode the pending documents of each split in one parallel batch and append their ids."""
    written_bytes = 0
    for name, batch in pending.items():
        if not batch:
            continue
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        ids: list[int] = []
        for encoding in encodings:
            ids.extend(encoding.ids)
            ids.append(eot)
        try:
            array = np.asarray(ids, dtype=dtype)
        except OverflowError:
            raise AzGPTError(f"token id {max(ids)} does not fit in {dtype.name}: the tokenizer's vocabulary "
                             f"is larger than it reports; retrain it with azgpt prepare") from None
        array.astype(dtype.newbyteorder("<"), copy=False).tofile(handles[name])
        c = counts[name]
        c.documents += len(batch)
        c.tokens += array.size
        for document in batch:
            size = len(document.encode("utf-8"))
            c.bytes += size
            c.characters += len(document)
            c.words += len(document.split())
            written_bytes += size
        batch.clear()
    return written_bytes


def _write_npy_header(handle: BinaryIO, dtype: np.dtype, length: int) -> None:
    header = io.BytesIO()
    header_fields = {"descr": np.lib.format.dtype_to_descr(dtype.newbyteorder("<")),
                     "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(header, header_fields)
    if len(header.getvalue()) != _NPY_HEADER_BYTES:
        raise RuntimeError(f"unexpected .npy header size {len(header.getvalue())}")
    handle.seek(0)
    handle.write(header.getvalue())


def _check_split_sizes(counts: dict[str, SplitCounts], config: PrepareConfig) -> None:
    needed = config.block_size + 1
    for name in SPLITS:
        if counts[name].tokens < needed:
            total = sum(c.tokens for c in counts.values())
            raise AzGPTError(
                f"corpus too small: the {name} split has {counts[name].tokens:,} tokens "
                f"({counts[name].documents} documents) but needs at least {needed:,} (block_size + 1) "
                f"out of {total:,} tokens in all; add text (blank lines separate documents), "
                f"change --val-fraction, or lower --block-size"
            )


def _meta(config: PrepareConfig, sources: Sequence[str], tokenizer: Tokenizer, sha: str, dtype: np.dtype,
          counts: dict[str, SplitCounts]) -> dict:
    return {
        "format_version": META_VERSION,
        "azgpt_version": __version__,
        "vocab_size": tokenizer.get_vocab_size(),
        "dtype": dtype.name,
        "eot_id": eot_id(tokenizer),
        "tokenizer_file": "tokenizer.json",
        "tokenizer_sha256": sha,
        "source": list(sources),
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "normalization": "NFC, control characters dropped, Cyrillic schwa folded to Latin",
        "splits": {name: vars(c) for name, c in counts.items()},
    }


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
