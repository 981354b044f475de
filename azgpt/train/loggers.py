"""What azgpt writes through any Lightning logger: text (samples, alerts) and the run's folder.

TensorBoard stays the default; Weights & Biases, MLflow and CSVLogger get every feature too. Lightning's ``Logger``
interface has scalars only, so text goes to each backend its own way here.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger

from azgpt.errors import AzGPTError

TEXT_FILE = "text.csv"  # where text goes under CSVLogger, beside its metrics.csv
MLFLOW_TEXT = "text"  # under MLflow, each text is the artifact text/<tag>/<step>.md of its run


def run_dir(trainer: L.Trainer) -> Path | None:
    """The run's folder: where Lightning puts ``checkpoints/`` and azgpt its report (None without a logger).

    The same rule as Lightning's ``ModelCheckpoint``: ``<save_dir>/<name>/<version>``; TensorBoard and CSV name
    it ``log_dir``, W&B has no such property (its name is the project, its version the run id).
    """
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    if getattr(logger, "log_dir", None):
        return Path(logger.log_dir)
    save_dir = logger.save_dir or trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version


class NoEmptyRunFolder(L.Callback):
    """A run that fails before anything is logged (bad data, a bad option found at setup, a checkpoint refused on
    resume) leaves no ``version_N`` folder behind that holds only its config.yaml: the logger creates the folder
    and LightningCLI writes the config into it at setup, before the data is read or the checkpoint loaded."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        folder = run_dir(trainer) if trainer.is_global_zero else None
        if folder is not None and folder.is_dir() and not folder.is_symlink() and _holds_nothing(folder):
            shutil.rmtree(folder, ignore_errors=True)


# TensorBoard starts each events file with one record naming its format (88 bytes); anything logged adds more.
_EMPTY_EVENTS_BYTES = 128
RUN_CONFIG_FILE = "config.yaml"  # LightningCLI's config_filename, written by azgpt's RunFolderConfig


def _holds_nothing(folder: Path) -> bool:
    """Whether ``folder`` holds at most the run's config.yaml and TensorBoard events files with no record yet."""
    for path in folder.iterdir():
        if not path.is_file() or path.is_symlink():
            return False
        empty_events = path.name.startswith("events.out.tfevents.") and path.stat().st_size <= _EMPTY_EVENTS_BYTES
        if not (empty_events or path.name == RUN_CONFIG_FILE):
            return False
    return True


def log_text(trainer: L.Trainer, tag: str, text: str) -> None:
    """Write ``text`` under ``tag`` at the current step to every logger that can hold text (rank zero only).

    TensorBoard: its Text tab (markdown). W&B: a table with a step and a text column. CSV: a row of
    ``text.csv`` (step, tag, text) in the run folder. MLflow: the run's artifact ``text/<tag>/<step>.md``.
    Other loggers: skipped.
    """
    if not trainer.is_global_zero:
        return
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            _append_csv(Path(logger.log_dir) / TEXT_FILE, step, tag, text)
        elif is_wandb(logger):
            logger.log_text(key=tag, columns=["step", "text"], data=[[str(step), text]])
        elif is_mlflow(logger):
            logger.experiment.log_text(logger.run_id, text, f"{MLFLOW_TEXT}/{tag}/{step}.md")
        elif hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text(tag, text, global_step=step)


def flush(trainer: L.Trainer) -> None:
    """Put everything logged so far into the loggers' files, for the report at the end of fit.

    W&B keeps its records in memory until the run finishes, so its run is finished here (fit is over; a later
    ``trainer.test`` under W&B needs a new ``WandbLogger``).
    """
    for logger in trainer.loggers:
        if is_wandb(logger):
            logger.experiment.finish()
        else:
            logger.save()


def can_hold_text(logger: Logger) -> bool:
    """Whether ``log_text`` writes anything to ``logger``."""
    return (isinstance(logger, CSVLogger) or is_wandb(logger) or is_mlflow(logger)
            or hasattr(logger.experiment, "add_text"))


def is_wandb(logger: Logger) -> bool:
    return type(logger).__name__ == "WandbLogger"  # no import: wandb is an optional extra


def is_mlflow(logger: Logger) -> bool:
    return type(logger).__name__ == "MLFlowLogger"  # no import: mlflow is an optional extra


@contextmanager
def mlflow_file_store() -> Iterator[None]:
    """Let MLflow open a ``file:`` store while azgpt reads one a run already wrote (MLflow 3 refuses the file
    store unless MLFLOW_ALLOW_FILE_STORE=true, which that run was started with)."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def mlflow_client(tracking_uri: str) -> Any:
    """``mlflow.tracking.MlflowClient`` for ``tracking_uri`` (use it inside ``mlflow_file_store()`` for a ``file:``
    store), or an AzGPTError naming the pip command."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise AzGPTError("reading an MLflow run needs mlflow: pip install 'azgpt[mlflow]'") from None
    return MlflowClient(tracking_uri)


def _append_csv(path: Path, step: int, tag: str, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "tag", "text"])
        writer.writerow([step, tag, text])
