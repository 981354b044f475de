"""The azgpt checkpoint format, in one place: what a ``.ckpt`` holds, how to read one safely, and how
older ones are brought up to date.

A checkpoint is a Lightning checkpoint (``state_dict``, ``hyper_parameters``, optimizer, loops, callbacks)
plus an ``"azgpt"`` entry written by ``AzGPT.on_save_checkpoint`` (see ``azgpt_entry``): the tokenizer's
JSON, a summary of the data, the last validation metrics, the random-number state and the micro-batch
position. Lightning checkpoints are pickles; ``torch.load(weights_only=True)`` unpickles only tensors,
containers and primitives, so a file crafted to run code when loaded is refused instead of executed.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from azgpt.data.tokenizer import tokenizer_from_json
from azgpt.errors import AzGPTError
from azgpt.model import GPT, GPTConfig

CHECKPOINT_KEY = "azgpt"  # the entry azgpt adds to Lightning's checkpoint dict
FORMAT_VERSION = 1
MODEL_PREFIX = "model."  # AzGPT holds its GPT as ``self.model``
CONFIG_KEYS = tuple(f.name for f in fields(GPTConfig))
# What must match to load weights into a model; dropout is a training setting and may change on resume.
ARCHITECTURE_KEYS = tuple(key for key in CONFIG_KEYS if key != "dropout")
# Defaults of settings added after the first checkpoints were written: an older checkpoint without the
# key was trained with this value (GPT-2's tanh GELU before `activation` existed; GPT-2's architecture before
# the modern recipe's options existed, which are GPTConfig's defaults).
LEGACY_DEFAULTS = {"activation": "gelu_tanh",
                   **{f.name: f.default for f in fields(GPTConfig)
                      if f.name in ("position", "rope_theta", "norm", "qk_norm", "mlp", "tie_embeddings",
                                    "zero_init", "logit_softcap", "embedding_norm")}}
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"  # how torch's safe unpickler begins its refusal


class UnsafeCheckpointError(AzGPTError):
    """A checkpoint holds Python objects that loading with ``weights_only=True`` refuses to build."""


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with a clear ``AzGPTError`` for unsafe or unreadable files."""
    path = Path(path)
    if not path.exists():
        raise AzGPTError(f"checkpoint {path} does not exist: pass a .ckpt from lightning_logs/version_N/checkpoints/")
    if not path.is_file():
        raise AzGPTError(f"checkpoint {path} is not a file: pass a .ckpt file, not a folder")
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format; a raw pickle is read plainly
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(exc).strip()
        refused = _REFUSED_GLOBAL.search(text)
        if _WEIGHTS_ONLY_REFUSAL in text and refused:
            # torch's own text goes on to suggest turning the safe loader off: none of it is shown.
            raise UnsafeCheckpointError(
                f"refusing to load {path}: the file holds code ({refused.group(1).rstrip('.,')}) that azgpt will "
                f"not run; use a checkpoint written by azgpt fit") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if _WEIGHTS_ONLY_REFUSAL in text:  # keep only torch's specific reason, e.g. "Unsupported operand 110"
            lines = [line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file"))]
            lines = lines or ["a pickle the safe loader does not read"]
        reason = lines[0] if lines else type(exc).__name__
        raise AzGPTError(f"{path} is not a readable checkpoint (truncated, corrupt or another format: "
                         f"{reason[:200]})") from None
    if not isinstance(checkpoint, dict):
        raise AzGPTError(f"{path} is not an azgpt checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


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

    @property
    def chat_template(self) -> dict[str, Any] | None:
        """The stored chat template of a fine-tuned model (see ``azgpt_entry``); None for a base model."""
        return self.summary.get("chat_template")



def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``azgpt fit`` and check it has what generation and export need."""
    path = Path(path)
    raw = load_checkpoint_file(path)
    carried = raw.get(CHECKPOINT_KEY)
    hparams = raw.get("hyper_parameters")
    state = raw.get("state_dict")
    if not isinstance(carried, dict) or not isinstance(hparams, dict) or not isinstance(state, dict):
        raise AzGPTError(f"{path} is not an azgpt checkpoint (no {CHECKPOINT_KEY!r} entry, hyper_parameters or "
                         f"state_dict): pass a .ckpt written by azgpt fit")
    if not carried.get("tokenizer"):
        raise AzGPTError(f"{path} holds no tokenizer (the model was trained without azgpt's data module): "
                         f"it cannot turn text into tokens")
    hparams = upgrade_hyperparameters(hparams)
    missing = [key for key in CONFIG_KEYS if key not in hparams]
    if missing:
        raise AzGPTError(f"{path} is not an azgpt checkpoint: its hyper_parameters lack {', '.join(missing)}")
    config = config_from_hparams(hparams, origin=str(path))
    tokenizer = tokenizer_from_json(carried["tokenizer"], origin=str(path))
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise AzGPTError(f"{path}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                         f"{config.vocab_size}")
    weights = {key[len(MODEL_PREFIX):]: value for key, value in state.items() if key.startswith(MODEL_PREFIX)}
    if not weights:
        raise AzGPTError(f"{path} is not an azgpt checkpoint: no {MODEL_PREFIX}* weights in its state_dict")
    check_weights(path, config, weights)
    return Checkpoint(path=path, config=config, state_dict=weights, tokenizer=tokenizer, raw=raw)


def non_finite_weights(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``state_dict`` holding a NaN or an infinity."""
    return [name for name, value in state_dict.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]


def check_weights(path: Path, config: GPTConfig, weights: dict[str, Any]) -> None:
    """Refuse weights that do not fit ``config`` (checked on the meta device, so a crafted config asking for
    terabytes allocates nothing) or that hold NaN / infinity (a diverged run would only write garbage)."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    for name, shape in expected.items():
        value = weights.get(name)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else "missing"
            raise AzGPTError(f"{path}: its weights do not fit the architecture in its hyper_parameters ({name}: "
                             f"{found} in the file, {shape} for the config): the file is damaged or crafted")
    bad = non_finite_weights({name: weights[name] for name in expected})
    if bad:
        raise AzGPTError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]}); the run "
                         f"diverged before this checkpoint was saved: use an earlier checkpoint")


def azgpt_entry(tokenizer_json: str | None, data: dict[str, Any] | None, metrics: dict[str, float],
                rng: dict[str, Any], micro_batch: int, chat_template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``checkpoint["azgpt"]`` entry: everything beyond Lightning's own state that using or resuming needs.

    ``chat_template`` (``ChatTemplate.to_dict()``, azgpt/data/chat.py) is there once a model is fine-tuned with
    ``azgpt finetune``; a base model, and any checkpoint older than it, has none.
    """
    entry = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_json, "data": data, "metrics": metrics,
             "rng": rng, "micro_batch": micro_batch}
    if chat_template is not None:
        entry["chat_template"] = chat_template
    return entry


def upgrade_hyperparameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` with the values older checkpoints imply for settings added since (see LEGACY_DEFAULTS)."""
    return {**LEGACY_DEFAULTS, **hparams}


def config_from_hparams(hparams: dict[str, Any], origin: str = "the checkpoint") -> GPTConfig:
    """The GPTConfig saved in a checkpoint's (upgraded) hyperparameters."""
    try:
        return GPTConfig(**{key: hparams[key] for key in CONFIG_KEYS if key in hparams})
    except (TypeError, ValueError) as exc:
        raise AzGPTError(f"{origin}: bad model hyper_parameters ({exc})") from None


def recorded_val_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """The last validation's metrics saved by azgpt, else the val_loss score ModelCheckpoint kept."""
    saved = (raw.get(CHECKPOINT_KEY) or {}).get("metrics")
    if saved:
        return {name: float(value) for name, value in saved.items()}
    for key, state in (raw.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor") == "val_loss":
            score = state.get("current_score")
            if score is None:
                score = state.get("best_model_score")
            if score is not None:
                loss = float(score)
                return {"val_loss": loss, "val_ppl": math.exp(loss)}
    return {}
