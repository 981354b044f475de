"""Muon beside AdamW (model.optimizer muon): one optimizer to Lightning, exact resume, the NaN guard."""

from __future__ import annotations

import copy

import pytest
import torch

from azgpt.cli import main
from azgpt.train.module import AzGPT
from azgpt.train.muon import MuonWithAdamW, hidden_matrices
from resume_helpers import MAX_STEPS, read_losses, write_config
from test_resume import assert_matches_reference, data_dir, signal_callback  # noqa: F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore")
MODERN = ("--model.recipe", "modern", "--model.muon_lr", "0.02")


def tiny_module(**kwargs) -> AzGPT:
    return AzGPT(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16, **kwargs)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    module = tiny_module(recipe="modern")
    optimizer, warmups = module.build_optimizer()
    assert isinstance(optimizer, MuonWithAdamW) and module.hparams.optimizer == "muon"
    hidden = {id(p) for p in hidden_matrices(module.model)}
    assert len(hidden) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert {id(p) for p in optimizer.muon.param_groups[0]["params"]} == hidden
    rest = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert not rest & hidden and rest | hidden == {id(p) for p in module.parameters()}
    assert [g["name"] for g in optimizer.param_groups] == ["muon", "decay", "no_decay"]
    assert warmups == [0, 100, 100]
    assert tiny_module(recipe="modern", optimizer="adamw").build_optimizer()[0].__class__ is not MuonWithAdamW


def test_state_dict_round_trips_and_a_failed_closure_changes_nothing() -> None:
    torch.manual_seed(0)
    module = tiny_module(recipe="modern", zero_init=False)
    optimizer, _ = module.build_optimizer()
    idx = torch.randint(0, 64, (2, 8))

    def closure():
        optimizer.zero_grad()
        loss = module(idx, idx)[1]
        loss.backward()
        return loss

    optimizer.step(closure)
    saved = copy.deepcopy(optimizer.state_dict())  # a live state_dict shares the optimizer's tensors
    assert len(saved["state"]) == sum(1 for _ in module.parameters())
    assert len(optimizer.state) == len(saved["state"])
    twin = tiny_module(recipe="modern", zero_init=False)
    twin.load_state_dict(module.state_dict())
    twin_optimizer, _ = twin.build_optimizer()
    twin_optimizer.load_state_dict(saved)
    optimizer.step(closure)

    def twin_closure():
        twin_optimizer.zero_grad()
        loss = twin(idx, idx)[1]
        loss.backward()
        return loss

    twin_optimizer.step(twin_closure)
    for (name, a), b in zip(module.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    before = [p.detach().clone() for p in module.parameters()]

    def failing():
        closure()
        raise RuntimeError("non-finite")

    with pytest.raises(RuntimeError):
        optimizer.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.slow
def test_muon_resume_is_bitwise_identical(tmp_path, data_dir, capsys) -> None:
    """Stopped by SIGTERM after step 3 mid-accumulation, resumed with --ckpt_path last: every loss, weight
    and optimizer tensor equals an uninterrupted run's (CPU, fp32, accumulation 4, clipping at 1.0)."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["fit", "--config", str(write_config(reference, data_dir)), *MODERN]) == 0
    assert sorted(read_losses(reference)) == list(range(1, MAX_STEPS + 1))
    config = write_config(run, data_dir, extra_callbacks=signal_callback("SIGTERM", 3, 1))
    assert main(["fit", "--config", str(config), *MODERN]) == 143
    assert main(["fit", "--config", str(write_config(run, data_dir)), *MODERN, "--ckpt_path", "last"]) == 0
    assert assert_matches_reference(reference, [run]) == 0.0


def test_muon_update_is_torchs_with_the_iteration_in_fp32_on_cpus_without_native_bf16(monkeypatch) -> None:
    """Where the CPU has native bf16 matmuls (as on GPUs) the update equals torch.optim.Muon's bitwise; where it
    has not (azgpt's CPU precision choice is 32-true), the iteration runs in fp32 and stays close."""
    import azgpt.train.muon as muon_module
    from azgpt.train.precision import CPU_PRECISION_ENV

    torch.manual_seed(0)
    theirs, ours, ours_fp32 = (torch.nn.Parameter(torch.randn(96, 32)) for _ in range(3))
    with torch.no_grad():
        ours.copy_(theirs)
        ours_fp32.copy_(theirs)
    torch_muon = torch.optim.Muon([theirs], lr=0.02)
    bf16_muon, fp32_muon = muon_module.Muon([ours], lr=0.02), muon_module.Muon([ours_fp32], lr=0.02)
    for _ in range(3):
        grad = torch.randn(96, 32)
        for p in (theirs, ours, ours_fp32):
            p.grad = grad.clone()
        torch_muon.step()
        monkeypatch.setenv(CPU_PRECISION_ENV, "32-true")
        fp32_muon.step()
        monkeypatch.setenv(CPU_PRECISION_ENV, "bf16-mixed")
        bf16_muon.step()
    assert fp32_muon._cpu_dtype == torch.float32 and bf16_muon._cpu_dtype == torch.bfloat16
    assert torch.equal(theirs, ours)
    assert not torch.equal(theirs, ours_fp32)
    torch.testing.assert_close(ours_fp32, theirs, atol=2e-3, rtol=0)


def test_matrices_of_one_shape_orthogonalised_as_a_batch_update_as_torchs_one_by_one(monkeypatch) -> None:
    """In bf16 the matrices of one shape go through Newton-Schulz as one batch: each must still get its own
    update, torch.optim.Muon's (to bf16 rounding), tall and wide alike, beside a matrix of another shape."""
    import azgpt.train.muon as muon_module
    from azgpt.train.precision import CPU_PRECISION_ENV

    monkeypatch.setenv(CPU_PRECISION_ENV, "bf16-mixed")
    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (16, 40), (48, 16), (16, 40), (24, 24)]
    theirs = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    torch_muon, our_muon = torch.optim.Muon(theirs, lr=0.02), muon_module.Muon(ours, lr=0.02)
    assert sorted(map(sorted, muon_module.same_shape_batches(ours, torch.bfloat16))) == [[0, 1, 3], [2, 4], [5]]
    for _ in range(3):
        for mine, other in zip(ours, theirs):
            other.grad = torch.randn_like(other)
            mine.grad = other.grad.clone()
        torch_muon.step()
        our_muon.step()
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, atol=1e-4, rtol=0)
