"""The corpus reader: formats, document boundaries, normalisation and its error messages."""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path

import pytest

from azgpt.data.corpus import CorpusStats, iter_documents, normalize_text, resolve_corpus_files, sample_corpus_path
from azgpt.errors import AzGPTError

TEXT = "Bakı Azərbaycanın paytaxtıdır.\nŞəhər Xəzər dənizinin sahilindədir.\n\nİkinci sənəd: ağac, göl, üzüm, çay.\n"
DOCS = ["Bakı Azərbaycanın paytaxtıdır.\nŞəhər Xəzər dənizinin sahilindədir.", "İkinci sənəd: ağac, göl, üzüm, çay."]


def test_reads_txt_with_blank_line_documents(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\n\n" + TEXT.replace("\n\n", "\n   \n\n") + "\n\n", encoding="utf-8")
    assert list(iter_documents(path)) == DOCS


def test_reads_txt_gz(tmp_path: Path) -> None:
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(TEXT)
    assert list(iter_documents(str(path))) == DOCS


def test_crlf_line_ends_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(TEXT.replace("\n", "\r\n").encode("utf-8"))
    assert list(iter_documents(path)) == DOCS


def test_reads_jsonl_text_field_and_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    records = [{"text": "Birinci\n\nsənəd", "body": "X"}, {"text": "İkinci", "body": "Y"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    assert list(iter_documents(path)) == ["Birinci\n\nsənəd", "İkinci"]  # one record = one document
    assert list(iter_documents(path, text_field="body")) == ["X", "Y"]


def test_jsonl_without_the_field_names_file_line_and_option(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(AzGPTError, match=r"a\.jsonl:2: .*'text'.*--text_field"):
        list(iter_documents(path))


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third", encoding="utf-8")
    (tmp_path / "b" / "a.jsonl").write_text('{"text": "second"}\n', encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("first")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["first", "second", "third"]
    assert list(iter_documents(tmp_path)) == ["first", "second", "third"]  # deterministic
    assert [Path(f).name for f in resolve_corpus_files(tmp_path)] == ["a.txt.gz", "a.jsonl", "z.txt"]


def test_several_sources_in_order_and_stats(tmp_path: Path) -> None:
    (tmp_path / "1.txt").write_text("bir\n\niki", encoding="utf-8")
    (tmp_path / "2.txt").write_text("üç", encoding="utf-8")
    stats = CorpusStats()
    docs = list(iter_documents([tmp_path / "2.txt", tmp_path / "1.txt"], stats=stats))
    assert docs == ["üç", "bir", "iki"]
    assert stats.documents == 3 and [Path(f).name for f in stats.files] == ["2.txt", "1.txt"]


def test_normalisation_nfc_schwa_control_characters_and_case() -> None:
    decomposed = "Gu\u0308l c\u0327ic\u0327ək"  # ü and ç as base letter + combining mark
    assert normalize_text(decomposed) == "Gül çiçək"
    assert normalize_text("\u04d9l\u04d9 \u04d8li") == "\u0259l\u0259 \u018fli"  # Cyrillic ә/Ә -> Latin ə/Ə
    assert normalize_text("a\x00b\x07c\x1bd\x7fe\x85f\ufeffg\rh") == "abcdefgh"
    assert normalize_text("tab\there\nnew line") == "tab\there\nnew line"
    assert normalize_text("I ı İ i") == "I ı İ i"  # no lowercasing: Azerbaijani dotted/dotless i survive
    text = "ƏLİ ağır İşıq"
    assert normalize_text(text) == text
    assert unicodedata.is_normalized("NFC", normalize_text("e\u0301\u04d9"))


def test_documents_are_normalised_and_empty_ones_skipped(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\ufeffM\u04d9kt\u04d9b\x00\n\n\x01\x02\n\n  İstanbul  \n", encoding="utf-8")
    assert list(iter_documents(path)) == ["Məktəb", "İstanbul"]


def test_sample_corpus_is_the_default() -> None:
    docs = list(iter_documents(None))
    assert len(docs) > 50
    assert sum(len(d) for d in docs) > 60_000
    assert sample_corpus_path().is_dir()


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(AzGPTError, match=r"corpus path .*nope\.txt does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    with pytest.raises(AzGPTError, match="does not exist"):
        resolve_corpus_files([tmp_path / "nope.txt"])


def test_unsupported_file_and_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x", encoding="utf-8")
    with pytest.raises(AzGPTError, match=r"a\.csv is not \.txt"):
        resolve_corpus_files(tmp_path / "a.csv")
    with pytest.raises(AzGPTError, match="holds no .txt"):
        resolve_corpus_files(tmp_path)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes("salam\ndünya ".encode("utf-8") + b"\xff\xfe son\n")
    with pytest.raises(AzGPTError, match=r"bad\.txt:2: invalid UTF-8.*--errors replace"):
        list(iter_documents(path))


def test_invalid_utf8_replaced_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"ok \xef\xbf\xbd already\n\nbad \xff here \xc3\n")
    stats = CorpusStats()
    docs = list(iter_documents(path, errors="replace", stats=stats))
    assert docs == ["ok \ufffd already", "bad \ufffd here \ufffd"]
    assert stats.replaced_chars == 2  # the U+FFFD already in the text is not counted


def test_unknown_errors_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AzGPTError, match="--errors"):
        list(iter_documents(tmp_path, errors="ignore"))


def test_corrupt_gzip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "a.txt.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(AzGPTError, match=r"a\.txt\.gz: not a readable gzip"):
        list(iter_documents(path))


def test_hf_dataset_without_datasets_says_what_to_install(without_datasets: None) -> None:
    with pytest.raises(AzGPTError, match=r"needs the optional 'datasets' package: pip install 'azgpt\[datasets\]'"):
        resolve_corpus_files("hf:some/dataset")
    with pytest.raises(AzGPTError, match="optional 'datasets' package"):
        list(iter_documents("hf:some/dataset:train"))

