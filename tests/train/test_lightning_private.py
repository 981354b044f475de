"""The private Lightning / torch members azgpt relies on exist in the installed versions (a failure names which)."""

from __future__ import annotations

import pytest
import torch

from azgpt.errors import AzGPTError
from azgpt.train import lightning_private


def test_every_private_member_azgpt_uses_is_there() -> None:
    assert lightning_private.missing_private_members() == []


def test_a_missing_member_is_named(monkeypatch) -> None:
    """What a Lightning that renamed one would give: the member named, once in the list and once at run time."""
    monkeypatch.setattr(lightning_private, "PRIVATE_MEMBERS",
                        (*lightning_private.PRIVATE_MEMBERS, ("torch.amp.GradScaler", "_gone_in_torch_9", "a test")))
    assert lightning_private.missing_private_members() == ["torch.amp.GradScaler._gone_in_torch_9 (used by a test)"]
    scaler = torch.amp.GradScaler("cpu")
    del scaler._per_optimizer_states
    with pytest.raises(AzGPTError, match=r"GradScaler._per_optimizer_states is gone in lightning .* and azgpt "
                                         r"relies on it"):
        lightning_private.unscaled_already(scaler, torch.optim.SGD([torch.zeros(1, requires_grad=True)]))


def test_no_private_lightning_member_outside_its_module() -> None:
    """The list above is complete: no other module of azgpt reaches into these members."""
    from pathlib import Path

    package = Path(lightning_private.__file__).resolve().parents[1]
    names = {member for _, member, _ in lightning_private.PRIVATE_MEMBERS if member != "_parse_ckpt_path"}
    offenders = [f"{path.relative_to(package)}: {name}" for path in package.rglob("*.py")
                 if path.name != "lightning_private.py"
                 for name in names if f".{name}" in path.read_text(encoding="utf-8")]
    assert offenders == []
