"""Issue 23 item 15: azgpt report on run folders it cannot fully read: what it cannot read is left out with one
note, a folder it cannot write into is one line, and a W&B file cut mid-record is read up to its last record."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from azgpt.cli import main
from azgpt.train.history import read_history
from mount_helpers import tmpfs

METRICS = "epoch,step,train_loss,val_loss\n0,1,5.0,\n0,2,4.5,4.8\n0,3,4.0,4.6\n"


def csv_run(folder: Path, metrics: str = METRICS, config: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.csv").write_text(metrics, encoding="utf-8")
    if config is not None:
        (folder / "config.yaml").write_text(config, encoding="utf-8")
    return folder


def report(capsys, run: Path) -> tuple[int, str]:
    code = main(["report", str(run)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("config", ["just a string\n", "- a\n- list\n", "data: not a mapping\nearly_stopping: x\n"])
def test_a_config_that_is_not_settings_is_left_out(tmp_path: Path, capsys, config: str) -> None:
    run = csv_run(tmp_path / "run", config=config)
    code, err = report(capsys, run)
    assert code == 0 and "Traceback" not in err, err
    assert (run / "report.png").stat().st_size > 0 and "val_loss" in (run / "report.md").read_text()
    if not config.startswith("data"):
        assert err.count("azgpt report: note: ") == 1 and "config.yaml holds a" in err


def test_values_that_are_not_numbers_are_left_out_with_one_note(tmp_path: Path, capsys) -> None:
    run = csv_run(tmp_path / "run", METRICS + "0,abc,3.0,3.0\n0,4,abc,4.4\n")
    code, err = report(capsys, run)
    assert code == 0 and err.count("\n") == 1 and "left out 2 values that are not numbers" in err, err
    assert [p.step for p in read_history(run).curve("val_loss")] == [2, 3, 4]


def test_a_metrics_csv_without_step_is_one_line(tmp_path: Path, capsys) -> None:
    run = csv_run(tmp_path / "run", "epoch,loss\n0,1.0\n")
    code, err = report(capsys, run)
    assert code == 2 and err.count("\n") == 1 and "metrics.csv has no step column" in err, err


def test_a_run_on_a_read_only_mount_is_one_line(tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "ro") as mount:
        run = csv_run(mount / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        code, err = report(capsys, run)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"azgpt: error: cannot write the report into {run}: it is on a read-only filesystem")
        assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]


def wandb_file(path: Path, steps: int) -> bytes:
    """A W&B run file of ``steps`` history records, framed as W&B writes it (LevelDB log chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = bytearray(b":W&B\xbe\xef\x01")
    for step in range(1, steps + 1):
        record = wandb_internal_pb2.Record()
        for key, value in (("trainer/global_step", step), ("val_loss", 5.0 - step / 10)):
            item = record.history.item.add()
            item.key, item.value_json = key, str(value)
        payload = record.SerializeToString()
        data += struct.pack("<IHB", 0, len(payload), 1) + payload
    path.write_bytes(bytes(data))
    return bytes(data)


def test_a_wandb_file_cut_mid_record_is_read_up_to_its_last_record(tmp_path: Path, capsys) -> None:
    pytest.importorskip("wandb")
    run = tmp_path / "offline-run-1"
    run.mkdir()
    whole = wandb_file(run / "run-abc.wandb", 3)
    (run / "run-abc.wandb").write_bytes(whole[:-5])  # the last record cut short
    assert [p.step for p in read_history(run).curve("val_loss")] == [1, 2]
    code, err = report(capsys, run)
    assert code == 0 and "Traceback" not in err, err


def test_the_report_waits_for_a_wandb_file_still_being_written(tmp_path: Path) -> None:
    """Issue 23 item 6: the end-of-fit report waits for W&B's writer instead of reading a file not yet written."""
    pytest.importorskip("wandb")
    import threading

    from azgpt.train.history import wait_for_wandb_file

    run = tmp_path / "offline-run-1"
    run.mkdir()
    whole = wandb_file(tmp_path / "whole.wandb", 3)
    path = run / "run-abc.wandb"
    path.write_bytes(whole[:7])  # the header only, as W&B's core leaves it before its first flush
    writer = threading.Timer(1.0, lambda: path.write_bytes(whole))
    writer.start()
    try:
        assert wait_for_wandb_file(run, timeout=30, poll=0.2)
    finally:
        writer.join()
    assert [p.step for p in read_history(run).curve("val_loss")] == [1, 2, 3]
    assert not wait_for_wandb_file(tmp_path / "nothing-here", timeout=0.3, poll=0.1)


@pytest.mark.slow
def test_under_wandb_each_run_keeps_its_own_config(tmp_path: Path, prepared_dir: Path, monkeypatch) -> None:
    """Issue 23 item 6: config.yaml goes beside the run's checkpoints and report, not into the shared save_dir."""
    pytest.importorskip("wandb")
    from conftest import tiny_fit_args

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wandb.yaml").write_text("trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
                                         "    init_args: {save_dir: ., project: lightning_logs}\n")
    assert main(tiny_fit_args(prepared_dir, max_steps=3) + ["--config", "wandb.yaml"]) == 0
    (run,) = [p for p in (tmp_path / "lightning_logs").iterdir() if (p / "checkpoints").is_dir()]
    assert not (tmp_path / "config.yaml").exists()
    assert "data_dir" in (run / "config.yaml").read_text() and "val_loss" in (run / "report.md").read_text()
