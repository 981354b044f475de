"""Hostile cases for ``azgpt prepare`` and the data module: nothing replaced silently, nothing mixed up, every
failure one clear line with nothing half-written."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from azgpt.cli import main
from azgpt.data.datamodule import AzGPTDataModule
from azgpt.data.prepare import PrepareConfig, prepare
from azgpt.errors import AzGPTError
from mount_helpers import tmpfs
from process_env import child_env

OUTPUT_FILES = {"train.npy", "val.npy", "tokenizer.json", "meta.json"}
DOCS = [f"Sənəd {i}: Bakıda payız günləri {i * 7} dərəcə isti olur, küləklər əsir və dəniz dalğalanır." for i in range(60)]


def write_corpus(path: Path, docs: list[str] = DOCS) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def config(corpus: Path | list, out: Path, **extra) -> PrepareConfig:
    corpus = [str(c) for c in corpus] if isinstance(corpus, list) else [str(corpus)]
    return PrepareConfig(out=out, corpus=corpus, vocab_size=300, block_size=8, val_fraction=0.25, **extra)


def refused(capsys, *args) -> str:
    code = main(["prepare", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("azgpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_another_corpus_into_a_prepared_folder_needs_overwrite(tmp_path: Path, capsys) -> None:
    base, other = write_corpus(tmp_path / "base.txt"), write_corpus(tmp_path / "other.txt", DOCS[::-1])
    out = tmp_path / "out"
    prepare(config(base, out))
    before = snapshot(out)
    args = ["--corpus", other, "--tokenizer", out / "tokenizer.json", "--out", out, "--block_size", "8",
            "--val_fraction", "0.25"]
    err = refused(capsys, *args)
    assert f"holds token files of other data: --corpus is {other} but {out} was prepared from {base}" in err
    assert "--overwrite" in err
    assert snapshot(out) == before
    assert main(["prepare", *map(str, args), "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["source"] == [str(other)]


def test_another_val_corpus_into_a_prepared_folder_needs_overwrite(tmp_path: Path, capsys) -> None:
    """A new --val_corpus used to replace val.npy of a prepared folder without a word."""
    base, held_out = write_corpus(tmp_path / "base.txt"), write_corpus(tmp_path / "val.txt", DOCS[::-1])
    out = tmp_path / "out"
    prepare(config(base, out))
    before = snapshot(out)
    err = refused(capsys, "--corpus", base, "--tokenizer", out / "tokenizer.json", "--out", out, "--block_size", "8",
                  "--val_fraction", "0.25", "--val_corpus", held_out)
    assert f"--val_corpus is {held_out} but {out} took its validation text from val_fraction 0.25" in err
    assert snapshot(out) == before


def test_a_second_prepare_into_a_locked_folder_is_refused_naming_the_holder(tmp_path: Path, capsys) -> None:
    from azgpt.atomic import FolderLock
    from azgpt.data.prepare import LOCK_NAME

    corpus, out = write_corpus(tmp_path / "c.txt"), tmp_path / "out"
    prepare(config(corpus, out))
    before = snapshot(out)
    with FolderLock(out, "azgpt prepare", LOCK_NAME):
        err = refused(capsys, "--corpus", corpus, "--out", out, "--vocab_size", "300", "--block_size", "8",
                      "--overwrite")
        assert "another azgpt prepare is writing into" in err and str(os.getpid()) in err
        assert snapshot(out) == {**before, LOCK_NAME: (out / LOCK_NAME).read_bytes()}
    assert snapshot(out) == before


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    from azgpt.data.prepare import LOCK_NAME

    corpus, out = write_corpus(tmp_path / "c.txt"), tmp_path / "out"
    out.mkdir()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (out / LOCK_NAME).write_text(f"{socket.gethostname()} {dead}\n")
    prepare(config(corpus, out))
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES


def test_two_prepares_at_once_leave_one_consistent_folder(tmp_path: Path) -> None:
    """Real processes racing: whichever finishes, meta.json describes the train.npy beside it."""
    import subprocess
    import sys

    first, second = write_corpus(tmp_path / "a.txt", DOCS * 40), write_corpus(tmp_path / "b.txt", DOCS * 25)
    out = tmp_path / "out"
    env = child_env()
    runs = [subprocess.Popen([sys.executable, "-m", "azgpt.cli", "prepare", "--corpus", str(c), "--out", str(out),
                              "--vocab_size", "300", "--block_size", "8", "--overwrite"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in (first, second)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or "another azgpt prepare is writing into" in err, err
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        assert len(np.load(out / f"{split}.npy", mmap_mode="r")) == meta["splits"][split]["tokens"]
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES


@pytest.mark.parametrize("planted", [".meta.json.partial", ".train.npy.partial", ".tokenizer.json.partial"])
def test_a_link_planted_at_a_temporary_name_is_never_written_through(planted: str, tmp_path: Path) -> None:
    corpus, out = write_corpus(tmp_path / "c.txt"), tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out.mkdir()
    (out / planted).symlink_to(victim)
    prepare(config(corpus, out))
    assert victim.read_text() == "keep me"
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert not any(p.is_symlink() for p in out.iterdir())


def test_the_same_file_twice_is_read_once(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt")
    summary = prepare(config([corpus, tmp_path / "." / "c.txt"], tmp_path / "out"))
    assert summary.repeated_sources == [str(tmp_path / "." / "c.txt")]
    assert summary.shared_documents == 0
    assert sum(c.documents for c in summary.splits.values()) == len(DOCS)
    assert "names" in summary.table() and "more than once" in summary.table()


def test_identical_documents_in_both_splits_are_counted_and_warned(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt", DOCS + DOCS[:20])
    summary = prepare(config(corpus, tmp_path / "out"))
    assert summary.shared_documents > 0
    assert f"{summary.shared_documents:,} val documents also appear word for word in train" in summary.table()


def test_read_only_out_is_one_clear_line(tmp_path: Path, capsys) -> None:
    corpus = write_corpus(tmp_path / "c.txt")
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        err = refused(capsys, "--corpus", corpus, "--out", ro / "data", "--vocab_size", "300", "--block_size", "8")
        assert f"--out {ro / 'data'}" in err and "read-only" in err
        assert list(ro.iterdir()) == []


def test_disk_full_during_prepare_is_one_clear_line_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    corpus = write_corpus(tmp_path / "c.txt", DOCS * 30)
    with tmpfs(tmp_path / "small", size="12k") as small:
        err = refused(capsys, "--corpus", corpus, "--out", small / "data", "--vocab_size", "300", "--block_size", "8")
        assert "the disk is full" in err and "free some space" in err
        assert list(small.iterdir()) == []


def test_meta_json_that_is_not_an_object_is_refused(prepared_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in OUTPUT_FILES - {"meta.json"}:
        (data / name).symlink_to(prepared_dir / name)
    (data / "meta.json").write_text("[1, 2, 3]\n")
    with pytest.raises(AzGPTError, match=r"meta.json holds a JSON list, not the object"):
        AzGPTDataModule(data_dir=str(data), vocab_size=512, block_size=32).setup("fit")


def test_token_ids_beyond_the_vocabulary_are_refused_at_setup(prepared_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in OUTPUT_FILES:
        (data / name).write_bytes((prepared_dir / name).read_bytes())
    tokens = np.load(data / "train.npy", mmap_mode="r+")
    tokens[1234] = 600  # consistent header and length, an id the 512-token vocabulary lacks
    tokens.flush()
    del tokens
    with pytest.raises(AzGPTError, match=r"train.npy holds token id 600 at position 1,234, outside the vocabulary"):
        AzGPTDataModule(data_dir=str(data), vocab_size=512, block_size=32).setup("fit")


def test_a_fifo_as_corpus_is_not_called_a_folder(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    err = refused(capsys, "--corpus", fifo, "--out", tmp_path / "out")
    assert "neither a regular file nor a folder" in err and "folder holds no" not in err


def test_data_dir_pointing_at_a_file_names_data_dir_not_out(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("x")
    module = AzGPTDataModule(data_dir=str(path), vocab_size=512, block_size=32)
    with pytest.raises(AzGPTError, match=r"data.data_dir .* is a file, not a folder") as caught:
        module.prepare_data()
    assert "--out" not in str(caught.value)
