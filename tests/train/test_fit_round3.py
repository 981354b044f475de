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


def test_finetune_budget_counts_conversations_drawn_and_gives_finetune_advice(tiny_run) -> None:
    import lightning as L

    from azgpt.data.instructions import InstructionDataModule
    from azgpt.sampling import Generator
    from azgpt.train.budget import budget_of
    from azgpt.train.module import AzGPT

    tokenizer = Generator.from_checkpoint(tiny_run.ckpt, device="cpu").tokenizer
    data = InstructionDataModule(tokenizer_json=tokenizer.to_str(), block_size=96, batch_size=4)
    data.setup()
    conversations = len(data._train)
    model = AzGPT(vocab_size=320, block_size=96, n_layer=1, n_head=2, n_embd=32)
    budget = budget_of(L.Trainer(max_steps=960, logger=False, accumulate_grad_batches=1), model, data)
    assert budget.epochs == pytest.approx(960 * 4 / conversations)  # conversations drawn / conversations held
    assert budget.consumed_tokens == round(budget.epochs * data.meta["splits"]["train"]["tokens"])
    message = budget.warning(10)
    assert f"draws its {conversations:,} training conversations" in message
    assert "--max_bytes" not in message and "fineweb2-az" not in message and "data.files" in message
    assert f"max_steps to about {int(10 * conversations / 4):,}" in message


def test_a_resumed_run_budgets_only_the_steps_it_has_left() -> None:
    from azgpt.train.budget import DataBudget

    budget = DataBudget(train_tokens=10_000, max_steps=1_000, effective_batch=4, block_size=32, parameters=1_000,
                        start_step=900)
    assert budget.steps == 100 and budget.consumed_tokens == 100 * 4 * 32
    assert "100 steps (from step 900 to 1,000)" in budget.lines()[1]
    message = budget.warning(1)
    assert "1.3 times over (more than 1 epoch)" in message  # not "1 times over (more than 1 epochs)"
    assert "max_steps to about 978" in message  # above the current step: 900 + 10,000 / 128


def test_finetune_data_files_naming_a_folder_says_it_is_a_folder(tmp_path: Path, tiny_run, capsys) -> None:
    from test_finetune import finetune_config

    folder = tmp_path / "conversations"
    folder.mkdir()
    config = finetune_config(tmp_path / "run", tiny_run.ckpt, files=[str(folder)])
    code, err = run(["finetune", "--config", str(config)], capsys)
    line = one_error(err)
    assert code == 2 and f"instruction file {folder} is a folder" in line and "does not exist" not in line


def test_finetune_resuming_from_a_base_checkpoint_says_what_it_is(tmp_path: Path, tiny_run, capsys) -> None:
    from test_finetune import finetune_config

    config = finetune_config(tmp_path / "run", tiny_run.ckpt)
    code, err = run(["finetune", "--config", str(config), "--ckpt_path", str(tiny_run.ckpt)], capsys)
    line = one_error(err)
    assert code == 2 and "is not a fine-tune's checkpoint" in line and "--model.init_from" in line
    assert "vocab_size" not in line


def test_ckpt_path_best_without_a_checkpoint_names_best(prepared_dir: Path, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    monkeypatch.chdir(tmp_path)
    args = tiny_fit_args(prepared_dir)
    args[0] = "validate"
    code, err = run(args + ["--ckpt_path", "best", "--trainer.logger", "false"], capsys)
    line = one_error(err)
    assert code == 2 and line.startswith("azgpt: error: --ckpt_path best: no checkpoint in checkpoints")
