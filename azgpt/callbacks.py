"""Callbacks azgpt adds to Lightning's own: training speed and a closing summary."""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from azgpt.errors import AzGPTError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                         repeats: int = 3) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls on ``device``: the practical peak to compute MFU against."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 3 if device.type == "cpu" else 20
    best = 0.0
    for _ in range(repeats + 1):  # the first round warms up
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        _sync(device)
        best = max(best, inner * 2 * size**3 / (time.perf_counter() - start))
    return best


def precision_dtype(precision: str | int) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision setting."""
    p = str(precision)
    if "bf16" in p:
        return torch.bfloat16
    return torch.float16 if "16" in p else torch.float32


class TrainingSpeed(L.Callback):
    """Logs ``tokens_per_sec`` and, where the device's peak is known, ``mfu`` once per optimizer step,
    and prints the run's wall time and throughput when training ends.

    Written here rather than using ``ThroughputMonitor`` because that one plots against micro-batches,
    not optimizer steps, so its curves do not line up with the loss under gradient accumulation.
    Time spent in validation is left out of the rate.

    The rate is measured over the optimizer steps between two logged steps (``trainer.log_every_n_steps``),
    so on CUDA it waits for the device only when it logs, never on the other steps.

    Args:
        peak_flops: the device's peak FLOP/s for ``mfu``. None: Lightning's datasheet figure where it knows
            the device (CUDA GPUs), else no ``mfu``; ``"measure"``: the best rate of 2048² matmuls in the
            training dtype, timed once when training starts (about a second on a CPU), as the benchmark
            ``bench/train_throughput.py`` does; 0: no ``mfu``.
    """

    def __init__(self, peak_flops: float | Literal["measure"] | None = None) -> None:
        if isinstance(peak_flops, str) and peak_flops != "measure":
            raise AzGPTError(f"TrainingSpeed peak_flops must be a number, measure or null, got {peak_flops!r}")
        self.peak_flops = peak_flops
        self._tokens = 0
        self._window_tokens = 0
        self._window_start = 0.0
        self._last_step_end = 0.0
        self._window_seconds = 0.0  # training time of the current window before a validation paused it
        self._train_seconds = 0.0
        self._fit_start = 0.0
        self._steps_at_start = 0
        self._flops_per_token = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device, dtype = trainer.strategy.root_device, precision_dtype(trainer.precision)
        if self.peak_flops is None:
            self.peak_flops = get_available_flops(device, dtype)
        elif self.peak_flops == "measure":
            self.peak_flops = measure_matmul_flops(device, dtype)
            rank_zero_info(f"azgpt: mfu is against a measured matmul peak of {self.peak_flops / 1e9:,.0f} GFLOP/s "
                           f"({str(dtype).removeprefix('torch.')}, {device.type})")
        model = getattr(pl_module, "model", None)
        self._flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0
        self._steps_at_start = trainer.global_step
        self._window_start = self._last_step_end = time.perf_counter()
        self._window_seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = batch[0].numel() * trainer.world_size
        self._tokens += tokens
        self._window_tokens += tokens
        if trainer.fit_loop._should_accumulate():
            return
        self._last_step_end = time.perf_counter()
        every = trainer.log_every_n_steps
        if not every or trainer.global_step % every != 0:
            return  # a step the logger will not write: measure nothing, wait for nothing
        _sync(trainer.strategy.root_device)
        now = time.perf_counter()
        elapsed = self._window_seconds + now - self._window_start
        self._train_seconds += elapsed
        rate = self._window_tokens / max(elapsed, 1e-9)
        metrics = {"tokens_per_sec": rate}
        if self.peak_flops and self._flops_per_token:
            metrics["mfu"] = rate * self._flops_per_token / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._window_tokens = 0
        self._window_seconds = 0.0
        self._window_start = now

    @staticmethod
    def _validating_within_training(trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validating_within_training(trainer):  # pause the clock; the last step ended just before
            self._window_seconds += max(0.0, self._last_step_end - self._window_start)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validating_within_training(trainer):
            self._window_start = self._last_step_end = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The steps after the last logged one (the time after them, e.g. a final checkpoint, is left out).
        self._train_seconds += self._window_seconds + max(0.0, self._last_step_end - self._window_start)
        steps = trainer.global_step - self._steps_at_start
        wall = time.perf_counter() - self._fit_start
        rate = self._tokens / max(self._train_seconds, 1e-9)
        line = (f"trained {steps} optimizer steps ({self._tokens:,} tokens) in {wall:.1f}s wall time, "
                f"{rate:,.0f} tokens/s while training")
        val_loss = trainer.callback_metrics.get("val_loss")
        if val_loss is not None:
            line += f"; last val_loss {float(val_loss):.4f}"
        rank_zero_info(line)
