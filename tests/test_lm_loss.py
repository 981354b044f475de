"""linear_cross_entropy equals F.cross_entropy(x @ W.T, y) in value and gradients, chunked or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from azgpt.lm_loss import default_chunk_rows, linear_cross_entropy


def reference(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x @ w.t(), y, ignore_index=-1)


def inputs(n: int = 37, c: int = 16, v: int = 50, ignored: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    w = torch.randn(v, c, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[:ignored] = -1
    return x, w, y


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 100])
@pytest.mark.parametrize("ignored", [0, 5])
def test_loss_and_gradients_match_cross_entropy(chunk_rows: int, ignored: int) -> None:
    x, w, y = inputs(ignored=ignored)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = reference(xa, wa, y)
    got = linear_cross_entropy(xb, wb, y, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, expected)
    (expected * 3.0).backward()  # a non-unit upstream gradient, as under loss / accumulate
    (got * 3.0).backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(wb.grad, wa.grad)


def test_float32_default_chunks() -> None:
    x, w, y = (t.float() if t.is_floating_point() else t for t in inputs(n=300, v=700))
    torch.testing.assert_close(linear_cross_entropy(x, w, y), reference(x, w, y), rtol=1e-5, atol=1e-5)


def test_without_grad_only_the_loss() -> None:
    x, w, y = inputs()
    with torch.no_grad():
        got = linear_cross_entropy(x, w, y, chunk_rows=8)
    torch.testing.assert_close(got, reference(x, w, y))
    assert not got.requires_grad


def test_tied_weight_gradients_add_up() -> None:
    """The GPT ties lm_head to the embedding: both uses must reach the one Parameter."""
    x, w, y = inputs()
    idx = torch.randint(0, 50, (37,))
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    (reference(F.embedding(idx, wa) + x, wa, y)).backward()
    (linear_cross_entropy(F.embedding(idx, wb) + x, wb, y, chunk_rows=8)).backward()
    torch.testing.assert_close(wb.grad, wa.grad)


def test_bf16_autocast_close_to_fp32() -> None:
    x, w, y = (t.float() if t.is_floating_point() else t for t in inputs(n=64, v=128))
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference(xa, wa, y).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(xb, wb, y, chunk_rows=16)
    got.backward()
    assert got.dtype == torch.float32
    assert xb.grad.dtype == torch.float32 and wb.grad.dtype == torch.float32
    torch.testing.assert_close(got, reference(x, w, y), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(wb.grad, wa.grad, rtol=5e-2, atol=5e-3)


def test_all_ignored_is_nan_like_cross_entropy() -> None:
    x, w, y = inputs(ignored=37)
    assert torch.isnan(linear_cross_entropy(x, w, y)) and torch.isnan(reference(x, w, y))


def test_default_chunk_rows() -> None:
    assert default_chunk_rows(8192) == 256
    assert default_chunk_rows(10**9) == 1
