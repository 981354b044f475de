"""Precision: the dtype a Lightning precision setting computes in, matmul peaks, and the choice on CPUs.

Whether bf16 pays on a CPU depends on the chip: with native bf16 dot products (AVX512-BF16, AMX, Arm BF16)
a bf16 matmul runs 2-4x faster than fp32; without them bf16 is emulated: about half of fp32 on AVX-512 chips,
and on AVX2-only chips under 1 GFLOP/s, 50-100x slower than fp32. No flag in torch says which, so azgpt times
both once and keeps the faster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from azgpt.errors import AzGPTError

CPU_PRECISION_ENV = "AZGPT_CPU_PRECISION"
# fp16 requests: CPUs have no fast fp16 path (Lightning itself silently turns 16-mixed into bf16 on CPU).
FP16_REQUESTS = {"16-mixed", "16", "16-true", 16}
CPU_CHOICES = ("32-true", "bf16-mixed")
# bf16-mixed must beat fp32 matmuls by this much before it is chosen: autocast adds casts around every matmul,
# and a margin keeps noisy measurements (or several processes measuring at once) from flipping the choice.
BF16_MIN_SPEEDUP = 1.5
# A bf16 probe (one 512² matmul after one warm-up) this many times slower than fp32 ends the timing: bf16 is
# emulated. Native bf16 runs 512² matmuls near its peak; emulated bf16 on AVX2 (about 0.4 GFLOP/s) would take
# a minute to time at 1024², the probe about a second.
BF16_PROBE_GIVE_UP = 4.0


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU), so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                         repeats: int = 3, inner: int | None = None) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls on ``device``: the practical peak to compute MFU against.

    ``repeats`` timed rounds of ``inner`` matmuls each (default 3 on a CPU, 20 on a GPU), after one warm-up round.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if inner is None:
        inner = 3 if device.type == "cpu" else 20
    best = 0.0
    for _ in range(repeats + 1):  # the first round warms up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        best = max(best, inner * 2 * size**3 / (time.perf_counter() - start))
    return best


def precision_dtype(precision: str | int) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision setting."""
    p = str(precision)
    if "bf16" in p:
        return torch.bfloat16
    return torch.float16 if "16" in p else torch.float32


@dataclass(frozen=True)
class CpuPrecision:
    """The precision chosen for a CPU run and the reason, for the log."""

    precision: str
    reason: str


def choose_cpu_precision(fp32_flops: float, bf16_flops: float) -> str:
    """``bf16-mixed`` when bf16 matmuls run at least ``BF16_MIN_SPEEDUP`` times faster than fp32, else ``32-true``."""
    return "bf16-mixed" if bf16_flops >= BF16_MIN_SPEEDUP * fp32_flops else "32-true"


def resolve_cpu_precision(requested: str | int) -> CpuPrecision | None:
    """What a run without CUDA should use instead of ``requested``; None keeps the request as it is.

    An fp16 request (``16-mixed``, the configs' default for GPUs) becomes whichever of ``bf16-mixed`` and
    ``32-true`` is faster on this CPU, timed once per process tree: the answer goes into the environment
    variable ``AZGPT_CPU_PRECISION``, so processes that Lightning's DDP launcher starts reuse it, and a user
    can set it to skip the timing. Explicit ``32-true``, ``bf16-mixed`` and ``bf16-true`` are kept.
    """
    if requested not in FP16_REQUESTS:
        return None
    preset = os.environ.get(CPU_PRECISION_ENV)
    if preset:
        if preset not in CPU_CHOICES:
            raise AzGPTError(f"environment variable {CPU_PRECISION_ENV}={preset!r} is not one of "
                             f"{', '.join(CPU_CHOICES)}; set one of those or unset it")
        return CpuPrecision(preset, f"{CPU_PRECISION_ENV}={preset}")
    fp32 = measure_matmul_flops("cpu", torch.float32, size=1024, repeats=3)
    bf16 = measure_matmul_flops("cpu", torch.bfloat16, size=512, repeats=1, inner=1)
    if bf16 * BF16_PROBE_GIVE_UP >= fp32:  # not obviously emulated: time it as fp32 was timed
        bf16 = measure_matmul_flops("cpu", torch.bfloat16, size=1024, repeats=3)
    choice = choose_cpu_precision(fp32, bf16)
    os.environ[CPU_PRECISION_ENV] = choice
    return CpuPrecision(choice, f"bf16 matmuls ran at {_gflops(bf16)} GFLOP/s vs {_gflops(fp32)} for fp32 "
                                f"on this CPU; {CPU_PRECISION_ENV}=32-true or =bf16-mixed skips the timing")


def _gflops(flops: float) -> str:
    """GFLOP/s for the log: whole numbers, two digits below 10 (emulated bf16 runs at 0.4)."""
    value = flops / 1e9
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU runs bf16 matmuls natively (the choice ``resolve_cpu_precision`` makes and caches)."""
    return resolve_cpu_precision("16-mixed").precision == "bf16-mixed"
