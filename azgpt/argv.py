"""One spelling for list options in every verb: ``--corpus a.txt b/`` as well as jsonargparse's own ``'[a.txt, b/]'``
and ``--corpus+ a.txt``. Written here because jsonargparse has no space-separated lists (it refuses a bare value for a
list); used by the function verbs (azgpt/cli.py) and LightningCLI's (azgpt/train/lightning_cli.py) alike."""

from __future__ import annotations

import inspect
import json
from typing import Any, get_args, get_origin


def list_flags(argv: list[str], names: set[str]) -> list[str]:
    """``--corpus a.txt b/`` -> ``--corpus '["a.txt", "b/"]'``: a list option takes every value up to the next flag
    (jsonargparse alone takes one JSON list or ``--corpus+ a.txt``, which also still work)."""
    gathered: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and arg[2:] in names:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            if len(values) == 1 and (values[0].lstrip().startswith("[") or values[0].strip() in ("null", "None")):
                gathered += [arg, values[0]]  # already a JSON / YAML list, or null
            else:
                gathered += [arg, json.dumps(values)]
        else:
            gathered.append(arg)
        i += 1
    return gathered


def is_list(hint: Any) -> bool:
    """Whether a type hint is a list or a union with one (``list[str] | None``)."""
    return list in (get_origin(hint), *(get_origin(arg) for arg in get_args(hint)))


def list_parameters(cls: type, prefix: str) -> set[str]:
    """``prefix + name`` for each parameter of ``cls.__init__`` that takes a list."""
    parameters = inspect.signature(cls.__init__, eval_str=True).parameters  # also a generated __signature__
    return {prefix + name for name, parameter in parameters.items() if is_list(parameter.annotation)}
