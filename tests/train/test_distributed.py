"""Two CPU processes (gloo) through Lightning's DDP strategy, driven by azgpt's own command line.

Every run is the shipped configs/base.yaml + ddp.yaml with a tiny model, on CPU, written over by a second config.
Two-process runs are subprocesses, started both ways a user would: ``python -m azgpt.cli`` with
``devices: 2`` (Lightning's launcher re-runs the command for rank 1) and ``torchrun --nproc_per_node 2``.
One-process runs call ``azgpt.cli.main`` in this process (saves a second import of torch and Lightning).
The runs chain, sharing one data folder prepared by the first, two-process run: 2-process fit to step 3
-> 1-process resume to step 5 -> 2-process resume to step 6; and 1- and 2-process validate on the step-3
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from azgpt.cli import main as azgpt_main
from azgpt.data.loading import block_offsets
from process_env import child_env

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240  # a hung collective fails the test instead of hanging CI
SEED = 1337
BLOCK_SIZE = 32
BATCH_SIZE = 4
ACCUMULATE = 2
VAL_BLOCKS = 7  # odd: two ranks get 4 and 3 blocks


SHIPPED_CONFIGS = ["--config", "base.yaml", "--config", "ddp.yaml"]  # ddp.yaml holds only its changes to base


def write_config(workdir: Path, name: str, *, devices: int, max_steps: int, val_every: int | None = None,
                 val_blocks: int = VAL_BLOCKS) -> Path:
    """What turns the shipped configs/ddp.yaml into a tiny CPU run whose checkpoints and records land in
    workdir/name/ (given after it on the command line, so its keys win)."""
    out = workdir / name
    config = {
        "seed_everything": SEED,
        "val_every_n_steps": val_every,
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "learning_rate": 1e-3, "warmup_steps": 2},
        "data": {"data_dir": str(workdir / "data"), "corpus": None, "max_bytes": None, "val_corpus": None,
                 "vocab_size": 300, "block_size": BLOCK_SIZE,
                 "batch_size": BATCH_SIZE, "seed": SEED, "val_fraction": 0.1, "val_max_blocks": val_blocks},
        "trainer": {
            "accelerator": "cpu", "devices": devices, "num_nodes": 1, "strategy": "ddp" if devices > 1 else "auto",
            "max_steps": max_steps, "accumulate_grad_batches": ACCUMULATE, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True}},
                {"class_path": "tests.distributed_helpers.RecordTrainBlocks", "init_args": {"out_dir": str(out)}},
                {"class_path": "tests.distributed_helpers.RecordValLoss", "init_args": {"out_dir": str(out)}},
            ],
        },
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def run_cli(workdir: Path, args: list[str], *, devices: int, torchrun: bool = False) -> None:
    """``azgpt ARGS`` in workdir: in this process for one device, else as a subprocess whose whole
    process group (both ranks) is killed on a timeout."""
    if devices == 1:
        with contextlib.chdir(workdir):
            assert azgpt_main(args) == 0, f"azgpt {' '.join(args)} failed"
        return
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}"]
                if torchrun else [sys.executable])
    command = [*launcher, "-m", "azgpt.cli", *args]
    env = child_env()
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {RUN_TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}:\n{output[-4000:]}"


def fit(workdir: Path, name: str, *, devices: int, max_steps: int, ckpt: Path | None = None,
        val_every: int | None = None, val_blocks: int = VAL_BLOCKS, torchrun: bool = False) -> Path:
    config = write_config(workdir, name, devices=devices, max_steps=max_steps, val_every=val_every,
                          val_blocks=val_blocks)
    resume = ["--ckpt_path", str(ckpt)] if ckpt else []
    run_cli(workdir, ["fit", *SHIPPED_CONFIGS, "--config", str(config), *resume], devices=devices,
            torchrun=torchrun)
    return workdir / name


def validate(workdir: Path, name: str, *, devices: int, ckpt: Path, val_blocks: int = VAL_BLOCKS,
             torchrun: bool = False) -> Path:
    config = write_config(workdir, name, devices=devices, max_steps=1, val_blocks=val_blocks)
    run_cli(workdir, ["validate", *SHIPPED_CONFIGS, "--config", str(config), "--ckpt_path", str(ckpt)],
            devices=devices, torchrun=torchrun)
    return workdir / name


def checkpoint_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def val_records(run: Path, world_size: int) -> list[dict]:
    return [json.loads((run / f"val-rank{rank}.json").read_text()) for rank in range(world_size)]


def drawn_offsets(run: Path, rank: int, first_index: int, tokens: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Offsets of the blocks ``rank`` trained on, per optimizer step, after checking that every recorded
    micro-batch is exactly the pure function's blocks for its index (counted from ``first_index``)."""
    saved = torch.load(run / f"train-blocks-rank{rank}.pt", weights_only=False)
    high = len(tokens) - BLOCK_SIZE
    per_step: dict[int, list[np.ndarray]] = {}
    for k, record in enumerate(saved["records"]):
        index = first_index + k
        assert record["global_step"] == index // ACCUMULATE, f"rank {rank}, micro-batch {index}: wrong step"
        offsets = block_offsets(SEED, rank, index, BATCH_SIZE, high)
        expected = np.stack([tokens[o : o + BLOCK_SIZE] for o in offsets]).astype(np.int64)
        assert np.array_equal(record["inputs"].numpy(), expected), f"rank {rank}, micro-batch {index}"
        per_step.setdefault(record["global_step"], []).append(offsets)
    return per_step


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def two_process_fit(workdir: Path) -> Path:
    """2 processes from an empty data folder to step 3, validating at step 3."""
    assert not (workdir / "data").exists()
    return fit(workdir, "fit2", devices=2, max_steps=3, val_every=3)


@pytest.fixture(scope="module")
def one_process_resume(workdir: Path, two_process_fit: Path) -> Path:
    return fit(workdir, "resume1", devices=1, max_steps=5, ckpt=two_process_fit / "checkpoints" / "last.ckpt")


def test_two_processes_prepare_once_and_draw_disjoint_blocks(workdir: Path, two_process_fit: Path) -> None:
    assert (workdir / "data" / "meta.json").is_file()
    tokens = np.load(workdir / "data" / "train.npy")
    rank0 = drawn_offsets(two_process_fit, 0, 0, tokens)
    rank1 = drawn_offsets(two_process_fit, 1, 0, tokens)
    assert sorted(rank0) == sorted(rank1) == [0, 1, 2]
    for step in rank0:
        assert len(rank0[step]) == len(rank1[step]) == ACCUMULATE
        mine, theirs = set(np.concatenate(rank0[step]).tolist()), set(np.concatenate(rank1[step]).tolist())
        assert not mine & theirs, f"step {step}: both ranks drew blocks at {sorted(mine & theirs)}"
    assert checkpoint_step(two_process_fit) == 3
    # The model folder, written by the first process only (every rank asks for the run folder, a collective).
    assert json.loads((two_process_fit / "model" / "meta.json").read_text())["global_step"] == 3


def test_two_process_checkpoint_resumes_on_one(workdir: Path, one_process_resume: Path) -> None:
    assert checkpoint_step(one_process_resume) == 5
    tokens = np.load(workdir / "data" / "train.npy")
    steps = drawn_offsets(one_process_resume, 0, 3 * ACCUMULATE, tokens)  # resumes at rank 0's step 3
    assert sorted(steps) == [3, 4]
    assert not (one_process_resume / "train-blocks-rank1.pt").exists()


def test_one_process_checkpoint_resumes_on_two(workdir: Path, one_process_resume: Path) -> None:
    # One validation block for two ranks: rank 1 validates a padding block only, and must not hang.
    run = fit(workdir, "resume2", devices=2, max_steps=6, ckpt=one_process_resume / "checkpoints" / "last.ckpt",
              val_every=1, val_blocks=1, torchrun=True)
    assert checkpoint_step(run) == 6
    tokens = np.load(workdir / "data" / "train.npy")
    for rank in (0, 1):
        assert sorted(drawn_offsets(run, rank, 5 * ACCUMULATE, tokens)) == [5]
    two = val_records(run, 2)
    (one,) = val_records(validate(workdir, "val1-resume2", devices=1, ckpt=run / "checkpoints" / "last.ckpt",
                                  val_blocks=1), 1)
    assert [r["batches"] for r in two] == [1, 1]
    for record in two:
        assert record["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)


def test_validation_over_two_processes_equals_one(workdir: Path, two_process_fit: Path) -> None:
    ckpt = two_process_fit / "checkpoints" / "last.ckpt"
    (one,) = val_records(validate(workdir, "val1", devices=1, ckpt=ckpt), 1)
    two = val_records(validate(workdir, "val2", devices=2, ckpt=ckpt, torchrun=True), 2)
    in_fit = val_records(two_process_fit, 2)  # during fit, validation runs through the DDP wrapper
    assert one["batches"] == 2  # 7 blocks in batches of 4
    assert [r["batches"] for r in two] == [1, 1]  # 4 blocks, and 3 blocks + 1 padding block
    for record in two + in_fit:
        assert record["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
