"""UpdateGuard: non-finite steps fail without a GradScaler, are the scaler's to skip with one (16-mixed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from azgpt.train.numerics import NonFiniteError, UpdateGuard

pytestmark = pytest.mark.filterwarnings("ignore")


def fake_trainer(plugin, step: int = 4) -> SimpleNamespace:
    return SimpleNamespace(precision_plugin=plugin, global_step=step)


def test_non_finite_grad_norm_or_loss_raises_naming_the_step() -> None:
    guard, trainer = UpdateGuard(), fake_trainer(Precision())
    guard.check(trainer, torch.tensor(1.5), torch.tensor(2.0))
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at optimizer step 5"):
        guard.check(trainer, torch.tensor(math.nan), torch.tensor(2.0))
    with pytest.raises(NonFiniteError, match="non-finite loss at optimizer step 5"):
        guard.check(trainer, torch.tensor(1.0), torch.tensor(math.inf))
    assert NonFiniteError.exit_code == 3


def test_gradscaler_skips_are_not_failures_until_they_never_end() -> None:
    guard, trainer = UpdateGuard(max_skipped_steps=2), fake_trainer(MixedPrecision("16-mixed", "cpu"))
    guard.check(trainer, torch.tensor(math.inf), torch.tensor(2.0))
    guard.check(trainer, torch.tensor(math.inf), torch.tensor(2.0))
    guard.check(trainer, torch.tensor(1.0), torch.tensor(2.0))  # a good step resets the count
    guard.check(trainer, torch.tensor(math.nan), None)
    guard.check(trainer, torch.tensor(math.nan), None)
    with pytest.raises(NonFiniteError, match="step 5: 3 steps in a row skipped by the GradScaler"):
        guard.check(trainer, torch.tensor(math.nan), None)


def test_fused_adamw_gradients_are_unscaled_before_clipping_and_only_once() -> None:
    """The CUDA 16-mixed path, on CPU: fused AdamW unscales inside its step, so Lightning does not unscale
    before clipping; the guard does, and the step must then not divide by the scale a second time."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    reference = torch.nn.Parameter(weight.detach().clone())
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    reference_optimizer = torch.optim.AdamW([reference], lr=0.1)
    plugin = MixedPrecision("16-mixed", "cpu")
    plugin.scaler.scale((weight**2).sum()).backward()
    UpdateGuard.unscale_for_clipping(fake_trainer(plugin), optimizer)
    assert torch.allclose(weight.grad, 2 * weight.detach())
    UpdateGuard.unscale_for_clipping(fake_trainer(plugin), optimizer)  # twice is harmless
    plugin.scaler.step(optimizer)
    plugin.scaler.update()
    (reference**2).sum().backward()
    reference_optimizer.step()
    assert torch.allclose(weight, reference)
