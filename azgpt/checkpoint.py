"""Open an azgpt ``.ckpt`` safely: tensors and plain data only, never arbitrary pickled code.

Lightning checkpoints are pickles. ``torch.load(weights_only=True)`` unpickles only tensors, containers and
primitives, so a file crafted to run code when loaded is refused instead of executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from azgpt.train.checkpointing import load_checkpoint_file
from azgpt.errors import AzGPTError
from azgpt.model import GPT, GPTConfig, saved_activation
from azgpt.data.tokenizer import tokenizer_from_json

CHECKPOINT_KEY = "azgpt"  # where AzGPT.on_save_checkpoint puts the tokenizer and the run's summary
MODEL_PREFIX = "model."  # AzGPT holds its GPT as ``self.model``
CONFIG_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")


@dataclass
class Checkpoint:
    """What a checkpoint holds for using the model: architecture, weights, tokenizer, and the raw dict."""

    path: Path
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]  # GPT's own keys (without the ``model.`` prefix)
    tokenizer: Tokenizer
    raw: dict[str, Any]

    def build_model(self, device: torch.device | str = "cpu") -> GPT:
        """A GPT with the checkpoint's weights, in eval mode, on ``device``."""
        model = GPT(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise AzGPTError(f"{self.path}: its weights do not fit the architecture in its hyper_parameters "
                             f"({str(exc).splitlines()[0]})") from None
        return model.to(device).eval()

    @property
    def summary(self) -> dict[str, Any]:
        """The ``checkpoint["azgpt"]`` entry: tokenizer, and where present the data and last val metrics."""
        return self.raw.get(CHECKPOINT_KEY) or {}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint loaded safely onto the CPU; every failure becomes an AzGPTError naming the file."""
    path = Path(path)
    if not path.exists():
        raise AzGPTError(f"checkpoint {path} does not exist: pass a .ckpt from lightning_logs/version_N/checkpoints/")
    if not path.is_file():
        raise AzGPTError(f"checkpoint {path} is not a file: pass a .ckpt file, not a folder")
    return load_checkpoint_file(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``azgpt fit`` and check it has what generation and export need."""
    path = Path(path)
    raw = read_checkpoint(path)
    carried = raw.get(CHECKPOINT_KEY)
    hparams = raw.get("hyper_parameters")
    state = raw.get("state_dict")
    if not isinstance(carried, dict) or not isinstance(hparams, dict) or not isinstance(state, dict):
        raise AzGPTError(f"{path} is not an azgpt checkpoint (no {CHECKPOINT_KEY!r} entry, hyper_parameters or "
                         f"state_dict): pass a .ckpt written by azgpt fit")
    if not carried.get("tokenizer"):
        raise AzGPTError(f"{path} holds no tokenizer (the model was trained without azgpt's data module): "
                         f"it cannot turn text into tokens")
    missing = [key for key in CONFIG_KEYS if key not in hparams]
    if missing:
        raise AzGPTError(f"{path} is not an azgpt checkpoint: its hyper_parameters lack {', '.join(missing)}")
    try:
        config = GPTConfig(**{key: hparams[key] for key in CONFIG_KEYS}, activation=saved_activation(hparams))
    except (TypeError, ValueError) as exc:
        raise AzGPTError(f"{path}: bad model hyper_parameters ({exc})") from None
    tokenizer = tokenizer_from_json(carried["tokenizer"], origin=str(path))
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise AzGPTError(f"{path}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                         f"{config.vocab_size}")
    weights = {key[len(MODEL_PREFIX):]: value for key, value in state.items() if key.startswith(MODEL_PREFIX)}
    if not weights:
        raise AzGPTError(f"{path} is not an azgpt checkpoint: no {MODEL_PREFIX}* weights in its state_dict")
    return Checkpoint(path=path, config=config, state_dict=weights, tokenizer=tokenizer, raw=raw)
