"""Training throughput: azgpt's real ``Trainer.fit`` against a minimal PyTorch loop, on one GPT and one data set.

    PYTHONPATH=. python bench/train_throughput.py                 # reference config, 3 rounds
    PYTHONPATH=. python bench/train_throughput.py --compile       # both paths with torch.compile
    AZGPT_NO_TUNING=1 PYTHONPATH=. python bench/train_throughput.py   # without azgpt's malloc tuning

``fit`` is built by azgpt's LightningCLI from ``configs/base.yaml`` (TensorBoardLogger, ModelCheckpoint,
LearningRateMonitor, TrainingSpeed, progress bar) with the model and data sizes overridden by the flags;
validation is pushed past the end of the run, so ModelCheckpoint saves once, after the timed steps.
The plain loop uses the same GPT, config, AdamW parameter groups, LR schedule, gradient clipping (1.0),
accumulation and token blocks, with nothing else. The two alternate (ABBA order) so that load from
other processes hits both alike; tokens/s is timed over optimizer steps after the warm-up steps.

MFU = tokens/s * GPT.flops_per_token() / peak, the peak being the best square-matmul rate measured in
this run (fp32 on CPU; the autocast dtype on CUDA). A last section compares the cost per token of a full
validation pass (``Trainer.validate``) with a training forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpus"
sys.path.insert(0, str(REPO))

from azgpt.runtime import tune_malloc  # noqa: E402

# The same process-level tuning azgpt's own entry point applies, before torch allocates anything.
TUNING = tune_malloc()

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from azgpt.train.callbacks import TextSamples  # noqa: E402
from azgpt.data.datamodule import AzGPTDataModule, FixedValBlocks, RandomTrainBlocks  # noqa: E402
from azgpt.train.module import AzGPT, adamw_param_groups, build_adamw, warmup_cosine  # noqa: E402
from azgpt.train.optim import OptimConfig  # noqa: E402
from azgpt.model import GPT, GPTConfig  # noqa: E402
from azgpt.train.precision import measure_matmul_flops, precision_dtype, resolve_cpu_precision, synchronize  # noqa: E402
from azgpt.train.lightning_cli import AzGPTCLI, resolve_config_arguments  # noqa: E402

SEED = 1337


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=12, help="micro-batch rows")
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--precision", default="auto", choices=("auto", "32-true", "16-mixed", "bf16-mixed"),
                   help="auto: what azgpt's configs get here (16-mixed on CUDA; on a CPU the faster of "
                        "bf16-mixed and 32-true, timed as azgpt's CLI does)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both paths")
    p.add_argument("--rounds", type=int, default=3, help="runs of each path, alternating")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps per run left out of the timing")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--only", choices=("both", "fit", "plain"), default="both")
    p.add_argument("--corpus", type=Path, default=SHARED_CORPUS / "web.txt.gz",
                   help="text to tokenize (random tokens when it is missing)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="prepared token files (default: data/bench/<corpus stem>-v<vocab> in the repo)")
    p.add_argument("--random-tokens", action="store_true", help="use random tokens even if the corpus exists")
    p.add_argument("--val-rounds", type=int, default=3, help="validation-cost measurements (0: skip)")
    p.add_argument("--cli-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for azgpt's LightningCLI in the fit path, e.g. "
                        "--cli-arg=--trainer.enable_progress_bar=false (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul that measures the peak")
    args = p.parse_args(argv)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir(args.corpus, args.vocab_size)
    return args


def default_cache_dir(corpus: Path, vocab_size: int) -> Path:
    """Where the benchmarks keep a corpus prepared with ``vocab_size`` tokens: data/bench/<stem>-v<vocab>."""
    return REPO / "data" / "bench" / f"{corpus.name.split('.')[0]}-v{vocab_size}"


def reproduce_command(argv: list[str]) -> str:
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("AZGPT_NO_TUNING", "LD_PRELOAD", "MALLOC_ARENA_MAX",
           "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES",
           "OMP_NUM_THREADS") if os.environ.get(k)]
    return " ".join(env + ["PYTHONPATH=.", "python", "bench/train_throughput.py"] + [shlex.quote(a) for a in argv])


# ------------------------------------------------------------------------------------------- helpers


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str):
    if precision == "32-true":
        return contextlib.nullcontext()
    return torch.autocast(device().type, dtype=precision_dtype(precision))


def machine_load() -> str:
    load1, load5, _ = os.getloadavg()
    return f"load average {load1:.2f} (1 min), {load5:.2f} (5 min) on {os.cpu_count()} CPUs"


def other_busy_processes(limit: int = 5) -> str:
    """The other processes using the most CPU now (from ps), to say what else was running."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,pcpu=,args=", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no ps)"
    rows = []
    for line in out.splitlines():
        pid, pcpu, command = line.split(None, 2)
        if int(pid) != os.getpid() and float(pcpu) >= 5.0:
            rows.append(f"{float(pcpu):.0f}% {command[:70]}")
    return "; ".join(rows[:limit]) or "none above 5% CPU"


@dataclass
class Clock:
    """(wall time, user CPU time, system CPU time, minor page faults) at the end of each optimizer step."""

    marks: list[tuple[float, float, float, int]] = field(default_factory=list)

    def mark(self) -> None:
        synchronize(device())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.marks.append((time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt))

    def window(self, warmup: int, tokens_per_step: int) -> dict[str, float]:
        """Rates over the steps after ``warmup`` (mark 0 is the start, mark i the end of step i)."""
        (w0, u0, s0, f0), (w1, u1, s1, f1) = self.marks[warmup], self.marks[-1]
        steps = len(self.marks) - 1 - warmup
        return {"tokens_per_sec": steps * tokens_per_step / (w1 - w0), "sec_per_step": (w1 - w0) / steps,
                "user_sec_per_step": (u1 - u0) / steps, "sys_sec_per_step": (s1 - s0) / steps,
                "faults_per_step": (f1 - f0) / steps}


class StepClock(L.Callback):
    """Marks the clock when Lightning starts training and after every optimizer step."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate = accumulate
        self.clock = Clock()

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate == 0:
            self.clock.mark()


# ------------------------------------------------------------------------------------------- data


@dataclass
class Tokens:
    description: str
    train: np.ndarray
    val: np.ndarray
    data_dir: Path | None  # prepared folder for AzGPTDataModule; None for random tokens


def load_tokens(args: argparse.Namespace) -> Tokens:
    if not args.random_tokens and (args.corpus.is_file() or (args.cache_dir / "meta.json").is_file()):
        dm = AzGPTDataModule(data_dir=str(args.cache_dir), corpus=[str(args.corpus)], vocab_size=args.vocab_size,
                             block_size=args.block_size, batch_size=args.batch_size, seed=SEED)
        if not dm.is_prepared():
            print(f"preparing {args.corpus} (vocab {args.vocab_size}) into {args.cache_dir} ...", flush=True)
            dm.prepare_data()
        dm.setup("fit")
        return Tokens(f"{args.corpus.name} prepared in {args.cache_dir} ({len(dm._train):,} train tokens)",
                      dm._train, dm._val, args.cache_dir)
    rng = np.random.default_rng(0)
    reason = "--random-tokens" if args.random_tokens else f"{args.corpus} is missing"
    return Tokens(f"RANDOM tokens ({reason})", rng.integers(0, args.vocab_size, 4_000_000, dtype=np.uint16),
                  rng.integers(0, args.vocab_size, 200_000, dtype=np.uint16), None)


# ------------------------------------------------------------------------------------------- the two paths


def cli_args(args: argparse.Namespace, tokens: Tokens, log_dir: str, max_steps: int, val_every: int) -> list[str]:
    """azgpt's base.yaml with the benchmark's sizes: what ``azgpt fit --config base.yaml ...`` would get."""
    data_dir = str(tokens.data_dir) if tokens.data_dir else str(Path(log_dir) / "no-data")
    return [
        "--config", "base.yaml",
        "--model.n_layer", str(args.n_layer), "--model.n_head", str(args.n_head),
        "--model.n_embd", str(args.n_embd), "--model.dropout", str(args.dropout),
        "--model.compile", str(args.compile).lower(),
        "--data.data_dir", data_dir, "--data.corpus", json.dumps([str(args.corpus)]),
        "--data.vocab_size", str(args.vocab_size), "--data.block_size", str(args.block_size),
        "--data.batch_size", str(args.batch_size), "--data.seed", str(SEED),
        "--trainer.max_steps", str(max_steps), "--trainer.accumulate_grad_batches", str(args.accumulate),
        "--trainer.precision", args.precision, "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", log_dir, "--trainer.logger.init_args.save_dir", log_dir,
        "--val_every_n_steps", str(val_every),
    ] + args.cli_arg


def build_cli(args: argparse.Namespace, tokens: Tokens, log_dir: str, max_steps: int, val_every: int) -> AzGPTCLI:
    argv = resolve_config_arguments(cli_args(args, tokens, log_dir, max_steps, val_every))
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees the benchmark's own flags
    try:
        return AzGPTCLI(AzGPT, AzGPTDataModule, args=argv, run=False,
                        seed_everything_default=SEED, save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = saved


def random_train_loader(args: argparse.Namespace, tokens: Tokens) -> DataLoader:
    blocks = RandomTrainBlocks(tokens.train, args.block_size, args.batch_size, SEED)
    return DataLoader(blocks, batch_size=None, pin_memory=torch.cuda.is_available())


def run_fit(args: argparse.Namespace, tokens: Tokens) -> Clock:
    """azgpt's real training path, built by its LightningCLI from base.yaml."""
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="azgpt-bench-") as log_dir:
        cli = build_cli(args, tokens, log_dir, total, val_every=total + 1)
        clock = StepClock(args.accumulate)
        cli.trainer.callbacks.append(clock)
        if tokens.data_dir is not None:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        else:
            cli.trainer.fit(cli.model, train_dataloaders=random_train_loader(args, tokens))
    return clock.clock


def run_plain(args: argparse.Namespace, tokens: Tokens) -> Clock:
    """A minimal hand-written loop: the same model, AdamW (groups, fused where available), schedule,
    clipping and blocks; nothing else."""
    dev = device()
    total = args.warmup + args.steps
    hp = OptimConfig()  # AzGPT's defaults, as in base.yaml
    torch.manual_seed(SEED)
    model = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)).to(dev)
    if args.compile:
        model.compile()
    optimizer = build_adamw(adamw_param_groups(model, hp.weight_decay), lr=hp.learning_rate,
                            betas=(hp.beta1, hp.beta2), eps=hp.eps)
    schedule = LambdaLR(optimizer, lambda s: warmup_cosine(s, 200, total, hp.min_lr_ratio))
    scaler = torch.amp.GradScaler(dev.type, enabled=args.precision == "16-mixed")
    blocks = RandomTrainBlocks(tokens.train, args.block_size, args.batch_size, SEED)
    model.train()
    clock = Clock()
    clock.mark()
    for step in range(total):
        for micro in range(args.accumulate):
            inputs, targets = blocks.batch_at(step * args.accumulate + micro)
            if dev.type == "cuda":
                inputs = inputs.pin_memory().to(dev, non_blocking=True)
                targets = targets.pin_memory().to(dev, non_blocking=True)
            with autocast(args.precision):
                _, loss = model(inputs, targets)
            scaler.scale(loss / args.accumulate).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        clock.mark()
    return clock


# ------------------------------------------------------------------------------------------- validation cost


class EvalClock(L.Callback):
    """Wall time of each validation epoch, from before its first batch to after its metrics are logged."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        synchronize(device())
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        synchronize(device())
        self.seconds.append(time.perf_counter() - self._start)


def validation_cost(args: argparse.Namespace, tokens: Tokens) -> tuple[float, float, int]:
    """(median seconds per token of a full Trainer.validate pass, of a training forward pass, val tokens)."""
    with tempfile.TemporaryDirectory(prefix="azgpt-bench-") as log_dir:
        cli = build_cli(args, tokens, log_dir, max_steps=1, val_every=1)
        clock = EvalClock()
        # TextSamples writes a few generations after each validation: a fixed cost per pass whatever the
        # number of val blocks, which is not the validation pass this compares with a forward pass.
        cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, TextSamples)]
        cli.trainer.callbacks.append(clock)
        model: AzGPT = cli.model
        if tokens.data_dir is not None:
            cli.datamodule.setup("validate")
            val_blocks = len(cli.datamodule.val_dataset())
            validate = lambda: cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False)  # noqa: E731
        else:
            val_set = FixedValBlocks(tokens.val, args.block_size, 200)
            val_blocks = len(val_set)
            loader = DataLoader(val_set, batch_size=args.batch_size)
            validate = lambda: cli.trainer.validate(model, dataloaders=loader, verbose=False)  # noqa: E731
        blocks = RandomTrainBlocks(tokens.train, args.block_size, args.batch_size, SEED)
        forward_batches = max(2, val_blocks // args.batch_size)

        def train_forward() -> float:
            model.train()
            inputs, targets = blocks.batch_at(0)
            inputs, targets = inputs.to(model.device), targets.to(model.device)
            synchronize(device())
            start = time.perf_counter()
            for _ in range(forward_batches):
                with autocast(args.precision):
                    model(inputs, targets)  # the forward pass training_step runs, autograd graph included
            synchronize(device())
            return time.perf_counter() - start

        validate()  # warm-up (and moves the model to its device)
        forward_seconds = []
        for _ in range(args.val_rounds):
            forward_seconds.append(train_forward())
            validate()
    val_tokens = val_blocks * args.block_size
    per_val = statistics.median(clock.seconds[1:]) / val_tokens
    per_fwd = statistics.median(forward_seconds) / (forward_batches * args.batch_size * args.block_size)
    return per_val, per_fwd, val_tokens


# ------------------------------------------------------------------------------------------- report


def summarize(name: str, rates: list[float], flops_per_token: int, peak: float) -> str:
    med = statistics.median(rates)
    return (f"{name:10s} {med:9,.0f} tokens/s median   (min {min(rates):,.0f}, max {max(rates):,.0f}, "
            f"spread {(max(rates) - min(rates)) / med:.1%}, n={len(rates)})   MFU {med * flops_per_token / peak:.1%}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)  # base.yaml is found under ./configs
    warnings.filterwarnings("ignore", ".*could not find the monitored key.*")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    print(f"command: {reproduce_command(argv)}")
    if args.precision == "auto":
        chosen = None if torch.cuda.is_available() else resolve_cpu_precision("16-mixed")
        args.precision = "16-mixed" if chosen is None else chosen.precision
        print(f"precision auto -> {args.precision}" + ("" if chosen is None else f" ({chosen.reason})"))
    print(f"torch {torch.__version__}, lightning {L.__version__}, device {device()}, "
          f"{torch.get_num_threads()} threads, precision {args.precision}, compile {args.compile}")
    print(f"malloc: {TUNING['malloc']}" + (f"; LD_PRELOAD={os.environ['LD_PRELOAD']}"
                                           if os.environ.get("LD_PRELOAD") else ""))
    print(f"machine at start: {machine_load()}; other busy processes: {other_busy_processes()}")
    tokens = load_tokens(args)
    print(f"data: {tokens.description}")
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    flops_per_token = GPT(config).flops_per_token()
    tokens_per_step = args.batch_size * args.block_size * args.accumulate
    print(f"model: {args.n_layer} layers, {args.n_head} heads, n_embd {args.n_embd}, block {args.block_size}, "
          f"vocab {args.vocab_size}; micro-batch {args.batch_size} x accumulate {args.accumulate} = "
          f"{tokens_per_step:,} tokens/step; {flops_per_token / 1e6:.1f} MFLOPs/token (GPT.flops_per_token)")
    print(f"timing: {args.rounds} rounds x {args.steps} optimizer steps after {args.warmup} warm-up steps each\n",
          flush=True)

    runners = {"fit": run_fit, "plain": run_plain}
    names = ["fit", "plain"] if args.only == "both" else [args.only]
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    peaks = []
    for r in range(args.rounds):
        peaks.append(measure_matmul_flops(device(), precision_dtype(args.precision), size=args.peak_size))
        for name in names if r % 2 == 0 else names[::-1]:
            stats = runners[name](args, tokens).window(args.warmup, tokens_per_step)
            results[name].append(stats)
            print(f"round {r + 1} {name:5s}: {stats['tokens_per_sec']:8,.0f} tokens/s, {stats['sec_per_step']:.3f} s/step "
                  f"(CPU: {stats['user_sec_per_step']:.2f} user + {stats['sys_sec_per_step']:.2f} sys), "
                  f"{stats['faults_per_step']:,.0f} minor faults/step"
                  f"   [{machine_load()}]", flush=True)
    peak = max(peaks)
    print(f"\nmatmul peak ({args.peak_size}² {str(precision_dtype(args.precision)).removeprefix('torch.')}, best of "
          f"{len(peaks)} measurements during the run): {peak / 1e9:,.0f} GFLOP/s "
          f"(per round: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    for name in names:
        rates = [s["tokens_per_sec"] for s in results[name]]
        label = {"fit": "azgpt fit", "plain": "plain loop"}[name]
        print(summarize(label, rates, flops_per_token, peak)
              + f"   {statistics.median(s['faults_per_step'] for s in results[name]):,.0f} faults/step")
    if len(names) == 2:
        fit, plain = ([s["tokens_per_sec"] for s in results[n]] for n in names)
        paired = [f / p for f, p in zip(fit, plain)]
        cpu = {n: [s["user_sec_per_step"] + s["sys_sec_per_step"] for s in results[n]] for n in names}
        cpu_ratio = statistics.median(p / f for f, p in zip(cpu["fit"], cpu["plain"]))
        overhead = statistics.median(tokens_per_step / f - tokens_per_step / p for f, p in zip(fit, plain))
        print(f"fit / plain: {statistics.median(fit) / statistics.median(plain):.3f} (ratio of medians); "
              f"per round {', '.join(f'{x:.3f}' for x in paired)} (median {statistics.median(paired):.3f}); "
              f"by CPU time per step {cpu_ratio:.3f}; fit's extra time per optimizer step {overhead * 1e3:+.0f} ms")

    if args.val_rounds > 0:
        per_val, per_fwd, val_tokens = validation_cost(args, tokens)
        print(f"\nvalidation: full pass over {val_tokens:,} tokens at {1 / per_val:,.0f} tokens/s; training forward "
              f"pass {1 / per_fwd:,.0f} tokens/s; validation / forward time per token {per_val / per_fwd:.2f}")
    print(f"machine at end: {machine_load()}; other busy processes: {other_busy_processes()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
