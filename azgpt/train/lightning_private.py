"""Every private Lightning and torch member azgpt uses, in one place, each for want of a public way.

An upgrade may rename any of them: tests/train/test_lightning_private.py then names the one that is gone, and at
run time each function below stops with one line naming it instead of an AttributeError deep in a run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from azgpt.errors import AzGPTError


def _private(owner: object, name: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise AzGPTError(f"{type(owner).__name__}.{name} is gone in lightning {L.__version__} / torch "
                         f"{torch.__version__}, and azgpt relies on it (azgpt/train/lightning_private.py): install "
                         f"the versions pyproject.toml names") from None


def should_accumulate(trainer: L.Trainer) -> bool:
    """Whether the micro-batch that just ran is not the last of its optimizer step. Lightning's own answer, which
    also knows when an epoch's end forces a step; no public API gives it."""
    return _private(trainer.fit_loop, "_should_accumulate")()


def forget_sigterm(trainer: L.Trainer) -> None:
    """Take over a SIGTERM that Lightning's handler recorded during setup (azgpt stops at the step boundary)."""
    _private(trainer, "_signal_connector").received_sigterm = False


def save_last_now(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Bring ``callback``'s ``last.ckpt`` to the current step, named and recorded exactly as ModelCheckpoint
    does (Lightning 2.6 writes it only alongside another save)."""
    if _private(callback, "_last_global_step_saved") != trainer.global_step:
        _private(callback, "_save_last_checkpoint")(trainer, _private(callback, "_monitor_candidates")(trainer))


def unscaled_already(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran this step (calling it twice raises)."""
    return _private(scaler, "_per_optimizer_states")[id(optimizer)]["stage"].name != "READY"


# (owner, member, what uses it): instance attributes are checked on a fresh instance.
PRIVATE_MEMBERS = (
    ("lightning.pytorch.loops.fit_loop._FitLoop", "_should_accumulate", "should_accumulate"),
    ("lightning.pytorch.trainer.trainer.Trainer", "_signal_connector", "forget_sigterm"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint", "save_last_now"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates", "save_last_now"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_last_global_step_saved", "save_last_now"),
    ("torch.amp.GradScaler", "_per_optimizer_states", "unscaled_already"),
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path", "FinetuneCLI._parse_ckpt_path (an override)"),
)


def _instances() -> dict[str, object]:
    return {"lightning.pytorch.trainer.trainer.Trainer": L.Trainer(logger=False, enable_checkpointing=False,
                                                                   enable_progress_bar=False,
                                                                   enable_model_summary=False),
            "lightning.pytorch.callbacks.ModelCheckpoint": ModelCheckpoint(),
            "torch.amp.GradScaler": torch.amp.GradScaler("cpu")}


def missing_private_members() -> list[str]:
    """``owner.member (used by ...)`` for each private member this Lightning / torch lacks."""
    from lightning.pytorch.loops.fit_loop import _FitLoop

    classes = {"lightning.pytorch.loops.fit_loop._FitLoop": _FitLoop, "lightning.pytorch.cli.LightningCLI": LightningCLI,
               "lightning.pytorch.trainer.trainer.Trainer": L.Trainer,
               "lightning.pytorch.callbacks.ModelCheckpoint": ModelCheckpoint, "torch.amp.GradScaler": torch.amp.GradScaler}
    instances = _instances()
    missing = []
    for owner, member, user in PRIVATE_MEMBERS:
        holder = instances.get(owner, classes[owner])
        if not hasattr(holder, member) and not hasattr(classes[owner], member):
            missing.append(f"{owner}.{member} (used by {user})")
    return missing
