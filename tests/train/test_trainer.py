"""build_trainer: the Trainer of the README's notebook example has azgpt's defaults, and they work there."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from azgpt import AzGPT, AzGPTDataModule, build_trainer
from azgpt.checkpoint import load_checkpoint_file
from azgpt.errors import TrainingInterrupted
from azgpt.train.callbacks import StepProgressBar
from azgpt.train.resume import AtomicCheckpointIO
from azgpt.train.signals import GracefulStop
from tests.conftest import TINY_BLOCK, TINY_VOCAB


def tiny_model() -> AzGPT:
    return AzGPT(vocab_size=TINY_VOCAB, block_size=TINY_BLOCK, n_layer=1, n_head=2, n_embd=32, warmup_steps=1)


def tiny_data(prepared_dir: Path) -> AzGPTDataModule:
    return AzGPTDataModule(data_dir=str(prepared_dir), vocab_size=TINY_VOCAB, block_size=TINY_BLOCK, batch_size=4,
                           val_max_blocks=4)


def test_defaults_are_added_and_the_callers_own_are_kept(tmp_path: Path) -> None:
    trainer = build_trainer(default_root_dir=tmp_path, logger=False, max_steps=1)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, GracefulStop) for c in trainer.callbacks)
    assert any(isinstance(c, StepProgressBar) for c in trainer.callbacks)
    assert trainer.precision == "32-true"  # conftest pins the CPU choice; 16-mixed on a CPU becomes it
    own_bar = TQDMProgressBar()
    trainer = build_trainer(default_root_dir=tmp_path, logger=False, callbacks=[own_bar], precision="16-mixed")
    bars = [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]
    assert bars == [own_bar] and trainer.precision == "32-true"
    quiet = build_trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    assert not any(isinstance(c, StepProgressBar) for c in quiet.callbacks)


class SignalAtStep(L.Callback):
    """Sends SIGTERM to this process in the middle of optimizer step ``step`` (after its first micro-batch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1 and batch_idx % trainer.accumulate_grad_batches == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_graceful_stop_and_atomic_saves_work_in_a_notebook_trainer(tmp_path: Path, prepared_dir: Path) -> None:
    folder = tmp_path / "checkpoints"
    trainer = build_trainer(default_root_dir=tmp_path, logger=False, max_steps=10, accumulate_grad_batches=2,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[ModelCheckpoint(dirpath=folder, save_last=True), SignalAtStep(3)])
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit(tiny_model(), datamodule=tiny_data(prepared_dir))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert trainer.global_step == 3  # the step under way was finished, not cut
    saved = load_checkpoint_file(folder / "last.ckpt")
    assert saved["global_step"] == 3 and "azgpt" in saved
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert signal.getsignal(signal.SIGTERM) is not GracefulStop._handle  # handlers restored


def test_the_readme_notebook_example_validates_a_run(trained_run: Path, prepared_dir: Path) -> None:
    """README's "From a notebook", as written there (with the tiny run's sizes): the numbers the run logged."""
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dm = AzGPTDataModule(data_dir=str(prepared_dir), vocab_size=TINY_VOCAB, block_size=TINY_BLOCK, batch_size=4,
                         val_max_blocks=13)
    model = AzGPT.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    (metrics,) = build_trainer(logger=False).validate(model, datamodule=dm)
    assert set(metrics) == {"val_loss", "val_ppl", "val_bpb"}
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)
    events = EventAccumulator(str(trained_run), size_guidance={"scalars": 0})
    events.Reload()
    # last.ckpt holds the weights of the run's last validation (step 6, the same 13 blocks)
    for tag in ("val_loss", "val_bpb"):
        assert metrics[tag] == pytest.approx(events.Scalars(tag)[-1].value, abs=1e-5), tag
