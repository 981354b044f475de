"""The CUDA path, checked and measured in one command: the GPU evening azgpt promises, in under 8 minutes.

    PYTHONPATH=. python bench/gpu_check.py                 # on a CUDA machine: checks + measurements
    PYTHONPATH=. python bench/gpu_check.py --dry_run       # anywhere: the same parts on the CPU, tiny shapes

Each part runs azgpt the way a user does (``python -m azgpt.cli fit ...`` and the use verbs, in their own
processes, each under a time cap) and checks what it left behind; the throughput part runs
bench/train_throughput.py's real ``Trainer.fit`` path on GPT-2 small with random tokens. Independent runs go
side by side (the GPU has room); the timed runs go alone. Results: ``gpu_check.json`` and ``gpu_check.md`` in
``--out`` (default bench/results/), a table on stdout, and exit 1 when any check failed.

Parts: env (versions, GPU, bf16, NVML, which SDPA kernel runs, fused AdamW), quickstart (16-mixed and
bf16-mixed), resume (SIGTERM at step k, resume, per-step losses against an uninterrupted run), health
(``system/gpu_*`` logged), throughput (GPT-2 small tokens/s, MFU, peak memory; with and without compile),
modern (modern recipe with Muon), distributed (DDP and FSDP through Lightning), budget (``fit --budget`` ends on
time at the learning-rate floor), use (generate, chat, evaluate, export from the CUDA-trained checkpoint, on CUDA
and on the CPU); laptop, only when named (laptop.yaml on ../shared's real text for ``--laptop_budget``: held-out
bits per byte, on time, at the learning-rate floor).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULT_MARK = "GPU_CHECK_RESULT "
sys.path[:0] = [str(REPO), str(BENCH)]  # azgpt and train_throughput, without PYTHONPATH
SAMPLE = REPO / "azgpt" / "sample_corpus"
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


# -------------------------------------------------------------------------------------------- results


@dataclass
class Check:
    """One part's verdict: ``ok`` (passed), ``fail`` or ``skip`` (with the reason), its figures and notes."""

    part: str
    status: str = "ok"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def expect(self, condition: bool, message: str) -> bool:
        """Record ``message`` as a failure unless ``condition`` holds."""
        if not condition:
            self.status = "fail"
            self.notes.append("FAILED: " + message)
        return condition

    def skip(self, reason: str) -> None:
        if self.status == "ok":
            self.status = "skip"
        self.notes.append("skipped: " + reason)


@dataclass
class Plan:
    """Sizes for a real GPU run or a CPU dry run."""

    dry_run: bool
    cuda: bool
    work: Path
    deadline: float
    throughput: list[str] | None = None  # which GPT-2 small runs to time (None: all)
    shared: Path = REPO.parent / "shared" / "corpus"  # the real text the laptop part trains on
    laptop_budget: str = "3min"

    @property
    def tiny_model(self) -> list[str]:
        """Overrides that shrink quickstart.yaml to seconds on a CPU (nothing on a GPU)."""
        if not self.dry_run:
            return []
        return ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--data.block_size", "32",
                "--data.batch_size", "4", "--data.val_max_blocks", "4", "--trainer.accumulate_grad_batches", "2"]

    def left(self) -> float:
        return self.deadline - time.monotonic()


# -------------------------------------------------------------------------------------------- processes


@dataclass
class Ran:
    """A finished command: exit code, output, seconds."""

    command: list[str]
    code: int
    out: str
    err: str
    seconds: float

    def tail(self, chars: int = 1500) -> str:
        return (self.err or self.out)[-chars:]


def environment(cpu_only: bool = False) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run(command: list[str], cwd: Path, timeout: float, stdin: str | None = None, cpu_only: bool = False) -> Ran:
    """Run ``command``; a time-out is an exit code of 124 with what it printed so far."""
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=cwd, env=environment(cpu_only), input=stdin, capture_output=True,
                              text=True, timeout=max(timeout, 1.0), errors="replace")
        return Ran(command, done.returncode, done.stdout, done.stderr, time.monotonic() - start)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Ran(command, 124, out, err + f"\n(timed out after {timeout:.0f} s)", time.monotonic() - start)


def azgpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "azgpt.cli", *args]


def child(name: str, spec: dict[str, Any]) -> list[str]:
    """This script, running ``CHILDREN[name](spec)`` in a fresh process (for a clean CUDA state and a time cap)."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", name, "--spec", json.dumps(spec)]


def child_result(ran: Ran) -> dict[str, Any] | None:
    for line in ran.out.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return None


# -------------------------------------------------------------------------------------------- fit helpers


def fit_command(plan: Plan, log_dir: Path, *extra: str, steps: int, val_every: int) -> list[str]:
    """``azgpt fit --config quickstart.yaml`` logging every step into ``log_dir``, on the shared prepared data."""
    return azgpt("fit", "--config", "quickstart.yaml", *plan.tiny_model,
                 "--data.data_dir", str(plan.work / "data" / "quickstart"),
                 "--trainer.max_steps", str(steps), "--val_every_n_steps", str(val_every),
                 "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                 "--early_stopping", "null", "--trainer.logger.init_args.save_dir", str(log_dir), *extra)


def read_curves(version_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from azgpt.train.history import read_history

    history = read_history(version_dir)
    return {tag: [(p.step, p.value) for p in points] for tag, points in history.scalars.items()}


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def scaler_skips(checkpoint: dict[str, Any]) -> int | None:
    """Steps the GradScaler skipped, from its scale: it starts at 2**16, halves per skip and doubles every
    2000 clean steps (so this counts exactly in runs under 2000 steps)."""
    state = checkpoint.get("MixedPrecision") or {}
    scale = state.get("scale")
    if not scale:
        return None
    return max(0, round(math.log2(65536.0 / float(scale))))


def check_fit_run(check: Check, ran: Ran, log_dir: Path, steps: int, label: str) -> dict[str, Any]:
    """The checks every fit gets: it ended, val_loss fell, each step logged a finite loss, last.ckpt at the end."""
    figures: dict[str, Any] = {"seconds": round(ran.seconds, 1)}
    if not check.expect(ran.code == 0, f"{label}: exit code {ran.code}: {ran.tail()}"):
        return figures
    version = log_dir / "lightning_logs" / "version_0"
    curves = read_curves(version)
    val = [v for _, v in curves.get("val_loss", [])]
    losses = curves.get("train_loss", [])
    figures.update(val_loss_first=val[0] if val else None, val_loss_last=val[-1] if val else None,
                   train_loss_steps=len(losses))
    check.expect(len(val) >= 2 and val[-1] < val[0], f"{label}: val_loss did not fall ({val})")
    check.expect(len(losses) == steps and all(math.isfinite(v) for _, v in losses),
                 f"{label}: {len(losses)} finite train_loss points for {steps} steps")
    last = version / "checkpoints" / "last.ckpt"
    if check.expect(last.is_file(), f"{label}: no {last}"):
        saved = load_checkpoint(last)
        figures["last_ckpt_step"] = saved["global_step"]
        figures["scaler_skips"] = scaler_skips(saved)
        check.expect(saved["global_step"] == steps, f"{label}: last.ckpt at step {saved['global_step']}, not {steps}")
    return figures


# -------------------------------------------------------------------------------------------- parts


def part_env(plan: Plan, check: Check) -> None:
    ran = run(child("env", {"dry_run": plan.dry_run}), plan.work, timeout=min(120, plan.left()))
    result = child_result(ran)
    if not check.expect(ran.code == 0 and result is not None, f"env probe failed: {ran.tail()}"):
        return
    check.figures.update(result)
    if plan.cuda:
        check.expect(result["nvml_readable"], "NVML not readable: system/gpu_* cannot be logged")
        check.expect(result["fused_adamw"], "AdamW is not fused on CUDA")
        check.expect(bool(result["sdpa_kernels"]), "no SDPA kernel seen in the profile")


def child_env(spec: dict[str, Any]) -> dict[str, Any]:
    """Versions, the GPU, bf16 support, NVML, the SDPA kernels a GPT step runs and whether AdamW is fused."""
    import lightning as L
    import torch

    from azgpt.train.module import AzGPT

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "lightning": L.__version__, "cuda_runtime": torch.version.cuda, "cuda": cuda}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        info["nvml_temp_c"] = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        info["nvml_power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        info["nvml_readable"] = True
    except Exception as exc:  # no driver, no library: say which
        info["nvml_readable"] = False
        info["nvml_error"] = f"{type(exc).__name__}: {exc}"[:200]
    device = "cuda" if cuda else "cpu"
    shape = dict(n_layer=1, n_head=12, n_embd=768, block_size=512) if cuda else dict(n_layer=1, n_head=2, n_embd=32,
                                                                                   block_size=32)
    module = AzGPT(vocab_size=512, **shape).to(device)
    optimizer, _ = module.build_optimizer()
    info["fused_adamw"] = bool(optimizer.defaults.get("fused"))
    kernels: dict[str, list[str]] = {}
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.bfloat16]
    for dtype in dtypes:
        idx = torch.randint(0, 512, (2, shape["block_size"]), device=device)
        with torch.profiler.profile() as prof, torch.autocast(device, dtype=dtype):
            _, loss = module.model(idx, idx)
            loss.backward()
        names = sorted({e.name for e in prof.events() if "attention" in e.name.lower() and e.name.startswith("aten::")})
        kernels[str(dtype).removeprefix("torch.")] = names
    info["sdpa_kernels"] = kernels
    return info


def part_quickstart(plan: Plan, check: Check) -> None:
    steps = 4 if plan.dry_run else 150
    val_every = 2 if plan.dry_run else 25
    # On a CPU the two differ only in what azgpt's CPU choice makes of 16-mixed: the dry run checks one.
    precisions = ("16-mixed",) if plan.dry_run else ("16-mixed", "bf16-mixed")
    jobs = {precision: fit_command(plan, plan.work / f"qs-{precision}", "--trainer.precision", precision,
                                   steps=steps, val_every=val_every)
            for precision in precisions}
    for precision, ran in run_side_by_side(plan, jobs).items():
        check.figures[precision] = check_fit_run(check, ran, plan.work / f"qs-{precision}", steps, precision)
    if not plan.cuda:
        check.notes.append("on the CPU 16-mixed runs as azgpt's CPU choice (bf16-mixed or 32-true), not fp16")


def part_health(plan: Plan, check: Check) -> None:
    """The ``system/*`` curves of the 16-mixed quickstart run."""
    version = plan.work / "qs-16-mixed" / "lightning_logs" / "version_0"
    if not check.expect(version.is_dir(), "the 16-mixed quickstart run left no run folder"):
        return
    curves = read_curves(version)
    wanted = ["system/gpu_util", "system/gpu_temp_c", "system/gpu_power_w", "system/cuda_mem_peak_gb"]
    for tag in ["system/rss_gb", *wanted]:
        values = [v for _, v in curves.get(tag, [])]
        check.figures[tag] = max(values) if values else None
    if not plan.cuda:
        check.expect(bool(check.figures["system/rss_gb"]), "system/rss_gb not logged")
        check.skip("no CUDA: system/gpu_* are not logged on a CPU")
        return
    for tag in wanted:
        check.expect(bool(check.figures[tag]), f"{tag} missing or zero")


def part_resume(plan: Plan, check: Check) -> None:
    """SIGTERM at step k of a 16-mixed run, resume, compare per-step losses with the uninterrupted run."""
    steps, stop_at = (6, 3) if plan.dry_run else (12, 5)
    common = ["--trainer.precision", "16-mixed", "--trainer.deterministic", "warn"]
    whole, parts = plan.work / "resume-whole", plan.work / "resume-parts"
    signal_at = ["--trainer.callbacks+", json.dumps({"class_path": "gpu_check.SignalAtStep",
                                                     "init_args": {"step": stop_at}})]
    first = run_side_by_side(plan, {
        "whole": fit_command(plan, whole, *common, steps=steps, val_every=steps),
        "stopped": fit_command(plan, parts, *common, *signal_at, steps=steps, val_every=steps)})
    check.expect(first["whole"].code == 0, f"uninterrupted run: exit {first['whole'].code}: {first['whole'].tail()}")
    check.expect(first["stopped"].code == 143, f"SIGTERM run: exit {first['stopped'].code}, not 143: "
                                                f"{first['stopped'].tail()}")
    resumed = run(fit_command(plan, parts, *common, "--ckpt_path", "last", steps=steps, val_every=steps),
                  plan.work, timeout=min(240, plan.left()))
    if not check.expect(resumed.code == 0, f"resume: exit {resumed.code}: {resumed.tail()}") or check.status == "fail":
        return
    reference = dict(read_curves(whole / "lightning_logs" / "version_0")["train_loss"])
    pieces = dict(read_curves(parts / "lightning_logs" / "version_0").get("train_loss", []))
    pieces.update(read_curves(parts / "lightning_logs" / "version_1")["train_loss"])
    check.figures.update(compare_losses(reference, pieces))
    check.figures["stopped_at_step"] = stop_at
    tolerance = 1e-5
    check.figures["tolerance_rel"] = tolerance
    check.expect(check.figures["steps_compared"] == steps, f"compared {check.figures['steps_compared']} of {steps} steps")
    check.expect(check.figures["max_rel_diff"] <= tolerance,
                 f"resumed losses differ by {check.figures['max_rel_diff']:.2e} (relative) > {tolerance}")


def compare_losses(reference: dict[int, float], other: dict[int, float]) -> dict[str, Any]:
    common = sorted(set(reference) & set(other))
    diffs = [abs(reference[s] - other[s]) / max(abs(reference[s]), 1e-12) for s in common]
    return {"steps_compared": len(common), "bitwise_equal": sum(reference[s] == other[s] for s in common),
            "max_rel_diff": max(diffs) if diffs else math.inf}


def part_distributed(plan: Plan, check: Check) -> None:
    """DDP and FSDP (full state dict) with one process per GPU against a single-process run of the same steps."""
    import torch

    steps = 4 if plan.dry_run else 12
    devices = torch.cuda.device_count() if plan.cuda else 1
    # No dropout: its random masks would differ between a run with and without a process group.
    common = ["--trainer.precision", "32-true", "--trainer.deterministic", "warn", "--trainer.devices", str(devices),
              "--model.dropout", "0"]
    strategies = {"single": [], "ddp": ["--trainer.strategy", "ddp"]}
    if plan.cuda:
        strategies["fsdp"] = ["--trainer.strategy", json.dumps({"class_path": "lightning.pytorch.strategies.FSDPStrategy",
                                                                "init_args": {"state_dict_type": "full"}})]
    else:
        check.skip("FSDP needs CUDA in Lightning; DDP ran on the CPU (gloo)")
    if devices > 1:
        strategies["single"] = ["--trainer.devices", "1"]
        check.notes.append(f"{devices} GPUs: the single run has 1/{devices} of the batch per step, so the losses "
                           f"are compared for closeness only")
    runs = run_side_by_side(plan, {name: fit_command(plan, plan.work / f"dist-{name}", *common, *extra,
                                                     steps=steps, val_every=steps)
                                   for name, extra in strategies.items()})
    curves = {}
    for name, ran in runs.items():
        if check.expect(ran.code == 0, f"{name}: exit {ran.code}: {ran.tail()}"):
            curves[name] = dict(read_curves(plan.work / f"dist-{name}" / "lightning_logs" / "version_0")["train_loss"])
    tolerance = 1e-3 if devices == 1 else 5e-2
    check.figures["tolerance_rel"] = tolerance
    for name in ("ddp", "fsdp"):
        if name in curves and "single" in curves:
            compared = compare_losses(curves["single"], curves[name])
            check.figures[name] = compared
            check.expect(compared["max_rel_diff"] <= tolerance,
                         f"{name} loss differs from one process by {compared['max_rel_diff']:.2e}")
            last = plan.work / f"dist-{name}" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
            if check.expect(last.is_file(), f"{name}: no single last.ckpt file"):
                check.figures[name]["loads_on_cpu"] = loads_on_cpu(check, last, name)


def loads_on_cpu(check: Check, path: Path, label: str) -> bool:
    """The checkpoint loads into AzGPT on the CPU and computes a finite loss."""
    import torch

    from azgpt.train.module import AzGPT

    try:
        model = AzGPT.load_from_checkpoint(path, map_location="cpu")
        idx = torch.randint(0, model.hparams.vocab_size, (1, 8))
        _, loss = model.model(idx, idx)
        return check.expect(bool(torch.isfinite(loss)), f"{label}: non-finite loss after loading on the CPU")
    except Exception as exc:  # what a user would see
        return check.expect(False, f"{label}: {path} does not load on the CPU: {type(exc).__name__}: {exc}")


def part_modern(plan: Plan, check: Check) -> None:
    """The modern recipe (RoPE, RMSNorm, SwiGLU, QK-norm) with Muon for the block matrices, 16-mixed."""
    steps = 4 if plan.dry_run else 60
    log_dir = plan.work / "modern"
    ran = run(fit_command(plan, log_dir, "--model.recipe", "modern", "--model.learning_rate", "3e-3",
                          "--model.muon_lr", "0.04", "--trainer.precision", "16-mixed",
                          steps=steps, val_every=steps // 2),
              plan.work, timeout=min(240, plan.left()))
    check.figures.update(check_fit_run(check, ran, log_dir, steps, "modern"))


def part_budget(plan: Plan, check: Check) -> None:
    """``fit --budget``: the run plans its own step count, ends near its wall-clock budget, and its last step is
    at the learning-rate floor (warmup-stable-decay)."""
    import re

    budget_s = 10 if plan.dry_run else 45
    log_dir = plan.work / "budget"
    ran = run(fit_command(plan, log_dir, "--budget", f"{budget_s}s", steps=-1, val_every=10 if plan.dry_run else 50),
              plan.work, timeout=min(budget_s * 4 + 60, plan.left()))
    if not check.expect(ran.code == 0, f"--budget {budget_s}s: exit {ran.code}: {ran.tail()}"):
        return
    ended = re.search(r"trained to step ([\d,]+) in .* \(([\d.]+)% of the budget\)", ran.out + ran.err)
    if not check.expect(ended is not None, "no 'trained to step N in ... of the budget' line"):
        return
    share = float(ended.group(2)) / 100
    check.figures.update(budget_s=budget_s, steps=int(ended.group(1).replace(",", "")), share_of_budget=share)
    curves = read_curves(log_dir / "lightning_logs" / "version_0")
    lr = [v for _, v in curves.get("lr-AdamW/decay", curves.get("lr-AdamW", []))]
    floor = 2.0e-3 * 0.1  # quickstart.yaml: learning_rate x min_lr_ratio
    if check.expect(bool(lr), "no learning-rate curve logged"):
        check.figures["last_lr_over_floor"] = lr[-1] / floor
        check.expect(abs(lr[-1] / floor - 1) < 0.01, f"last step's learning rate {lr[-1]:.3g} is not the floor {floor:.3g}")
    if plan.dry_run:
        check.notes.append("on a shared CPU the share of the budget is not checked (CI's cores are noisy)")
    else:
        check.expect(abs(share - 1) <= 0.05, f"ended at {share:.1%} of its budget, not within 5%")


def part_laptop(plan: Plan, check: Check) -> None:
    """``fit --config quickstart.yaml --config laptop.yaml`` on ../shared's real text (web, legal, quran, social;
    wiki and poetry held out, as bench/laptop_sizes.py gives it) for ``--laptop_budget``: what that config reaches
    in that time on this machine (held-out bits per byte), and that it ends on time at the learning-rate floor."""
    import re

    if not plan.shared.is_dir():
        check.skip(f"no corpus folder {plan.shared} (give --shared)")
        return
    corpus = lambda *names: "[" + ", ".join(str(plan.shared / f"{n}.txt.gz") for n in names) + "]"  # noqa: E731
    budget = "12s" if plan.dry_run else plan.laptop_budget
    log_dir = plan.work / "laptop"
    command = azgpt("fit", "--config", "quickstart.yaml", "--config", "laptop.yaml", *plan.tiny_model,
                    "--budget", budget, "--data.data_dir", str(plan.work / "data" / "shared-az"),
                    "--data.corpus", corpus("web", "legal", "quran", "social"), "--data.max_bytes", "null",
                    "--data.val_corpus", corpus("wiki", "poetry"), "--trainer.enable_progress_bar", "false",
                    "--trainer.log_every_n_steps", "1",
                    "--trainer.logger.init_args.save_dir", str(log_dir))
    if not plan.dry_run:
        command += ["--trainer.precision", "bf16-mixed" if plan.cuda else "32-true"]
    ran = run(command, plan.work, timeout=plan.left() - 5)
    if not check.expect(ran.code == 0, f"laptop --budget {budget}: exit {ran.code}: {ran.tail()}"):
        return
    ended = re.search(r"trained to step ([\d,]+) in .* \(([\d.]+)% of the budget\)", ran.out + ran.err)
    if check.expect(ended is not None, "no 'trained to step N in ... of the budget' line"):
        check.figures.update(budget=budget, steps=int(ended.group(1).replace(",", "")),
                             share_of_budget=float(ended.group(2)) / 100, seconds_end_to_end=round(ran.seconds, 1))
    curves = read_curves(log_dir / "lightning_logs" / "version_0")
    bpb = [v for _, v in curves.get("val_bpb", [])]
    if check.expect(bool(bpb), "no val_bpb logged"):
        check.figures.update(val_bpb_first=bpb[0], val_bpb_last=bpb[-1], val_bpb_best=min(bpb))
    lr = [v for _, v in curves.get("lr-MuonWithAdamW/decay", curves.get("lr-AdamW/decay", []))]
    floor = 3.0e-3 * 0.1  # laptop.yaml's AdamW rate x quickstart.yaml's min_lr_ratio
    if check.expect(bool(lr), f"no AdamW learning-rate curve among {sorted(curves)}"):
        check.figures["last_lr_over_floor"] = lr[-1] / floor
        check.expect(abs(lr[-1] / floor - 1) < 0.01, f"last step's learning rate {lr[-1]:.3g} is not the floor")


def part_use(plan: Plan, check: Check) -> None:
    """generate, chat (piped), evaluate, export (HF and GGUF) from the 16-mixed run's last.ckpt."""
    ckpt = plan.work / "qs-16-mixed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    if not check.expect(ckpt.is_file(), "no checkpoint from the 16-mixed quickstart run"):
        return
    devices = ["cuda", "cpu"] if plan.cuda else ["cpu"]
    jobs: dict[str, tuple[list[str], str | None]] = {}
    for device in devices:
        jobs[f"generate/{device}"] = (azgpt("generate", "--ckpt", str(ckpt), "--prompt", "Azərbaycan",
                                            "--max_new_tokens", "24", "--temperature", "0", "--device", device), None)
        jobs[f"chat/{device}"] = (azgpt("chat", "--ckpt", str(ckpt), "--max_new_tokens", "16", "--seed", "1",
                                        "--device", device), "Salam, necəsən?\n/quit\n")
        jobs[f"evaluate/{device}"] = (azgpt("evaluate", "--ckpt", str(ckpt), "--corpus",
                                            json.dumps([str(SAMPLE / "xeberler.txt")]), "--json", "true",
                                            "--device", device), None)
    folder = ckpt.parents[1] / "model"  # the model folder the same run wrote: same text as from the .ckpt
    jobs["generate/folder"] = (azgpt("generate", "--ckpt", str(folder), "--prompt", "Azərbaycan", "--max_new_tokens",
                                     "24", "--temperature", "0", "--device", devices[0]), None)
    if not plan.dry_run:  # the HF export has its own tests; the dry run keeps CI's time for what only it checks
        jobs["export/hf"] = (azgpt("export", "--ckpt", str(ckpt), "--out", str(plan.work / "export-hf")), None)
    jobs["export/gguf"] = (azgpt("export", "--ckpt", str(ckpt), "--format", "gguf",
                                 "--out", str(plan.work / "export.gguf")), None)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers(plan)) as pool:
        futures = {name: pool.submit(run, command, plan.work, min(180, plan.left()), stdin, name.endswith("/cpu"))
                   for name, (command, stdin) in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}
    for name, ran in results.items():
        check.figures[name] = {"exit": ran.code, "seconds": round(ran.seconds, 1)}
        check.expect(ran.code == 0, f"{name}: exit {ran.code}: {ran.tail()}")
        if name.startswith("generate/") and ran.code == 0:  # the text, without the note lines on stderr
            check.figures[name]["text"] = ran.out.strip()[:120]
    losses = {}
    for device in devices:
        ran = results[f"evaluate/{device}"]
        if ran.code == 0:
            losses[device] = json.loads(ran.out)["overall"]["loss"]
    check.figures["evaluate_loss"] = losses
    if len(losses) == 2:
        check.expect(abs(losses["cuda"] - losses["cpu"]) <= 1e-3 * abs(losses["cpu"]),
                     f"evaluate: loss on CUDA {losses['cuda']} vs CPU {losses['cpu']}")
    from_folder = check.figures.get("generate/folder", {}).get("text")
    check.expect(from_folder == check.figures.get(f"generate/{devices[0]}", {}).get("text"),
                 "generate from the model folder differs from generate from last.ckpt")
    texts = [check.figures.get(f"generate/{d}", {}).get("text") for d in devices]
    if plan.cuda and all(texts):
        check.figures["greedy_same_on_cuda_and_cpu"] = texts[0] == texts[1]


def part_throughput(plan: Plan, check: Check) -> None:
    """GPT-2 small on random tokens through azgpt's fit path: tokens/s, MFU and peak memory, one run at a time."""
    if plan.dry_run:
        shape = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 512, "steps": 2,
                 "warmup": 1}
        configs = {"bf16 b4x2": {"precision": "bf16-mixed", "batch_size": 4, "accumulate": 2, "compile": False}}
    else:
        shape = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 512, "vocab_size": 32768, "steps": 30,
                 "warmup": 3}
        configs = {
            "bf16 b24x2 compile": {"precision": "bf16-mixed", "batch_size": 24, "accumulate": 2, "compile": True},
            "bf16 b24x2": {"precision": "bf16-mixed", "batch_size": 24, "accumulate": 2, "compile": False},
            "16-mixed b24x2": {"precision": "16-mixed", "batch_size": 24, "accumulate": 2, "compile": False},
            "bf16 b48x1 compile": {"precision": "bf16-mixed", "batch_size": 48, "accumulate": 1, "compile": True},
            "modern bf16 b24x2 compile": {"precision": "bf16-mixed", "batch_size": 24, "accumulate": 2,
                                          "compile": True, "recipe": "modern"},
        }
    if plan.throughput:
        unknown = set(plan.throughput) - set(configs)
        check.expect(not unknown, f"unknown --throughput runs {sorted(unknown)}; known: {sorted(configs)}")
        configs = {name: config for name, config in configs.items() if name in plan.throughput}
    for name, config in configs.items():
        if plan.left() < 45:
            check.skip(f"{name}: no time left")
            continue
        ran = run(child("throughput", {**shape, **config}), plan.work, timeout=min(150, plan.left() - 5))
        result = child_result(ran)
        if check.expect(ran.code == 0 and result is not None, f"{name}: exit {ran.code}: {ran.tail()}"):
            check.figures[name] = result


def child_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """One bench/train_throughput.py fit-path run of ``spec``: tokens/s, MFU and the CUDA memory peak."""
    import torch

    import train_throughput as bench
    from azgpt.model import GPT, GPTConfig
    from azgpt.train.precision import measure_matmul_flops

    recipe = spec.get("recipe", "gpt2")
    argv = ["--random-tokens", "--n-layer", str(spec["n_layer"]), "--n-head", str(spec["n_head"]),
            "--n-embd", str(spec["n_embd"]), "--block-size", str(spec["block_size"]),
            "--batch-size", str(spec["batch_size"]), "--accumulate", str(spec["accumulate"]),
            "--vocab-size", str(spec["vocab_size"]), "--precision", spec["precision"], "--rounds", "1",
            "--warmup", str(spec["warmup"]), "--steps", str(spec["steps"]), "--val-rounds", "0",
            "--cli-arg=--trainer.enable_progress_bar=false", f"--cli-arg=--model.recipe={recipe}"]
    if spec["compile"]:
        argv.append("--compile")
    args = bench.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if "bf16" in spec["precision"] else torch.float16 if cuda else torch.float32
    peak = measure_matmul_flops(device, dtype, size=8192 if cuda else 256, repeats=3)
    tokens = bench.load_tokens(args)
    config = GPTConfig.from_recipe(recipe, vocab_size=spec["vocab_size"], block_size=spec["block_size"],
                                   n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["n_embd"])
    with torch.device("meta"):
        model = GPT(config)
    flops_per_token = model.flops_per_token()  # attention at full context, as nanoGPT and litgpt count
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    clock = bench.run_fit(args, tokens)
    wall = time.monotonic() - start
    window = clock.window(args.warmup, args.batch_size * args.block_size * args.accumulate)
    rate = window["tokens_per_sec"]
    result = {"tokens_per_sec": round(rate), "sec_per_step": round(window["sec_per_step"], 4),
              "matmul_peak_tflops": round(peak / 1e12, 1), "mfu": round(rate * flops_per_token / peak, 4),
              "run_seconds": round(wall, 1)}
    if cuda:
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        name = torch.cuda.get_device_name(0)
        sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
        if sheet:
            result["mfu_vs_datasheet"] = round(rate * flops_per_token / (sheet * 1e12), 4)
    return result


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"env": child_env, "throughput": child_throughput}


# -------------------------------------------------------------------------------------------- the SIGTERM


import lightning as L  # noqa: E402  (for the callback below, loaded by class path in the fit processes)


class SignalAtStep(L.Callback):
    """Sends SIGTERM to its own process when optimizer step ``step`` (1-based) starts: a real signal, as a
    scheduler's pre-emption would send."""

    def __init__(self, step: int = 3) -> None:
        self.step = step
        self.sent = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.sent and trainer.global_step + 1 == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


# -------------------------------------------------------------------------------------------- driver


def workers(plan: Plan) -> int:
    return max(2, min(8, (os.cpu_count() or 2) // 2)) if plan.cuda else 2


def run_side_by_side(plan: Plan, jobs: dict[str, list[str]], timeout: float = 300) -> dict[str, Ran]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers(plan)) as pool:
        futures = {name: pool.submit(run, command, plan.work, min(timeout, plan.left())) for name, command in
                   jobs.items()}
        return {name: future.result() for name, future in futures.items()}


PARTS: dict[str, Callable[[Plan, Check], None]] = {
    "env": part_env, "quickstart": part_quickstart, "health": part_health, "resume": part_resume,
    "modern": part_modern, "distributed": part_distributed, "budget": part_budget, "use": part_use,
    "throughput": part_throughput, "laptop": part_laptop}
DEFAULT_PARTS = [p for p in PARTS if p != "laptop"]  # laptop needs ../shared and minutes: asked for by name


def run_part(name: str, plan: Plan) -> Check:
    check = Check(name)
    start = time.monotonic()
    if plan.left() < 10:
        check.skip("the time budget was spent before this part")
        check.status = "fail"
        return check
    try:
        PARTS[name](plan, check)
    except Exception:  # a broken part must not take the other parts' results with it
        check.expect(False, traceback.format_exc()[-1500:])
    check.seconds = round(time.monotonic() - start, 1)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {check.status} ({check.seconds} s)", flush=True)
    return check


def prepare_data(plan: Plan) -> Ran:
    """The quickstart's token folder, once, before the runs that share it."""
    return run(azgpt("prepare", "--out", str(plan.work / "data" / "quickstart"), "--vocab_size", "2048",
                     "--val_fraction", "0.1", "--block_size", "32" if plan.dry_run else "128"),
               plan.work, timeout=min(180, plan.left()))


def headline(figures: dict[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` for every number, flag and short text in ``figures`` (nested dicts flattened)."""
    items = []
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += headline(value, name + ".")
        elif isinstance(value, list):
            items.append(f"{name}=" + ",".join(str(v).removeprefix("aten::") for v in value))
        elif isinstance(value, float):
            items.append(f"{name}={value:.4g}")
        elif isinstance(value, (int, bool)) or (isinstance(value, str) and len(value) <= 40):
            items.append(f"{name}={value}")
    return items


def summary_table(checks: list[Check]) -> str:
    lines = ["| part | status | seconds | figures and notes |", "|---|---|---|---|"]
    for check in checks:
        text = "; ".join(headline(check.figures) + check.notes).replace("|", "/").replace("\n", " ")
        lines.append(f"| {check.part} | {check.status} | {check.seconds} | {text[:1200]} |")
    return "\n".join(lines)


def throughput_table(checks: list[Check]) -> str:
    rows = next((c.figures for c in checks if c.part == "throughput"), {})
    lines = ["| GPT-2 small run | tokens/s | s/step | MFU | MFU vs datasheet | peak GB |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        sheet = f"{r['mfu_vs_datasheet']:.1%}" if "mfu_vs_datasheet" in r else "-"
        lines.append(f"| {name} | {r['tokens_per_sec']:,} | {r['sec_per_step']} | {r['mfu']:.1%} | {sheet} | "
                     f"{r.get('peak_memory_gb', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="the same parts on the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON and table go")
    parser.add_argument("--budget_s", type=float, default=450, help="stop starting parts after this many seconds")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=DEFAULT_PARTS,
                        help="default: all but laptop")
    parser.add_argument("--shared", type=Path, default=Plan.shared, help="the laptop part's corpus folder")
    parser.add_argument("--laptop_budget", default=Plan.laptop_budget, help="the laptop part's --budget")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--throughput", nargs="+", default=None, metavar="RUN",
                        help='GPT-2 small runs to time, e.g. "bf16 b24x2 compile" (default: all)')
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_MARK + json.dumps(CHILDREN[args.child](json.loads(args.spec))), flush=True)
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device here; run with --dry_run to check the script on the CPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    command = "PYTHONPATH=. python bench/gpu_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"command: {command}", flush=True)
    with tempfile.TemporaryDirectory(prefix="azgpt-gpu-check-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        plan = Plan(dry_run=args.dry_run, cuda=cuda and not args.dry_run, work=work,
                    deadline=started + args.budget_s, throughput=args.throughput, shared=args.shared,
                    laptop_budget=args.laptop_budget)
        prepared = prepare_data(plan)
        checks: list[Check] = []
        if prepared.code != 0:
            failed = Check("prepare", status="fail", notes=[prepared.tail()])
            checks.append(failed)
        else:
            order = [p for p in PARTS if p in args.parts]
            # Runs that only need to finish go side by side; throughput is timed alone, at the end.
            # budget times itself, so it runs alone too (its plan would chase the other runs' load).
            early = [p for p in order if p in ("env", "quickstart", "resume", "modern", "distributed")]
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(early) or 1) as pool:
                done = {name: pool.submit(run_part, name, plan) for name in early}
                results = {name: future.result() for name, future in done.items()}
            for name in order:
                if name not in early:  # health and use read the quickstart runs; budget and throughput time
                    results[name] = run_part(name, plan)
            checks = [results[name] for name in order]
    report = {"command": command, "dry_run": args.dry_run, "seconds": round(time.monotonic() - started, 1),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "checks": [asdict(c) for c in checks]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    table = summary_table(checks)
    if any(c.part == "throughput" and c.figures for c in checks):
        table += "\n\n" + throughput_table(checks)
    (args.out / f"{stem}.md").write_text(f"# bench/gpu_check.py\n\n`{command}` on {report['date']}, "
                                          f"{report['seconds']} s\n\n{table}\n")
    print("\n" + table)
    failed = [c.part for c in checks if c.status == "fail"]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} parts passed or were skipped in {report['seconds']} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; results in {args.out}/{stem}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
