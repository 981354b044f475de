"""TrainingSpeed: what it logs, when, and the peak it measures for MFU."""

from __future__ import annotations

import time

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


def test_validation_during_fit_is_left_out_of_the_rate() -> None:
    torch.manual_seed(0)
    model = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, warmup_steps=1)
    tokens = np.random.default_rng(0).integers(0, 64, 1000, dtype=np.uint16)
    train = DataLoader(RandomTrainBlocks(tokens, block_size=8, batch_size=2, seed=0), batch_size=None)
    val = DataLoader(FixedValBlocks(tokens, block_size=8, max_blocks=4), batch_size=2)
    speed = TrainingSpeed(peak_flops=0)
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=1, val_check_interval=4,
                        check_val_every_n_epoch=None, num_sanity_val_steps=1, logger=MemoryLogger(),
                        callbacks=[speed], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    assert "val_loss" in trainer.callback_metrics
    assert 0 < speed._train_seconds < time.perf_counter() - speed._fit_start


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
