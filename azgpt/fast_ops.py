"""RMSNorm, rotary embeddings and SwiGLU with hand-written backward passes, for the modern recipe's speed on CPUs.

Why by hand: on a CPU torch runs ``F.rms_norm``, the rotary formula and SwiGLU as composites of elementwise
kernels, each one more pass over memory (RMSNorm forward and backward took 6x LayerNorm's fused kernel; SwiGLU's
backward ends in a copy of both halves' gradients into one tensor). These compute the same values with fewer
passes: ``tests/test_fast_ops.py`` holds them to torch's results,
``bench/recipe_speed.py`` times them against torch's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class _RMSNorm(torch.autograd.Function):
    """y = x / rms(x) * weight over the last dimension; saves the normalised x and 1/rms for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        width = x.size(-1)
        inv_rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        normalised = x * inv_rms
        ctx.save_for_backward(normalised, inv_rms, weight)
        return normalised * weight if weight is not None else normalised

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        normalised, inv_rms, weight = ctx.saved_tensors
        grad_weight = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                width = grad.size(-1)
                grad_weight = (grad.reshape(-1, width) * normalised.reshape(-1, width)).sum(0)
            grad = grad * weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * r(x): r * (g - x_hat * mean(g * x_hat)), x_hat = x * r
            mean = (grad * normalised).sum(-1, keepdim=True).div_(normalised.size(-1))
            grad_x = torch.addcmul(grad, normalised, mean, value=-1).mul_(inv_rms)
        return grad_x, grad_weight, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``F.rms_norm`` over the last dimension; by the hand-written backward for fp32 on CPUs, where torch's is a
    slow composite, and by torch's own elsewhere (fused kernels on GPUs, an fp32 upcast for half precision)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.size(-1),), weight, eps)


class _Rotate(torch.autograd.Function):
    """y = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), the halves of the last dimension.

    The rotation's transpose is the rotation by the opposite angle, so the backward is the same formula with
    -sin, and nothing but the tables is saved.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    half = x.size(-1) // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (..., T, head_dim) by the angles whose cos and sin (T, head_dim) are given, the
    pair of channels (i, i + head_dim/2) rotated together (Hugging Face Llama's layout)."""
    return _Rotate.apply(x, cos.to(x.dtype), sin.to(x.dtype))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of the two halves of the last dimension; the backward writes both halves' gradients
    straight into one tensor instead of concatenating them afterwards."""

    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(h, activated)
        return activated * up

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        h, activated = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_h


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up with gate and up the first and second halves of h's last dimension; by the hand-written
    backward on CPUs and by torch's autograd elsewhere (where torch.compile fuses it)."""
    if h.device.type == "cpu":
        return _SwiGLU.apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
