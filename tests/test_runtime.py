"""azgpt.runtime: the malloc tuning the azgpt command applies at start, and its opt-outs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import azgpt.cli
from azgpt import runtime

REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_in_subprocess(**env: str) -> str:
    """tune_malloc()'s answer in a fresh interpreter (the settings are process-wide and applied once)."""
    clean = {k: v for k, v in os.environ.items() if k not in runtime._USER_ALLOCATOR_VARIABLES
             and k != runtime.OPT_OUT_VARIABLE}
    clean.update(env, PYTHONPATH=str(REPO))
    code = "from azgpt.runtime import tune_malloc; print(tune_malloc()['malloc'])"
    result = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_tunes_glibc_malloc_by_default() -> None:
    assert tune_in_subprocess().startswith("glibc mallopt")


@pytest.mark.parametrize("value", ["1", "yes"])
def test_opt_out(value: str) -> None:
    assert tune_in_subprocess(AZGPT_NO_TUNING=value) == "untouched (AZGPT_NO_TUNING is set)"


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_opt_out_zero_means_tune() -> None:
    assert tune_in_subprocess(AZGPT_NO_TUNING="0").startswith("glibc mallopt")


@pytest.mark.parametrize("name", ["MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_users_own_malloc_settings_win(name: str) -> None:
    value = "glibc.malloc.trim_threshold=1" if name == "GLIBC_TUNABLES" else "1"
    assert tune_in_subprocess(**{name: value}) == f"untouched ({name} set by the user)"


def test_applied_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setenv(runtime.OPT_OUT_VARIABLE, "1")
    first = runtime.tune_malloc()
    monkeypatch.delenv(runtime.OPT_OUT_VARIABLE)
    assert runtime.tune_malloc() is first


def test_cli_main_tunes_before_dispatching(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(azgpt.cli, "tune_malloc", lambda: calls.append("tuned"))
    monkeypatch.setattr(azgpt.cli, "run_verb", lambda name, argv: calls.append(name) or 0)
    assert azgpt.cli.main(["prepare"]) == 0
    assert calls == ["tuned", "prepare"]
