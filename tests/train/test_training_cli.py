"""The training command line: config lookup, precision on CPU, and a clear exit 2 for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from azgpt.cli import main
from azgpt.train.lightning_cli import resolve_config_arguments
from tests.conftest import tiny_fit_args


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # jsonargparse reports config errors by exiting
        code = exc.code
    return code, capsys.readouterr().err


def test_bare_config_name_resolves_to_the_shipped_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = resolve_config_arguments(["fit", "--config", "quickstart.yaml", "--config=base.yaml"])
    assert Path(resolved[2]).is_file() and resolved[2].endswith("configs/quickstart.yaml")
    assert resolved[3].startswith("--config=") and resolved[3].endswith("configs/base.yaml")


def test_a_config_in_the_working_directory_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("trainer: {}\n")
    assert resolve_config_arguments(["--config", "quickstart.yaml"])[1] == "quickstart.yaml"


def test_missing_config_names_what_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(["fit", "--config", "nope.yaml"], capsys)
    assert code == 2 and "nope.yaml not found" in err and "quickstart.yaml" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.no_such_key", "1"], "no_such_key"),
        (["--model.n_layer", "two"], "n_layer"),
        (["--data.block_size", "0"], "block_size"),
        (["--model.n_embd", "30", "--model.n_head", "4"], "divisible"),
        (["--model.n_layer", "0"], "n_layer"),
        (["--trainer.max_steps", "0"], "max_steps"),
        (["--val_every_n_steps", "0"], "val_every_n_steps"),
    ],
)
def test_bad_config_values_exit_2_with_a_message(override: list[str], expected: str, prepared_dir: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(tiny_fit_args(prepared_dir) + override, capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("lightning_logs/*/checkpoints/*.ckpt"))


def test_meta_that_disagrees_with_the_tokenizer_is_refused(prepared_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["tokenizer_sha256"] = "0" * 64
    (data / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    code, err = run(tiny_fit_args(data), capsys)
    assert code == 2 and "another tokenizer" in err and "meta.json" in err


def test_data_vocab_that_disagrees_with_the_files_is_refused(prepared_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = run(tiny_fit_args(prepared_dir, **{"--data.vocab_size": 300}), capsys)
    assert code == 2 and "vocab_size 512" in err and "300" in err


def test_truncated_token_file_is_refused(prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    raw = (data / "val.npy").read_bytes()
    (data / "val.npy").write_bytes(raw[: len(raw) // 2])
    monkeypatch.chdir(tmp_path)
    code, err = run(tiny_fit_args(data), capsys)
    assert code == 2 and "val.npy" in err


def test_checkpoint_with_another_architecture_is_refused(trained_run: Path, prepared_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    code, err = run(tiny_fit_args(prepared_dir, max_steps=8, **{"--model.n_embd": 64}) + ["--ckpt_path", str(ckpt)],
                    capsys)
    assert code == 2 and "architecture differs" in err and "n_embd" in err


def test_a_modern_checkpoint_trained_without_embedding_norm_resumes_without_it(
        prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """embedding_norm joined the modern recipe after runs were trained without it (it has no weights): a config that
    leaves it to the recipe resumes and reloads them without it, one that asks for it is refused."""
    from azgpt.train.module import AzGPT

    monkeypatch.chdir(tmp_path)
    modern = {"--model.recipe": "modern", "--budget": "null"}
    assert run(tiny_fit_args(prepared_dir, max_steps=4, **modern, **{"--model.embedding_norm": "false"}), capsys)[0] == 0
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"

    code, err = run(tiny_fit_args(prepared_dir, max_steps=6, **modern) + ["--ckpt_path", str(first)], capsys)
    assert code == 0, err
    resumed = torch.load(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["hyper_parameters"]["embedding_norm"] is False

    code, err = run(tiny_fit_args(prepared_dir, max_steps=6, **modern, **{"--model.embedding_norm": "true"})
                    + ["--ckpt_path", str(first)], capsys)
    assert code == 2 and "embedding_norm: checkpoint False vs config True" in err

    raw = torch.load(first, weights_only=True)  # as written before embedding_norm existed
    del raw["hyper_parameters"]["embedding_norm"]
    torch.save(raw, tmp_path / "older.ckpt")
    module = AzGPT.load_from_checkpoint(tmp_path / "older.ckpt", weights_only=True)
    assert module.model.config.embedding_norm is False and module.hparams.embedding_norm is False


def test_resuming_with_other_training_settings_says_the_checkpoints_are_kept(
        trained_run: Path, prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    args = tiny_fit_args(prepared_dir, max_steps=8, **{"--model.learning_rate": 0.05, "--model.embedding_lr": 0.2})
    with pytest.warns(UserWarning, match="keeps the checkpoint's training settings") as caught:
        code, _ = run(args + ["--ckpt_path", str(ckpt)], capsys)
    message = next(str(w.message) for w in caught if "training settings" in str(w.message))
    assert code == 0
    assert f"model.learning_rate 0.05 (checkpoint: {saved['learning_rate']})" in message
    assert "model.embedding_lr 0.2 (checkpoint: None)" in message
    assert "warmup_steps" not in message  # the same as the checkpoint's: not named


def test_resuming_an_older_checkpoint_with_an_embedding_rate_is_refused_in_one_line(
        trained_run: Path, prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint from before model.embedding_lr has no key for it, so LightningCLI keeps the command line's
    rate, and the optimizer state (no group for the embedding) cannot be loaded into the optimizer built."""
    monkeypatch.chdir(tmp_path)
    raw = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    del raw["hyper_parameters"]["embedding_lr"]
    older = tmp_path / "older.ckpt"
    torch.save(raw, older)
    code, err = run(tiny_fit_args(prepared_dir, max_steps=8, **{"--model.embedding_lr": 0.2})
                    + ["--ckpt_path", str(older)], capsys)
    assert code == 2 and "model.embedding_lr null and this run has 0.2" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("config.yaml")), "the refused run left a folder holding only its config"


def test_resuming_a_finished_run_does_not_report_zero_steps(trained_run: Path, prepared_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    code, err = run(tiny_fit_args(prepared_dir) + ["--ckpt_path", str(ckpt)], capsys)
    assert code == 2 and "already at step 6" in err
    assert not list(tmp_path.rglob("version_*")), "the refused run left a folder holding only its config"


@pytest.mark.parametrize("bf16_flops, expected", [(8e11, "bf16-mixed"), (1e11, "32-true")])
def test_cpu_run_picks_the_faster_precision_and_says_so(prepared_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture,
                                                         bf16_flops: float, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AZGPT_CPU_PRECISION")
    monkeypatch.setattr("azgpt.train.precision.measure_matmul_flops",
                        lambda device, dtype, **kw: bf16_flops if dtype is torch.bfloat16 else 2e11)
    import logging

    with caplog.at_level(logging.INFO):
        assert main(tiny_fit_args(prepared_dir, max_steps=1) + ["--trainer.precision", "16-mixed"]) == 0
    assert f"becomes {expected}" in caplog.text and "GFLOP/s" in caplog.text
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert f"precision: {expected}" in config


def test_bad_cpu_precision_variable_is_a_clear_error(prepared_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AZGPT_CPU_PRECISION", "fp8")
    code, err = run(tiny_fit_args(prepared_dir, max_steps=1), capsys)
    assert code == 2 and "AZGPT_CPU_PRECISION" in err and "32-true" in err
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize("accelerator, cuda, mps, on_cpu", [
    ("auto", False, False, True), ("auto", True, False, False), ("auto", False, True, False),
    ("cpu", True, False, True), ("gpu", True, False, False), ("mps", False, True, False)])
def test_precision_is_chosen_only_for_cpu_training(monkeypatch: pytest.MonkeyPatch, accelerator: str, cuda: bool,
                                                   mps: bool, on_cpu: bool) -> None:
    from azgpt.train.trainer import trains_on_cpu as _trains_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert _trains_on_cpu(accelerator) is on_cpu
