"""Stop on SIGTERM / SIGINT at an optimizer-step boundary, with a checkpoint to resume from."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from azgpt.errors import TrainingInterrupted
from azgpt.train.lightning_private import forget_sigterm, should_accumulate

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What AzGPT logs per optimizer step (module.py), written by hand for the step a stop ends on.
STEP_METRICS = ("train_loss", "grad_norm")


class GracefulStop(L.Callback):
    """On SIGTERM or SIGINT, finish the optimizer step under way, save ``last.ckpt``, and raise
    ``TrainingInterrupted``.

    Written here because Lightning 2.6 stops a SIGTERM'd run after the current *micro*-batch, saves
    nothing and exits 0. The checkpoint goes to the ``ModelCheckpoint`` folder (else
    ``<log_dir>/checkpoints``) as ``last.ckpt``, where ``--ckpt_path last`` looks. A second SIGINT stops at
    once, without a checkpoint. SIGUSR1 (SLURM's requeue signal) is left to Lightning. Under DDP the ranks
    agree on the stop with one all-reduce of a flag per optimizer step.
    """

    def __init__(self) -> None:
        self._received: int | None = None
        self._previous: dict[int, Any] = {}
        self._announced = False

    # Installed at train start because Lightning sets its own SIGTERM handler just before training runs,
    # and that one would end the run after the current micro-batch.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = None
        self._announced = False
        if trainer.received_sigterm:  # arrived during setup, through Lightning's handler
            self._received = signal.SIGTERM
            forget_sigterm(trainer)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # No printing here: a signal can land inside a write to the same stream.
        if self._received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        if self._received is None:
            self._received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if should_accumulate(trainer):
            if self._received is not None and not self._announced:
                self._announced = True
                rank_zero_info(f"azgpt: received {signal.Signals(self._received).name}: finishing optimizer step "
                               f"{trainer.global_step + 1}, then saving a checkpoint and stopping "
                               f"(Ctrl-C again stops at once, without one)")
            return
        stop = self._received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self._log_final_step(trainer)
        path = str(self.checkpoint_path(trainer))
        trainer.save_checkpoint(path, False)  # False: the whole training state, not the weights alone
        raise TrainingInterrupted(self._received or signal.SIGTERM, trainer.global_step, path)

    @staticmethod
    def _log_final_step(trainer: L.Trainer) -> None:
        """Write the finished step's loss: Lightning logs a step's metrics only after this hook, so the stop
        raised here would leave the curve one point short of the checkpoint (and a resumed curve with a gap)."""
        metrics = {key: float(trainer.callback_metrics[key]) for key in STEP_METRICS if key in trainer.callback_metrics}
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step - 1)  # Lightning's step of the same point

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """``last.ckpt`` in the folder the run's ``ModelCheckpoint`` writes to (else ``<log_dir>/checkpoints``)."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folder = Path(callback.dirpath)
        else:
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return folder / f"last{ModelCheckpoint.FILE_EXTENSION}"

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
