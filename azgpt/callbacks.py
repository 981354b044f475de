"""Callbacks azgpt adds to Lightning's own: training speed and a closing summary."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info


class TrainingSpeed(L.Callback):
    """Logs ``tokens_per_sec`` and, where the device's peak is known, ``mfu`` once per optimizer step,
    and prints the run's wall time and throughput when training ends.

    Written here rather than using ``ThroughputMonitor`` because that one plots against micro-batches,
    not optimizer steps, so its curves do not line up with the loss under gradient accumulation.
    Time spent in validation is left out of the rate.

    Args:
        peak_flops: the device's peak FLOP/s for MFU; None asks Lightning (known for CUDA GPUs only).
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._tokens = 0
        self._window_tokens = 0
        self._window_start = 0.0
        self._train_seconds = 0.0
        self._fit_start = 0.0
        self._steps_at_start = 0
        self._flops_per_token = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            dtype = torch.float16 if "16" in str(trainer.precision) else torch.float32
            self.peak_flops = get_available_flops(trainer.strategy.root_device, dtype)
        model = getattr(pl_module, "model", None)
        self._flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0
        self._steps_at_start = trainer.global_step
        self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = batch[0].numel() * trainer.world_size
        self._tokens += tokens
        self._window_tokens += tokens
        if trainer.fit_loop._should_accumulate():
            return
        if trainer.device_ids and trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = now - self._window_start
        self._train_seconds += elapsed
        rate = self._window_tokens / max(elapsed, 1e-9)
        metrics = {"tokens_per_sec": rate}
        if self.peak_flops and self._flops_per_token:
            metrics["mfu"] = rate * self._flops_per_token / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._window_tokens = 0
        self._window_start = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start += time.perf_counter() - getattr(self, "_paused_at", time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = trainer.global_step - self._steps_at_start
        wall = time.perf_counter() - self._fit_start
        rate = self._tokens / max(self._train_seconds, 1e-9)
        line = (f"trained {steps} optimizer steps ({self._tokens:,} tokens) in {wall:.1f}s wall time, "
                f"{rate:,.0f} tokens/s while training")
        val_loss = trainer.callback_metrics.get("val_loss")
        if val_loss is not None:
            line += f"; last val_loss {float(val_loss):.4f}"
        rank_zero_info(line)


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar with the right total under gradient accumulation.

    Lightning sizes the bar of an endless loader by the remaining *optimizer* steps but advances it once per
    micro-batch, so with ``accumulate_grad_batches: 4`` it overflows at a quarter of the run.
    """

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, remaining)
        return trainer.num_training_batches
