"""AzGPT's AdamW: parameter groups and the fused implementation where torch has one for the device."""

from __future__ import annotations

import pytest
import torch

from azgpt.errors import AzGPTError
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


def test_embedding_lr_gives_the_token_embedding_its_own_rate_and_the_same_decay_per_step() -> None:
    module = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, recipe="modern",
                   learning_rate=1e-3, weight_decay=0.1, embedding_lr=0.05)
    optimizer, warmups = module.build_optimizer()
    groups = {g["name"]: g for g in optimizer.param_groups}
    embedding = groups["embedding"]
    assert embedding["params"] == [module.model.transformer.wte.weight]
    assert embedding["lr"] == 0.05
    assert embedding["lr"] * embedding["weight_decay"] == pytest.approx(1e-3 * 0.1)  # same shrink per step
    others = [p for name, g in groups.items() if name != "embedding" for p in g["params"]]
    assert all(p is not module.model.transformer.wte.weight for p in others)
    assert len(others) + 1 == len(list(module.parameters())) and len(warmups) == len(optimizer.param_groups)
    assert "embedding" not in {g["name"] for g in tiny().build_optimizer()[0].param_groups}  # None: one rate


def test_embedding_lr_follows_the_schedule_from_its_own_peak() -> None:
    module = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, embedding_lr=0.05,
                   learning_rate=1e-3, warmup_steps=2, lr_schedule="wsd", min_lr_ratio=0.1)
    module._trainer = type("T", (), {"max_steps": 10})()
    scheduled = module.configure_optimizers()
    optimizer, schedule = scheduled["optimizer"], scheduled["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(10):
        rates.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        schedule.step()
    assert rates[1]["embedding"] == pytest.approx(0.05) and rates[1]["decay"] == pytest.approx(1e-3)
    assert rates[9]["embedding"] == pytest.approx(0.005) and rates[9]["decay"] == pytest.approx(1e-4)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_embedding_lr_must_be_finite_and_positive(rate: float) -> None:
    with pytest.raises(AzGPTError, match="embedding_lr"):
        AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, embedding_lr=rate)
