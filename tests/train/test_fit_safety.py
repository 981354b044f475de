"""Hostile cases around fit / validate: nothing lost at the end of a run, nothing mixed up between runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from azgpt.cli import main
from conftest import tiny_fit_args

TESTS_DIR = Path(__file__).resolve().parents[1]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_last_ckpt_holds_the_final_step_and_resuming_retrains_nothing(prepared_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    code, _ = run(tiny_fit_args(prepared_dir, max_steps=7), capsys)  # validates at 3 and 6, ends at 7
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert code == 0 and step_of(last) == 7
    steps = tmp_path / "steps.txt"
    code, _ = run(tiny_fit_args(prepared_dir, max_steps=9) + [
        "--ckpt_path", "last", "--trainer.callbacks+=resume_helpers.LossRecorder",
        f"--trainer.callbacks.path={steps}"], capsys)
    assert code == 0
    assert [int(line.split()[0]) for line in steps.read_text().splitlines()] == [8, 9]
    assert step_of(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt") == 9
