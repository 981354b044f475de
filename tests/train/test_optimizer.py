"""AzGPT's AdamW: parameter groups and the fused implementation where torch has one for the device."""

from __future__ import annotations

import torch

from azgpt.train.module import AzGPT, adamw_param_groups, build_adamw


def tiny() -> AzGPT:
    return AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16)


def test_groups_decay_matrices_only_and_hold_the_tied_weight_once() -> None:
    model = tiny()
    decay, no_decay = adamw_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_fused_on_cpu_when_torch_has_it_and_same_update_as_default() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    fused = build_adamw(adamw_param_groups(a, 0.1), lr=1e-2)
    plain = torch.optim.AdamW(adamw_param_groups(b, 0.1), lr=1e-2)
    assert fused.defaults["fused"]  # torch >= 2.4 has a fused CPU AdamW
    for _ in range(3):
        x = torch.randn(4, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)


def test_falls_back_where_fused_is_unsupported(monkeypatch) -> None:
    real = torch.optim.AdamW

    def no_fused(groups, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = build_adamw([{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1e-3)
    assert not opt.defaults.get("fused")


def test_configure_optimizers_uses_fused_adamw() -> None:
    model = tiny()
    model.trainer = None
    model._trainer = type("T", (), {"max_steps": 10})()
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"]
