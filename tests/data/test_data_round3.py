"""Issue 23 (third round of hostile cases) for prepare and the corpus reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from azgpt.cli import main

DOCS = [f"Sənəd {i}: Bakıda payız günləri {i * 7} dərəcə isti olur, küləklər əsir." for i in range(40)]


def refused(capsys, verb: str, *args: object) -> str:
    code = main([verb, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("azgpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("as_folder", [False, True])
def test_a_zero_byte_gz_in_a_corpus_is_one_line_naming_it(tmp_path: Path, capsys, as_folder: bool) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    empty = corpus / "b.txt.gz"
    empty.write_bytes(b"")
    sources = [corpus] if as_folder else [corpus / "a.txt", empty]
    out = tmp_path / "out"
    err = refused(capsys, "prepare", "--corpus", *sources, "--out", out, "--vocab_size", 300, "--block_size", 8)
    assert f"{empty}: not a readable gzip file (0 bytes" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_a_slice_smaller_than_the_first_document_says_so(tmp_path: Path, capsys) -> None:
    err = refused(capsys, "prepare", "--max_bytes", 10, "--out", tmp_path / "out", "--vocab_size", 300)
    assert "first document alone is" in err and "more than --max_bytes 10" in err and "has no text" not in err


def test_hf_naming_a_file_says_to_pass_the_file(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("small.txt").write_text("Salam.\n", encoding="utf-8")
    err = refused(capsys, "prepare", "--corpus", "hf:small.txt", "--out", "out", "--vocab_size", 300)
    assert "small.txt is a file" in err and "--corpus small.txt" in err and "Hub" in err
    assert "cannot reach" not in err


def test_hf_query_key_given_twice_is_refused(tmp_path: Path, capsys) -> None:
    err = refused(capsys, "prepare", "--corpus", "hf:some/dataset?split=train&split=test", "--out", tmp_path / "o",
                  "--vocab_size", 300)
    assert "split= is given more than once (train, test)" in err
