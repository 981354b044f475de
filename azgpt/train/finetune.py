"""Supervised fine-tuning: AzGPT started from a pretrained checkpoint's weights, with the chat template's
tokens added to its tokenizer and embedding, trained on instruction data (azgpt/data/instructions.py).

It is a new run, not a resume: a fresh optimizer, schedule and step count. Everything else is fit's: the
same LightningModule (loss, AdamW groups, NaN guard, validation metrics), Trainer defaults, checkpoints,
``--ckpt_path last`` to resume a fine-tune, signals and TensorBoard.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from azgpt.artifact import load_model
from azgpt.checkpoint import ARCHITECTURE_KEYS, Checkpoint, load_checkpoint_file
from azgpt.data.chat import DEFAULT_TEMPLATE
from azgpt.data.instructions import InstructionDataModule
from azgpt.errors import AzGPTError
from azgpt.train.lightning_cli import AzGPTCLI, run_lightning_cli
from azgpt.model import GPTConfig
from azgpt.train.module import (COMPILE, OPTIM_KEYS, AzGPT, bind_settings, check_same_architecture, settings_doc,
                                settings_parameters, settings_signature)
from azgpt.train.optim import FINETUNE_OPTIM, OPTIMIZERS, OptimConfig

EMBEDDING_KEYS = ("transformer.wte.weight", "lm_head.weight")  # one tensor under both names when tied


def resize_token_embedding(weight: torch.Tensor, rows: int, known_tokens: int, new_ids: list[int]) -> torch.Tensor:
    """The token embedding grown (or kept) to ``rows`` rows: every old row is kept exactly except those of
    ``new_ids``; rows of new tokens and new padding rows start at the mean of the ``known_tokens`` real
    token rows, an "average token" whose logit starts at the level of a typical token's rather than
    at a random one's (with a tied head, the embedding row is also the output row)."""
    if rows < weight.size(0):
        raise ValueError(f"cannot shrink the embedding from {weight.size(0)} to {rows} rows")
    mean = weight[:known_tokens].mean(dim=0)
    resized = mean.expand(rows, weight.size(1)).clone()
    resized[: weight.size(0)] = weight
    if new_ids:
        resized[torch.tensor(new_ids)] = mean
    return resized


def trained_with_optimizer(base: Checkpoint) -> str:
    """The optimizer ``base`` was trained with: its checkpoint's hyperparameters or its model folder's meta.json."""
    recorded = (base.raw.get("hyper_parameters") or {}).get("optimizer")
    recorded = recorded or ((base.raw.get("meta") or {}).get("training") or {}).get("optimizer")
    return recorded if recorded in OPTIMIZERS else "adamw"


# AzGPTFinetune's arguments: the base model, then GPTConfig's fields (None: the base model's), OptimConfig's
# fields with a fine-tune's defaults, and compile.
FINETUNE_SIGNATURE = settings_signature(
    inspect.Parameter("init_from", inspect.Parameter.KEYWORD_ONLY, annotation=str),
    *settings_parameters(GPTConfig, None), *settings_parameters(OptimConfig, FINETUNE_OPTIM), COMPILE)


class AzGPTFinetune(AzGPT):
    """AzGPT started from a pretrained checkpoint, its vocabulary grown by the chat template's tokens.

    It takes ``init_from``, each field of ``GPTConfig`` and of ``OptimConfig``, and ``compile``, by keyword. The
    architecture comes from ``init_from``: leave its fields unset (a value that differs from the checkpoint's is
    refused), except ``dropout`` (None: the checkpoint's). The optimizer settings are fit's with a fine-tune's
    defaults (``FINETUNE_OPTIM``); a new optimizer and schedule start at step 0.

    Args:
        init_from: checkpoint or model folder written by ``azgpt fit`` (or a fine-tune) whose weights and tokenizer
            start the run.
        optimizer: adamw or muon (None: the one the base model was trained with, so a modern-recipe model keeps
            Muon for its block matrices; adamw where the base does not say).
    """

    def __init__(self, **settings: Any) -> None:
        settings = bind_settings(FINETUNE_SIGNATURE, self, settings)
        init_from = settings.pop("init_from")
        base = load_model(init_from)
        tokenizer = DEFAULT_TEMPLATE.add_to_tokenizer(base.tokenizer)
        known = base.tokenizer.get_vocab_size()
        new_ids = [i for i in DEFAULT_TEMPLATE.token_ids(tokenizer).values() if i >= known]
        architecture = asdict(base.config)
        architecture["vocab_size"] = max(base.config.vocab_size, tokenizer.get_vocab_size())
        configured = {key: settings[key] for key in ARCHITECTURE_KEYS if settings[key] is not None}
        check_same_architecture(architecture, configured, advice="a fine-tune takes its architecture from "
                                "model.init_from: leave these model settings out")
        if settings["dropout"] is not None:
            architecture["dropout"] = settings["dropout"]
        if settings["optimizer"] is None:
            settings["optimizer"] = trained_with_optimizer(base)
            rank_zero_info(f"azgpt finetune: optimizer {settings['optimizer']}, as the base model was trained "
                           f"(model.optimizer changes it)")
        optim = {key: settings[key] for key in OPTIM_KEYS}
        AzGPT.__init__(self, **architecture, **optim, compile=settings["compile"])  # not super(): see AzGPT
        # The resolved values, so a checkpoint's hyperparameters describe its model without the base file.
        self.save_hyperparameters({"init_from": str(init_from), **architecture, **optim,
                                   "compile": settings["compile"]})
        weights = dict(base.state_dict)
        rows = self.config.padded_vocab_size
        for key in EMBEDDING_KEYS:  # an untied head (modern recipe) grows from its own rows, not the embedding's
            weights[key] = resize_token_embedding(weights[key], rows, known, new_ids)
        self.model.load_state_dict(weights)
        self.tokenizer_json = tokenizer.to_str()
        self.chat_template = DEFAULT_TEMPLATE.to_dict()

    __init__.__signature__ = FINETUNE_SIGNATURE
    __init__.__doc__ = settings_doc(GPTConfig, OptimConfig)

    @property
    def block_size(self) -> int:
        """The context length, taken from the base checkpoint (the fine-tune's data is cut to it)."""
        return self.config.block_size


class FinetuneCLI(AzGPTCLI):
    """``fit`` of AzGPTFinetune on InstructionDataModule, which gets the model's tokenizer (template tokens
    included), block size and template once the model is built from ``model.init_from``."""

    links = (("model.tokenizer_json", "data.tokenizer_json", "instantiate"),
             ("model.block_size", "data.block_size", "instantiate"),
             ("model.chat_template", "data.chat_template", "instantiate"))

    def _parse_ckpt_path(self) -> None:
        """On resume the fine-tune's own hyperparameters replace the config's, as in fit; those that are not
        AzGPTFinetune's options (architecture settings it reads from ``init_from``) are left to it.

        Overrides a private LightningCLI method (listed in azgpt/train/lightning_private.py): Lightning's own
        would feed it every saved hyperparameter, which AzGPTFinetune's parser refuses."""
        self._model_asked_for = None  # checked below against the options alone, not AzGPTCLI's whole model
        ckpt_path = self.config.fit.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        configured = {k: v for k, v in vars(self.config.fit.model).items() if v is not None}
        options = inspect.signature(self.model_class.__init__).parameters
        saved = load_checkpoint_file(ckpt_path).get("hyper_parameters") or {}
        if "init_from" not in saved:  # what every fine-tune records; its vocabulary would differ by the template's
            raise AzGPTError(f"--ckpt_path {ckpt_path} is not a fine-tune's checkpoint (it records no init_from): "
                             f"--ckpt_path resumes a fine-tune; to start one from this model, pass it as "
                             f"--model.init_from without --ckpt_path")
        saved = {key: value for key, value in saved.items() if key in options}
        self.config = self.parser.parse_object({"fit": {"model": saved}}, self.config)
        check_same_architecture(dict(vars(self.config.fit.model)), configured)


def run_finetune_cli(argv: list[str]) -> FinetuneCLI:
    """``azgpt finetune ARGS`` as ``fit ARGS`` of FinetuneCLI (``--help`` and ``--print_config`` work too)."""
    return run_lightning_cli(["fit", *argv], FinetuneCLI, AzGPTFinetune, InstructionDataModule)

