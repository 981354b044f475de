"""The package's imports run one way, along the flow: data -> model -> train -> use (DESIGN.md's arrows)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "azgpt"
# What each part may import from azgpt (besides itself). model.py knows nothing of Lightning, data or files;
# data knows no model; train knows no use; checkpoint.py (the format) sits between model and its readers.
ALLOWED = {
    "errors": set(),
    "atomic": {"errors"},  # safe writes of files and folders, used by every stage that writes
    "runtime": set(),
    "argv": set(),  # list options spelled one way in every verb
    "targets": set(),  # the target id the loss skips, written by the data: below both
    "fast_ops": set(),  # the model's hand-written RMSNorm and rotary embeddings
    "model": {"targets", "fast_ops"},
    "data": {"errors", "atomic", "targets"},
    "checkpoint": {"errors", "model", "data"},
    "artifact": {"errors", "atomic", "model", "data", "checkpoint"},  # the model folder, and load_model for both
    "sampling": {"errors", "model", "data", "checkpoint", "artifact"},
    "train": {"errors", "atomic", "targets", "model", "data", "checkpoint", "artifact", "sampling", "argv"},
    "use": {"errors", "atomic", "targets", "model", "data", "checkpoint", "artifact", "sampling"},
    "cli": {"errors", "runtime", "train", "argv"},  # the other verbs are imported by name from cli.VERBS when run
}


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def imported_parts(source: str, module: str) -> set[str]:
    """The parts of azgpt that ``source`` (the text of ``module``, e.g. ``azgpt.data.prepare``) imports, however
    spelled: ``import azgpt.x``, ``from azgpt.x import y``, ``from azgpt import x`` (a submodule, or a name
    azgpt re-exports from one), and relative imports."""
    from azgpt import _LAZY

    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # from . import x, from ..model import GPT
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            if target == "azgpt":
                for alias in node.names:
                    if alias.name in _LAZY:
                        found.add(part_of(_LAZY[alias.name]))
                    elif (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file():
                        found.add(alias.name)
            elif target.startswith("azgpt."):
                found.add(part_of(target))
        elif isinstance(node, ast.Import):
            found |= {part_of(alias.name) for alias in node.names if alias.name.startswith("azgpt.")}
    return found


def azgpt_imports(path: Path) -> set[str]:
    module = ".".join(("azgpt", *path.relative_to(PACKAGE).with_suffix("").parts))
    return imported_parts(path.read_text(encoding="utf-8"), module)


def test_every_spelling_of_an_import_is_seen() -> None:
    spellings = {"from azgpt import train": {"train"}, "from azgpt import AzGPT": {"train"},
                 "from azgpt import AzGPTDataModule": {"data"}, "from azgpt import __version__": set(),
                 "import azgpt.use.export": {"use"}, "from azgpt.model import GPT": {"model"},
                 "from .. import train": {"train"}, "from ..use.export import x": {"use"},
                 "from . import corpus": {"data"}}
    for source, parts in spellings.items():
        assert imported_parts(source, "azgpt.data.prepare") == parts, source


def test_imports_follow_the_flow() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        part = relative.parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for imported in azgpt_imports(path) - {part, ""}:
            if imported not in ALLOWED[part]:
                wrong.append(f"{relative} imports azgpt.{imported}")
    assert not wrong, wrong


def test_the_model_does_not_import_lightning() -> None:
    source = (PACKAGE / "model.py").read_text(encoding="utf-8")
    assert "lightning" not in source


def module_imports(path: Path) -> set[str]:
    """The azgpt modules ``path`` imports (at the top or inside functions), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("azgpt."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("azgpt.")}
    return found


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between azgpt's modules, lazy imports included (export and gguf used to import each other)."""
    graph = {"azgpt." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts): module_imports(p)
             for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported == path[0]:
                cycles.append(" -> ".join([*path, imported]))
            elif imported not in path and imported in graph and len(path) < len(graph):
                visit(imported, [*path, imported])

    for start in graph:
        visit(start, [start])
    assert not cycles, cycles[:5]
