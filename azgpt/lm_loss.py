"""The language-model head and cross-entropy in one pass over row chunks, never holding all the logits.

At vocab 8192 the logits of one micro-batch (12 x 256 rows) take 100 MB in fp32, and the usual
``F.cross_entropy(x @ W.T, y)`` writes and reads several tensors of that size (logits, log-softmax,
their gradients). Here each chunk of rows gets its logits, its loss and, when a gradient is needed,
its gradients for ``x`` and ``W`` at once (d loss / d logits = softmax - one_hot), so the large
intermediates are chunk-sized and reused while still in cache. The backward only rescales what the
forward stored. Written by hand because neither PyTorch nor Lightning ships a fused linear
cross-entropy for CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 8 MB in fp32


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that a chunk of fp32 logits stays around 8 MB."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, ignore_index: int) -> Tensor:
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        valid = targets != ignore_index
        safe_targets = targets.masked_fill(~valid, 0)  # any in-range id; its row is masked below
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if want_dx else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if want_dw else None
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            xs, ts, vs = xc[rows], safe_targets[rows, None], valid[rows]
            logits = torch.mm(xs, wc.t()).float()
            lse = torch.logsumexp(logits, dim=1)
            total += ((lse - logits.gather(1, ts).squeeze(1)) * vs).sum()
            if not (want_dx or want_dw):
                continue
            # logits becomes softmax - one_hot in place; an ignored row gets lse = inf, so it is all zeros.
            logits.sub_(lse.masked_fill(~vs, float("inf"))[:, None]).exp_()
            logits.scatter_add_(1, ts, -vs[:, None].to(logits.dtype))
            grad = logits.to(dtype)
            if want_dx:
                dx[rows] = torch.mm(grad, wc)
            if want_dw:
                if grad.dtype == dw.dtype:
                    dw.addmm_(grad.t(), xs)
                else:
                    dw += torch.mm(grad.t(), xs).float()
        count = valid.sum()
        ctx.save_for_backward(dx, dw, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        dx, dw, count = ctx.saved_tensors
        scale = grad_loss / count
        grad_x = dx * scale if dx is not None else None
        grad_w = (dw * scale).to(ctx.weight_dtype) if dw is not None else None
        return grad_x, grad_w, None, None, None


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None,
                         ignore_index: int = -1) -> Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets``, without materialising all the logits.

    x (N, C), weight (V, C), targets (N,) int64; rows whose target is ``ignore_index`` are left out
    (all rows ignored gives nan, as ``F.cross_entropy`` does). Under autocast the matmuls run in the
    autocast dtype and the softmax in fp32. Equals ``F.cross_entropy(x @ weight.T, targets)`` up to rounding.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.size(0))
    return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows, ignore_index)
