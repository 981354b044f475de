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


def test_the_learning_rate_panel_of_a_gpt2_run(trained_run: Path) -> None:
    from azgpt.train.history import read_history
    from azgpt.train.report import drawn_panels

    panels = {title: [label for _, label in series] for title, series, _ in drawn_panels(read_history(trained_run))}
    assert panels["learning rate"] == ["AdamW"]


@pytest.mark.slow
def test_a_modern_recipe_run_reports_both_learning_rates(prepared_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from azgpt.train.history import read_history
    from azgpt.train.report import drawn_panels
    from tests.conftest import tiny_fit_args

    monkeypatch.chdir(tmp_path)
    args = tiny_fit_args(prepared_dir, max_steps=4, **{"--model.recipe": "modern", "--model.learning_rate": "0.003",
                                                       "--model.muon_lr": "0.04", "--model.muon_warmup_steps": "2"})
    assert main(args) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    history = read_history(run)
    panels = {title: series for title, series, _ in drawn_panels(history)}
    assert panels["learning rate"] == [("lr-MuonWithAdamW/decay", "AdamW"), ("lr-MuonWithAdamW/muon", "Muon")]
    muon = [p.value for p in history.curve("lr-MuonWithAdamW/muon")]
    adamw = [p.value for p in history.curve("lr-MuonWithAdamW/decay")]
    # Warmup over 2 steps, then cosine decay: the peak is the configured rate.
    assert max(muon) == pytest.approx(0.04) and max(adamw) == pytest.approx(0.003)
    assert muon[0] < max(muon) and adamw[0] < max(adamw)
    assert (run / "report.png").is_file() and "val_bpb" in (run / "report.md").read_text(encoding="utf-8")
