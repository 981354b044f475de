"""The environment a test gives the azgpt process it starts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def child_env(base: Mapping[str, str] | None = None, **variables: str) -> dict[str, str]:
    """``base`` (default: this process's environment) with the repository and the tests folder put first on
    PYTHONPATH, what was on it kept (packages installed by path, as on a machine given wheels to unpack), and
    ``variables`` set."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    env.update(variables)
    return env
