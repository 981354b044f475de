"""The README's two commands stay true: CI runs exactly its test command, the configs it names exist, the
version floors it and pyproject state cover what the code uses, and the dev extras the tests need are there."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

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


def declared_floor(requirement: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))


def test_declared_floors_cover_what_the_code_uses() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_requirement = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    # azgpt/train/muon.py subclasses torch.optim.Muon, which first shipped in torch 2.9.
    assert declared_floor(torch_requirement) >= (2, 9), torch_requirement
    floor = ".".join(map(str, declared_floor(torch_requirement)))
    assert f"any torch from {floor} on works" in (ROOT / "README.md").read_text(encoding="utf-8")
    # The tests use contextlib.chdir (Python 3.11); the project must not promise an older Python.
    assert declared_floor(project["requires-python"]) >= (3, 11), project["requires-python"]


@pytest.mark.parametrize("module", ["datasets", "pyarrow", "safetensors", "wandb", "gguf", "transformers",
                                   "accelerate"])
def test_dev_extras_are_installed(module: str) -> None:
    """Test files skip themselves without these (importorskip); here a broken dev install fails instead."""
    importlib.import_module(module)


def test_the_layout_map_names_every_module_and_config() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    modules = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "azgpt").rglob("*.py"))
               if p.name != "__init__.py"]
    missing = [m for m in modules if m not in layout and Path(m).name not in layout]
    missing += [p.name for p in sorted((ROOT / "configs").glob("*.yaml")) if p.name not in layout]
    assert not missing, f"README's layout map does not name {missing}"
