"""The model folder: what a trained model is, apart from the state of the run that trained it.

    model/
      config.json          the architecture (GPTConfig's fields) and the folder's format version
      model.safetensors    the GPT's weights, nothing else (no optimizer, no pickle)
      tokenizer.json       the byte-level BPE tokenizer
      meta.json            provenance: azgpt version, source checkpoint and step, data summary, last validation
                           metrics, the recipe and optimizer it was trained with, the chat template of a fine-tune

``fit`` and ``finetune`` write it into the run folder when they end (``azgpt export --format azgpt`` from any
``.ckpt``); every use verb reads a model through ``load_model``, which takes this folder, a run folder holding one,
or a ``.ckpt`` (the training state, which older runs left alone).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from azgpt import __version__
from azgpt.atomic import atomic_output
from azgpt.checkpoint import CHECKPOINT_KEY, Checkpoint, check_weights, load_checkpoint
from azgpt.data.tokenizer import tokenizer_from_json
from azgpt.errors import AzGPTError
from azgpt.model import GPT, GPTConfig

FOLDER_FORMAT = "azgpt-model"
FOLDER_VERSION = 1
FILES = ("config.json", "model.safetensors", "tokenizer.json", "meta.json")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise AzGPTError("the model folder needs the safetensors package: pip install safetensors") from None
    return safetensors.torch


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors once each, and ``{alias: name}`` for weights shared with another (a tied embedding and head):
    safetensors stores a storage once, so the alias is written down and restored when reading."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().to("cpu").contiguous()
    return unique, aliases


def write_model_folder(out: Path, config: GPTConfig, state_dict: dict[str, torch.Tensor], tokenizer_json: str,
                       meta: dict[str, Any], overwrite: bool = False) -> Path:
    """Write the model folder ``out`` all at once (a failure or a kill leaves ``out`` as it was)."""
    out = Path(out)
    tensors, aliases = _unique_tensors(state_dict)
    description = {"format": FOLDER_FORMAT, "format_version": FOLDER_VERSION, "architecture": asdict(config),
                   "shared_weights": aliases}
    meta = {"format_version": FOLDER_VERSION, "azgpt_version": __version__, **meta}
    # JSON has no infinity: a perplexity past e^709 is written as null, not as invalid JSON.
    meta["metrics"] = {k: v if math.isfinite(v) else None for k, v in (meta.get("metrics") or {}).items()}
    with atomic_output(out, "the model folder", overwrite=overwrite) as folder:
        # Bytes written by Python, not save_file: its Rust writer reports a full disk as SafetensorError, which
        # atomic_output could not tell from a bug.
        (folder / "model.safetensors").write_bytes(_safetensors().save(tensors, metadata={"format": "pt"}))
        (folder / "config.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                                          encoding="utf-8")
    return out


def checkpoint_meta(checkpoint: Checkpoint) -> dict[str, Any]:
    """meta.json's content for a model read from a ``.ckpt`` (what ``azgpt export --format azgpt`` writes)."""
    summary = checkpoint.summary
    hparams = checkpoint.raw.get("hyper_parameters") or {}
    return {"source_checkpoint": str(checkpoint.path), "global_step": checkpoint.raw.get("global_step"),
            "data": summary.get("data"), "metrics": summary.get("metrics") or {},
            "chat_template": summary.get("chat_template"),
            "training": {key: hparams.get(key) for key in ("recipe", "optimizer", "init_from")}}


def export_model_folder(ckpt: Path, out: Path, overwrite: bool = False) -> Path:
    """``azgpt export --format azgpt``: the model folder of a ``.ckpt`` (or a copy of another model folder)."""
    checkpoint = load_model(ckpt)
    tokenizer_json = checkpoint.tokenizer.to_str()
    return write_model_folder(out, checkpoint.config, checkpoint.state_dict, tokenizer_json,
                              checkpoint_meta(checkpoint), overwrite=overwrite)


# -- reading ------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AzGPTError(f"{path} is not readable JSON ({exc}): the model folder is damaged; export it again "
                         f"(azgpt export --format azgpt --ckpt last.ckpt)") from None
    if not isinstance(content, dict):
        raise AzGPTError(f"{path} must hold a JSON object: the model folder is damaged")
    return content


def read_model_folder(folder: Path) -> Checkpoint:
    """Read and check a model folder, as ``load_checkpoint`` does a ``.ckpt``."""
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise AzGPTError(f"{folder} is not a complete model folder: {', '.join(missing)} missing (a model folder "
                         f"holds {', '.join(FILES)})")
    description = _read_json(folder / "config.json")
    if description.get("format") != FOLDER_FORMAT:
        raise AzGPTError(f"{folder}/config.json is not an azgpt model description (format "
                         f"{description.get('format')!r}, expected {FOLDER_FORMAT!r})")
    if not isinstance(description.get("format_version"), int) or description["format_version"] > FOLDER_VERSION:
        raise AzGPTError(f"{folder} was written by a newer azgpt (format_version {description.get('format_version')}"
                         f"; this azgpt reads up to {FOLDER_VERSION}): upgrade azgpt")
    architecture = description.get("architecture")
    known = {f.name for f in fields(GPTConfig)}
    if not isinstance(architecture, dict) or set(architecture) - known:
        unknown = sorted(set(architecture) - known) if isinstance(architecture, dict) else "not an object"
        raise AzGPTError(f"{folder}/config.json: bad architecture ({unknown})")
    try:
        config = GPTConfig(**architecture)
    except (TypeError, ValueError) as exc:
        raise AzGPTError(f"{folder}/config.json: bad architecture ({exc})") from None
    try:
        weights = _safetensors().load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
        raise AzGPTError(f"{folder}/model.safetensors is not readable ({str(exc)[:200]}): the model folder is "
                         f"damaged") from None
    for alias, name in (description.get("shared_weights") or {}).items():
        if name in weights:
            weights[alias] = weights[name]
    check_weights(folder / "model.safetensors", config, weights)
    tokenizer: Tokenizer = tokenizer_from_json((folder / "tokenizer.json").read_text(encoding="utf-8"),
                                               origin=str(folder / "tokenizer.json"))
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise AzGPTError(f"{folder}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                         f"{config.vocab_size}")
    meta = _read_json(folder / "meta.json")
    # The same shape as a checkpoint's own entry, so every reader of a Checkpoint works unchanged.
    raw = {CHECKPOINT_KEY: {"format_version": meta.get("format_version"), "tokenizer": tokenizer.to_str(),
                            "data": meta.get("data"),
                            "metrics": {k: v for k, v in (meta.get("metrics") or {}).items() if v is not None},
                            "chat_template": meta.get("chat_template")},
           "global_step": meta.get("global_step"), "meta": meta}
    with torch.device("meta"):
        expected = set(GPT(config).state_dict())
    return Checkpoint(path=folder, config=config, state_dict={k: v for k, v in weights.items() if k in expected},
                      tokenizer=tokenizer, raw=raw)


def model_folder_of(path: Path) -> Path | None:
    """The model folder ``path`` names: itself, or the ``model/`` inside a run folder; None for a file."""
    if not path.is_dir():
        return None
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise AzGPTError(f"{path} is a folder but not a model folder (no config.json, nor model/config.json): pass a "
                     f"model folder such as lightning_logs/version_0/model, or a .ckpt file")


def load_model(path: str | Path) -> Checkpoint:
    """A model to use, from a model folder, a run folder holding ``model/``, or a ``.ckpt`` written by fit."""
    path = Path(path)
    folder = model_folder_of(path)
    return read_model_folder(folder) if folder is not None else load_checkpoint(path)
