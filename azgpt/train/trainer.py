"""The Trainer azgpt trains with, for the command line and for notebooks alike.

``build_trainer(**kwargs)`` is ``lightning.Trainer(**kwargs)`` plus azgpt's defaults, each added only when the
caller did not bring its own: atomic checkpoint writes (``AtomicCheckpointIO``), a graceful stop on SIGTERM /
SIGINT (``GracefulStop``), ``last.ckpt`` saved at the final step (``SaveLastAtEnd``, and a
``ModelCheckpoint`` keeping it when the callbacks have none), the model folder written when training ends
(``WriteModelFolder``), the data budget stated when fit starts (``DataBudgetCheck``), no empty run folder
after a failed start (``NoEmptyRunFolder``), a progress bar that counts optimizer steps under accumulation, and on a
CPU the faster of bf16-mixed and 32-true for a ``16-mixed`` request.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_info

from azgpt.train.budget import DataBudgetCheck
from azgpt.train.callbacks import StepProgressBar
from azgpt.train.resume import AtomicCheckpointIO, SaveLastAtEnd
from azgpt.train.loggers import NoEmptyRunFolder
from azgpt.train.model_folder import WriteModelFolder
from azgpt.train.precision import resolve_cpu_precision
from azgpt.train.signals import GracefulStop


def trains_on_cpu(accelerator: object) -> bool:
    """Whether Lightning will run on the CPU: asked for, or ``auto`` with neither CUDA nor Apple's MPS."""
    if isinstance(accelerator, str) and accelerator != "auto":
        return accelerator == "cpu"
    if accelerator is not None and not isinstance(accelerator, str):
        return False  # an Accelerator object: the user chose, leave precision to them
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def choose_precision(accelerator: object, precision: Any) -> Any:
    """``precision`` as it will run: on a CPU a 16-mixed request becomes bf16-mixed or 32-true (logged once)."""
    if not trains_on_cpu(accelerator):
        return precision
    chosen = resolve_cpu_precision(precision)
    if chosen is None:
        return precision
    rank_zero_info(f"azgpt: training on the CPU, so precision {precision} becomes {chosen.precision} "
                   f"({chosen.reason})")
    return chosen.precision


def _as_list(configured: object) -> list:
    return [] if configured is None else list(configured) if isinstance(configured, (list, tuple)) else [configured]


def _with_default(items: list, kind: type, make: type) -> list:
    """``items`` with ``make()`` added when none of them is a ``kind``."""
    return items if any(isinstance(item, kind) for item in items) else [*items, make()]


def _last_only() -> ModelCheckpoint:
    """A ModelCheckpoint that keeps only ``last.ckpt`` (nothing to rank runs by without a monitored metric)."""
    return ModelCheckpoint(save_last=True, save_top_k=0)


def with_azgpt_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """Trainer keyword arguments with azgpt's plugins and callbacks added where the caller has none."""
    settings = dict(settings)
    settings["plugins"] = _with_default(_as_list(settings.get("plugins")), CheckpointIO, AtomicCheckpointIO)
    callbacks = _with_default(_as_list(settings.get("callbacks")), GracefulStop, GracefulStop)
    callbacks = _with_default(callbacks, SaveLastAtEnd, SaveLastAtEnd)
    if settings.get("enable_checkpointing") is not False:
        # Every fit leaves last.ckpt, even when a config replaces the callbacks list (``--trainer.callbacks
        # null``): without a ModelCheckpoint Lightning's default one saves only at epoch ends, which never come.
        callbacks = _with_default(callbacks, ModelCheckpoint, _last_only)
    callbacks = _with_default(callbacks, WriteModelFolder, WriteModelFolder)  # after last.ckpt, which it names
    callbacks = _with_default(callbacks, DataBudgetCheck, DataBudgetCheck)
    callbacks = _with_default(callbacks, NoEmptyRunFolder, NoEmptyRunFolder)
    if settings.get("enable_progress_bar") is not False:
        callbacks = _with_default(callbacks, ProgressBar, StepProgressBar)
    if settings.get("logger") is False:
        callbacks = _without_logging_callbacks(callbacks)
    settings["callbacks"] = callbacks
    return settings


# Callbacks that only write to a logger, and that Lightning refuses to start without one.
LOGGING_ONLY = (LearningRateMonitor, DeviceStatsMonitor)


def _without_logging_callbacks(callbacks: list) -> list:
    """``callbacks`` less those with nothing to do under ``logger: false`` (Lightning would stop the run)."""
    dropped = [type(c).__name__ for c in callbacks if isinstance(c, LOGGING_ONLY)]
    if dropped:
        rank_zero_info(f"azgpt: trainer.logger is false, so {', '.join(dropped)} (which only log) are left out")
    return [c for c in callbacks if not isinstance(c, LOGGING_ONLY)]


def build_trainer(**kwargs: Any) -> L.Trainer:
    """``lightning.Trainer(**kwargs)`` with azgpt's defaults (see the module docstring).

    >>> trainer = build_trainer(max_steps=100, accumulate_grad_batches=4, gradient_clip_val=1.0, logger=False)
    """
    settings = with_azgpt_defaults(kwargs)
    settings["precision"] = choose_precision(settings.get("accelerator", "auto"), settings.get("precision"))
    if settings["precision"] is None:
        del settings["precision"]
    return L.Trainer(**settings)
