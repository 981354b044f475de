"""Which model size learns most in a fixed CPU time: the sizing behind configs/laptop.yaml.

    PYTHONPATH=. python bench/laptop_sizes.py [--corpus FILES] [--minutes 30] [--scale 0.1]

1. Throughput: each size trains a few optimizer steps in turn (alternating, two rounds, best round kept), in
   the precision ``fit`` would choose on this CPU, so a busy machine slows all sizes alike.
2. Equal time: each size then trains ``scale x minutes`` worth of its own measured optimizer steps with
   ``azgpt fit`` (its schedule ending there), and its final val_bpb is reported. Steps, not a wall-clock limit,
   so the comparison holds on a shared machine; at ``--scale 1`` it is the full budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from azgpt.data.datamodule import AzGPTDataModule
from azgpt.train.lightning_cli import run_lightning_cli
from azgpt.train.module import AzGPT
from azgpt.train.precision import precision_dtype
from azgpt.train.trainer import choose_precision

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"2x128": (2, 2, 128), "4x256": (4, 4, 256), "6x384": (6, 6, 384)}
VOCAB = 8192


def steps_per_second(size: tuple[int, int, int], dm: AzGPTDataModule, dtype: torch.dtype, steps: int,
                     accumulate: int) -> float:
    n_layer, n_head, n_embd = size
    module = AzGPT(vocab_size=VOCAB, block_size=dm.block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    blocks = dm.train_dataset()
    started = None
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()  # the first step warms up allocator and kernels
        for micro in range(accumulate):
            inputs, targets = blocks.batch_at(step * accumulate + micro)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                _, loss = module.model(inputs, targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = ROOT.parent / "shared" / "corpus"
    parser.add_argument("--corpus", nargs="+", default=[str(shared / f) for f in ("web.txt.gz", "legal.txt.gz",
                                                                                   "quran.txt.gz")])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--probe-rounds", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse a folder prepared with vocab 8192")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    print("command: PYTHONPATH=. python bench/laptop_sizes.py " + shlex.join(sys.argv[1:]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="laptop_sizes_"))
    data_dir = args.data_dir or work / "data"
    dm = AzGPTDataModule(data_dir=str(data_dir), corpus=args.corpus, vocab_size=VOCAB, block_size=args.block,
                         batch_size=args.micro, val_max_blocks=100)
    dm.prepare_data()
    dm.setup()
    precision = choose_precision("cpu", "16-mixed")
    dtype = precision_dtype(precision)
    rates: dict[str, float] = {}
    for round_index in range(args.probe_rounds):
        for name in args.sizes if round_index % 2 == 0 else reversed(args.sizes):
            rate = steps_per_second(SIZES[name], dm, dtype, args.probe_steps, args.accumulate)
            rates[name] = max(rates.get(name, 0.0), rate)
    tokens_per_step = args.micro * args.accumulate * args.block
    print(f"data: {' '.join(args.corpus)}, {dm.meta['splits']['train']['tokens']:,} train tokens; precision {precision}; "
          f"{os.cpu_count()} CPUs (shared machine)", flush=True)
    results = {}
    for name in args.sizes:
        n_layer, n_head, n_embd = SIZES[name]
        full_steps = int(rates[name] * args.minutes * 60)
        steps = max(int(full_steps * args.scale), args.min_steps)
        print(f"{name}: {rates[name] * tokens_per_step:,.0f} tokens/s -> {full_steps:,} steps in {args.minutes:g} "
              f"min; training {steps} steps (scale {args.scale:g})", flush=True)
        cli = run_lightning_cli([
            "fit", "--config", "quickstart.yaml", "--data.data_dir", str(data_dir),
            "--data.corpus", json.dumps(args.corpus), "--data.vocab_size", str(VOCAB),
            "--data.block_size", str(args.block), "--data.batch_size", str(args.micro), "--data.val_max_blocks", "100",
            "--model.n_layer", str(n_layer), "--model.n_head", str(n_head), "--model.n_embd", str(n_embd),
            "--model.dropout", "0.0", "--model.warmup_steps", str(max(steps // 20, 2)),
            "--trainer.max_steps", str(steps), "--trainer.accumulate_grad_batches", str(args.accumulate),
            "--val_every_n_steps", str(steps), "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(work / name)])
        results[name] = float(cli.trainer.callback_metrics["val_bpb"])
        print(f"{name}: val_bpb {results[name]:.4f} after {steps} steps", flush=True)
    best = min(results, key=results.get)
    print(f"best in equal time: {best} (val_bpb {results[best]:.4f})")


if __name__ == "__main__":
    main()
