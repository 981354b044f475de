"""Shared fixtures: a tiny prepared data folder and tiny trained runs, built once per session."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# The suite checks behaviour on the CPU on every machine, a GPU one included (its expected values, precisions
# and devices are the CPU's); bench/gpu_check.py is what checks the CUDA path. Set before torch looks for one.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Under pytest-xdist each worker (and the azgpt processes it starts) gets its share of the cores: torch takes them
# all in every process otherwise, and 15 workers x 16 threads on a 16-core machine ran tests into their timeouts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402

from azgpt.data.prepare import PrepareConfig, prepare  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY_VOCAB = 512
TINY_BLOCK = 32

# The configs ask for 16-mixed, which on a CPU becomes bf16-mixed or 32-true depending on the chip (timed at
# start-up). Tests compare losses across runs and process counts, so they pin fp32 on every machine; the
# tests of that choice and of bf16 training unset or override this themselves.
os.environ["AZGPT_CPU_PRECISION"] = "32-true"


def tiny_fit_args(data_dir: Path, max_steps: int = 6, **overrides: object) -> list[str]:
    """Command-line arguments for a fit of a tiny model that takes seconds on a CPU."""
    args = {
        "--config": "quickstart.yaml",
        "--data.data_dir": str(data_dir),
        "--data.vocab_size": str(TINY_VOCAB),
        "--data.block_size": str(TINY_BLOCK),
        "--data.batch_size": "4",
        "--data.val_max_blocks": "13",
        "--model.n_layer": "1",
        "--model.n_head": "2",
        "--model.n_embd": "32",
        "--model.dropout": "0.0",
        "--model.warmup_steps": "2",
        "--trainer.max_steps": str(max_steps),
        "--trainer.accumulate_grad_batches": "2",
        "--trainer.log_every_n_steps": "1",
        "--trainer.enable_progress_bar": "false",
        "--val_every_n_steps": "3",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    return ["fit", *[item for pair in args.items() for item in pair]]


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped sample corpus prepared with a 512-token vocabulary."""
    out = tmp_path_factory.mktemp("prepared") / "sample"
    prepare(PrepareConfig(out=out, vocab_size=TINY_VOCAB, block_size=TINY_BLOCK, val_fraction=0.1))
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """A finished tiny fit; returns its lightning_logs/version_0 folder."""
    from azgpt.cli import main

    workdir = tmp_path_factory.mktemp("run")
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        assert main(tiny_fit_args(prepared_dir)) == 0
    finally:
        os.chdir(previous)
    return workdir / "lightning_logs" / "version_0"


# -- one tiny finished run for the generation and export tests ------------------------------------------

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
    from azgpt.cli import main

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


@pytest.fixture
def without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as it is without the optional ``datasets`` package (the dev install always has it)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "datasets" else real(name, *args))


def assert_same_tokenizer(ours, theirs, texts: list[str]) -> None:
    """A transformers tokenizer (``theirs``) gives azgpt's ids and text for every one of ``texts``."""
    assert theirs.eos_token == theirs.bos_token == "<|endoftext|>"
    assert theirs.eos_token_id == ours.token_to_id("<|endoftext|>")
    for text in texts:
        ids = ours.encode(text).ids
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False)


@pytest.fixture(autouse=True)
def fresh_wandb_per_test():
    """W&B keeps its settings (WANDB_DIR among them) in a process-wide singleton from the first run on: a later
    test's offline run would write into an earlier test's folder. Tear it down after each test that loaded it."""
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
