"""The run report: report.png is a real picture, report.md holds the event file's numbers; bad folders."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from azgpt.cli import main
from azgpt.train.report import write_report


def test_fit_writes_the_report_when_it_ends(trained_run: Path) -> None:
    assert (trained_run / "report.png").is_file() and (trained_run / "report.md").is_file()


def test_report_png_is_a_real_picture(trained_run: Path, tmp_path: Path) -> None:
    png, _ = write_report(trained_run)
    assert png.stat().st_size > 20_000
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # curves, text and axes, not a blank canvas
    assert (pixels[..., :3].mean(axis=-1) < 0.5).mean() > 0.005  # some ink


def test_report_md_holds_the_event_file_numbers(trained_run: Path) -> None:
    _, md = write_report(trained_run)
    text = md.read_text(encoding="utf-8")
    events = EventAccumulator(str(trained_run), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("val_loss", "train_eval_loss", "val_ppl"):
        values = events.Scalars(tag)
        last, best = values[-1], min(values, key=lambda e: e.value)
        assert f"| {tag} | {last.value:.4f} | {last.step} | {best.value:.4f} | {best.step} |" in text
    tokens = events.Scalars("tokens")[-1].value
    assert f"tokens trained: {tokens:,.0f}" in text
    assert "training tokens" in text and "epochs:" in text and "wall time:" in text
    assert "No overfitting seen over 2 validations" in text


def test_report_verb_on_a_folder_with_no_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} holds no run" in err and "Traceback" not in err
    assert not (tmp_path / "report.png").exists() and not (tmp_path / "report.md").exists()


def test_report_verb_writes_into_the_run_folder(trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    (trained_run / "report.md").unlink()
    assert main(["report", str(trained_run)]) == 0
    assert (trained_run / "report.md").is_file() and "wrote" in capsys.readouterr().out
