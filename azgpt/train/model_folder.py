"""Write the run's model folder (azgpt/artifact.py) when fit or finetune ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from azgpt.artifact import write_model_folder
from azgpt.train.loggers import run_dir
from azgpt.train.signals import GracefulStop


class WriteModelFolder(L.Callback):
    """When training ends, write ``<run folder>/model/``: the final weights, architecture, tokenizer and what they
    were trained on, for the use verbs and for sharing. A run stopped early (SIGTERM, an error) writes none: its
    ``last.ckpt`` resumes it, and ``azgpt export --format azgpt`` makes a model folder of any checkpoint."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        # trainer.log_dir is a collective under DDP: every rank asks, then only the first one writes.
        log_dir = trainer.log_dir
        last = GracefulStop.checkpoint_path(trainer)
        if not trainer.is_global_zero:
            return
        # Beside the checkpoints and the report: for W&B and MLflow, trainer.log_dir is the logger's save_dir.
        folder = (run_dir(trainer) or Path(log_dir or trainer.default_root_dir)) / "model"
        if isinstance(trainer.strategy, FSDPStrategy):  # the weights are sharded across ranks here
            rank_zero_info(f"azgpt: FSDP run: no {folder} written; make it from the checkpoint with azgpt export "
                           f"--format azgpt --ckpt last.ckpt --out {folder}")
            return
        if getattr(pl_module, "tokenizer_json", None) is None or not hasattr(pl_module, "config"):
            return  # not an azgpt model, or trained without azgpt's data: the folder could not write text
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        meta = {"source_checkpoint": str(last) if last.is_file() else None, "global_step": trainer.global_step,
                "data": pl_module.data_summary, "metrics": metrics, "chat_template": pl_module.chat_template,
                "training": {key: pl_module.hparams.get(key) for key in ("recipe", "optimizer", "init_from")}}
        write_model_folder(folder, pl_module.config, pl_module.model.state_dict(), pl_module.tokenizer_json, meta,
                           overwrite=True)
        rank_zero_info(f"azgpt: model folder {folder} (generate, chat, evaluate, export and serve read it)")
