"""Callbacks and config for the resume / signal / NaN tests (importable by class path, in and out of process)."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
import yaml

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
MAX_STEPS = 6
ACCUMULATE = 4


class LossRecorder(L.Callback):
    """Appends ``<optimizer step> <mean loss as float.hex()>`` per optimizer step to ``path`` (exact, bitwise),
    and saves the final weights and optimizer state to ``path + ".final.pt"``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop._should_accumulate():
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step} {float(pl_module._step_loss).hex()}\n")

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"model": pl_module.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                    "global_step": trainer.global_step}, self.path + ".final.pt")


class SelfSignal(L.Callback):
    """Sends ``signal`` to this very process while micro-batch ``micro`` (0-based) of optimizer step ``step``
    (1-based) runs: a real signal, arriving in the middle of an accumulation window."""

    def __init__(self, signal: str = "SIGTERM", step: int = 2, micro: int = 1) -> None:
        self.signum = getattr(signal_module, signal)
        self.step = step
        self.micro = micro

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step and pl_module._micro_batches == self.micro:
            os.kill(os.getpid(), self.signum)


signal_module = signal


class Stall(L.Callback):
    """Blocks for good once optimizer step ``step`` is done, so a test can kill the run before it ends."""

    def __init__(self, step: int = 5) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            time.sleep(3600)


class Poison(L.Callback):
    """Makes optimizer step ``step`` (1-based) non-finite: its gradients (``what="grad"``) or its loss."""

    def __init__(self, step: int = 3, what: str = "grad") -> None:
        self.step = step
        self.what = what

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 != self.step:
            return
        if self.what == "grad":
            next(pl_module.parameters()).grad.view(-1)[0] = math.nan
        elif pl_module._loss_sum is not None:
            pl_module._loss_sum = pl_module._loss_sum + math.inf


def write_config(run_dir: Path, data_dir: Path, *, dropout: float = 0.1, every_step_checkpoint: bool = False,
                 extra_callbacks: list[dict] | None = None) -> Path:
    """A tiny training config logging to ``run_dir/lightning_logs`` and recording losses to ``run_dir/losses.txt``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val_loss", "save_last": True, "filename": "best-{step}"}},
        {"class_path": "resume_helpers.LossRecorder", "init_args": {"path": str(run_dir / "losses.txt")}},
    ]
    if every_step_checkpoint:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "filename": "every-{step}"}})
    callbacks += extra_callbacks or []
    config = {
        "seed_everything": 1337,
        "val_every_n_steps": 2,
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": dropout, "learning_rate": 3e-3,
                  "warmup_steps": 2, "decay_steps": 8},
        "data": {"data_dir": str(data_dir), "vocab_size": 300, "block_size": 32, "batch_size": 4,
                 "val_max_blocks": 4},
        "trainer": {
            "max_steps": MAX_STEPS, "accumulate_grad_batches": ACCUMULATE, "gradient_clip_val": 1.0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "lightning_logs"}},
            "callbacks": callbacks,
        },
    }
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_losses(run_dir: Path) -> dict[int, torch.Tensor]:
    """Optimizer step -> that step's mean training loss, exactly as recorded (last record wins)."""
    losses: dict[int, torch.Tensor] = {}
    path = run_dir / "losses.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            step, value = line.split()
            losses[int(step)] = torch.tensor(float.fromhex(value), dtype=torch.float32)
    return losses


def read_final(run_dir: Path) -> dict:
    return torch.load(run_dir / "losses.txt.final.pt", weights_only=True)


class CtrlCTwice(L.Callback):
    """Presses Ctrl-C twice in a row (two real SIGINTs to this process) when optimizer step ``step`` starts."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step and pl_module._micro_batches == 0:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
