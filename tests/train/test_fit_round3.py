"""Issue 23 (third round of hostile cases) for fit and finetune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from azgpt.cli import main
from conftest import tiny_fit_args


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_a_fit_without_callbacks_still_leaves_last_ckpt(prepared_dir: Path, tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(tiny_fit_args(prepared_dir, max_steps=4) + ["--trainer.callbacks", "null"], capsys)
    assert code == 0, err
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
