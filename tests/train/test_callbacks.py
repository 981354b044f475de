"""TrainingSpeed: what it logs, when, and the peak it measures for MFU."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader

from azgpt.train.callbacks import TrainingSpeed
from azgpt.data.datamodule import FixedValBlocks, RandomTrainBlocks
from azgpt.errors import AzGPTError
from azgpt.train.module import AzGPT


class MemoryLogger(Logger):
    """Keeps every (step, metrics) the trainer writes."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))


def tiny_fit(speed: TrainingSpeed, max_steps: int = 4, log_every: int = 2) -> MemoryLogger:
    torch.manual_seed(0)
    model = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, warmup_steps=1)
    tokens = np.random.default_rng(0).integers(0, 64, 1000, dtype=np.uint16)
    loader = DataLoader(RandomTrainBlocks(tokens, block_size=8, batch_size=2, seed=0), batch_size=None)
    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, log_every_n_steps=log_every, logger=logger,
                        callbacks=[speed], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, train_dataloaders=loader)
    return logger


def test_logs_tokens_per_sec_and_mfu_on_logged_steps_only() -> None:
    speed = TrainingSpeed(peak_flops=1e12)
    logger = tiny_fit(speed, max_steps=4, log_every=2)
    logged = [(step, m) for step, m in logger.records if "tokens_per_sec" in m]
    assert [step for step, _ in logged] == [1, 3]  # Lightning writes optimizer steps 2 and 4 as steps 1 and 3
    for _, metrics in logged:
        assert metrics["tokens_per_sec"] > 0
        assert 0 < metrics["mfu"] < 1
    assert [m["tokens"] for _, m in logged] == [2 * 2 * 2 * 8, 4 * 2 * 2 * 8]  # trained so far
    assert speed._tokens == 4 * 2 * 2 * 8  # steps x accumulation x rows x block


class FakeClock:
    """``time.perf_counter`` that moves only when told: 1 s per training micro-batch, 100 s per validation batch."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class AdvanceClock(L.Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args) -> None:
        self.clock.now += 1.0

    def on_validation_batch_start(self, *args) -> None:
        self.clock.now += 100.0


def test_validation_during_fit_is_left_out_of_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("azgpt.train.callbacks.time", clock)
    torch.manual_seed(0)
    model = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, warmup_steps=1)
    tokens = np.random.default_rng(0).integers(0, 64, 1000, dtype=np.uint16)
    train = DataLoader(RandomTrainBlocks(tokens, block_size=8, batch_size=2, seed=0), batch_size=None)
    val = DataLoader(FixedValBlocks(tokens, block_size=8, max_blocks=4), batch_size=2)
    speed, logger = TrainingSpeed(peak_flops=0), MemoryLogger()
    # Validation after micro-batches 4 and 8 (optimizer steps 2 and 4), each 2 batches = 200 fake seconds.
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=1, val_check_interval=4,
                        check_val_every_n_epoch=None, num_sanity_val_steps=1, logger=logger,
                        callbacks=[AdvanceClock(clock), speed], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    assert "val_loss" in trainer.callback_metrics
    assert clock.now > 400  # the validations did take fake time
    assert speed._train_seconds == 8.0  # 8 micro-batches of 1 s, nothing of validation
    rates = [m["tokens_per_sec"] for _, m in logger.records if "tokens_per_sec" in m]
    assert rates == [2 * 2 * 8 / 2.0] * 4  # each step: 2 micro-batches x 2 rows x 8 tokens in 2 s


def test_progress_bar_counts_optimizer_steps() -> None:
    from azgpt.train.callbacks import StepProgressBar

    bar = StepProgressBar()
    seen: list[int] = []

    class Watch(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            seen.append(bar.train_progress_bar.n)

    torch.manual_seed(0)
    model = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, warmup_steps=1)
    tokens = np.random.default_rng(0).integers(0, 64, 1000, dtype=np.uint16)
    loader = DataLoader(RandomTrainBlocks(tokens, block_size=8, batch_size=2, seed=0), batch_size=None)
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=4, logger=False, callbacks=[bar, Watch()],
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, train_dataloaders=loader)
    assert bar.train_progress_bar.total == 3
    assert seen == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]  # one tick per optimizer step, none per micro-batch
    assert bar.train_progress_bar.n == 3


@pytest.mark.parametrize("peak", [None, 0])
def test_no_mfu_on_cpu_unless_asked(peak) -> None:
    logger = tiny_fit(TrainingSpeed(peak_flops=peak), max_steps=2, log_every=1)
    logged = [m for _, m in logger.records if "tokens_per_sec" in m]
    assert logged and not any("mfu" in m for m in logged)


def test_measures_the_peak_once_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("azgpt.train.callbacks.measure_matmul_flops",
                        lambda device, dtype: calls.append((device.type, dtype)) or 5e11)
    speed = TrainingSpeed(peak_flops="measure")
    logger = tiny_fit(speed, max_steps=2, log_every=1)
    assert calls == [("cpu", torch.float32)]
    assert speed.peak_flops == 5e11
    assert any("mfu" in m for _, m in logger.records)


def test_rejects_unknown_peak_word() -> None:
    with pytest.raises(AzGPTError, match="peak_flops"):
        TrainingSpeed(peak_flops="fast")
