"""Muon for the hidden weight matrices beside AdamW for everything else, as one torch Optimizer.

Lightning's automatic optimization (gradient accumulation, clipping, the NaN guard in the clipping hook,
checkpoints with exact resume) drives exactly one optimizer per step; with two it requires manual
optimization, which gives all of that up. ``MuonWithAdamW`` presents torch's own Muon and AdamW as one
optimizer instead: their param groups are its param groups, its step runs the closure once and then both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
