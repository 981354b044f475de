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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from tokenizers import Tokenizer

from azgpt import __version__
from azgpt.data.corpus import CorpusStats, iter_documents, resolve_corpus_files
from azgpt.errors import AzGPTError
from azgpt.data.tokenizer import (
    PIECE_CHARS,
    check_vocab_size,
    eot_id,
    fertility_report,
    load_tokenizer,
    split_at_line_breaks,
    splits_like_azgpt,
    tokenizer_sha256,
    train_tokenizer,
)

META_VERSION = 1
SPLITS = ("train", "val")
OUTPUT_FILES = ("train.npy", "val.npy", "tokenizer.json", "meta.json")
# Characters per encode_batch call: enough pieces to keep every core busy, few enough to bound memory.
_ENCODE_BATCH_CHARS = 512 * 1024
# A 1-D .npy header is 128 bytes for any length below 10**40: reserve it, stream the ids, then fill it in.
_NPY_HEADER_BYTES = 128


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class PrepareConfig:
    """Train (or reuse) a byte-level BPE tokenizer and write train.npy, val.npy, tokenizer.json and meta.json.

    Args:
        out: folder for the token files.
        corpus: .txt, .txt.gz, .jsonl(.gz), a folder of them, or hf:NAME[:SPLIT] (default: the sample corpus
            shipped with azgpt).
        vocab_size: BPE vocabulary size.
        val_fraction: share of documents held out for validation.
        seed: seed of the train/val split.
        tokenizer: reuse this tokenizer.json instead of training one.
        block_size: context length you will train with: each split must hold one block + 1 token.
        text_field: field of .jsonl records to read.
        errors: invalid UTF-8: stop with an error (strict) or replace and count (replace).
        overwrite: replace token files made by another tokenizer.
    """

    out: Path
    corpus: list[str] | None = None
    vocab_size: int = 8192
    val_fraction: float = 0.05
    seed: int = 1337
    tokenizer: Path | None = None
    block_size: int = 256
    text_field: str = "text"
    errors: Literal["strict", "replace"] = "strict"
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
    requested_vocab_size: int = 0
    dtype: str = ""
    tokenizer_seconds: float = 0.0
    encode_seconds: float = 0.0
    total_seconds: float = 0.0
    replaced_chars: int = 0
    tokenizer_trained: bool = False

    def table(self) -> str:
        """A closing summary a person reads at the end of the run."""
        rows = [f"{'split':<6} {'documents':>10} {'characters':>13} {'tokens':>12} {'chars/token':>12}"]
        for name, c in self.splits.items():
            rows.append(f"{name:<6} {c.documents:>10,} {c.characters:>13,} {c.tokens:>12,} "
                        f"{c.characters / max(c.tokens, 1):>12.2f}")
        mb = sum(c.bytes for c in self.splits.values()) / 1e6
        if self.tokenizer_trained:
            trained = f"tokenizer trained in {self.tokenizer_seconds:.1f}s ({mb / max(self.tokenizer_seconds, 1e-9):.2f} MB/s)"
        else:
            trained = "tokenizer reused"
        rows.append(f"vocab {self.vocab_size:,} ({self.dtype}); {trained}; encoded in {self.encode_seconds:.1f}s "
                    f"({mb / max(self.encode_seconds, 1e-9):.2f} MB/s); total {self.total_seconds:.1f}s "
                    f"for {mb:.2f} MB")
        if self.tokenizer_trained and self.vocab_size < self.requested_vocab_size:
            rows.append(f"note: the corpus ran out of BPE merges at {self.vocab_size:,} tokens, below the requested "
                        f"{self.requested_vocab_size:,}; pass --vocab_size {self.vocab_size} to match")
        rows.append(fertility_report(sum(c.words for c in self.splits.values()),
                                     sum(c.characters for c in self.splits.values()),
                                     sum(c.tokens - c.documents for c in self.splits.values())))
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
        summary.tokenizer_trained = True
    summary.tokenizer_seconds = time.perf_counter() - tokenizer_started
    sha = tokenizer_sha256(tokenizer)
    _check_existing_output(config, sha)

    vocab_size = _vocab_size(tokenizer)
    dtype = token_dtype(vocab_size)
    summary.vocab_size, summary.dtype = vocab_size, dtype.name
    summary.requested_vocab_size = config.vocab_size
    created = [p for p in (config.out, *config.out.parents) if not p.exists()]
    config.out.mkdir(parents=True, exist_ok=True)
    partial = {name: config.out / f".{name}.partial" for name in OUTPUT_FILES}
    complete = False
    try:
        encode_started = time.perf_counter()
        documents = iter_documents(config.corpus, text_field=config.text_field, errors=config.errors, stats=stats)
        summary.splits = _encode_to_files(documents, tokenizer, dtype, config, partial)
        summary.encode_seconds = time.perf_counter() - encode_started
        summary.replaced_chars = stats.replaced_chars
        if stats.documents == 0:
            raise _empty_corpus_error(config)
        _check_split_sizes(summary.splits, config)
        tokenizer.save(str(partial["tokenizer.json"]))
        meta = _meta(config, sources, vocab_size, tokenizer, sha, dtype, summary.splits)
        partial["meta.json"].write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for path in partial.values():
            _fsync(path)
        # meta.json goes first and comes back last: its presence marks a complete, consistent folder.
        (config.out / "meta.json").unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            os.replace(partial[name], config.out / name)
        complete = True
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
        if not complete:
            _remove_empty_folders(created)
    summary.total_seconds = time.perf_counter() - started
    return summary


def _vocab_size(tokenizer: Tokenizer) -> int:
    """One more than the largest id: the size of the embedding table, and what decides the file dtype."""
    return max(tokenizer.get_vocab_size(), max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1)


def _remove_empty_folders(folders: list[Path]) -> None:
    """Undo ``mkdir(parents=True)`` of a failed run (deepest first), keeping any folder that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _check_options(config: PrepareConfig) -> None:
    check_vocab_size(config.vocab_size)
    if not 0.0 < config.val_fraction < 1.0:
        raise AzGPTError(f"--val_fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    if isinstance(config.block_size, bool) or not isinstance(config.block_size, int) or config.block_size < 1:
        raise AzGPTError(f"--block_size must be a positive integer, got {config.block_size!r}")
    if config.out.exists() and not config.out.is_dir():
        raise AzGPTError(f"--out {config.out} exists and is not a folder: choose another path")


def _train_checked(documents: Iterable[str], config: PrepareConfig) -> Tokenizer:
    counter = _CountingIterator(documents)
    tokenizer = train_tokenizer(counter, config.vocab_size, normalized=True)
    if counter.count == 0:
        raise _empty_corpus_error(config)
    return tokenizer


def _empty_corpus_error(config: PrepareConfig) -> AzGPTError:
    corpus = config.corpus
    if corpus is None:
        where = "the sample corpus"
    else:
        where = ", ".join(str(c) for c in ([corpus] if isinstance(corpus, (str, Path)) else corpus))
    return AzGPTError(f"corpus {where} has no text (empty or only whitespace): point --corpus at real text")


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


def _split_of_documents(seed: int, val_fraction: float) -> Iterator[bool]:
    """Deterministic per-document assignment (True: val): the k-th document's split depends on (seed, k) only."""
    rng = np.random.default_rng(seed)
    while True:
        yield from (rng.random(4096) < val_fraction).tolist()


def _encode_to_files(documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, config: PrepareConfig,
                     partial: dict[str, Path]) -> dict[str, SplitCounts]:
    from tqdm.auto import tqdm  # a dependency of lightning; imported here to keep import time low

    encoder = _BatchEncoder(tokenizer, dtype)
    counts = {name: SplitCounts() for name in SPLITS}
    is_val = _split_of_documents(config.seed, config.val_fraction)
    handles = {name: open(partial[f"{name}.npy"], "wb") for name in SPLITS}
    batch = _Batch()
    try:
        for handle in handles.values():
            handle.write(b"\0" * _NPY_HEADER_BYTES)
        with tqdm(desc="encode", unit=" chars", unit_scale=True, disable=None) as progress:
            for document in documents:
                doc_is_val = next(is_val)
                c = counts["val" if doc_is_val else "train"]
                c.documents += 1
                c.bytes += len(document.encode("utf-8"))
                c.characters += len(document)
                pieces = encoder.pieces(document)
                for index, piece in enumerate(pieces, start=1):
                    c.words += len(piece.split())  # cuts never fall inside a word
                    batch.add(piece, doc_is_val, ends_document=index == len(pieces))
                    if batch.chars >= _ENCODE_BATCH_CHARS:
                        encoder.write(batch, handles, counts)
                        progress.update(batch.chars)
                        batch = _Batch()
            encoder.write(batch, handles, counts)
            progress.update(batch.chars)
        for name, handle in handles.items():
            _write_npy_header(handle, dtype, counts[name].tokens)
    finally:
        for handle in handles.values():
            handle.close()
    return counts


class _Batch:
    """Pieces of documents waiting to be encoded together: a long document may span several batches."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.is_val: list[bool] = []
        self.ends_document: list[bool] = []
        self.chars = 0

    def add(self, piece: str, is_val: bool, ends_document: bool) -> None:
        self.pieces.append(piece)
        self.is_val.append(is_val)
        self.ends_document.append(ends_document)
        self.chars += len(piece)


class DocumentEncoder:
    """Token ids of documents exactly as ``prepare`` writes them, in one parallel ``tokenizers`` call per list.

    Long documents are cut into pieces (``split_at_line_breaks``: same ids, more parallelism, and memory
    bounded by the batch, not by the longest document); offsets are never computed (``encode_batch_fast``
    where this ``tokenizers`` has it).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.eot = eot_id(tokenizer)
        # A copy to tune for this job, leaving the caller's tokenizer (saved next to the ids) as it is.
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        # A document that happens to contain the text "<|endoftext|>" is encoded as that text, so the only
        # end-of-text ids in the files are the separators written here.
        self.tokenizer.encode_special_tokens = True
        self.piece_chars: int | None = None
        if splits_like_azgpt(tokenizer):
            self.piece_chars = PIECE_CHARS
            # The corpus reader has already normalised every document; the same pass in Rust changes nothing.
            self.tokenizer.normalizer = None
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    def pieces(self, document: str) -> list[str]:
        return split_at_line_breaks(document, self.piece_chars) if self.piece_chars else [document]

    def encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """The ids of each piece, without special tokens."""
        return [encoding.ids for encoding in self._encode(pieces, add_special_tokens=False)] if pieces else []

    def encode_documents(self, documents: list[str]) -> list[list[int]]:
        """The ids of each (normalised) document, without special tokens."""
        cuts = [self.pieces(document) for document in documents]
        piece_ids = iter(self.encode_pieces([piece for cut in cuts for piece in cut]))
        encoded = []
        for cut in cuts:
            ids: list[int] = []
            for _ in cut:
                ids.extend(next(piece_ids))
            encoded.append(ids)
        return encoded


class _BatchEncoder(DocumentEncoder):
    """Encodes a batch of pieces and appends the ids (+ end-of-text after each document) to the split files."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype):
        super().__init__(tokenizer)
        self.dtype = dtype

    def write(self, batch: _Batch, handles: dict[str, BinaryIO], counts: dict[str, SplitCounts]) -> None:
        """Encode the batch and append each piece's ids (+ end-of-text after a document's last piece) to its split."""
        if not batch.pieces:
            return
        flat: list[int] = []
        piece_tokens: list[int] = []
        for piece_ids, ends_document in zip(self.encode_pieces(batch.pieces), batch.ends_document):
            before = len(flat)
            flat.extend(piece_ids)
            if ends_document:
                flat.append(self.eot)
            piece_tokens.append(len(flat) - before)
        ids = np.array(flat, dtype=np.int64)
        if ids.size and ids.max() > np.iinfo(self.dtype).max:
            raise AzGPTError(f"token id {ids.max()} does not fit in {self.dtype.name}: the tokenizer's vocabulary "
                             f"is larger than it reports; retrain it with azgpt prepare")
        ids = ids.astype(self.dtype.newbyteorder("<"))
        val_mask = np.repeat(np.array(batch.is_val, dtype=bool), piece_tokens)
        for name, in_split in (("train", ~val_mask), ("val", val_mask)):
            ids[in_split].tofile(handles[name])
            counts[name].tokens += int(np.count_nonzero(in_split))


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
                f"change --val_fraction, or lower --block_size"
            )


def _meta(config: PrepareConfig, sources: Sequence[str], vocab_size: int, tokenizer: Tokenizer, sha: str,
          dtype: np.dtype, counts: dict[str, SplitCounts]) -> dict:
    return {
        "format_version": META_VERSION,
        "azgpt_version": __version__,
        "vocab_size": vocab_size,
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


def prepare_command(options: PrepareConfig) -> int:
    """``azgpt prepare``: write the token files and print what was written."""
    print(prepare(options).table())
    return 0
