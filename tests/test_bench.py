"""bench/train_throughput.py still runs end to end (a smoke run on a tiny model; its figures are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_benchmark_smoke_run(tmp_path) -> None:
    command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--random-tokens",
               "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "2",
               "--accumulate", "2", "--vocab-size", "512", "--rounds", "2", "--warmup", "1", "--steps", "1",
               "--val-rounds", "1", "--peak-size", "64", "--cache-dir", str(tmp_path / "unused")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    threads = os.environ.get("OMP_NUM_THREADS")  # set under pytest-xdist (conftest): the command says so
    assert out.startswith(f"command: {f'OMP_NUM_THREADS={threads} ' if threads else ''}PYTHONPATH=. python "
                          "bench/train_throughput.py --random-tokens")
    assert "data: RANDOM tokens (--random-tokens)" in out
    for line in ("azgpt fit ", "plain loop ", "fit / plain:", "validation: full pass"):
        assert line in out


@pytest.mark.slow
def test_recipe_benchmark_smoke_run(tmp_path) -> None:
    """bench/recipe.py end to end on a tiny corpus standing in for ../shared/corpus (figures not checked)."""
    import gzip

    from azgpt.data.corpus import iter_documents

    documents = list(iter_documents(None))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, name in enumerate(("web", "legal", "quran", "social", "wiki", "poetry")):
        with gzip.open(corpus / f"{name}.txt.gz", "wt", encoding="utf-8") as f:
            f.write("\n\n".join(documents[index::6]))
    command = [sys.executable, str(REPO / "bench" / "recipe.py"), "--corpus", str(corpus), "--cache-dir",
               str(tmp_path / "cache"), "--minutes", "0.05", "--turn", "1", "--n-layer", "1", "--n-head", "2",
               "--n-embd", "32", "--block-size", "32", "--batch-size", "2", "--vocab-size", "300",
               "--eval-blocks", "2", "--threads", "1", "--variants", "gpt2", "modern", "ablation:recipe=modern,qk_norm=true",
               "short:recipe=modern,minutes=0.01,batch_size=3,vocab_size=320"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("command: PYTHONPATH=. python bench/recipe.py --corpus")
    assert "time to reach gpt2's final held-out bits per byte" in out
    for name in ("gpt2", "modern", "ablation", "short"):
        assert f"{name}:" in out
    # A variant's own time, batch and vocabulary: its own data, and it stops at its own budget.
    assert "data, vocab 320: train" in out and "data, vocab 300: train" in out
    assert "short: " in out and "{'minutes': 0.01, 'batch_size': 3, 'vocab_size': 320}" in out
    short_times = [float(line.split()[1]) for line in out.splitlines() if line.strip().startswith("short ")]
    gpt2_times = [float(line.split()[1]) for line in out.splitlines() if line.strip().startswith("gpt2 ")]
    assert short_times and max(short_times) < 0.6 * max(gpt2_times), (short_times, gpt2_times)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path) -> None:
    """bench/gpu_check.py --dry_run runs every part on the CPU and says what it found (what CI can check of it)."""
    import json

    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry_run", "--out",
                             str(tmp_path / "results")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "gpu_check_dry_run.json").read_text())
    checks = {check["part"]: check for check in report["checks"]}
    assert set(checks) == {"env", "quickstart", "health", "resume", "modern", "distributed", "budget", "use",
                           "throughput"}
    assert checks["budget"]["figures"]["last_lr_over_floor"] == pytest.approx(1.0, abs=0.01)
    assert {check["status"] for check in checks.values()} <= {"ok", "skip"}
    assert checks["quickstart"]["figures"]["16-mixed"]["last_ckpt_step"] == 4
    resume = checks["resume"]["figures"]
    assert resume["steps_compared"] == 6 and resume["bitwise_equal"] == 6
    assert checks["distributed"]["figures"]["ddp"]["bitwise_equal"] == 4
    assert checks["distributed"]["figures"]["ddp"]["loads_on_cpu"] is True
    assert checks["use"]["figures"]["export/gguf"]["exit"] == 0
    assert checks["throughput"]["figures"]["bf16 b4x2"]["tokens_per_sec"] > 0
    assert "| resume | ok |" in (tmp_path / "results" / "gpu_check_dry_run.md").read_text()


def test_recipe_speed_benchmark_smoke_run() -> None:
    """bench/recipe_speed.py times every variant it names and prints the command (figures not checked)."""
    command = [sys.executable, str(REPO / "bench" / "recipe_speed.py"), "--n-layer", "1", "--n-head", "2",
               "--n-embd", "32", "--block-size", "16", "--batch-size", "2", "--vocab-size", "64", "--rounds", "1",
               "--steps", "1", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("command: PYTHONPATH=. python bench/recipe_speed.py --n-layer 1")
    timed = [line for line in out.splitlines() if "ms/step" in line]
    assert len(timed) == 8 and all("x gpt2" in line for line in timed)
    assert sum("that part costs" in line for line in timed) == 6


def test_laptop_sizes_reads_its_default_sizes_and_given_ones_alike() -> None:
    """bench/laptop_sizes.py's sizes, defaulted or given, are (layers, heads, width): argparse converts a list
    default with no ``type``, which once broke a run with the default sizes after preparing the data."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("laptop_sizes", REPO / "bench" / "laptop_sizes.py")
    laptop_sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(laptop_sizes)
    assert laptop_sizes.parse_args([]).sizes == [(2, 2, 128), (3, 3, 192), (4, 4, 256)]
    assert laptop_sizes.parse_args(["--sizes", "3x192", "1x64"]).sizes == [(3, 3, 192), (1, 1, 64)]
    assert laptop_sizes.parse_args([]).minutes == 27


@pytest.mark.parametrize("setting, message", [("minutes=0", "minutes must be a positive number, got 0"),
                                              ("batch_size=2.5", "batch_size must be a positive whole number, got 2.5"),
                                              ("vocab_size=big", "vocab_size must be a positive whole number, got 'big'")])
def test_recipe_benchmark_refuses_a_bad_variant_setting_before_preparing_data(tmp_path, setting, message) -> None:
    """A variant's own minutes, batch or vocabulary that cannot work ends in one line, before any data is made."""
    corpus = tmp_path / "corpus"  # the names recipe.py looks for, empty: preparing them would fail otherwise
    corpus.mkdir()
    for name in ("web", "legal", "quran", "social", "wiki", "poetry"):
        (corpus / f"{name}.txt.gz").write_bytes(b"")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "recipe.py"), "--corpus", str(corpus),
                             "--cache-dir", str(tmp_path / "cache"), "--variants", "gpt2", f"bad:{setting}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"recipe.py: variant 'bad': {message}"]
    assert not (tmp_path / "cache").exists()
