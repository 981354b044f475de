"""Callbacks the distributed tests load into ``python -m azgpt.cli`` runs (through a YAML config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class RecordTrainBlocks(L.Callback):
    """Writes every training micro-batch this process saw, with the step it was drawn at, to
    ``out_dir/train-blocks-rank{global_rank}.pt`` when training ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.records: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.records.append({"global_step": trainer.global_step, "inputs": batch[0].detach().cpu().clone()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"world_size": trainer.world_size, "records": self.records},
                   self.out_dir / f"train-blocks-rank{trainer.global_rank}.pt")


class RecordValLoss(L.Callback):
    """Writes the final ``val_loss`` (as a Python float, full precision) and the number of validation
    batches each process ran to ``out_dir/val-rank{global_rank}.json`` (loader 0: during fit, loader 1 holds
    the fixed training blocks of train_eval_loss)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches = 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.batches += dataloader_idx == 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"val_loss": float(trainer.callback_metrics["val_loss"]), "batches": self.batches,
                  "world_size": trainer.world_size}
        (self.out_dir / f"val-rank{trainer.global_rank}.json").write_text(json.dumps(record))
