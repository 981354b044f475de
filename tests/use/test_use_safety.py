"""Hostile cases for export and generate: a folder is a whole export or nothing, every failure one clear line."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from azgpt.cli import main
from azgpt.use.export import EXPORTED_FILES
from mount_helpers import tmpfs


def refused(capsys: pytest.CaptureFixture[str], verb: str, *args: object) -> str:
    code = main([verb, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("azgpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_every_exported_file_gets_the_same_mode(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out)]) == 0
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in EXPORTED_FILES}
    assert len(set(modes.values())) == 1, modes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left beside it


def test_export_that_fails_midway_leaves_no_folder(tiny_run, tmp_path: Path, monkeypatch, capsys) -> None:
    from azgpt.use import export

    def broken(content):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_json_bytes", broken)
    err = refused(capsys, "export", "--ckpt", tiny_run.ckpt, "--out", tmp_path / "hf")
    assert "the disk is full" in err
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_export_leaves_nothing_that_looks_like_a_model(tiny_run, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "small", size="40k") as small:
        err = refused(capsys, "export", "--ckpt", tiny_run.ckpt, "--out", small / "hf")
        assert f"--out {small / 'hf'}" in err and "the disk is full" in err
        assert list(small.iterdir()) == []


def test_read_only_export_folder_is_one_clear_line(tiny_run, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        err = refused(capsys, "export", "--ckpt", tiny_run.ckpt, "--out", ro / "hf")
        assert "read-only" in err


def test_overwrite_replaces_an_export_and_keeps_foreign_files(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out)]) == 0
    (out / "config.json").write_text("stale")
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").read_text() != "stale"
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir()} == {*EXPORTED_FILES, "notes.txt"}
