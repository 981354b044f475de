"""Which model size learns most in a fixed CPU time: the sizing behind configs/laptop.yaml.

    PYTHONPATH=. python bench/laptop_sizes.py [--minutes 27] [--sizes 2x128 3x192 4x256] [--seeds 1337 1]
                                              [--side-by-side]

1. Data: the local real corpus in ../shared (web, legal, quran, social to train on; wiki and poetry held out for
   validation), prepared once with laptop.yaml's vocabulary and block.
2. Equal time: each size runs the real ``python -m azgpt.cli fit --config quickstart.yaml --config laptop.yaml
   --budget`` for the same ``--minutes`` of training (validations included, as the budget counts them): azgpt
   plans the steps from its measured speed, re-plans when the machine drifts, and ends the learning-rate
   schedule at its floor on the last step. The table shows the steps each size got and its final held-out
   val_bpb.
3. Seeds: every size runs once per ``--seeds`` value (``--seed_everything``: initial weights and the blocks
   drawn), seed by seed, the sizes in alternating order, and the table gives the mean and the spread, since
   the sizes' margins (about 0.01 bpb) are of the order of what a seed changes. ``--side-by-side`` runs a
   size's seeds at once instead, each on its own CPU core with one thread (a laptop's core while another
   program uses the next one), in half the time on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=27, help="training time of every fit (its --budget)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, help="LAYERSxWIDTH, heads of width 64",
                        default=[parse_size(size) for size in ("2x128", "3x192", "4x256")])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1], help="one fit per size and seed")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "shared-az")
    parser.add_argument("--work", type=Path, default=None, help="where the runs' logs go (default: a temp folder)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run each size's seeds at once, one CPU core and one thread each")
    args = parser.parse_args(argv)
    if args.side_by_side and len(args.seeds) > len(os.sched_getaffinity(0)):
        parser.error(f"--side-by-side needs a CPU core per seed: {len(args.seeds)} seeds, "
                     f"{len(os.sched_getaffinity(0))} cores")
    return args


def main() -> None:
    args = parse_args()
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
          f"{torch.get_num_threads()} threads; {tokens_per_step:,} tokens per optimizer step; each fit --budget "
          f"{args.minutes:g} min of training"
          + (", each size's seeds side by side, one core and thread each" if args.side_by_side else ""), flush=True)

    sizes = {f"{n_layer}x{n_embd}": (n_layer, n_head, n_embd) for n_layer, n_head, n_embd in args.sizes}
    parameters = {name: AzGPT(**{**laptop["model"], "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd},
                              vocab_size=dm.vocab_size, block_size=dm.block_size).model.num_params(non_embedding=False)
                  for name, (n_layer, n_head, n_embd) in sizes.items()}
    budget = f"{args.minutes * 60:.0f}s"
    work = args.work or Path(tempfile.mkdtemp(prefix="laptop_sizes_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in sizes}  # (s, steps, val_bpb) a seed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cores = sorted(os.sched_getaffinity(0))

    def start(name: str, seed: int, core: int | None) -> tuple[subprocess.Popen, Path, float]:
        n_layer, n_head, n_embd = sizes[name]
        command = [sys.executable, "-m", "azgpt.cli", "fit", "--config", "quickstart.yaml", "--config",
                   "laptop.yaml", *data_args, "--seed_everything", str(seed), "--model.n_layer", str(n_layer),
                   "--model.n_head", str(n_head), "--model.n_embd", str(n_embd),
                   "--budget", budget, "--early_stopping", "null", "--trainer.enable_progress_bar", "false"]
        folder = work / f"{name}-seed{seed}"
        folder.mkdir()
        pinned = {} if core is None else {"OMP_NUM_THREADS": "1"}
        with open(folder / "fit.log", "w") as log:
            run = subprocess.Popen(command, cwd=folder, env={**env, **pinned}, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=None if core is None else lambda: os.sched_setaffinity(0, {core}))
        return run, folder, time.perf_counter()

    if args.side_by_side:  # a size's seeds together, the sizes one after another
        rounds = [[(name, seed, core) for seed, core in zip(args.seeds, cores)] for name in sizes]
    else:  # seed by seed, the sizes in alternating order
        rounds = [[(name, seed, None)] for seed_index, seed in enumerate(args.seeds)
                  for name in (list(sizes) if seed_index % 2 == 0 else list(reversed(sizes)))]
    taken = [work / f"{name}-seed{seed}" for fits in rounds for name, seed, _ in fits
             if (work / f"{name}-seed{seed}").exists()]
    if taken:  # before any fit starts, so that none is left running when another cannot
        raise SystemExit(f"{taken[0]} already exists (an earlier run's logs): pass another --work")
    for fits in rounds:
        running = [(name, seed, *start(name, seed, core)) for name, seed, core in fits]
        finished = []
        while running:  # polled, so that each fit's end-to-end time is its own
            time.sleep(0.5)
            for fit in [fit for fit in running if fit[2].poll() is not None]:
                running.remove(fit)
                finished.append((*fit, time.perf_counter() - fit[4]))
        for name, seed, run, folder, _, seconds in finished:
            if run.returncode != 0:
                raise SystemExit(f"{name} seed {seed}: fit failed (exit {run.returncode}); see {folder / 'fit.log'}")
            version = max((folder / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)
            last = read_history(version).curve("val_bpb")[-1]
            results[name].append((seconds, last.step, last.value))
            print(f"{name} seed {seed}: val_bpb {last.value:.4f} after {last.step:,} steps, "
                  f"{seconds / 60:.1f} min end to end ({version})", flush=True)

    print(f"\n| size | parameters | optimizer steps (mean) | tokens (mean) | end to end (mean) | final val_bpb, mean "
          f"of {len(args.seeds)} seeds (min-max) |\n|---|---|---|---|---|---|")
    means = {}
    for name, runs in results.items():
        bpbs = [bpb for _, _, bpb in runs]
        means[name] = statistics.fmean(bpbs)
        wall = statistics.fmean(seconds for seconds, _, _ in runs)
        steps = statistics.fmean(step for _, step, _ in runs)
        print(f"| {name} | {parameters[name] / 1e6:.2f} M | {steps:,.0f} | {steps * tokens_per_step / 1e6:.1f} M | "
              f"{wall / 60:.1f} min | {means[name]:.4f} ({min(bpbs):.4f}-{max(bpbs):.4f}) |")
    best = min(means, key=means.get)
    print(f"lowest mean val_bpb: {best} ({means[best]:.4f}); a margin inside the seeds' ranges is no ranking")


if __name__ == "__main__":
    main()
