"""A run's report: ``report.png`` (the curves at a glance) and ``report.md`` (the numbers and a verdict).

Written into the run's folder when fit ends (``RunReport``) and by ``azgpt report RUN_DIR`` on any run, finished,
stopped or still running, whichever logger wrote it (see ``azgpt.train.history``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from azgpt.atomic import atomic_file, write_error
from azgpt.errors import AzGPTError
from azgpt.train.history import RunHistory, finite, read_history, wait_for_wandb_file
from azgpt.train.loggers import flush, is_wandb, run_dir as trainer_run_dir
from azgpt.train.monitoring import Evaluation, OverfitAlarm

SUMMARY_TAGS = ("val_loss", "val_ppl", "val_bpb", "train_eval_loss", "train_eval_ppl", "overfit_gap", "train_loss")
# (title, [(tag, label)], log scale): one panel each, drawn where at least one of its tags was logged.
PANELS = (
    ("loss", [("train_loss", "train (step mean, dropout on)"), ("train_eval_loss", "train (fixed blocks, eval)"),
              ("val_loss", "validation")], False),
    ("perplexity", [("train_eval_ppl", "train (fixed blocks, eval)"), ("val_ppl", "validation")], True),
    # LearningRateMonitor names curves lr-<optimizer class>/<group name>: AdamW alone under the GPT-2 recipe,
    # MuonWithAdamW (groups muon, decay, no_decay) under the modern one.
    ("learning rate", [("lr-AdamW/decay", "AdamW"), ("lr-AdamW", "AdamW"), ("lr-MuonWithAdamW/decay", "AdamW"),
                       ("lr-MuonWithAdamW/muon", "Muon")], False),
    ("tokens / s", [("tokens_per_sec", "tokens/s")], False),
    ("memory (GB)", [("system/rss_gb", "process RSS"), ("system/cuda_mem_peak_gb", "CUDA peak"),
                     ("system/cuda_mem_reserved_gb", "CUDA reserved")], False),
    ("device", [("system/gpu_temp_c", "GPU temperature (°C)"), ("system/gpu_util", "GPU util (%)"),
                ("system/cpu_util", "CPU util (%)")], False),
)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``run_dir``; returns their paths. What cannot be read is left
    out with a note on stderr; each file appears only when complete."""
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    if not history.scalars:
        raise AzGPTError(f"{run_dir} holds a run with no logged values yet: train for a few steps first")
    config = _run_config(run_dir, history.notes)
    for note in history.notes:
        print(f"azgpt report: note: {note}", file=sys.stderr)
    png, md = run_dir / "report.png", run_dir / "report.md"
    text = _markdown(history, run_dir, config)
    try:
        with atomic_file(png) as partial:
            _plot(history, run_dir, partial)
        with atomic_file(md) as partial:
            partial.write_text(text, encoding="utf-8")
    except OSError as exc:
        error = write_error(exc, run_dir, "the report into", "copy the run folder somewhere writable and run "
                                                             "azgpt report there")
        if error is None:
            raise
        raise error from None
    return png, md


def report_command(run_dir: Path) -> int:
    """Write report.png (loss, perplexity, learning rate, speed, device health) and report.md (final and best
    metrics, steps, tokens, wall time, data size and epochs, the overfitting verdict) into a run's folder.

    Args:
        run_dir: the run's folder, e.g. lightning_logs/version_0 (TensorBoard or CSVLogger), or the folder of a
            W&B run's checkpoints (<save_dir>/<project>/<run id>).
    """
    png, md = write_report(run_dir)
    print(f"wrote {png} and {md}")
    return 0


report_command.positional = True  # azgpt report RUN_DIR


class RunReport(L.Callback):
    """Writes the report (``write_report``) into the run's folder when fit ends, on rank zero.

    Under W&B this finishes the W&B run first: W&B writes its run file only then (see ``loggers.flush``).
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer_run_dir(trainer)
        if not trainer.is_global_zero or folder is None:
            return
        flush(trainer)  # so the files hold the last steps
        if any(is_wandb(logger) for logger in trainer.loggers) and not wait_for_wandb_file(folder):
            rank_zero_info(f"azgpt: W&B's run file for {folder} is still being written; azgpt report {folder} "
                           f"writes the report once it is")
        try:
            png, md = write_report(folder)
        except AzGPTError as exc:  # e.g. a logger azgpt cannot read back: the run itself is fine
            rank_zero_info(f"azgpt: no report: {exc}")
            return
        rank_zero_info(f"azgpt: report in {md} and {png}")


# -- the picture ---------------------------------------------------------------------------------------

def drawn_panels(history: RunHistory) -> list[tuple[str, list[tuple[str, str]], bool]]:
    """The panels of report.png for this run: each of ``PANELS`` with the series it logged, empty ones left out."""
    panels = [(title, [(tag, label) for tag, label in series if finite(history.curve(tag))], log)
              for title, series, log in PANELS]
    return [panel for panel in panels if panel[1]]


def _plot(history: RunHistory, run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    panels = drawn_panels(history)
    columns = 3 if len(panels) > 4 else 2
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for axis, (title, series, log) in zip(axes.flat, panels):
        for tag, label in series:
            points = finite(history.curve(tag))
            marker = "o" if len(points) < 30 else None
            axis.plot([p.step for p in points], [p.value for p in points], label=label, marker=marker, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if log:
            axis.set_yscale("log")
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"{run_dir}", fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=100, format="png")  # out may be a temporary name without .png
    plt.close(figure)


# -- the numbers ---------------------------------------------------------------------------------------

def _markdown(history: RunHistory, run_dir: Path, config: dict[str, Any]) -> str:
    lines = [f"# Run report: {run_dir}", "", f"Read from {history.source}.", "", "## Metrics", "",
             "| metric | final | at step | best | at step |", "|---|---|---|---|---|"]
    for tag in SUMMARY_TAGS:
        points = finite(history.curve(tag))
        if points:
            last = points[-1]
            best = min(points, key=lambda p: abs(p.value) if tag == "overfit_gap" else p.value)
            lines.append(f"| {tag} | {last.value:.4f} | {last.step} | {best.value:.4f} | {best.step} |")
    lines += ["", "## Training", ""]
    steps = max((p.step for points in history.scalars.values() for p in points), default=0)
    lines.append(f"- steps logged: up to {steps}")
    tokens = history.curve("tokens")
    if tokens:
        lines.append(f"- tokens trained: {tokens[-1].value:,.0f}")
    if history.wall_seconds is not None:
        lines.append(f"- wall time: {_duration(history.wall_seconds)}")
    speed = finite(history.curve("tokens_per_sec"))
    if speed:
        lines.append(f"- tokens/s: {sum(p.value for p in speed) / len(speed):,.0f} on average over the logged steps")
    lines += _data_lines(config, run_dir, tokens[-1].value if tokens else None)
    lines += ["", "## Overfitting", "", _verdict(history, config), ""]
    return "\n".join(lines)


def _run_config(run_dir: Path, notes: list[str]) -> dict[str, Any]:
    """The run's config.yaml (LightningCLI writes it beside the logs), or {} with a note in ``notes``."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, yaml.YAMLError) as exc:
        notes.append(f"{path} cannot be read ({type(exc).__name__}); the data lines and verdict leave it out")
        return {}
    if config is not None and not isinstance(config, dict):
        notes.append(f"{path} holds a {type(config).__name__}, not settings; the data lines and verdict leave it "
                     f"out")
        return {}
    return config or {}


def _data_lines(config: dict[str, Any], run_dir: Path, tokens: float | None) -> list[str]:
    data = config.get("data")
    data_dir = data.get("data_dir") if isinstance(data, dict) else None
    if not isinstance(data_dir, str) or not data_dir:
        return []
    # As given (relative to where fit ran), else relative to the folder holding lightning_logs/.
    meta_path = next((p for p in (Path(data_dir), run_dir.resolve().parent.parent / data_dir)
                      if (p / "meta.json").is_file()), None)
    if meta_path is None:
        return [f"- data: {data_dir} (its meta.json is not found from here)"]
    meta = json.loads((meta_path / "meta.json").read_text(encoding="utf-8"))
    train = ((meta.get("splits") or {}).get("train") or {}).get("tokens")
    val = ((meta.get("splits") or {}).get("val") or {}).get("tokens")
    lines = [f"- data: {data_dir}: {train:,} training tokens, {val:,} validation tokens" if train and val
             else f"- data: {data_dir}"]
    if train and tokens:
        lines.append(f"- epochs: {tokens / train:.2f} passes over the training tokens")
    return lines


def _verdict(history: RunHistory, config: dict[str, Any]) -> str:
    val = {p.step: p.value for p in history.curve("val_loss")}
    train = {p.step: p.value for p in history.curve("train_eval_loss")}
    common = sorted(set(val) & set(train))
    alerts = history.texts.get("alerts/overfitting")
    if alerts:
        return f"**Overfitting** (the alarm was raised at step {alerts[0][0]}): {alerts[0][1]}"
    if not common:
        return "No verdict: val_loss and train_eval_loss were not both logged."
    patience = config.get("early_stopping")
    alarm = OverfitAlarm(patience if isinstance(patience, int) and not isinstance(patience, bool) and patience > 0
                         else 3)
    for i in range(len(common)):  # replay the alarm over the logged validations
        alarm.history = [Evaluation(s, val[s], train[s]) for s in common[:i + 1]]
        message = alarm.verdict()
        if message:
            return f"**Overfitting**: {message}."
    best_step = min(common, key=lambda s: val[s] if math.isfinite(val[s]) else math.inf)
    last = common[-1]
    return (f"No overfitting seen over {len(common)} validations: the best val_loss {val[best_step]:.4f} is at step "
            f"{best_step}{' (the last)' if best_step == last else f', the last at step {last} is {val[last]:.4f}'}; "
            f"gap val - train {val[last] - train[last]:+.4f} at the end.")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"

