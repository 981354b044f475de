"""The README's two commands stay true: CI runs exactly its test command, and the configs it names exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", text)


def test_ci_runs_the_readme_test_command() -> None:
    main_job, tests = readme_commands()[:2]
    assert "pytest" in tests and "azgpt.cli fit" in main_job
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert tests in ci_lines


def test_main_job_config_exists() -> None:
    main_job = readme_commands()[0]
    config = re.search(r"--config (\S+)", main_job).group(1)
    assert (ROOT / "configs" / config).is_file()
