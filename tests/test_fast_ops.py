"""azgpt.fast_ops gives torch's values and gradients: RMSNorm against F.rms_norm, rotary embeddings against the
textbook formula x * cos + cat(-x2, x1) * sin, SwiGLU against silu(gate) * up by torch's autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from azgpt.fast_ops import _RMSNorm, _SwiGLU, rms_norm, rotate, swiglu
from azgpt.model import rope_tables


def values_and_grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn's output and the gradients of a fixed random projection of it with respect to each input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, probe)
    return (out.detach(), *grads)


def reference_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_torch(with_weight: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 10, 3 * 24)[..., :24] * 3 + 0.5  # a strided view, as the split of a projection gives
    inputs = (x, torch.randn(24)) if with_weight else (x,)

    def ours(x: torch.Tensor, *weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight[0] if weight else None, 1e-5)

    def torchs(x: torch.Tensor, *weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), weight[0] if weight else None, 1e-5)

    for got, want in zip(values_and_grads(ours, *inputs), values_and_grads(torchs, *inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rms_norm_backward_is_the_derivative() -> None:
    x, weight = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-5),
                                    (x.requires_grad_(), weight.requires_grad_()))
    assert torch.autograd.gradcheck(lambda x: _RMSNorm.apply(x, None, 1e-5), (x,))


def test_rms_norm_in_bf16_is_torchs() -> None:
    x, weight = torch.randn(2, 6, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, weight, 1e-5), F.rms_norm(x, (16,), weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_matches_the_formula(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cos, sin = rope_tables(16, 12, 10000.0)
    # (B, n_head, T, head_dim) as attention makes it: a transposed view of the projection's output
    x = torch.randn(2, 12, 3, 16).transpose(1, 2).to(dtype)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    got = values_and_grads(lambda x: rotate(x, cos, sin), x)
    want = values_and_grads(lambda x: reference_rotate(x, cos, sin), x)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **tolerance)


def test_rotate_backward_is_the_derivative() -> None:
    cos, sin = (t.double() for t in rope_tables(8, 5, 10000.0))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rotate(x, cos, sin), (x,))


def reference_swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_torchs_autograd(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    h = (torch.randn(3, 7, 2 * 20) * 3).to(dtype)
    got, want = values_and_grads(swiglu, h), values_and_grads(reference_swiglu, h)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_swiglu_backward_is_the_derivative() -> None:
    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (h,))
