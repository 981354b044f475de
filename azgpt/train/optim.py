"""How a model is trained: the optimizer and learning-rate schedule settings that fit and finetune share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

OPTIMIZERS = ("adamw", "muon")
RECIPE_OPTIMIZERS = {"gpt2": "adamw", "modern": "muon"}  # the optimizer that is part of each named recipe (RECIPES)


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule.

    Args:
        optimizer: ``adamw`` for every weight, or ``muon``: torch's Muon for the 2-D weights inside the blocks and
            AdamW for the embedding, head, norms and biases (None: the recipe's, or for a fine-tune the base
            model's).
        muon_lr: Muon's peak learning rate (its own; ``learning_rate`` stays AdamW's).
        muon_momentum: Muon's momentum.
        muon_warmup_steps: Muon's own linear warmup; it then follows the same schedule as AdamW.
        learning_rate: peak AdamW learning rate, reached after ``warmup_steps`` optimizer steps.
        embedding_lr: the token embedding's own peak AdamW rate (None: ``learning_rate``). Each row only gets a
            gradient where its token occurs, so it learns slowly at the rate that suits the matrices; its weight
            decay is scaled so that it shrinks per step as much as the other weights.
        min_lr_ratio: the schedule ends at ``learning_rate * min_lr_ratio``.
        warmup_steps: linear warmup length in optimizer steps.
        decay_steps: optimizer step where the schedule reaches its floor (None: ``trainer.max_steps``; must be
            None with a time budget, which plans the steps).
        lr_schedule: ``cosine`` (warmup, then cosine decay to the floor) or ``wsd`` (warmup-stable-decay: warmup,
            constant, then a cooldown to the floor on the last step). None: ``wsd`` when a time budget
            (``--budget``) plans the steps, else ``cosine``. Checkpoints record the one used.
        cooldown_fraction: the share of the steps the ``wsd`` cooldown takes (at the end).
        cooldown_shape: the ``wsd`` cooldown: ``linear`` or ``1-sqrt`` (1 - sqrt of its progress).
        weight_decay: AdamW decay, applied to the weights of linear and embedding layers only.
        beta1: AdamW's first-moment decay.
        beta2: AdamW's second-moment decay.
        eps: AdamW's epsilon.
    """

    optimizer: str | None = None
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_warmup_steps: int = 0
    learning_rate: float = 6e-4
    embedding_lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None
    lr_schedule: Literal["cosine", "wsd"] | None = None
    cooldown_fraction: float = 0.2
    cooldown_shape: Literal["linear", "1-sqrt"] = "linear"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"model: need learning_rate > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0; got "
                             f"{self.learning_rate}, {self.min_lr_ratio}, {self.warmup_steps}")
        if self.embedding_lr is not None and not 0 < self.embedding_lr < math.inf:
            raise ValueError(f"model.embedding_lr must be a finite number > 0 or null (learning_rate), got "
                             f"{self.embedding_lr!r}")
        if self.lr_schedule not in (None, "cosine", "wsd"):
            raise ValueError(f"model.lr_schedule must be cosine, wsd or null, got {self.lr_schedule!r}")
        if self.cooldown_shape not in ("linear", "1-sqrt") or not 0 <= self.cooldown_fraction <= 1:
            raise ValueError(f"model: need cooldown_shape linear or 1-sqrt and 0 <= cooldown_fraction <= 1; got "
                             f"{self.cooldown_shape!r}, {self.cooldown_fraction}")


# A fine-tune starts from trained weights: a shorter warmup, a lower peak and no decay (azgpt finetune's defaults).
FINETUNE_OPTIM = OptimConfig(learning_rate=3e-4, warmup_steps=10, weight_decay=0.0)
