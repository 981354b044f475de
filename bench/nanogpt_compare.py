"""nanoGPT's own ``train.py`` on azgpt's reference config and token data: a same-machine speed yardstick.

    PYTHONPATH=. python bench/nanogpt_compare.py --nanogpt ~/src/nanoGPT              # as nanoGPT runs on a CPU
    PYTHONPATH=. python bench/nanogpt_compare.py --nanogpt ~/src/nanoGPT --tuned      # + azgpt's malloc tuning
    PYTHONPATH=. python bench/nanogpt_compare.py --nanogpt ~/src/nanoGPT --script train_cpu_bf16.py --dtype bfloat16

nanoGPT is not a dependency and nothing of it is copied here: point ``--nanogpt`` at a checkout. The token data
(azgpt's prepared web corpus, as ``bench/train_throughput.py`` uses) is written there as
``data/azgpt_bench/{train,val}.bin``. nanoGPT's ``train.py`` never autocasts on a CPU, whatever ``--dtype``
says; for a bf16 figure, copy it and let its ``ctx = ...`` line return ``torch.autocast`` on the CPU too, then
pass the copy with ``--script``. Compare with ``bench/train_throughput.py`` run right before or after: the
machines are noisy, so only figures from the same few minutes compare.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from train_throughput import REPO, SHARED_CORPUS, default_cache_dir, load_tokens

DATASET = "azgpt_bench"
ITERATION = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms")
TOKENS_PER_ITERATION = re.compile(r"tokens per iteration will be: ([\d,]+)")
# Runs train.py in this process after azgpt's malloc tuning, as `python -c` so train.py still sees its own argv.
TUNED_LAUNCHER = ("import runpy, sys; from azgpt.runtime import tune_malloc; print('malloc:', tune_malloc()); "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (holds train.py, model.py)")
    p.add_argument("--script", default="train.py", help="the training script inside --nanogpt")
    p.add_argument("--device", default="cpu", help="nanoGPT's device setting (cpu, cuda, ...)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tuned", action="store_true", help="apply azgpt's glibc malloc tuning first")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--runs", type=int, default=2, help="separate train.py runs")
    p.add_argument("--iters", type=int, default=12, help="nanoGPT's max_iters: it runs iterations 0..iters")
    p.add_argument("--skip", type=int, default=2, help="first iterations per run left out (iteration 0 evaluates)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--accumulate", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--corpus", type=Path, default=SHARED_CORPUS / "web.txt.gz")
    args = p.parse_args(argv)
    if not (args.nanogpt / args.script).is_file() or not (args.nanogpt / "configurator.py").is_file():
        p.error(f"{args.nanogpt} has no {args.script} and configurator.py: pass a nanoGPT checkout with --nanogpt")
    if args.iters <= args.skip:
        p.error(f"--iters ({args.iters}) must be larger than --skip ({args.skip})")
    return args


def write_nanogpt_data(args: argparse.Namespace) -> None:
    """azgpt's prepared tokens as nanoGPT's uint16 ``.bin`` files plus ``meta.pkl`` (vocab size)."""
    tokens_args = argparse.Namespace(random_tokens=False, corpus=args.corpus, vocab_size=args.vocab_size,
                                     block_size=args.block_size, batch_size=args.batch_size,
                                     cache_dir=default_cache_dir(args.corpus, args.vocab_size))
    tokens = load_tokens(tokens_args)
    if args.vocab_size > 65536:
        raise SystemExit("nanoGPT's .bin files hold uint16 token ids: --vocab-size must be at most 65,536")
    out = args.nanogpt / "data" / DATASET
    out.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", tokens.train), ("val", tokens.val)):
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": args.vocab_size}, f)
    print(f"data: {tokens.description} -> {out}")


def train_command(args: argparse.Namespace, out_dir: str) -> list[str]:
    overrides = {
        "dataset": DATASET, "out_dir": out_dir, "init_from": "scratch", "device": args.device,
        "dtype": args.dtype, "compile": args.compile, "n_layer": args.n_layer, "n_head": args.n_head,
        "n_embd": args.n_embd, "block_size": args.block_size, "dropout": 0.0, "bias": False,
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.accumulate,
        "max_iters": args.iters, "lr_decay_iters": args.iters, "warmup_iters": 2,
        "eval_interval": 10**9, "eval_iters": 1, "log_interval": 1, "always_save_checkpoint": False,
        "wandb_log": False,
    }
    launcher = ["-c", TUNED_LAUNCHER] if args.tuned else []
    return [sys.executable, *launcher, args.script, *(f"--{k}={v}" for k, v in overrides.items())]


def run_once(args: argparse.Namespace) -> tuple[list[float], int, str]:
    """Seconds per iteration after the skipped ones, tokens per iteration, and the malloc line (--tuned),
    from train.py's output."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-out-") as out_dir:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run(train_command(args, out_dir), cwd=args.nanogpt, env=env, capture_output=True,
                                text=True)
    if result.returncode != 0:
        raise SystemExit(f"nanoGPT's {args.script} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    seconds = [float(m.group(2)) / 1000 for m in map(ITERATION.match, result.stdout.splitlines()) if m]
    per_iteration = TOKENS_PER_ITERATION.search(result.stdout)
    if per_iteration is None or len(seconds) <= args.skip:
        raise SystemExit(f"could not read iteration times from {args.script}'s output:\n{result.stdout[-2000:]}")
    malloc = next((line for line in result.stdout.splitlines() if line.startswith("malloc:")), "")
    return seconds[args.skip:], int(per_iteration.group(1).replace(",", "")), malloc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    print("command: PYTHONPATH=. python bench/nanogpt_compare.py " + " ".join(shlex.quote(a) for a in argv))
    write_nanogpt_data(args)
    print(f"nanoGPT: {args.nanogpt / args.script}, dtype {args.dtype}, compile {args.compile}, "
          f"malloc tuning {'on' if args.tuned else 'off'}; {args.runs} runs x {args.iters + 1 - args.skip} timed "
          f"iterations", flush=True)
    rates = []
    for run in range(args.runs):
        seconds, tokens, malloc = run_once(args)
        if malloc and run == 0:
            print(malloc)
        rates.append(tokens / statistics.median(seconds))
        print(f"run {run + 1}: {rates[-1]:,.0f} tokens/s (median of {len(seconds)} iterations, "
              f"{tokens:,} tokens each)", flush=True)
    median = statistics.median(rates)
    print(f"nanoGPT {args.script}: {median:,.0f} tokens/s median (min {min(rates):,.0f}, max {max(rates):,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
