"""Watching a run learn: train vs val like for like, the custom-scalars layout, device health."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata as custom_scalar_metadata

from azgpt.data.datamodule import FixedTrainBlocks
from azgpt.errors import AzGPTError
from azgpt.train.module import AzGPT
from azgpt.train.monitoring import Evaluation, OverfitAlarm
from tests.conftest import TINY_BLOCK, tiny_fit_args

SAMPLE = Path(__file__).resolve().parents[2] / "azgpt" / "sample_corpus"


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def test_train_eval_loss_and_gap_are_logged_at_every_validation(trained_run: Path) -> None:
    val, train_eval, gap = (curve(trained_run, t) for t in ("val_loss", "train_eval_loss", "overfit_gap"))
    assert [s for s, _ in val] == [s for s, _ in train_eval] == [s for s, _ in gap] and len(val) == 2
    for (_, v), (_, t), (_, g) in zip(val, train_eval, gap):
        assert g == pytest.approx(v - t, abs=1e-5)
    ppl = curve(trained_run, "train_eval_ppl")
    assert [p for _, p in ppl] == pytest.approx([np.exp(t) for _, t in train_eval], rel=1e-5)


def test_train_eval_loss_is_token_weighted_nll_over_fixed_training_blocks(trained_run: Path,
                                                                          prepared_dir: Path) -> None:
    # last.ckpt holds the weights of the last validation (step 6); the fit used val_max_blocks 13.
    model = AzGPT.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", map_location="cpu",
                                       weights_only=True).eval()
    blocks = FixedTrainBlocks(np.load(prepared_dir / "train.npy", mmap_mode="r"), TINY_BLOCK, 13)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(blocks)):
            x, y = blocks[i]
            logits, _ = model.model(x[None])
            nll += F.cross_entropy(logits[0].double(), y, reduction="sum").item()
            count += y.numel()
    assert len(blocks) == 13 and count == 13 * TINY_BLOCK
    assert curve(trained_run, "train_eval_loss")[-1][1] == pytest.approx(nll / count, abs=1e-5)


def test_fixed_training_blocks_spread_over_the_file_and_stay_inside_it() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    blocks = FixedTrainBlocks(tokens, 32, 10)
    starts = [int(blocks[i][0][0]) for i in range(10)]
    assert starts[0] == 0 and starts[-1] == 1000 - 33 and starts == sorted(set(starts))
    assert all(len(blocks[i][1]) == 32 for i in range(10))


def test_event_file_holds_the_train_vs_val_layout(trained_run: Path) -> None:
    tensors = events(trained_run).Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensors[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert any("val_loss" in t for t in charts["loss"]) and any("train_eval_loss" in t for t in charts["loss"])
    assert any("val_ppl" in t for t in charts["perplexity"]) and any("train_eval_ppl" in t
                                                                     for t in charts["perplexity"])
    # The gap chart's pattern must match the logged tag exactly (a regex TensorBoard applies to tag names).
    gap = charts["overfit gap (val_loss - train_eval_loss)"]
    logged = events(trained_run).Tags()["scalars"]
    assert [tag for tag in logged if any(re.search(pattern, tag) for pattern in gap)] == ["overfit_gap"]


def test_rss_is_logged_with_a_sane_value(trained_run: Path) -> None:
    import resource

    # The fit ran in this process: every RSS it logged lies between what torch and Lightning alone take
    # (well over 100 MB) and this process's peak so far (ru_maxrss, KiB on Linux).
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3
    values = [v for _, v in curve(trained_run, "system/rss_gb")]
    assert values and all(0.1 < v <= peak_gb for v in values), (values, peak_gb)
    tags = events(trained_run).Tags()["scalars"]
    assert {"system/ram_used_gb", "system/cpu_util"} <= set(tags)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory, utilisation and temperature need a GPU")
def test_cuda_health_is_read_on_a_gpu() -> None:
    import lightning as L

    from azgpt.train.monitoring import DeviceHealth

    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False)
    torch.ones(1024, device="cuda")
    stats = DeviceHealth().read(trainer)
    assert stats["system/cuda_mem_peak_gb"] > 0
    assert 0 < stats["system/gpu_temp_c"] < 120 and 0 <= stats["system/gpu_util"] <= 100


class FakeNVML:
    """torch.cuda's NVML readers with fixed answers, or all raising as they do when pynvml is missing."""

    def __init__(self, missing: bool = False) -> None:
        self.missing = missing
        self.devices: list[torch.device] = []

    def _answer(self, value: float, device: torch.device) -> float:
        if self.missing:
            raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")
        self.devices.append(device)
        return value

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "utilization", lambda device: self._answer(87, device))
        monkeypatch.setattr(torch.cuda, "temperature", lambda device: self._answer(64, device))
        monkeypatch.setattr(torch.cuda, "power_draw", lambda device: self._answer(312_500, device))  # mW


def cuda_trainer(monkeypatch: pytest.MonkeyPatch) -> object:
    """What DeviceHealth.read needs of a trainer on cuda:1, with torch.cuda.memory_stats answering."""
    from types import SimpleNamespace

    from lightning.pytorch.accelerators.cuda import CUDAAccelerator

    stats = {"allocated_bytes.all.current": 3 * 1024**3, "reserved_bytes.all.current": 4 * 1024**3,
             "allocated_bytes.all.peak": 5 * 1024**3}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: dict(stats))
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 1)),
                           accelerator=CUDAAccelerator())


def test_cuda_health_reads_memory_and_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    from azgpt.train.monitoring import DeviceHealth

    nvml = FakeNVML()
    nvml.install(monkeypatch)
    stats = DeviceHealth().read(cuda_trainer(monkeypatch))
    assert stats["system/cuda_mem_allocated_gb"] == 3.0
    assert stats["system/cuda_mem_reserved_gb"] == 4.0
    assert stats["system/cuda_mem_peak_gb"] == 5.0
    assert stats["system/gpu_util"] == 87.0 and stats["system/gpu_temp_c"] == 64.0
    assert stats["system/gpu_power_w"] == 312.5  # NVML's milliwatts in watts
    assert nvml.devices == [torch.device("cuda", 1)] * 3  # the trainer's device, not cuda:0
    assert {"system/rss_gb", "system/ram_used_gb", "system/cpu_util"} <= set(stats)


def test_cuda_health_without_nvml_keeps_memory_and_says_so_once(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from azgpt.train.monitoring import DeviceHealth

    FakeNVML(missing=True).install(monkeypatch)
    health, trainer = DeviceHealth(), cuda_trainer(monkeypatch)
    with caplog.at_level(logging.INFO):
        first, second = health.read(trainer), health.read(trainer)
    for stats in (first, second):
        assert stats["system/cuda_mem_peak_gb"] == 5.0
        assert not any(key.startswith("system/gpu_") for key in stats)
    said = [r.getMessage() for r in caplog.records if "nvidia-ml-py" in r.getMessage()]
    assert len(said) == 1 and "pynvml does not seem to be installed" in said[0]


# -- the overfitting alarm -------------------------------------------------------------------------------

def alarm_after(history: list[tuple[float, float]], patience: int = 3) -> str | None:
    alarm = OverfitAlarm(patience)
    alarm.history = [Evaluation(10 * (i + 1), v, t) for i, (v, t) in enumerate(history)]
    return alarm.verdict()


def test_alarm_when_val_rises_for_patience_validations_while_train_falls() -> None:
    rising = [(3.0, 3.0), (2.5, 2.4), (2.6, 2.2), (2.7, 2.0), (2.8, 1.8)]
    assert alarm_after(rising[:4]) is None  # two validations since the best: not yet
    message = alarm_after(rising)
    assert "best 2.5000 at step 20" in message and "now 2.8000 at step 50" in message


@pytest.mark.parametrize("history", [
    [(3.0, 3.0), (2.5, 2.4), (2.4, 2.2), (2.3, 2.0), (2.2, 1.8)],  # healthy: both fall
    [(3.0, 3.0), (2.5, 2.4), (2.6, 2.5), (2.7, 2.6), (2.8, 2.7)],  # diverging: both rise
    [(3.0, 3.0), (2.5, 2.4), (2.6, 2.2), (2.5, 2.0), (2.5, 1.8)],  # level, not above the best
])
def test_no_alarm_for_healthy_diverging_or_level_runs(history: list[tuple[float, float]]) -> None:
    assert alarm_after(history) is None


def test_alarm_rejects_a_bad_patience() -> None:
    with pytest.raises(AzGPTError, match="patience"):
        OverfitAlarm(0)


def test_healthy_run_raises_nothing(trained_run: Path) -> None:
    assert not [t for t in events(trained_run).Tags()["tensors"] if t.startswith("alerts/")]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run made to overfit: 10 short documents (about 800 training tokens), no dropout, a high lr."""
    from azgpt.cli import main
    from azgpt.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("overfit")
    lines = [line for line in (SAMPLE / "hekayeler.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    (root / "corpus.txt").write_text("\n\n".join(lines[:10]), encoding="utf-8")
    prepare(PrepareConfig(out=root / "data", corpus=[str(root / "corpus.txt")], vocab_size=300, block_size=16,
                          val_fraction=0.4))
    args = tiny_fit_args(root / "data", max_steps=80, **{
        "--data.vocab_size": 300, "--data.block_size": 16, "--data.batch_size": 8, "--data.val_max_blocks": 8,
        "--model.n_embd": 64, "--model.learning_rate": 1e-2, "--trainer.accumulate_grad_batches": 1,
        "--val_every_n_steps": 4, "--trainer.log_every_n_steps": 10, "--early_stopping": 3})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    return root / "lightning_logs" / "version_0"


@pytest.mark.slow
def test_overfitting_run_raises_the_alarm_once_and_early_stopping_stops_it(overfit_run: Path) -> None:
    accumulator = events(overfit_run)
    alerts = accumulator.Tensors("alerts/overfitting/text_summary")
    assert len(alerts) == 1
    text = alerts[0].tensor_proto.string_val[0].decode()
    val = curve(overfit_run, "val_loss")
    best_step, best = min(val, key=lambda sv: sv[1])
    assert f"at step {best_step + 1}" in text or f"at step {best_step}" in text
    assert "best-" in text and ".ckpt" in text  # the checkpoint holding the best weights
    # Stopped by EarlyStopping three validations after the best, well before max_steps.
    steps = [s for s, _ in val]
    assert steps.index(best_step) == len(steps) - 4 and steps[-1] < 79
    assert val[-1][1] > best and curve(overfit_run, "train_eval_loss")[-1][1] < dict(
        curve(overfit_run, "train_eval_loss"))[best_step]


@pytest.mark.slow
def test_the_report_of_an_overfitting_run_says_so(overfit_run: Path) -> None:
    text = (overfit_run / "report.md").read_text(encoding="utf-8")
    assert "**Overfitting** (the alarm was raised" in text and "best-" in text
