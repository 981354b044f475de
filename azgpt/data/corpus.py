"""Stream normalised Azerbaijani documents from text files, JSON lines or a Hugging Face dataset.

A document is a blank-line-separated block in a text file, one record in a ``.jsonl`` file, or one row
of a dataset. Nothing here holds more than one document (one line for text files) in memory.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from azgpt.errors import AzGPTError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
HF_PREFIX = "hf:"

# Control characters carry no text and confuse the tokenizer; tab and newline are layout and stay.
# A regex, not str.translate: translate looks every character up in a dict and is ~15x slower here.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
# Real Azerbaijani text mixes in the Cyrillic schwa (U+04D9/U+04D8) where it means Latin ə/Ə.
_SCHWA_FOLDS = (("\u04d9", "\u0259"), ("\u04d8", "\u018f"))


def normalize_text(text: str) -> str:
    """Drop control characters, fold Cyrillic schwa to Latin ə/Ə, and compose to Unicode NFC.

    Case is never changed: Azerbaijani I/ı and İ/i would not survive lowercasing.
    """
    text = _CONTROL.sub("", text)
    for cyrillic, latin in _SCHWA_FOLDS:
        if cyrillic in text:
            text = text.replace(cyrillic, latin)
    return unicodedata.normalize("NFC", text)


@dataclass
class CorpusStats:
    """What reading a corpus found: filled in while documents are streamed."""

    files: list[str] = field(default_factory=list)
    documents: int = 0
    replaced_chars: int = 0


def sample_corpus_path() -> Path:
    """The small Azerbaijani corpus that ships inside the package (the default when none is named)."""
    return Path(str(resources.files("azgpt") / "sample_corpus"))


def iter_documents(
    sources: str | Path | Sequence[str | Path] | None,
    *,
    text_field: str = "text",
    errors: str = "strict",
    stats: CorpusStats | None = None,
) -> Iterator[str]:
    """Yield normalised, non-empty documents from each source in order.

    ``sources`` may be a path to a ``.txt``/``.txt.gz``/``.jsonl``/``.jsonl.gz`` file, a folder of those
    (read recursively in sorted order), ``hf:NAME[:SPLIT]`` for a Hugging Face dataset, a list of any of
    these, or None for the shipped sample corpus. ``errors`` is ``"strict"`` (invalid UTF-8 is an error
    naming file and line) or ``"replace"`` (replaced with U+FFFD and counted in ``stats``).
    """
    if errors not in ("strict", "replace"):
        raise AzGPTError(f"--errors must be 'strict' or 'replace', got {errors!r}")
    stats = stats if stats is not None else CorpusStats()
    for source in _as_source_list(sources):
        if isinstance(source, str) and source.startswith(HF_PREFIX):
            documents = _iter_hf_dataset(source[len(HF_PREFIX) :], text_field)
            stats.files.append(source)
        else:
            documents = _iter_path(Path(source), text_field, errors, stats)
        for text in documents:
            text = normalize_text(text).strip()
            if text:
                stats.documents += 1
                yield text


def resolve_corpus_files(sources: str | Path | Sequence[str | Path] | None) -> list[str]:
    """Check every source exists and list the files (or ``hf:`` names) it stands for, in reading order."""
    found: list[str] = []
    for source in _as_source_list(sources):
        if isinstance(source, str) and source.startswith(HF_PREFIX):
            _require_datasets()
            found.append(source)
        else:
            found.extend(str(p) for p in _files_of(Path(source)))
    return found


def _as_source_list(sources: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    if sources is None:
        return [sample_corpus_path()]
    if isinstance(sources, (str, Path)):
        return [sources]
    if not sources:
        raise AzGPTError("no corpus given: name at least one file or folder")
    return list(sources)


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _files_of(path: Path) -> list[Path]:
    if not path.exists():
        raise AzGPTError(f"corpus path {path} does not exist: check the path, or pass a .txt, .txt.gz, "
                         f".jsonl or a folder of them")
    if path.is_file():
        if not _has_suffix(path, TEXT_SUFFIXES + JSONL_SUFFIXES):
            raise AzGPTError(f"corpus file {path} is not .txt, .txt.gz, .jsonl or .jsonl.gz: rename it or "
                             f"convert it to one of those")
        return [path]
    if not path.is_dir():
        raise AzGPTError(f"corpus path {path} is neither a regular file nor a folder (a pipe, socket or device): "
                         f"save the text to a .txt or .jsonl file and pass that")
    files = sorted(p for p in path.rglob("*") if p.is_file() and _has_suffix(p, TEXT_SUFFIXES + JSONL_SUFFIXES))
    if not files:
        raise AzGPTError(f"corpus folder {path} holds no .txt, .txt.gz, .jsonl or .jsonl.gz files")
    return files


def _iter_path(path: Path, text_field: str, errors: str, stats: CorpusStats) -> Iterator[str]:
    for file in _files_of(path):
        stats.files.append(str(file))
        if _has_suffix(file, JSONL_SUFFIXES):
            yield from _iter_jsonl(file, text_field, errors, stats)
        else:
            yield from _iter_text(file, errors, stats)


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decoded_lines(path: Path, errors: str, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) pairs; invalid UTF-8 names the file and line."""
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    if errors == "strict":
                        raise AzGPTError(
                            f"{path}:{number}: invalid UTF-8 at byte {exc.start} of the line: fix the file, "
                            f"or pass --errors replace to replace bad bytes and carry on"
                        ) from None
                    line = raw.decode("utf-8", errors="replace")
                    stats.replaced_chars += line.count("\ufffd") - raw.count("\ufffd".encode())
                yield number, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise AzGPTError(f"{path}: not a readable gzip file ({exc}): re-compress it or decompress it to .txt") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise AzGPTError(f"{path}: cannot read ({exc.strerror})") from None


def _iter_text(path: Path, errors: str, stats: CorpusStats) -> Iterator[str]:
    """Blank-line-separated blocks of lines, each one document."""
    block: list[str] = []
    for _, line in _decoded_lines(path, errors, stats):
        line = line.rstrip("\r\n")
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _iter_jsonl(path: Path, text_field: str, errors: str, stats: CorpusStats) -> Iterator[str]:
    for number, line in _decoded_lines(path, errors, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AzGPTError(f"{path}:{number}: not valid JSON ({exc.msg}): each line must be one JSON object") from None
        if not isinstance(record, dict) or text_field not in record:
            raise AzGPTError(f"{path}:{number}: no {text_field!r} field in this record: "
                             f"pass --text_field NAME to read another field")
        text = record[text_field]
        if not isinstance(text, str):
            raise AzGPTError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, not a string")
        yield text


def _require_datasets() -> None:
    if importlib.util.find_spec("datasets") is None:
        raise AzGPTError("reading a Hugging Face dataset (hf:NAME) needs the optional 'datasets' package: "
                         "pip install 'azgpt[datasets]', or pass a .txt, .txt.gz or .jsonl file instead")


def _iter_hf_dataset(spec: str, text_field: str) -> Iterator[str]:
    """Stream a Hugging Face dataset given as ``NAME`` or ``NAME:SPLIT`` (``datasets`` is an optional extra)."""
    _require_datasets()
    import datasets

    name, _, split = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as exc:  # the library raises many types; the user needs the name and the reason
        raise AzGPTError(f"could not open Hugging Face dataset {name!r} (split {split or 'train'!r}): {exc}") from None
    for row in dataset:
        if text_field not in row:
            raise AzGPTError(f"dataset {name!r} has no {text_field!r} column; pass --text_field with one of "
                             f"{sorted(row)}")
        yield row[text_field]
