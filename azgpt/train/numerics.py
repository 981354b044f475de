"""Keep non-finite losses and gradients away from the weights."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from azgpt.errors import AzGPTError
from azgpt.train.lightning_private import unscaled_already


class NonFiniteError(AzGPTError):
    """The loss or the gradient norm of an optimizer step is NaN or infinite; the step was not applied."""

    exit_code = 3


def gradient_scaler(trainer: L.Trainer) -> torch.amp.GradScaler | None:
    """The GradScaler of a ``16-mixed`` run (None in fp32 / bf16, which need none)."""
    plugin = trainer.precision_plugin
    return plugin.scaler if isinstance(plugin, MixedPrecision) else None


class UpdateGuard:
    """Checks each optimizer step's loss and gradient norm before the optimizer applies them.

    Without a GradScaler, a non-finite value raises ``NonFiniteError`` naming the step: the exception
    leaves ``optimizer.step`` before AdamW touches the weights or its moments. With one (16-mixed on
    CUDA), an overflow is the scaler's business: it skips the step and lowers the scale, and that is not
    a failure, unless ``max_skipped_steps`` steps in a row are skipped (the scale has then fallen by
    ``2**max_skipped_steps``: that is divergence, not overflow).
    """

    def __init__(self, max_skipped_steps: int = 25) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.skipped_in_a_row = 0

    @staticmethod
    def unscale_for_clipping(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Unscale 16-mixed gradients before they are measured or clipped.

        Lightning leaves unscaling to optimizers that can do it inside ``step`` (fused AdamW, which azgpt
        uses on CUDA), so the gradients seen by clipping would still carry the loss scale; ``unscale_``
        here marks them unscaled, and the fused step then does not unscale them again.
        """
        scaler = gradient_scaler(trainer)
        if scaler is None or not scaler.is_enabled() or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return
        if not unscaled_already(scaler, optimizer):
            scaler.unscale_(optimizer)

    def check(self, trainer: L.Trainer, grad_norm: torch.Tensor, loss: torch.Tensor | None) -> None:
        """Raise ``NonFiniteError`` (or count a GradScaler skip) when ``grad_norm`` or ``loss`` is not finite."""
        values = [grad_norm.detach().float().reshape(1)]
        if loss is not None:
            values.append(loss.detach().float().reshape(1).to(grad_norm.device))
        if bool(torch.isfinite(torch.cat(values)).all()):  # the step's one host sync
            self.skipped_in_a_row = 0
            return
        step = trainer.global_step + 1
        norm_value = float(grad_norm)
        loss_value = float(loss) if loss is not None else math.nan
        what = "loss" if loss is not None and not math.isfinite(loss_value) else "gradient norm"
        scaler = gradient_scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row <= self.max_skipped_steps:
                return  # the GradScaler skips this step and halves its scale
            raise NonFiniteError(
                f"non-finite {what} at optimizer step {step}: {self.skipped_in_a_row} steps in a row skipped by "
                f"the GradScaler, so the run has diverged; resume from the last checkpoint with a lower "
                f"model.learning_rate or precision bf16-mixed")
        raise NonFiniteError(
            f"non-finite {what} at optimizer step {step} (loss {loss_value:.4g}, gradient norm {norm_value:.4g}): "
            f"the step was not applied, so the weights and checkpoints stay finite; resume from the last "
            f"checkpoint with a lower model.learning_rate or a longer model.warmup_steps")
