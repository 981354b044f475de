"""azgpt: train a GPT on Azerbaijani text from scratch with PyTorch Lightning.

``from azgpt import AzGPT, AzGPTDataModule, build_trainer`` is the notebook path; they load on first use, so
``import azgpt`` (and the ``azgpt`` command's start-up) does not pull in Lightning.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"

_LAZY = {"AzGPT": "azgpt.train.module", "AzGPTDataModule": "azgpt.data.datamodule",
         "build_trainer": "azgpt.train.trainer"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'azgpt' has no attribute {name!r}")
