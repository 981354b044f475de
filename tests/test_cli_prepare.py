"""``python -m azgpt.cli prepare`` as a user runs it: a real process, exit codes and what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from process_env import child_env



def azgpt(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = child_env()
    return subprocess.run([sys.executable, "-m", "azgpt.cli", "prepare", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_prepare_on_the_shipped_sample_corpus(tmp_path: Path) -> None:
    result = azgpt("--out", "data", "--vocab_size", "512", "--block_size", "64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "data"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.npy", "val.npy"]
    assert np.load(out / "train.npy", mmap_mode="r").size > np.load(out / "val.npy", mmap_mode="r").size > 65
    assert "chars/token" in result.stdout and "tokens per word" in result.stdout


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = azgpt("--corpus", "nowhere.txt", "--out", "data", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "azgpt: error: corpus path nowhere.txt does not exist: check the path, or pass a .txt, .txt.gz, .jsonl "
        "or a folder of them"
    ]
    assert not (tmp_path / "data").exists()
