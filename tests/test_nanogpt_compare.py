"""bench/nanogpt_compare.py drives a nanoGPT checkout: here a stand-in train.py that checks what it is given
and prints iteration lines in nanoGPT's format (the figures are not checked, only that they are read)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_TRAIN = '''
import os, pickle, sys
import numpy as np
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
assert args["dataset"] == "azgpt_bench" and args["n_embd"] == "32" and args["gradient_accumulation_steps"] == "2"
data = os.path.join("data", args["dataset"])
assert np.fromfile(os.path.join(data, "train.bin"), dtype=np.uint16).max() < 300
assert pickle.load(open(os.path.join(data, "meta.pkl"), "rb")) == {"vocab_size": 300}
print("tokens per iteration will be: 1,024")
for i in range(int(args["max_iters"]) + 1):
    print(f"iter {i}: loss 5.6000, time {100 + i}.00ms, mfu -100.00%")
'''


@pytest.mark.slow
@pytest.mark.parametrize("tuned", [False, True])
def test_reads_nanogpt_iteration_times(tmp_path: Path, tuned: bool) -> None:
    nanogpt = tmp_path / "nanoGPT"
    nanogpt.mkdir()
    (nanogpt / "train.py").write_text(FAKE_TRAIN)
    (nanogpt / "configurator.py").write_text("")
    command = [sys.executable, str(REPO / "bench" / "nanogpt_compare.py"), "--nanogpt", str(nanogpt),
               "--corpus", str(tmp_path / "absent.txt"), "--vocab-size", "300", "--n-embd", "32", "--n-head", "2",
               "--block-size", "16", "--batch-size", "2", "--accumulate", "2", "--iters", "4", "--runs", "1"]
    result = subprocess.run(command + (["--tuned"] if tuned else []), capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # iterations 2..4 took 102, 103, 104 ms: median 103 ms for 1,024 tokens
    assert "run 1: 9,942 tokens/s (median of 3 iterations, 1,024 tokens each)" in result.stdout
    assert ("malloc: {'malloc'" in result.stdout) is tuned  # azgpt's tuning ran in train.py's process


def test_refuses_a_folder_without_nanogpt(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "nanogpt_compare.py"), "--nanogpt", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nanoGPT checkout" in result.stderr
