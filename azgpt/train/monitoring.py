"""Watching a run learn: train vs val charts, an overfitting alarm, and device health under ``system/``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import DeviceStatsMonitor, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from azgpt.errors import AzGPTError
from azgpt.train.loggers import log_text
from azgpt.train.lightning_private import should_accumulate

# TensorBoard's Custom Scalars tab: each chart overlays the listed tags (regular expressions, anchored here).
CHART_LAYOUT = {
    "train vs val": {
        "loss": ["Multiline", ["^train_loss$", "^train_eval_loss$", "^val_loss$"]],
        "perplexity": ["Multiline", ["^train_eval_ppl$", "^val_ppl$"]],
        "overfit gap (val_loss - train_eval_loss)": ["Multiline", ["^overfit_gap$"]],
    },
}
GB = 1024**3


class TrainValCharts(L.Callback):
    """Writes the custom-scalars layout (``CHART_LAYOUT``) when fit starts, to every TensorBoard logger:
    one chart with train and val loss, one with the two perplexities, one with the gap."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(CHART_LAYOUT)


@dataclass
class Evaluation:
    step: int
    val_loss: float
    train_eval_loss: float


class OverfitAlarm(L.Callback):
    """Says once, on the console and as text (``alerts/overfitting``), when the model overfits: val_loss has
    not beaten its best for ``patience`` validations, is above it now, while train_eval_loss kept falling.

    It names the best step and the checkpoint that holds it (the ``ModelCheckpoint`` monitoring val_loss).
    With ``EarlyStopping(monitor="val_loss", patience=N)`` and the same N, the alarm and the stop coincide.

    Args:
        patience: validations without a new best val_loss before the alarm (None: the patience of an
            ``EarlyStopping`` on val_loss among the trainer's callbacks, else 3).
    """

    def __init__(self, patience: int | None = None) -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise AzGPTError(f"OverfitAlarm patience must be a positive integer or null, got {patience!r}")
        self.patience = patience
        self.history: list[Evaluation] = []
        self.raised_at: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.patience is None:
            stoppers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping) and c.monitor == "val_loss"]
            self.patience = stoppers[0].patience if stoppers else 3

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.raised_at is not None:
            return
        metrics = trainer.callback_metrics
        if "val_loss" not in metrics or "train_eval_loss" not in metrics:
            return
        self.history.append(Evaluation(trainer.global_step, float(metrics["val_loss"]),
                                       float(metrics["train_eval_loss"])))
        message = self.verdict()
        if message is None:
            return
        self.raised_at = trainer.global_step
        message += f"; the best weights are in {_best_checkpoint(trainer) or 'no checkpoint (none monitors val_loss)'}"
        rank_zero_warn(f"azgpt: {message}")
        log_text(trainer, "alerts/overfitting", message)

    def verdict(self) -> str | None:
        """The alarm's sentence when the history shows overfitting, else None."""
        finite = [e for e in self.history if math.isfinite(e.val_loss)]
        if not finite:
            return None
        best = min(finite, key=lambda e: e.val_loss)
        since = self.history[self.history.index(best) + 1:]
        now = self.history[-1]
        if len(since) < self.patience or not now.val_loss > best.val_loss:
            return None
        if not now.train_eval_loss < best.train_eval_loss:
            return None  # both got worse: diverging, not overfitting
        return (f"overfitting: val_loss has not improved for {len(since)} validations (best {best.val_loss:.4f} "
                f"at step {best.step}, now {now.val_loss:.4f} at step {now.step}) while train_eval_loss fell from "
                f"{best.train_eval_loss:.4f} to {now.train_eval_loss:.4f}. Stop here, or add dropout / more data")

    def state_dict(self) -> dict[str, Any]:
        return {"history": [vars(e) for e in self.history], "raised_at": self.raised_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [Evaluation(**e) for e in state_dict.get("history", [])]
        self.raised_at = state_dict.get("raised_at")


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor == "val_loss" and callback.best_model_path:
            return callback.best_model_path
    return None


class DeviceHealth(DeviceStatsMonitor):
    """Device health every ``trainer.log_every_n_steps`` optimizer steps, under ``system/``.

    From Lightning (``trainer.accelerator.get_device_stats``, DeviceStatsMonitor's source): CUDA memory
    allocated / reserved / peak from ``torch.cuda.memory_stats``; system memory in use and CPU utilisation
    from psutil. Added by hand because DeviceStatsMonitor has neither: the process's RSS (psutil) and GPU
    utilisation, temperature and power (NVML, through torch.cuda's wrappers over ``nvidia-ml-py``).
    DeviceStatsMonitor's own hooks are replaced: they log ~80 raw keys per micro-batch under its class name.
    """

    def __init__(self) -> None:
        super().__init__(cpu_stats=True)
        self._process = psutil.Process()
        self._nvml_said = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        psutil.cpu_percent()  # the first reading is meaningless; start the interval here

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if should_accumulate(trainer):
            return
        every = trainer.log_every_n_steps
        if not every or trainer.global_step % every != 0:
            return
        pl_module.log_dict(self.read(trainer), on_step=True, on_epoch=False)

    def read(self, trainer: L.Trainer) -> dict[str, float]:
        """The ``system/*`` values now, on the trainer's device."""
        from lightning.pytorch.accelerators.cpu import get_cpu_stats

        device = trainer.strategy.root_device
        given = trainer.accelerator.get_device_stats(device)  # what DeviceStatsMonitor logs
        cpu = given if device.type == "cpu" else get_cpu_stats()
        stats = {"system/rss_gb": self._process.memory_info().rss / GB,
                 "system/ram_used_gb": (psutil.virtual_memory().total - psutil.virtual_memory().available) / GB,
                 "system/ram_percent": float(cpu["cpu_vm_percent"]),
                 "system/cpu_util": float(cpu["cpu_percent"])}
        if device.type == "cuda":
            stats.update({"system/cuda_mem_allocated_gb": given.get("allocated_bytes.all.current", 0) / GB,
                          "system/cuda_mem_reserved_gb": given.get("reserved_bytes.all.current", 0) / GB,
                          "system/cuda_mem_peak_gb": given.get("allocated_bytes.all.peak", 0) / GB})
            stats.update(self._nvml(device))
        return stats

    def _nvml(self, device: torch.device) -> dict[str, float]:
        try:
            return {"system/gpu_util": float(torch.cuda.utilization(device)),
                    "system/gpu_temp_c": float(torch.cuda.temperature(device)),
                    "system/gpu_power_w": torch.cuda.power_draw(device) / 1000.0}  # NVML reports milliwatts
        except Exception as exc:  # pynvml missing, or NVML not answering (some containers, MIG slices)
            if not self._nvml_said:
                rank_zero_info(f"azgpt: no GPU utilisation, temperature or power ({exc}); they need NVML: "
                               f"pip install nvidia-ml-py")
                self._nvml_said = True
            return {}
