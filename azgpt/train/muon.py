"""Muon for the hidden weight matrices beside AdamW for everything else, as one torch Optimizer.

Lightning's automatic optimization (gradient accumulation, clipping, the NaN guard in the clipping hook,
checkpoints with exact resume) drives exactly one optimizer per step; with two it requires manual
optimization, which gives all of that up. ``MuonWithAdamW`` presents a Muon (torch's, see ``Muon``) and AdamW as
one optimizer instead: their param groups are its param groups, its step runs the closure once and then both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from azgpt.train.precision import cpu_bf16_is_fast

# Newton-Schulz quintic coefficients (Keller Jordan's), torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class Muon(torch.optim.Muon):
    """torch's Muon (its param groups, state and checks), stepped with the orthogonalisation in fp32 on CPUs
    without native bf16 matmuls.

    torch orthogonalises in bf16, which CPUs without native bf16 matmuls run 10-30x slower than fp32: about
    20 s per step for the reference config's 16 matrices on a 2-core EPYC, against 1 s in fp32. On GPUs and on
    CPUs with native bf16 (AVX512-BF16, AMX: 3x192's matrices in 19 ms against 33 in fp32) the bf16 iteration is
    kept, with the matrices of one shape as one batch (``same_shape_batches``). The update is torch's: Nesterov momentum, Newton-Schulz, the "original" shape scaling
    sqrt(max(1, rows/cols)), decoupled weight decay.
    """

    _cpu_dtype: torch.dtype | None = None

    def _orthogonalise_dtype(self, device: torch.device) -> torch.dtype:
        if device.type != "cpu":
            return torch.bfloat16
        if self._cpu_dtype is None:  # timed once per process tree (see azgpt.train.precision)
            self._cpu_dtype = torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
        return self._cpu_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError("azgpt's Muon implements adjust_lr_fn 'original' only")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad)) for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, buffers, group["momentum"]) if group["nesterov"] else buffers
            dtype = self._orthogonalise_dtype(params[0].device)
            for batch in same_shape_batches(params, dtype):
                # a batch of one is a view, not a copy (fp32 CPUs orthogonalise every matrix alone)
                stacked = torch.stack([updates[i] for i in batch]) if len(batch) > 1 else updates[batch[0]][None]
                orthogonal = orthogonalise(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                for i, update in zip(batch, orthogonal):
                    p = params[i]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss


def same_shape_batches(params: list[torch.Tensor], dtype: torch.dtype) -> list[list[int]]:
    """Indices of ``params`` to orthogonalise together. In bf16 the matrices of one shape and device go as one
    batch (3 x 192's twelve matrices in 10 ms against 16 one by one on an AMX CPU, the same bits); in fp32 a CPU
    runs batches slower (31 ms against 27), so there each matrix goes alone."""
    if dtype != torch.bfloat16:
        return [[i] for i in range(len(params))]
    batches: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        batches.setdefault((tuple(p.shape), p.device), []).append(i)
    return list(batches.values())


def orthogonalise(matrices: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """About U V^T of each matrix U S V^T in ``matrices`` (batch, rows, cols): singular values pushed towards 1
    by ``steps`` Newton-Schulz rounds."""
    a, b, c = coefficients
    tall = matrices.size(-2) > matrices.size(-1)
    x = matrices.to(dtype)
    x = x.mT if tall else x  # iterate on the wide orientation: the Gram matrix is the smaller one
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the linear layers inside the transformer blocks: what Muon orthogonalises. The token
    embedding and the output head are not hidden layers (one row per token) and stay with AdamW."""
    return [m.weight for m in model.transformer.h.modules() if isinstance(m, nn.Linear)]


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps ``muon`` and ``adamw`` together.

    ``param_groups`` holds their group dicts (Muon's first), so a learning-rate scheduler with one lambda per
    group schedules each with its own; ``state_dict`` is torch's usual layout over both, parameters numbered
    Muon's first.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        params = [p for opt in (muon, adamw) for group in opt.param_groups for p in group["params"]]
        super().__init__(params, {})
        self._share_children()

    def _share_children(self) -> None:
        # In place: Lightning's optimizer wrapper keeps references to these two containers.
        self.param_groups[:] = self.muon.param_groups + self.adamw.param_groups
        self.state.clear()
        self.state.update(self.muon.state)
        self.state.update(self.adamw.state)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # forward, backward, clipping and the NaN guard: may raise before any update
        self.muon.step()
        self.adamw.step()
        self._share_children()
        return loss

    def _muon_count(self) -> int:
        return sum(len(group["params"]) for group in self.muon.param_groups)

    def state_dict(self) -> dict[str, Any]:
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        offset = self._muon_count()
        return {
            "state": {**muon["state"], **{index + offset: state for index, state in adamw["state"].items()}},
            "param_groups": muon["param_groups"] + [
                {**group, "params": [index + offset for index in group["params"]]} for group in adamw["param_groups"]],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n_groups, offset = len(self.muon.param_groups), self._muon_count()
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != n_groups + len(self.adamw.param_groups):
            raise ValueError(f"the saved optimizer has {len(groups)} parameter groups, this one "
                             f"{n_groups + len(self.adamw.param_groups)}: it was saved by another optimizer")
        self.muon.load_state_dict({"state": {i: s for i, s in state.items() if i < offset},
                                   "param_groups": groups[:n_groups]})
        self.adamw.load_state_dict({
            "state": {i - offset: s for i, s in state.items() if i >= offset},
            "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups[n_groups:]]})
        self._share_children()  # loading replaced the children's group dicts
