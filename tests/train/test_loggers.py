"""Every azgpt feature under the other loggers: CSVLogger, Weights & Biases (offline) and MLflow (a file: store).

Metrics are read back with each backend's own reader (CSVLogger's metrics.csv; W&B's record schema for the
offline run file; MLflow's client), text samples land in each, ``--ckpt_path last`` resumes, and the report is written.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import torch

from azgpt.cli import main
from azgpt.train.resume import checkpoint_folders
from azgpt.train.history import read_history, wandb_records
from tests.conftest import tiny_fit_args

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_snippet(name: str) -> str:
    """The README's config snippet for a logger (the tests run exactly what users are told to)."""
    text = README.read_text(encoding="utf-8")
    return re.search(rf"```yaml\n(# {name}:.*?)```", text, re.S).group(1)


CSV_CONFIG = readme_snippet("csv.yaml")
WANDB_CONFIG = readme_snippet("wandb.yaml")  # offline through WANDB_MODE, as the README says
MLFLOW_CONFIG = readme_snippet("mlflow.yaml")  # a file: store in ./mlruns


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


@pytest.mark.parametrize("extra", ["wandb", "mlflow"])
def test_a_logger_whose_package_is_missing_names_the_pip_command(extra: str, tmp_path: Path, prepared_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    import importlib

    from lightning_utilities.core.imports import RequirementCache

    module = importlib.import_module(f"lightning.pytorch.loggers.{extra}")
    monkeypatch.setattr(module, f"_{extra.upper()}_AVAILABLE", RequirementCache(f"{extra}>=999"))
    assert fit(tmp_path, prepared_dir, WANDB_CONFIG if extra == "wandb" else MLFLOW_CONFIG, 3) == 2
    err = capsys.readouterr().err
    assert f"pip install 'azgpt[{extra}]'" in err and "Traceback" not in err


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """mlflow (skipped where missing) with its file: store allowed, as the README's mlflow.yaml asks."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'azgpt[mlflow]'")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return mlflow


def absolute_store(root: Path) -> list[str]:
    """The README's ``file:./mlruns`` as an absolute path: MLflow caches a store by its URI for the process, so a
    relative one made in an earlier test's folder would be reused here."""
    return ["--trainer.logger.init_args.tracking_uri", f"file:{root / 'mlruns'}"]


def mlflow_runs(root: Path) -> list[Path]:
    """The run folders of the file: store in ``root/mlruns`` (``<experiment id>/<run id>``), oldest first."""
    return sorted((p.parent for p in (root / "mlruns").glob("*/*/meta.yaml")), key=lambda p: p.stat().st_mtime)


@pytest.mark.slow
def test_mlflow_file_store_gets_metrics_text_report_and_resume(tmp_path: Path, prepared_dir: Path,
                                                              mlflow_store) -> None:
    assert fit(tmp_path, prepared_dir, MLFLOW_CONFIG, 3, *absolute_store(tmp_path)) == 0
    client = mlflow_store.tracking.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("lightning_logs")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    history = client.get_metric_history(run_id, "val_loss")
    assert len(history) == 1 and 0 < history[0].value < 10  # one validation (every 3 steps), ln(512) = 6.2 or so
    assert {"val_loss", "val_bpb", "train_eval_loss", "overfit_gap", "system/rss_gb"} <= set(run.data.metrics)
    assert run.data.params["n_embd"] == "32" and run.data.params["vocab_size"] == "512"  # the hyperparameters
    samples = {Path(a.path).name for a in client.list_artifacts(run_id, "text/samples")}
    assert samples == {"0", "1", "2"}
    (folder,) = mlflow_runs(tmp_path)
    assert folder == tmp_path / "mlruns" / experiment.experiment_id / run_id
    assert (folder / "report.png").is_file() and "val_loss" in (folder / "report.md").read_text(encoding="utf-8")
    assert (folder / "model" / "config.json").is_file() and (folder / "config.yaml").is_file()
    assert read_history(folder).texts["samples/0"][0][1].startswith("**")

    assert fit(tmp_path, prepared_dir, MLFLOW_CONFIG, 6, "--ckpt_path", "last", *absolute_store(tmp_path)) == 0
    first, resumed = mlflow_runs(tmp_path)
    assert first == folder and checkpoint_step(resumed / "checkpoints" / "last.ckpt") == 6
    assert [m.step for m in client.get_metric_history(resumed.name, "val_loss")] == [5]  # steps 4-6 only


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "wandb", "mlflow"])
def test_the_overfitting_alert_reaches_csv_wandb_and_mlflow(logger: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """README: CSVLogger, W&B and MLflow get every feature, alerts included. The overfitting run of
    test_monitoring."""
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
    if logger == "mlflow":
        pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'azgpt[mlflow]'")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    overrides = ["--data.vocab_size", "300", "--data.block_size", "16", "--data.batch_size", "8",
                 "--data.val_max_blocks", "8", "--model.n_embd", "64", "--model.learning_rate", "1e-2",
                 "--trainer.accumulate_grad_batches", "1", "--val_every_n_steps", "4",
                 "--trainer.log_every_n_steps", "10", "--early_stopping", "3"]
    config = {"csv": CSV_CONFIG, "wandb": WANDB_CONFIG, "mlflow": MLFLOW_CONFIG}[logger]
    assert fit(tmp_path, tmp_path / "data", config, 80, *overrides,
               *(absolute_store(tmp_path) if logger == "mlflow" else [])) == 0
    if logger == "mlflow":
        (run,) = mlflow_runs(tmp_path)
    else:
        (run,) = [folder for folder in (tmp_path / "lightning_logs").iterdir() if folder.is_dir()]
    alerts = read_history(run).texts.get("alerts/overfitting", [])
    assert len(alerts) == 1 and "overfitting: val_loss has not improved" in alerts[0][1], alerts
    report = (run / "report.md").read_text(encoding="utf-8")
    # Under W&B the report written at fit end used to read the offline run file before W&B had written the last
    # validations and the alert into it; the report now waits for the file to be complete.
    assert "**Overfitting** (the alarm was raised" in report


def test_an_mlflow_file_store_without_opt_in_is_one_line(tmp_path: Path, prepared_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'azgpt[mlflow]'")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try:
        mlflow.tracking.MlflowClient(f"file:{tmp_path / 'probe'}")
        pytest.skip(f"mlflow {mlflow.__version__} opens a file: store without MLFLOW_ALLOW_FILE_STORE")
    except mlflow.exceptions.MlflowException:
        pass
    assert fit(tmp_path, prepared_dir, MLFLOW_CONFIG, 3, *absolute_store(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "azgpt: error: MLflow: " in err and "MLFLOW_ALLOW_FILE_STORE=true" in err and "Traceback" not in err
