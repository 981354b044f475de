"""Shared fixtures: one tiny trained run (checkpoint + TensorBoard events) for the generation and export tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from azgpt.cli import main

TINY_FIT = [
    "fit", "--config", "quickstart.yaml",
    "--trainer.max_steps", "4", "--val_every_n_steps", "2", "--trainer.accumulate_grad_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
    "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.dropout", "0.0",
    "--data.vocab_size", "300", "--data.block_size", "96", "--data.batch_size", "2", "--data.val_max_blocks", "4",
]


@dataclass
class TinyRun:
    """A finished 4-step fit on the sample corpus: its folder, last checkpoint and TensorBoard version folder."""

    root: Path
    ckpt: Path
    log_dir: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny_run")
    cwd = os.getcwd()
    os.chdir(root)  # the quickstart config logs to ./lightning_logs
    try:
        code = main([*TINY_FIT, "--data.data_dir", str(root / "data")])
    finally:
        os.chdir(cwd)
    assert code == 0
    log_dir = root / "lightning_logs" / "version_0"
    return TinyRun(root=root, ckpt=log_dir / "checkpoints" / "last.ckpt", log_dir=log_dir)
