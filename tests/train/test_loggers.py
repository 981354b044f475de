"""Every azgpt feature under the other loggers: CSVLogger and Weights & Biases (offline).

Metrics are read back with each backend's own reader (CSVLogger's metrics.csv; W&B's record schema for the
offline run file), text samples land in each, ``--ckpt_path last`` resumes, and the report is written.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch

from azgpt.cli import main
from azgpt.train.checkpointing import checkpoint_folders
from azgpt.train.history import read_history, wandb_records
from tests.conftest import tiny_fit_args

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_snippet(name: str) -> str:
    """The README's config snippet for a logger (the tests run exactly what users are told to)."""
    text = README.read_text(encoding="utf-8")
    return re.search(rf"```yaml\n(# {name}:.*?)```", text, re.S).group(1)


CSV_CONFIG = readme_snippet("csv.yaml")
WANDB_CONFIG = readme_snippet("wandb.yaml")  # offline through WANDB_MODE, as the README says


def fit(root: Path, data: Path, overlay: str, max_steps: int, *extra: str) -> int:
    (root / "logger.yaml").write_text(overlay, encoding="utf-8")
    args = tiny_fit_args(data, max_steps=max_steps)
    args = [*args[:3], "--config", "logger.yaml", *args[3:], *extra]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return main(args)
    finally:
        os.chdir(cwd)


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_csv_logger_gets_metrics_text_report_and_resume(tmp_path: Path, prepared_dir: Path) -> None:
    assert fit(tmp_path, prepared_dir, CSV_CONFIG, 3) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r for r in rows if r.get("val_loss")] and [r for r in rows if r.get("train_eval_loss")]
    assert [r for r in rows if r.get("system/rss_gb")]
    with (run / "text.csv").open(newline="", encoding="utf-8") as f:
        assert {r["tag"] for r in csv.DictReader(f)} == {"samples/0", "samples/1", "samples/2"}
    assert (run / "report.png").is_file() and "val_loss" in (run / "report.md").read_text(encoding="utf-8")

    assert fit(tmp_path, prepared_dir, CSV_CONFIG, 6, "--ckpt_path", "last") == 0
    resumed = tmp_path / "lightning_logs" / "version_1"
    assert checkpoint_step(resumed / "checkpoints" / "last.ckpt") == 6
    assert read_history(resumed).curve("val_loss")[-1].step == 5


@pytest.mark.slow
def test_wandb_offline_gets_metrics_text_report_and_resume(tmp_path: Path, prepared_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert fit(tmp_path, prepared_dir, WANDB_CONFIG, 3) == 0
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    kinds = [r.WhichOneof("record_type") for r in wandb_records(run_file)]
    assert "run" in kinds and "history" in kinds
    keys = {"/".join(i.nested_key) or i.key for r in wandb_records(run_file) if r.HasField("history")
            for i in r.history.item}
    assert {"val_loss", "train_eval_loss", "overfit_gap", "system/rss_gb", "trainer/global_step"} <= keys
    assert any(k.startswith("samples/0") for k in keys)  # the text samples, as W&B tables
    run_id = run_file.stem.removeprefix("run-")
    run = tmp_path / "lightning_logs" / run_id
    assert (run / "report.png").is_file() and "val_loss" in (run / "report.md").read_text(encoding="utf-8")
    assert read_history(run).texts["samples/0"][0][1].startswith("**")

    folders = checkpoint_folders({"logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                             "init_args": {"save_dir": str(tmp_path), "project": "lightning_logs"}}})
    assert [f.parent.name for f in folders] == [run_id]
    assert fit(tmp_path, prepared_dir, WANDB_CONFIG, 6, "--ckpt_path", "last") == 0
    newest = max(tmp_path.glob("lightning_logs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest.parent.parent.name != run_id and checkpoint_step(newest) == 6


def test_a_logger_whose_package_is_missing_names_the_pip_command(tmp_path: Path, prepared_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import lightning.pytorch.loggers.wandb as lightning_wandb
    from lightning_utilities.core.imports import RequirementCache

    monkeypatch.setattr(lightning_wandb, "_WANDB_AVAILABLE", RequirementCache("wandb>=999"))
    assert fit(tmp_path, prepared_dir, WANDB_CONFIG, 3) == 2
    err = capsys.readouterr().err
    assert "pip install 'azgpt[wandb]'" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_the_overfitting_alert_reaches_csv_and_wandb(logger: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """README: CSVLogger and W&B get every feature, alerts included. The overfitting run of test_monitoring."""
    from azgpt.data.prepare import PrepareConfig, prepare

    sample = Path(__file__).resolve().parents[2] / "azgpt" / "sample_corpus" / "hekayeler.txt"
    lines = [line for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines[:10]), encoding="utf-8")
    prepare(PrepareConfig(out=tmp_path / "data", corpus=[str(tmp_path / "corpus.txt")], vocab_size=300,
                          block_size=16, val_fraction=0.4))
    if logger == "wandb":
        pytest.importorskip("wandb")
        for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path))):
            monkeypatch.setenv(name, value)
    overrides = ["--data.vocab_size", "300", "--data.block_size", "16", "--data.batch_size", "8",
                 "--data.val_max_blocks", "8", "--model.n_embd", "64", "--model.learning_rate", "1e-2",
                 "--trainer.accumulate_grad_batches", "1", "--val_every_n_steps", "4",
                 "--trainer.log_every_n_steps", "10", "--early_stopping", "3"]
    assert fit(tmp_path, tmp_path / "data", CSV_CONFIG if logger == "csv" else WANDB_CONFIG, 80, *overrides) == 0
    (run,) = [folder for folder in (tmp_path / "lightning_logs").iterdir() if folder.is_dir()]
    alerts = read_history(run).texts.get("alerts/overfitting", [])
    assert len(alerts) == 1 and "overfitting: val_loss has not improved" in alerts[0][1], alerts
    report = (run / "report.md").read_text(encoding="utf-8")
    # Under W&B the report written at fit end used to read the offline run file before W&B had written the last
    # validations and the alert into it; the report now waits for the file to be complete.
    assert "**Overfitting** (the alarm was raised" in report
