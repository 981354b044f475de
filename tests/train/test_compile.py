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
