"""model.compile: true compiles the GPT in place, so training works and checkpoints keep clean keys."""

from __future__ import annotations

import shutil

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from azgpt.data.datamodule import RandomTrainBlocks
from azgpt.train.module import AzGPT


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_model_trains_and_saves_clean_keys(tmp_path) -> None:
    torch.manual_seed(0)
    model = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, warmup_steps=1, compile=True)
    tokens = np.random.default_rng(0).integers(0, 64, 1000, dtype=np.uint16)
    loader = DataLoader(RandomTrainBlocks(tokens, block_size=8, batch_size=2, seed=0), batch_size=None)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=loader)

    assert model.model._compiled_call_impl is not None  # compiled in place, not wrapped
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    keys = torch.load(path, map_location="cpu", weights_only=False)["state_dict"].keys()
    assert not [k for k in keys if "_orig_mod" in k]
    plain = AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16)
    assert set(keys) == set(plain.state_dict().keys())
    restored = AzGPT.load_from_checkpoint(path, compile=False)
    torch.testing.assert_close(restored.model.transformer.wte.weight, model.model.transformer.wte.weight)


def test_compile_cuda_means_only_on_a_gpu() -> None:
    """model.compile: cuda compiles on CUDA only; true/false are kept as they are; anything else is refused."""
    from azgpt.errors import AzGPTError
    from azgpt.train.module import compile_decision

    assert compile_decision("cuda", torch.device("cpu")) == (False, None)
    assert compile_decision(True, torch.device("cpu")) == (True, None)
    assert compile_decision(False, torch.device("cuda")) == (False, None)
    with pytest.raises(AzGPTError, match="model.compile must be true, false or cuda, got 'yes'"):
        AzGPT(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=16, compile="yes")


def test_compile_cuda_without_triton_says_why(monkeypatch) -> None:
    """On a GPU without Triton, compile: cuda falls back to eager with the reason, instead of failing mid-step."""
    import importlib.util

    from azgpt.train.module import compile_decision

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    wanted, reason = compile_decision("cuda", torch.device("cuda"))
    assert not wanted and "Triton is not installed" in reason
