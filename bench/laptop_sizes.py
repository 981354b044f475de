"""Which model size learns most in a fixed CPU time: the sizing behind configs/laptop.yaml.

    PYTHONPATH=. python bench/laptop_sizes.py [--minutes 30] [--scale 1] [--sizes 2x128 3x192 4x256]

1. Data: the local real corpus in ../shared (web, legal, quran, social to train on; wiki and poetry held out for
   validation), prepared once with laptop.yaml's vocabulary and block.
2. Throughput: each size trains a few optimizer steps with laptop.yaml's recipe and optimizers, in turn (two
   rounds, best kept), so a machine that gets busier slows all sizes alike.
3. Equal time: each size then runs the real ``python -m azgpt.cli fit --config quickstart.yaml --config
   laptop.yaml`` (callbacks and validation included) for ``scale x minutes`` worth of its measured optimizer
   steps, its learning-rate schedule ending there. Steps rather than a wall-clock limit, so every schedule
   completes; the table shows each run's real wall time beside its final held-out val_bpb.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from azgpt.data.datamodule import AzGPTDataModule
from azgpt.runtime import tune_malloc
from azgpt.train.history import read_history
from azgpt.train.module import AzGPT

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpus"
TRAIN = [str(SHARED / f"{name}.txt.gz") for name in ("web", "legal", "quran", "social")]
HELD_OUT = [str(SHARED / f"{name}.txt.gz") for name in ("wiki", "poetry")]


def parse_size(text: str) -> tuple[int, int, int]:
    """``4x256`` -> (layers 4, heads 4, width 256): heads of width 64."""
    try:
        n_layer, n_embd = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYERSxWIDTH, e.g. 4x256") from None
    if n_layer < 1 or n_embd < 64 or n_embd % 64:
        raise argparse.ArgumentTypeError(f"{text!r}: needs at least one layer and a width that is a multiple of 64")
    return n_layer, n_embd // 64, n_embd


def steps_per_second(model_settings: dict, dm: AzGPTDataModule, steps: int, accumulate: int) -> tuple[float, int]:
    """Optimizer steps per second of this model with its real optimizer (Muon's fixed cost per step included),
    and its parameter count."""
    module = AzGPT(vocab_size=dm.vocab_size, block_size=dm.block_size, **model_settings)
    optimizer, _ = module.build_optimizer()
    blocks = dm.train_dataset()
    started = time.perf_counter()
    for step in range(steps + 2):
        if step == 2:
            started = time.perf_counter()  # two untimed steps fault in the heap and warm the kernels
        for micro in range(accumulate):
            inputs, targets = blocks.batch_at(step * accumulate + micro)
            _, loss = module.model(inputs, targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - started), module.model.num_params(non_embedding=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=["2x128", "3x192", "4x256"],
                        help="LAYERSxWIDTH, heads of width 64")
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "shared-az")
    parser.add_argument("--work", type=Path, default=None, help="where the runs' logs go (default: a temp folder)")
    args = parser.parse_args()
    print("command: PYTHONPATH=. python bench/laptop_sizes.py " + shlex.join(sys.argv[1:]), flush=True)
    tune_malloc()
    laptop = yaml.safe_load((ROOT / "configs" / "laptop.yaml").read_text())
    data, trainer = laptop["data"], laptop["trainer"]
    data_args = ["--data.data_dir", str(args.data_dir.resolve()), "--data.corpus", json.dumps(TRAIN),
                 "--data.max_bytes", "null", "--data.val_corpus", json.dumps(HELD_OUT)]
    dm = AzGPTDataModule(data_dir=str(args.data_dir.resolve()), corpus=TRAIN, val_corpus=HELD_OUT, max_bytes=None,
                         vocab_size=data["vocab_size"], block_size=data["block_size"], batch_size=data["batch_size"],
                         val_max_blocks=data["val_max_blocks"])
    dm.prepare_data()
    dm.setup()
    accumulate = trainer["accumulate_grad_batches"]
    tokens_per_step = data["batch_size"] * accumulate * data["block_size"]
    train_tokens = dm.meta["splits"]["train"]["tokens"]
    print(f"data: {train_tokens:,} train tokens (web, legal, quran, social), held out: wiki + poetry; "
          f"{torch.get_num_threads()} threads, fp32; {tokens_per_step:,} tokens per optimizer step", flush=True)

    sizes = {f"{n_layer}x{n_embd}": (n_layer, n_head, n_embd) for n_layer, n_head, n_embd in args.sizes}
    settings = {name: {**laptop["model"], "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}
                for name, (n_layer, n_head, n_embd) in sizes.items()}
    rates: dict[str, float] = {}
    parameters: dict[str, int] = {}
    for round_index in range(2):
        for name in sizes if round_index == 0 else reversed(sizes):
            rate, parameters[name] = steps_per_second(settings[name], dm, args.probe_steps, accumulate)
            rates[name] = max(rates.get(name, 0.0), rate)

    work = args.work or Path(tempfile.mkdtemp(prefix="laptop_sizes_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (n_layer, n_head, n_embd) in sizes.items():
        steps = max(int(rates[name] * args.minutes * 60 * args.scale), 20)
        print(f"{name}: {rates[name] * tokens_per_step:,.0f} tokens/s -> {steps:,} steps "
              f"({steps * tokens_per_step / train_tokens:.2f} epochs)", flush=True)
        command = [sys.executable, "-m", "azgpt.cli", "fit", "--config", "quickstart.yaml", "--config", "laptop.yaml",
                   *data_args, "--model.n_layer", str(n_layer), "--model.n_head", str(n_head),
                   "--model.n_embd", str(n_embd), "--budget", "null", "--trainer.max_steps", str(steps),
                   "--val_every_n_steps", str(max(steps // 10, 1)), "--early_stopping", "null",
                   "--trainer.enable_progress_bar", "false"]
        if (work / name).exists():
            raise SystemExit(f"{work / name} already exists (an earlier run's logs): pass another --work")
        (work / name).mkdir()
        started = time.perf_counter()
        run = subprocess.run(command, cwd=work / name,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (work / name / "fit.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            raise SystemExit(f"{name}: fit failed (exit {run.returncode}); see {work / name / 'fit.log'}")
        version = max((work / name / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)
        val_bpb = read_history(version).curve("val_bpb")[-1].value
        rows.append((name, parameters[name], steps, seconds, val_bpb))
        print(f"{name}: val_bpb {val_bpb:.4f} after {steps} steps in {seconds / 60:.1f} min ({version})", flush=True)

    print("\n| size | parameters | optimizer steps | tokens | wall time | final val_bpb |\n|---|---|---|---|---|---|")
    for name, params, steps, seconds, val_bpb in rows:
        print(f"| {name} | {params / 1e6:.2f} M | {steps:,} | {steps * tokens_per_step / 1e6:.1f} M | "
              f"{seconds / 60:.1f} min | {val_bpb:.4f} |")
    best = min(rows, key=lambda row: row[4])
    print(f"best in equal time: {best[0]} (val_bpb {best[4]:.4f})")


if __name__ == "__main__":
    main()
