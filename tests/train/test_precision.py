"""The precision a run without CUDA uses: fp16 requests become the faster of bf16-mixed and 32-true."""

from __future__ import annotations

import os

import pytest
import torch

from azgpt.errors import AzGPTError
from azgpt.train.precision import (CPU_PRECISION_ENV, choose_cpu_precision, measure_matmul_flops, precision_dtype,
                             resolve_cpu_precision)


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("16-mixed", torch.float16),
                                              ("bf16-mixed", torch.bfloat16), (32, torch.float32)])
def test_precision_dtype(precision, dtype) -> None:
    assert precision_dtype(precision) is dtype


def test_measure_matmul_flops_counts_2n3_per_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clock that advances 1 s per matmul, 256² matmuls measure exactly 2 * 256³ FLOP/s."""
    import types

    clock = types.SimpleNamespace(now=0.0)
    real_mm = torch.mm

    def mm(a, b):
        clock.now += 1.0
        return real_mm(a, b)

    monkeypatch.setattr("azgpt.train.precision.time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(torch, "mm", mm)
    assert measure_matmul_flops("cpu", size=256, repeats=2, inner=3) == 2 * 256**3


@pytest.mark.parametrize("fp32, bf16, expected", [
    (200e9, 800e9, "bf16-mixed"),   # native bf16 dot products (AVX512-BF16, AMX)
    (320e9, 160e9, "32-true"),      # bf16 emulated: half of fp32
    (200e9, 250e9, "32-true"),      # a small gain does not pay for autocast's casts
])
def test_choice_follows_the_measured_rates(fp32: float, bf16: float, expected: str) -> None:
    assert choose_cpu_precision(fp32, bf16) == expected


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "bf16-true", "64-true"])
def test_explicit_choices_are_kept(explicit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_PRECISION_ENV)
    assert resolve_cpu_precision(explicit) is None


def test_fp16_request_is_timed_once_and_the_answer_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_PRECISION_ENV)
    timed: list[torch.dtype] = []
    monkeypatch.setattr("azgpt.train.precision.measure_matmul_flops",
                        lambda device, dtype, **kw: timed.append(dtype) or (9e11 if dtype is torch.bfloat16 else 2e11))
    first = resolve_cpu_precision("16-mixed")
    assert first is not None and first.precision == "bf16-mixed" and "900 GFLOP/s" in first.reason
    assert os.environ[CPU_PRECISION_ENV] == "bf16-mixed"  # what DDP's child processes will read
    second = resolve_cpu_precision(16)
    assert second is not None and second.precision == "bf16-mixed" and CPU_PRECISION_ENV in second.reason
    assert timed == [torch.float32, torch.bfloat16, torch.bfloat16]  # fp32, the bf16 probe, the bf16 timing


def test_emulated_bf16_is_given_up_after_one_small_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """On AVX2 bf16 runs at about 0.4 GFLOP/s: timing 1024² matmuls like fp32 would take about a minute."""
    monkeypatch.delenv(CPU_PRECISION_ENV)
    timed: list[tuple[torch.dtype, int, int, int | None]] = []

    def measure(device, dtype, size=2048, repeats=3, inner=None):
        timed.append((dtype, size, repeats, inner))
        return 0.4e9 if dtype is torch.bfloat16 else 40e9

    monkeypatch.setattr("azgpt.train.precision.measure_matmul_flops", measure)
    choice = resolve_cpu_precision("16-mixed")
    assert choice is not None and choice.precision == "32-true" and "0.4 GFLOP/s vs 40" in choice.reason
    # fp32 as before; bf16 one warm-up and one timed 512² matmul (0.27 GFLOP each, about 1.3 s at 0.4 GFLOP/s)
    # instead of 4 rounds of 3 1024² ones (25 GFLOP, about a minute).
    assert timed == [(torch.float32, 1024, 3, None), (torch.bfloat16, 512, 1, 1)]


def test_environment_variable_must_name_a_cpu_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_PRECISION_ENV, "16-mixed")
    with pytest.raises(AzGPTError, match=f"{CPU_PRECISION_ENV}='16-mixed'.*32-true"):
        resolve_cpu_precision("16-mixed")
