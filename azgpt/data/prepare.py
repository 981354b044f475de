"""Turn a corpus into ``train.npy``, ``val.npy``, ``tokenizer.json`` and ``meta.json``.

The corpus is read once: its first ``tokenizer_sample`` of text is held to train the tokenizer, then those
documents and the rest of the stream are encoded in batches and their ids stream to disk, so memory does
not grow with the corpus. Every file is written under a temporary name and renamed only when all are
complete: an interrupted run leaves nothing that looks finished. One prepare at a time writes into a folder
(a lock file created exclusively), and temporary files are created exclusively, never through a planted link.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import time
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from tokenizers import Tokenizer

from azgpt import __version__
from azgpt.atomic import FolderLock, create_exclusive, write_error, write_text_exclusive
from azgpt.data.corpus import GZIP_MIN_BYTES, CorpusStats, iter_documents, limit_documents, resolve_corpus_files
from azgpt.data.hub import is_hub_corpus, provenance
from azgpt.errors import AzGPTError
from azgpt.data.tokenizer import (
    PIECE_CHARS,
    check_vocab_size,
    eot_id,
    fertility_report,
    load_tokenizer,
    other_tokenizer,
    split_at_line_breaks,
    splits_like_azgpt,
    tokenizer_sha256,
    train_tokenizer,
)

META_VERSION = 1
SPLITS = ("train", "val")
OUTPUT_FILES = ("train.npy", "val.npy", "tokenizer.json", "meta.json")
LOCK_NAME = ".prepare.lock"
# Characters per encode_batch call: enough pieces to keep every core busy, few enough to bound memory.
_ENCODE_BATCH_CHARS = 512 * 1024
# A 1-D .npy header is 128 bytes for any length below 10**40: reserve it, stream the ids, then fill it in.
_NPY_HEADER_BYTES = 128


# Chosen by measurement (bench/tokenizer_sample.py, vocab 8192, on ../shared/corpus): past 10 MB each doubling
# of the sample bought about 1% fewer tokens per word (2 MB: +7.1%, 5 MB: +1.8%, 10 MB: +1.1% against 20 MB)
# and doubled the training time; 20 MB was the largest sample there was to measure.
DEFAULT_TOKENIZER_SAMPLE = "20MB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: str | int | None, option: str) -> int | None:
    """``"2GB"`` -> 2_000_000_000 (``KiB``/``MiB``/``GiB`` are powers of 1024); None stays None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    match = _SIZE.match(str(value))
    if match is None or float(match.group(1)) <= 0:
        raise AzGPTError(f"{option} {value!r} is not a size: write a positive number of bytes with an optional "
                         f"unit, e.g. 500MB, 2GB or 1.5GiB")
    unit = match.group(2).lower()
    scale = _SIZE_UNITS[unit[:1]] if "i" not in unit else 1024 ** " kmgt".index(unit[0])
    return int(float(match.group(1)) * scale)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class PrepareConfig:
    """Train (or reuse) a byte-level BPE tokenizer and write train.npy, val.npy, tokenizer.json and meta.json.

    Args:
        out: folder for the token files.
        corpus: .txt, .txt.gz, .jsonl(.gz), a folder of them, a named corpus (azgpt corpora lists them) or a
            Hugging Face dataset hf:NAME?config=C&split=S&text_field=F (default: the sample corpus shipped with azgpt).
        vocab_size: BPE vocabulary size.
        val_fraction: share of documents held out for validation.
        seed: seed of the train/val split.
        tokenizer: reuse this tokenizer.json instead of training one.
        block_size: context length you will train with: each split must hold one block + 1 token.
        text_field: field of .jsonl records to read.
        errors: invalid UTF-8: stop with an error (strict) or replace and count (replace).
        overwrite: replace token files made by another tokenizer or from another corpus.
        max_docs: read only the first N documents of the corpus.
        max_bytes: read only the first SIZE of text (whole documents; e.g. 500MB, 2GB).
        tokenizer_sample: train the tokenizer on at most this much of the corpus's first text (e.g. 50MB);
            null trains on all of it (held in memory).
        val_corpus: take validation from this corpus (e.g. fineweb2-az?split=test, a dataset's published
            split) instead of holding out val_fraction of the documents; it is read whole.
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
    max_docs: int | None = None
    max_bytes: str | None = None
    tokenizer_sample: str | None = DEFAULT_TOKENIZER_SAMPLE
    val_corpus: list[str] | None = None


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
    repeated_sources: list[str] = field(default_factory=list)
    shared_documents: int = 0  # distinct val documents whose exact text is also in train
    tokenizer_sample_bytes: int = 0

    def table(self) -> str:
        """A closing summary a person reads at the end of the run."""
        rows = [f"{'split':<6} {'documents':>10} {'characters':>13} {'tokens':>12} {'chars/token':>12}"]
        for name, c in self.splits.items():
            rows.append(f"{name:<6} {c.documents:>10,} {c.characters:>13,} {c.tokens:>12,} "
                        f"{c.characters / max(c.tokens, 1):>12.2f}")
        mb = sum(c.bytes for c in self.splits.values()) / 1e6
        if self.tokenizer_trained:
            sample = self.tokenizer_sample_bytes
            trained = (f"tokenizer trained on the first {sample:,} bytes in {self.tokenizer_seconds:.1f}s "
                       f"({sample / 1e6 / max(self.tokenizer_seconds, 1e-9):.2f} MB/s)")
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
        for source in self.repeated_sources:
            rows.append(f"warning: --corpus names {source} more than once: read it once")
        if self.shared_documents:
            rows.append(f"warning: {self.shared_documents:,} val documents also appear word for word in train: "
                        f"val_loss will flatter the model; deduplicate the corpus")
        rows.append(f"wrote {self.out}/{{{','.join(OUTPUT_FILES)}}}")
        return "\n".join(rows)


def read_meta(data_dir: Path) -> dict | None:
    """The ``meta.json`` of a prepared folder, or None when it has none."""
    path = data_dir / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AzGPTError(f"{path} is not valid JSON ({exc}): delete {data_dir} and run prepare again") from None
    if not isinstance(meta, dict):
        raise AzGPTError(f"{path} holds a JSON {type(meta).__name__}, not the object azgpt prepare writes: "
                         f"prepare the folder again (azgpt prepare --overwrite)")
    return meta


def prepare(config: PrepareConfig) -> PrepareSummary:
    """Train or load the tokenizer, encode the corpus and write the token files; see the module doc."""
    started = time.perf_counter()
    _check_options(config)
    summary = PrepareSummary(out=config.out)
    config, summary.repeated_sources = _without_repeated_sources(config)
    sources = resolve_corpus_files(config.corpus)  # fails early on a missing path
    val_sources = resolve_corpus_files(config.val_corpus) if config.val_corpus else []
    max_bytes = parse_size(config.max_bytes, "--max_bytes")
    sample_bytes = parse_size(config.tokenizer_sample, "--tokenizer_sample")
    created = [p for p in (config.out, *config.out.parents) if not p.exists()]
    complete = False
    try:
        config.out.mkdir(parents=True, exist_ok=True)
        # Held from before the tokenizer is trained: a second prepare stops at once instead of after its training,
        # and no other prepare can change the folder between the checks and the renames.
        with FolderLock(config.out, "azgpt prepare", LOCK_NAME):
            _prepare_locked(config, sources, val_sources, max_bytes, sample_bytes, summary)
        complete = True
    except OSError as exc:
        error = write_error(exc, config.out, "--out")
        if error is None:
            raise
        raise error from None
    finally:
        if not complete:
            _remove_empty_folders(created)
    summary.total_seconds = time.perf_counter() - started
    return summary


def _prepare_locked(config: PrepareConfig, sources: list[str], val_sources: list[str], max_bytes: int | None,
                    sample_bytes: int | None, summary: PrepareSummary) -> None:
    stats = CorpusStats()
    documents = limit_documents(
        iter_documents(config.corpus, text_field=config.text_field, errors=config.errors, stats=stats),
        config.max_docs, max_bytes)
    tokenizer_started = time.perf_counter()
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        sample = _take_sample(documents, sample_bytes)
        tokenizer = _train_checked(sample, config)
        documents = itertools.chain(sample, documents)  # the sample is encoded too: the corpus is read once
        summary.tokenizer_trained = True
        summary.tokenizer_sample_bytes = sum(len(d.encode("utf-8")) for d in sample)
        del sample
    summary.tokenizer_seconds = time.perf_counter() - tokenizer_started
    sha = tokenizer_sha256(tokenizer)
    _check_existing_output(config, tokenizer, sources)

    vocab_size = _vocab_size(tokenizer)
    dtype = token_dtype(vocab_size)
    summary.vocab_size, summary.dtype = vocab_size, dtype.name
    summary.requested_vocab_size = config.vocab_size
    partial = {name: config.out / f".{name}.partial" for name in OUTPUT_FILES}
    try:
        encode_started = time.perf_counter()
        if config.val_corpus:
            val_documents = iter_documents(config.val_corpus, text_field=config.text_field, errors=config.errors,
                                           stats=stats)
            labelled = itertools.chain(((d, False) for d in documents), ((d, True) for d in val_documents))
        else:
            labelled = zip(documents, _split_of_documents(config.seed, config.val_fraction))
        expected = max_bytes or _expected_text_bytes(sources + val_sources)
        summary.splits, summary.shared_documents = _encode_to_files(labelled, tokenizer, dtype, partial, expected)
        summary.encode_seconds = time.perf_counter() - encode_started
        summary.replaced_chars = stats.replaced_chars
        if stats.documents == 0:
            raise _empty_corpus_error(config)
        _check_split_sizes(summary.splits, config)
        write_text_exclusive(partial["tokenizer.json"], tokenizer.to_str(pretty=True), replace_leftover=True)
        meta = _meta(config, sources, val_sources, vocab_size, tokenizer, sha, dtype, summary)
        write_text_exclusive(partial["meta.json"], json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                             replace_leftover=True)
        # meta.json goes first and comes back last: its presence marks a complete, consistent folder.
        (config.out / "meta.json").unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            os.replace(partial[name], config.out / name)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)


def _without_repeated_sources(config: PrepareConfig) -> tuple[PrepareConfig, list[str]]:
    """``config`` with each corpus path named once (the same file twice would put its documents in both splits)."""
    if config.corpus is None or isinstance(config.corpus, (str, Path)):
        return config, []
    kept: list[str] = []
    seen: set[str] = set()
    repeated: list[str] = []
    for source in config.corpus:
        source = str(source)
        key = source if source.startswith("hf:") else os.path.realpath(source)
        if key in seen:
            if source not in repeated:
                repeated.append(source)
            continue
        seen.add(key)
        kept.append(source)
    if not repeated:
        return config, []
    return dataclasses.replace(config, corpus=kept), repeated


def _take_sample(documents: Iterator[str], max_bytes: int | None) -> list[str]:
    """The first documents of the stream up to ``max_bytes`` of UTF-8 (all of them for None), held in memory."""
    sample: list[str] = []
    size = 0
    for document in documents:
        sample.append(document)
        size += len(document.encode("utf-8"))
        if max_bytes is not None and size >= max_bytes:
            break
    return sample


def _expected_text_bytes(sources: Sequence[str]) -> int | None:
    """About how many bytes of text the local files hold (for the progress bar's ETA); None when unknown."""
    total = 0
    for source in sources:
        if is_hub_corpus(source):
            return None
        path = Path(source)
        if path.name.lower().endswith(".gz"):
            if path.stat().st_size < GZIP_MIN_BYTES:
                continue  # not a gzip file at all: the corpus reader refuses it, naming it
            with open(path, "rb") as handle:  # gzip's trailer holds the uncompressed size (mod 4 GiB)
                handle.seek(-4, os.SEEK_END)
                total += int.from_bytes(handle.read(4), "little")
        else:
            total += path.stat().st_size
    return total


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
    if config.max_docs is not None and (isinstance(config.max_docs, bool) or config.max_docs < 1):
        raise AzGPTError(f"--max_docs must be a positive integer, got {config.max_docs!r}")
    if config.val_corpus is not None and not config.val_corpus:
        raise AzGPTError("--val_corpus names no corpus: give one, or leave it out to hold out --val_fraction")
    parse_size(config.max_bytes, "--max_bytes")
    parse_size(config.tokenizer_sample, "--tokenizer_sample")
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


def _check_existing_output(config: PrepareConfig, tokenizer: Tokenizer, sources: Sequence[str]) -> None:
    if config.overwrite or not config.out.is_dir():
        return
    meta = read_meta(config.out)
    if meta is None:
        leftovers = [n for n in OUTPUT_FILES if (config.out / n).exists()]
        if leftovers:
            raise AzGPTError(f"--out {config.out} already holds {', '.join(leftovers)} without a meta.json: "
                             f"pass --overwrite to replace them, or choose another folder")
        return
    other = other_tokenizer(meta.get("tokenizer_sha256"), tokenizer)
    if other:
        raise AzGPTError(f"--out {config.out} holds token files made by a different tokenizer ({other}): "
                         f"pass --overwrite to replace them, or choose another folder")
    difference = prepared_from_other_data(config.out, meta, config.corpus, config.val_corpus, config.max_bytes,
                                          option="--", remedy="pass --overwrite to replace them, or choose another "
                                                              "folder", null_accepts_any=False)
    if difference:
        raise AzGPTError(f"--out {config.out} holds token files of other data: {difference}")


def _as_prepared(sources: Sequence[str | Path] | None) -> list[str]:
    """What prepare would record as the sources of ``sources``, without requiring them to exist still (a folder
    prepared from a file that has since moved must keep working) or the datasets package."""
    if sources is None:
        return resolve_corpus_files(None)
    listed: list[str] = []
    for source in dict.fromkeys(str(s) for s in sources):  # prepare drops repeated sources too
        try:
            listed += [source] if is_hub_corpus(source) else resolve_corpus_files([source])
        except AzGPTError:
            listed.append(source)
    return listed


def _same_sources(recorded: Sequence[str], configured: Sequence[str], sample: bool) -> bool:
    if sample:  # the sample corpus moves with each install: its files' names are what identify it
        return sorted(Path(s).name for s in recorded) == sorted(Path(s).name for s in configured)
    return _comparable(recorded) == _comparable(configured)


def prepared_from_other_data(data_dir: Path, meta: dict, corpus: Sequence[str] | None,
                             val_corpus: Sequence[str] | None, max_bytes: str | None, option: str = "data.",
                             remedy: str | None = None, null_accepts_any: bool = True) -> str | None:
    """Why the token files in ``data_dir`` (described by ``meta``) are not what ``corpus``, ``val_corpus`` and
    ``max_bytes`` would prepare, in one line naming both sides (options spelled ``{option}corpus``); None when
    they are. With ``null_accepts_any`` (fit's reading) a setting left null accepts what the folder holds, so
    ``azgpt prepare --corpus mine/ --out d`` then ``fit --config quickstart.yaml --data.data_dir d`` works; for
    prepare itself a null corpus means the sample corpus and is compared like any other."""
    remedy = remedy or (f"point data.data_dir at a new folder to prepare this data there, or delete {data_dir} (or "
                        f"run azgpt prepare --out {data_dir} --overwrite) to prepare it again")
    recorded = [str(s) for s in meta.get("source") or []]
    if corpus is None and null_accepts_any:
        pass
    elif recorded and not _same_sources(recorded, _as_prepared(corpus), corpus is None):
        wanted = "null (the sample corpus)" if corpus is None else ", ".join(map(str, corpus))
        had = ("the sample corpus" if _same_sources(recorded, _as_prepared(None), sample=True)
               else ", ".join(recorded))
        return f"{option}corpus is {wanted} but {data_dir} was prepared from {had}: {remedy}"
    recorded_val = [str(s) for s in meta.get("val_source") or []]
    configured_val = _as_prepared(val_corpus) if val_corpus else []
    if val_corpus is None and null_accepts_any:
        pass
    elif ("source" in meta and (bool(recorded_val) != bool(configured_val)
                              or (recorded_val and not _same_sources(recorded_val, configured_val, False)))):
        wanted = ", ".join(map(str, val_corpus)) if val_corpus else "null (val_fraction of the corpus)"
        had = ", ".join(recorded_val) if recorded_val else f"val_fraction {meta.get('val_fraction')} of the corpus"
        return f"{option}val_corpus is {wanted} but {data_dir} took its validation text from {had}: {remedy}"
    recorded_bytes = (meta.get("slice") or {}).get("max_bytes")
    wanted_bytes = parse_size(max_bytes, f"{option}max_bytes")
    if "source" in meta and recorded_bytes != wanted_bytes and not (max_bytes is None and null_accepts_any):
        def shown(size: int | None) -> str:
            return "null (all of it)" if size is None else f"{size:,} bytes"
        return (f"{option}max_bytes is {shown(wanted_bytes)} but {data_dir} was prepared from a slice of "
                f"{shown(recorded_bytes)}: {remedy}")
    return None


def _comparable(sources: Sequence[str]) -> list[str]:
    """Sources as real paths (``./a.txt`` and ``a.txt`` are one file); ``hf:`` names as they are."""
    return [str(s) if str(s).startswith("hf:") else os.path.realpath(str(s)) for s in sources]


def _split_of_documents(seed: int, val_fraction: float) -> Iterator[bool]:
    """Deterministic per-document assignment (True: val): the k-th document's split depends on (seed, k) only."""
    rng = np.random.default_rng(seed)
    while True:
        yield from (rng.random(4096) < val_fraction).tolist()


def _encode_to_files(labelled: Iterable[tuple[str, bool]], tokenizer: Tokenizer, dtype: np.dtype,
                     partial: dict[str, Path], expected_bytes: int | None) -> tuple[dict[str, SplitCounts], int]:
    """Encode (document, goes to val) pairs in batches into the two partial .npy files; return the counts per
    split and how many distinct val documents also occur in train (an 8-byte hash per document)."""
    from tqdm.auto import tqdm  # a dependency of lightning; imported here to keep import time low

    encoder = _BatchEncoder(tokenizer, dtype)
    counts = {name: SplitCounts() for name in SPLITS}
    handles: dict[str, BinaryIO] = {}
    hashes = {name: _Hashes() for name in SPLITS}
    batch = _Batch()
    try:
        for name in SPLITS:
            handles[name] = create_exclusive(partial[f"{name}.npy"], replace_leftover=True)
        for handle in handles.values():
            handle.write(b"\0" * _NPY_HEADER_BYTES)
        with tqdm(desc="encode", total=expected_bytes, unit="B", unit_scale=True, disable=None) as progress:
            for document, doc_is_val in labelled:
                split = "val" if doc_is_val else "train"
                c = counts[split]
                c.documents += 1
                encoded = document.encode("utf-8")
                c.bytes += len(encoded)
                batch.bytes += len(encoded)
                hashes[split].add(encoded)
                c.characters += len(document)
                pieces = encoder.pieces(document)
                for index, piece in enumerate(pieces, start=1):
                    c.words += len(piece.split())  # cuts never fall inside a word
                    batch.add(piece, doc_is_val, ends_document=index == len(pieces))
                    if batch.chars >= _ENCODE_BATCH_CHARS:
                        batch = _flush(encoder, batch, handles, counts, progress)
            _flush(encoder, batch, handles, counts, progress)
        for name, handle in handles.items():
            _write_npy_header(handle, dtype, counts[name].tokens)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in handles.values():
            handle.close()
    shared = np.intersect1d(hashes["train"].array(), hashes["val"].array())
    return counts, int(shared.size)


class _Hashes:
    """64-bit BLAKE2 digests of documents, kept in compact arrays (8 bytes each, not a Python int per document)."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._pending: list[bytes] = []

    def add(self, encoded: bytes) -> None:
        self._pending.append(hashlib.blake2b(encoded, digest_size=8).digest())
        if len(self._pending) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._chunks.append(np.frombuffer(b"".join(self._pending), dtype=np.uint64))
            self._pending = []

    def array(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.uint64)


def _flush(encoder: _BatchEncoder, batch: _Batch, handles: dict[str, BinaryIO], counts: dict[str, SplitCounts],
           progress) -> _Batch:
    encoder.write(batch, handles, counts)
    progress.update(batch.bytes)
    progress.set_postfix(docs=f"{sum(c.documents for c in counts.values()):,}", refresh=False)
    return _Batch()


class _Batch:
    """Pieces of documents waiting to be encoded together: a long document may span several batches."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.is_val: list[bool] = []
        self.ends_document: list[bool] = []
        self.chars = 0
        self.bytes = 0  # UTF-8 bytes of the documents begun in this batch, for the progress bar

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


def _meta(config: PrepareConfig, sources: Sequence[str], val_sources: Sequence[str], vocab_size: int,
          tokenizer: Tokenizer, sha: str, dtype: np.dtype, summary: PrepareSummary) -> dict:
    meta = {
        "format_version": META_VERSION,
        "azgpt_version": __version__,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eot_id": eot_id(tokenizer),
        "tokenizer_file": "tokenizer.json",
        "tokenizer_sha256": sha,
        "source": list(sources),
        "val_fraction": None if val_sources else config.val_fraction,
        "seed": config.seed,
        "normalization": "NFC, control characters dropped, Cyrillic schwa folded to Latin",
        "splits": {name: vars(c) for name, c in summary.splits.items()},
    }
    if val_sources:
        meta["val_source"] = list(val_sources)
    corpora = [provenance(s) for s in [*sources, *val_sources] if is_hub_corpus(s)]
    if corpora:
        meta["corpora"] = corpora  # dataset, config, split, and for named corpora licence and url
    if config.max_docs is not None or config.max_bytes is not None:
        meta["slice"] = {"max_docs": config.max_docs, "max_bytes": parse_size(config.max_bytes, "--max_bytes")}
    if summary.tokenizer_trained:
        meta["tokenizer_sample_bytes"] = summary.tokenizer_sample_bytes
    return meta


def prepare_command(options: PrepareConfig) -> int:
    """``azgpt prepare``: write the token files and print what was written."""
    print(prepare(options).table())
    return 0
