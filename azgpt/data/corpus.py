"""Stream normalised Azerbaijani documents from text files, JSON lines or a Hugging Face dataset.

A document is a blank-line-separated block in a text file, one record in a ``.jsonl`` file, or one row
of a dataset. Memory is bounded whatever the input: text files are read in pieces of at most
``READ_BYTES`` and any document longer than ``MAX_DOCUMENT_CHARS`` is cut into several (at whitespace where
there is some), so a corpus with no line breaks costs no more than one with many.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from azgpt.data.hub import HF_PREFIX  # noqa: F401  (re-exported: it lived here before azgpt.data.hub)
from azgpt.data.hub import is_hub_corpus, iter_hub_texts, require_datasets, unknown_corpus_error
from azgpt.errors import AzGPTError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Longest document handed on (characters; about 1-2 MB of UTF-8): a longer one becomes several documents,
# each ending in end-of-text. Real documents are rarely this long; a file with no blank lines often is.
MAX_DOCUMENT_CHARS = 1 << 20
# Most bytes of a text file read at once: a longer line arrives in pieces cut at whitespace.
READ_BYTES = 1 << 20
_WHITESPACE = re.compile(r"\s")

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
    (read recursively in sorted order), a Hugging Face dataset (``hf:NAME?config=C&split=S&text_field=F``,
    see ``azgpt.data.hub``), a named corpus (``fineweb2-az``), a list of any of these, or None for the
    shipped sample corpus. ``errors`` is ``"strict"`` (invalid UTF-8 is an error naming file and line) or
    ``"replace"`` (replaced with U+FFFD and counted in ``stats``). No document is longer than
    ``MAX_DOCUMENT_CHARS``.
    """
    if errors not in ("strict", "replace"):
        raise AzGPTError(f"--errors must be 'strict' or 'replace', got {errors!r}")
    stats = stats if stats is not None else CorpusStats()
    for source in _as_source_list(sources):
        if is_hub_corpus(source):
            documents = iter_hub_texts(str(source), text_field)
            stats.files.append(str(source))
        else:
            documents = _iter_path(Path(source), text_field, errors, stats)
        for text in documents:
            for part in split_long_text(text, MAX_DOCUMENT_CHARS):
                part = normalize_text(part).strip()
                if part:
                    stats.documents += 1
                    yield part


def limit_documents(documents: Iterable[str], max_docs: int | None = None,
                    max_bytes: int | None = None) -> Iterator[str]:
    """The first documents of a stream: at most ``max_docs`` of them, whole, within ``max_bytes`` of UTF-8."""
    taken = size = 0
    for document in documents:
        if max_docs is not None and taken >= max_docs:
            return
        if max_bytes is not None:
            size += len(document.encode("utf-8"))
            if size > max_bytes and taken == 0:
                raise AzGPTError(f"the corpus's first document alone is {size:,} bytes, more than --max_bytes "
                                 f"{max_bytes:,}, and a slice takes whole documents only: raise --max_bytes")
            if size > max_bytes:
                return
        taken += 1
        yield document


def split_long_text(text: str, max_chars: int) -> list[str]:
    """``text`` in parts of at most ``max_chars``, each cut after the last whitespace in its second half
    (else at ``max_chars``), so no part can blow up what later holds it whole."""
    if len(text) <= max_chars:
        return [text]
    parts, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max((m.end() for m in _WHITESPACE.finditer(text, start + max_chars // 2, end)), default=end)
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


def resolve_corpus_files(sources: str | Path | Sequence[str | Path] | None) -> list[str]:
    """Check every source exists and list the files (or dataset names) it stands for, in reading order."""
    found: list[str] = []
    for source in _as_source_list(sources):
        if is_hub_corpus(source):
            require_datasets()
            found.append(str(source))
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
        if not path.suffix and len(path.parts) == 1:  # a bare word: meant as a corpus name
            raise unknown_corpus_error(str(path))
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


GZIP_MIN_BYTES = 18  # a 10-byte header and an 8-byte trailer: any shorter ".gz" is not a gzip file


def _open_binary(path: Path) -> BinaryIO:
    if not path.name.lower().endswith(".gz"):
        return open(path, "rb")
    size = path.stat().st_size
    if size < GZIP_MIN_BYTES:  # Python's gzip reads such a file as empty text; zcat refuses it
        raise AzGPTError(f"{path}: not a readable gzip file ({size} bytes, shorter than any gzip file): "
                         f"re-compress it, or remove it from the corpus")
    return gzip.open(path, "rb")


def _decoded_lines(path: Path, errors: str, stats: CorpusStats) -> Iterator[tuple[int, str, bool]]:
    """Yield (line number, text, whether the line ends here); invalid UTF-8 names the file and line.

    A line longer than ``READ_BYTES`` comes in several pieces, each but the last cut after whitespace
    (else at a character boundary), so no line is ever held whole.
    """
    try:
        with _open_binary(path) as handle:
            for number, raw, complete in _bounded_lines(handle):
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
                yield number, line, complete
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise AzGPTError(f"{path}: not a readable gzip file ({exc}): re-compress it or decompress it to .txt") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise AzGPTError(f"{path}: cannot read ({exc.strerror})") from None


def _bounded_lines(handle: BinaryIO) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, whether the line ends here) with at most about ``READ_BYTES`` bytes each."""
    number, carry, line_started = 0, b"", False
    while True:
        read = handle.readline(READ_BYTES)
        raw, carry = carry + read, b""
        if not raw:
            return
        if not line_started:
            number += 1
        complete = read.endswith(b"\n") or len(read) < READ_BYTES  # a short read: the line or the file ended
        if not complete:
            cut = _safe_byte_cut(raw)
            raw, carry = raw[:cut], raw[cut:]
        line_started = not complete
        yield number, raw, complete


def _safe_byte_cut(raw: bytes) -> int:
    """Where to cut an overlong piece of a line: after its last space or tab in the second half, else at
    the last UTF-8 character boundary (never inside a character, so each piece decodes on its own)."""
    cut = max(raw.rfind(b" ", len(raw) // 2), raw.rfind(b"\t", len(raw) // 2))
    if cut >= 0:
        return cut + 1
    cut = len(raw)
    while cut > len(raw) - 4 and raw[cut - 1] & 0xC0 == 0x80:  # continuation bytes: step back to a lead byte
        cut -= 1
    if raw[cut - 1] >= 0xC0:  # a lead byte whose continuation is in the next read
        cut -= 1
    return cut


def _iter_text(path: Path, errors: str, stats: CorpusStats) -> Iterator[str]:
    """Blank-line-separated blocks of lines, each one document (cut at ``MAX_DOCUMENT_CHARS``)."""
    block: list[str] = []
    size = 0
    for _, line, complete in _decoded_lines(path, errors, stats):
        if complete:
            line = line.rstrip("\r\n")
        if line.strip():
            block.append(line + "\n" if complete else line)
            size += len(line)
            if size >= MAX_DOCUMENT_CHARS:
                yield "".join(block)
                block, size = [], 0
        elif complete and block:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


def _iter_jsonl(path: Path, text_field: str, errors: str, stats: CorpusStats) -> Iterator[str]:
    pieces: list[str] = []
    for number, piece, complete in _decoded_lines(path, errors, stats):
        if not complete:  # a record is parsed whole, so an overlong JSON line is gathered (text files need not be)
            pieces.append(piece)
            continue
        line, pieces = "".join(pieces) + piece, []
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
