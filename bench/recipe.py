"""The GPT-2 recipe against the modern one (and any ablation): same wall time, same machine, alternating.

    PYTHONPATH=. python bench/recipe.py --minutes 3
    PYTHONPATH=. python bench/recipe.py --minutes 2 --variants gpt2 modern modern-adamw:recipe=modern,optimizer=adamw

Training text: web + legal + quran + social from ``../shared/corpus``; the tokenizer is trained on those alone.
Held out, whole sources the training never sees: wiki + poetry, on which bits per byte are measured (a fixed
set of blocks spread over both). Each variant trains in turns of ``--turn`` seconds, round robin, until each
has trained ``--minutes``; load from other processes hits every variant alike. Only time spent in training
steps counts; evaluations run between turns. The learning rate follows a warmup and a cosine over the wall-time
budget (the fraction of the budget used, not a step count, since the step rate is not known in advance), or
with ``lr_schedule=wsd`` in a variant, warmup-stable-decay over it as ``fit --budget`` runs it.

The model and optimizer are azgpt's own (``AzGPT(...).model`` and the optimizer ``fit`` would build), trained in
a plain loop in fp32 (the faster precision on CPUs without native bf16 matmuls, see ../shared/PERF-NOTES.md).
A variant is ``NAME`` (a recipe: gpt2, modern) or ``NAME:key=value,...`` with AzGPT arguments, plus three
of the benchmark's own that a variant may set for itself: ``minutes`` (its own training time, so a run given a
quarter of the reference's time, its schedule ending there, races the reference's final), ``batch_size`` and
``vocab_size`` (its own tokenizer and data; bits per byte compare across vocabularies).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from azgpt.data.corpus import iter_documents  # noqa: E402
from azgpt.data.prepare import PrepareConfig, prepare  # noqa: E402
from azgpt.data.tokenizer import (bits_per_byte, eot_id, load_tokenizer, split_at_line_breaks,  # noqa: E402
                                  token_byte_lengths)
from azgpt.runtime import tune_malloc  # noqa: E402
from azgpt.train.module import RECIPE_KEYS, AzGPT  # noqa: E402

SHARED_CORPUS = REPO.parent / "shared" / "corpus"
TRAIN_SOURCES = ("web", "legal", "quran", "social")
HELD_OUT_SOURCES = ("wiki", "poetry")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["gpt2", "modern"],
                   help="the first is the reference whose final bits per byte the others race to")
    p.add_argument("--minutes", type=float, default=3.0, help="training wall time per variant")
    p.add_argument("--turn", type=float, default=20.0, help="seconds each variant trains before the next")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="blocks per optimizer step")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's peak (all of gpt2's weights)")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks per evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--reference", default=None, help="name prefix of the variants to race against: the one "
                   "with the best final bpb is the reference (default: the first variant)")
    p.add_argument("--corpus", type=Path, default=SHARED_CORPUS)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "azgpt" / "bench-recipe")
    args = p.parse_args(argv)
    missing = [name for name in TRAIN_SOURCES + HELD_OUT_SOURCES if not (args.corpus / f"{name}.txt.gz").is_file()]
    if missing:
        p.error(f"{args.corpus} lacks {', '.join(f'{m}.txt.gz' for m in missing)}: pass --corpus ../shared/corpus")
    return args


BENCH_KEYS = ("minutes", "batch_size", "vocab_size")  # a variant's settings of the benchmark, not of AzGPT


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """``modern`` -> recipe modern; ``name:key=value,...`` -> those AzGPT arguments (values read as YAML)."""
    import yaml

    name, _, spec = text.partition(":")
    if not spec:
        return name, {"recipe": name}
    settings = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    for key in BENCH_KEYS:
        value = settings.get(key)
        wanted = float if key == "minutes" else int
        if key in settings and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                                or (wanted is int and value != int(value))):
            raise SystemExit(f"recipe.py: variant {name!r}: {key} must be a positive "
                             f"{'number' if wanted is float else 'whole number'}, got {value!r}")
    return name, settings


@dataclass
class Data:
    train: np.ndarray
    held_out: np.ndarray
    byte_lengths: torch.Tensor


def load_data(args: argparse.Namespace, vocab_size: int) -> Data:
    """Tokens of the training sources (prepared once, cached) and of the held-out sources, by that tokenizer."""
    folder = args.cache_dir / f"v{vocab_size}"
    if not (folder / "meta.json").is_file():
        prepare(PrepareConfig(out=folder, corpus=[str(args.corpus / f"{n}.txt.gz") for n in TRAIN_SOURCES],
                              vocab_size=vocab_size, val_fraction=0.01, block_size=args.block_size))
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    held_out_file = folder / "held_out.npy"
    if not held_out_file.is_file():
        tokenizer.encode_special_tokens = True
        ids: list[int] = []
        for document in iter_documents([str(args.corpus / f"{n}.txt.gz") for n in HELD_OUT_SOURCES]):
            for encoding in tokenizer.encode_batch(split_at_line_breaks(document), add_special_tokens=False):
                ids.extend(encoding.ids)
            ids.append(eot_id(tokenizer))
        np.save(held_out_file, np.array(ids, dtype=np.uint16))
    train = np.load(folder / "train.npy", mmap_mode="r")
    held_out = np.load(held_out_file)
    return Data(train, held_out, torch.tensor(token_byte_lengths(tokenizer), dtype=torch.long))


@dataclass
class Run:
    name: str
    settings: dict[str, object]
    data: Data
    budget: float  # training seconds
    batch_size: int
    module: AzGPT
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    warmups: list[int]
    rng: np.random.Generator
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (train seconds, tokens, bpb)


def build_run(name: str, settings: dict[str, object], args: argparse.Namespace, datas: dict[int, Data]) -> Run:
    torch.manual_seed(args.seed)  # the same initial draw for every variant (where shapes agree)
    vocab_size = int(settings.get("vocab_size", args.vocab_size))
    if vocab_size not in datas:
        datas[vocab_size] = load_data(args, vocab_size)
    defaults = dict(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, learning_rate=args.learning_rate,
                    muon_lr=args.muon_lr, warmup_steps=args.warmup_steps)
    model_settings = {k: v for k, v in settings.items() if k not in BENCH_KEYS}
    module = AzGPT(**{**defaults, **model_settings})  # a variant's own settings win over the command's
    optimizer, warmups = module.build_optimizer()
    batch_size = int(settings.get("batch_size", args.batch_size))
    warm_up(module.model, args.block_size, batch_size, vocab_size)
    budget = float(settings.get("minutes", args.minutes)) * 60
    return Run(name, settings, datas[vocab_size], budget, batch_size, module, optimizer,
               [g["lr"] for g in optimizer.param_groups], warmups,
               np.random.default_rng(args.seed))  # the same batches in the same order for every variant


def warm_up(model: torch.nn.Module, block_size: int, batch_size: int, vocab_size: int) -> None:
    """Two untimed forward/backward passes on random tokens, gradients dropped: the first steps of a process
    page-fault its heap into existence, which would otherwise slow whichever variant trains first."""
    tokens = torch.randint(0, vocab_size, (batch_size, block_size + 1))
    for _ in range(2):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    model.zero_grad(set_to_none=True)


def lr_factor(step: int, warmup: int, used: float, min_ratio: float = 0.1, schedule: str | None = None,
              cooldown: float = 0.2) -> float:
    """Linear warmup over ``warmup`` steps, then over the fraction ``used`` of the time budget: a cosine down to
    ``min_ratio`` (the default), or with ``schedule="wsd"`` the peak until the last ``cooldown`` of the budget
    and a linear cooldown to ``min_ratio`` over it (what ``fit --budget`` runs)."""
    if step < warmup:
        return (step + 1) / warmup
    used = min(1.0, used)
    if schedule == "wsd":
        return 1.0 - (1 - min_ratio) * max(0.0, (used - (1 - cooldown)) / cooldown)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * used))


def train_turn(run: Run, args: argparse.Namespace, seconds: float) -> None:
    model, data, budget = run.module.model.train(), run.data, run.budget
    hp = run.module.hparams
    block = args.block_size
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and run.train_seconds < budget:
        start = time.perf_counter()
        offsets = run.rng.integers(0, len(data.train) - block - 1, size=run.batch_size)
        chunk = torch.from_numpy(np.stack([data.train[o:o + block + 1] for o in offsets]).astype(np.int64))
        for group, base, warmup in zip(run.optimizer.param_groups, run.base_lrs, run.warmups):
            group["lr"] = base * lr_factor(run.steps, warmup, run.train_seconds / budget, hp["min_lr_ratio"],
                                           hp["lr_schedule"], hp["cooldown_fraction"])
        run.optimizer.zero_grad(set_to_none=True)
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.optimizer.step()
        run.steps += 1
        run.tokens += run.batch_size * block
        run.train_seconds += time.perf_counter() - start


@torch.no_grad()
def held_out_bpb(run: Run, args: argparse.Namespace) -> float:
    model, data = run.module.model.eval(), run.data
    block = args.block_size
    starts = np.linspace(0, len(data.held_out) - block - 1, args.eval_blocks).astype(np.int64)
    chunk = torch.from_numpy(np.stack([data.held_out[s:s + block + 1] for s in starts]).astype(np.int64))
    nll = bytes_ = 0.0
    for rows in chunk.split(8):
        logits, _ = model(rows[:, :-1])
        targets = rows[:, 1:].reshape(-1)
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets, reduction="sum").item()
        bytes_ += data.byte_lengths[targets].sum().item()
    return bits_per_byte(nll, bytes_)


def time_to_reach(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """Training seconds at which the curve first reaches ``target`` (linear between evaluations)."""
    if curve and curve[0][2] <= target:
        return curve[0][0]
    for (t0, _, b0), (t1, _, b1) in zip(curve, curve[1:]):
        if b1 <= target:
            return t1 if b0 == b1 else t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tuning = tune_malloc()  # as `azgpt fit` does: without it glibc's page-fault churn halves CPU throughput
    print("command: PYTHONPATH=. python bench/recipe.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(text) for text in args.variants]  # a bad variant fails before any data is prepared
    datas = {args.vocab_size: load_data(args, args.vocab_size)}
    runs = [build_run(name, settings, args, datas) for name, settings in variants]
    for vocab_size, data in datas.items():
        print(f"data, vocab {vocab_size}: train {', '.join(TRAIN_SOURCES)}: {len(data.train):,} tokens; held out "
              f"{', '.join(HELD_OUT_SOURCES)}: {len(data.held_out):,} tokens, {args.eval_blocks} blocks measured")
    print(f"model: {args.n_layer} layers, {args.n_head} heads, n_embd {args.n_embd}, block {args.block_size}, "
          f"vocab {args.vocab_size}; batch {args.batch_size} x {args.block_size} tokens; fp32; "
          f"{torch.get_num_threads()} threads; AdamW lr {args.learning_rate}, Muon lr {args.muon_lr}; "
          f"malloc: {tuning['malloc']}")
    for run in runs:
        hp = run.module.hparams
        arch = {k: hp[k] for k in (*RECIPE_KEYS, "optimizer")}
        own = {k: run.settings[k] for k in BENCH_KEYS if k in run.settings}
        print(f"  {run.name}: {run.module.model.num_params(non_embedding=False) / 1e6:.2f} M params, {arch}"
              + (f", {own}" if own else ""))
        run.curve.append((0.0, 0, held_out_bpb(run, args)))
    while any(run.train_seconds < run.budget for run in runs):
        for run in runs:
            if run.train_seconds < run.budget:
                train_turn(run, args, args.turn)
                run.curve.append((run.train_seconds, run.tokens, held_out_bpb(run, args)))
                print(f"  {run.name:>16}  {run.train_seconds:7.1f} s  step {run.steps:5d}  "
                      f"held-out bpb {run.curve[-1][2]:.4f}", flush=True)

    print("\nheld-out bits per byte against training time (s):")
    for run in runs:
        print(f"  {run.name:>16}: " + "  ".join(f"{t:.0f}s {b:.3f}" for t, _, b in run.curve))
    # The reference: the best final of the variants named --reference... (a swept recipe races its best rate).
    candidates = [run for run in runs if run.name.startswith(args.reference or runs[0].name)] or runs[:1]
    reference = min(candidates, key=lambda run: run.curve[-1][2])
    target = reference.curve[-1][2]
    print(f"\ntime to reach {reference.name}'s final held-out bits per byte ({target:.4f}), the best final of "
          f"{', '.join(run.name for run in candidates)}:")
    for run in runs:
        reached = time_to_reach(run.curve, target)
        rate = run.tokens / run.train_seconds
        when = (f"{reached:6.1f} s ({reached / reference.train_seconds:.2f} of {reference.name}'s time)"
                if reached is not None else "   not reached")
        print(f"  {run.name:>16}: {when}; final bpb {run.curve[-1][2]:.4f} after {run.train_seconds:.0f} s; "
              f"{run.steps} steps, "
              f"{rate:,.0f} tok/s ({rate / (reference.tokens / reference.train_seconds):.2f}x {reference.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
