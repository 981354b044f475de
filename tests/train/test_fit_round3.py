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


def one_error(err: str) -> str:
    """The one ``azgpt: error:`` line of ``err`` (Lightning's logging handlers of an earlier fit in this process
    may add "Logging error" noise about pytest's closed capture streams)."""
    errors = [line for line in err.splitlines() if line.startswith("azgpt: error: ")]
    assert len(errors) == 1 and "Traceback (most recent call last)" not in err.split("--- Logging error ---")[0], err
    return errors[0]


def test_a_fit_without_callbacks_still_leaves_last_ckpt(prepared_dir: Path, tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(tiny_fit_args(prepared_dir, max_steps=4) + ["--trainer.callbacks", "null"], capsys)
    assert code == 0, err
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "Salam", "response": "Salam!"}\n{"prompt": "Sal\xffam", "response": "x"}\n',
     ":2: not valid UTF-8 (byte 16 of the line)"),
    (b'{"prompt": "Salam", "response": "Salam!"}\n{"prompt": "\\ud800", "response": "x"}\n',
     ":2: message 1's text holds a lone surrogate ('\\ud800')"),
])
def test_finetune_data_that_is_not_text_is_one_line(tmp_path: Path, tiny_run, capsys, content: bytes,
                                                    message: str) -> None:
    from test_finetune import finetune_config

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    config = finetune_config(tmp_path / "run", tiny_run.ckpt, files=[str(bad)])
    code, err = run(["finetune", "--config", str(config)], capsys)
    assert code == 2 and one_error(err).startswith(f"azgpt: error: {bad}{message}")


def test_a_failed_finetune_leaves_no_empty_run_folder(tmp_path: Path, tiny_run, capsys) -> None:
    from test_finetune import finetune_config

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Salam"}\n', encoding="utf-8")
    config = finetune_config(tmp_path / "run", tiny_run.ckpt, files=[str(bad)])
    code, err = run(["finetune", "--config", str(config)], capsys)
    assert code == 2, err
    runs = tmp_path / "run" / "lightning_logs" / "finetune"
    assert not runs.exists() or list(runs.iterdir()) == []


@pytest.mark.parametrize("callback, init_args, message", [
    ("azgpt.train.budget.DataBudgetCheck", "{warn_above_epochs: 0}", "warn_above_epochs must be a positive"),
    ("azgpt.train.budget.DataBudgetCheck", "{warn_above_epochs: .nan}", "warn_above_epochs must be a positive"),
    ("azgpt.train.callbacks.TextSamples", "{temperature: -1}", "temperature must be a finite number >= 0"),
])
def test_a_callback_refusing_its_value_is_one_line(prepared_dir: Path, tmp_path: Path, monkeypatch, capsys,
                                                   callback: str, init_args: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "callback.yaml"
    extra.write_text(f"trainer:\n  callbacks:\n    - class_path: {callback}\n      init_args: {init_args}\n")
    code, err = run(tiny_fit_args(prepared_dir, max_steps=2) + ["--config", str(extra)], capsys)
    assert code == 2 and message in one_error(err)
    assert not (tmp_path / "lightning_logs").exists() or not any((tmp_path / "lightning_logs").rglob("*.ckpt"))


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
def test_ddp_config_without_a_gpu_is_one_line_naming_it(prepared_dir: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(tiny_fit_args(prepared_dir, max_steps=2) + ["--config", "ddp.yaml"], capsys)
    line = one_error(err)
    assert code == 2 and "trainer.accelerator is gpu (set by " in line and "ddp.yaml)" in line
    assert "--trainer.accelerator cpu --trainer.devices 2" in line
