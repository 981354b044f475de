"""Callbacks azgpt adds to Lightning's own: training speed with a closing summary, and text samples."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from azgpt.errors import AzGPTError
from azgpt.sampling import Generator, Sampling
from azgpt.train.loggers import can_hold_text, log_text
from azgpt.train.precision import measure_matmul_flops, precision_dtype, synchronize
from azgpt.train.time_budget import PROVISIONAL_STEPS
from azgpt.data.tokenizer import tokenizer_from_json
from azgpt.train.lightning_private import should_accumulate


class TrainingSpeed(L.Callback):
    """Logs ``tokens_per_sec``, ``tokens`` (trained so far) and, where the device's peak is known, ``mfu``
    once per logged optimizer step, and prints the run's wall time and throughput when training ends.

    Written here rather than using ``ThroughputMonitor`` because that one plots against micro-batches,
    not optimizer steps, so its curves do not line up with the loss under gradient accumulation.
    Time spent in validation is left out of the rate.

    The rate is measured over the optimizer steps between two logged steps (``trainer.log_every_n_steps``),
    so on CUDA it waits for the device only when it logs, never on the other steps.

    Args:
        peak_flops: the device's peak FLOP/s for ``mfu``. None: Lightning's datasheet figure where it knows
            the device (CUDA GPUs), else no ``mfu``; ``"measure"``: the best rate of 2048² matmuls in the
            training dtype, timed once when training starts (about a second on a CPU), as the benchmark
            ``bench/train_throughput.py`` does; 0: no ``mfu``.
    """

    def __init__(self, peak_flops: float | Literal["measure"] | None = None) -> None:
        if isinstance(peak_flops, str) and peak_flops != "measure":
            raise AzGPTError(f"TrainingSpeed peak_flops must be a number, measure or null, got {peak_flops!r}")
        self.peak_flops = peak_flops
        self._tokens = 0
        self._window_tokens = 0
        self._window_start = 0.0
        self._last_step_end = 0.0
        self._window_seconds = 0.0  # training time of the current window before a validation paused it
        self._train_seconds = 0.0
        self._fit_start = 0.0
        self._steps_at_start = 0
        self._flops_per_token = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device, dtype = trainer.strategy.root_device, precision_dtype(trainer.precision)
        if self.peak_flops is None:
            self.peak_flops = get_available_flops(device, dtype)
        elif self.peak_flops == "measure":
            self.peak_flops = measure_matmul_flops(device, dtype)
            rank_zero_info(f"azgpt: mfu is against a measured matmul peak of {self.peak_flops / 1e9:,.0f} GFLOP/s "
                           f"({str(dtype).removeprefix('torch.')}, {device.type})")
        model = getattr(pl_module, "model", None)
        self._flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0
        self._steps_at_start = trainer.global_step
        self._window_start = self._last_step_end = time.perf_counter()
        self._window_seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = batch[0].numel() * trainer.world_size
        self._tokens += tokens
        self._window_tokens += tokens
        if should_accumulate(trainer):
            return
        self._last_step_end = time.perf_counter()
        every = trainer.log_every_n_steps
        if not every or trainer.global_step % every != 0:
            return  # a step the logger will not write: measure nothing, wait for nothing
        synchronize(trainer.strategy.root_device)
        now = time.perf_counter()
        elapsed = self._window_seconds + now - self._window_start
        self._train_seconds += elapsed
        rate = self._window_tokens / max(elapsed, 1e-9)
        # Tokens trained so far (resumed runs included), for the report's tokens and epochs.
        metrics = {"tokens_per_sec": rate,
                   "tokens": float(trainer.global_step * tokens * trainer.accumulate_grad_batches)}
        if self.peak_flops and self._flops_per_token:
            metrics["mfu"] = rate * self._flops_per_token / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._window_tokens = 0
        self._window_seconds = 0.0
        self._window_start = now

    @staticmethod
    def _validating_within_training(trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validating_within_training(trainer):  # pause the clock; the last step ended just before
            self._window_seconds += max(0.0, self._last_step_end - self._window_start)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validating_within_training(trainer):
            self._window_start = self._last_step_end = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The steps after the last logged one (the time after them, e.g. a final checkpoint, is left out).
        self._train_seconds += self._window_seconds + max(0.0, self._last_step_end - self._window_start)
        steps = trainer.global_step - self._steps_at_start
        wall = time.perf_counter() - self._fit_start
        rate = self._tokens / max(self._train_seconds, 1e-9)
        line = (f"trained {steps} optimizer steps ({self._tokens:,} tokens) in {wall:.1f}s wall time, "
                f"{rate:,.0f} tokens/s while training")
        val_loss = trainer.callback_metrics.get("val_loss")
        if val_loss is not None:
            line += f"; last val_loss {float(val_loss):.4f}"
        rank_zero_info(line)


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting optimizer steps instead of micro-batches.

    Lightning's bar advances once per micro-batch, so under ``accumulate_grad_batches: 4`` a 150-step run
    shows 600. This one advances when an optimizer step completes and its total is the steps this epoch
    will take (the steps left to ``max_steps``, or the epoch's micro-batches divided by the accumulation).
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._steps_at_epoch_start = 0

    @property
    def total_train_batches(self) -> int | float:
        """Optimizer steps in this epoch (``inf`` for an endless loader without ``max_steps``)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        steps = batches if math.isinf(batches) else math.ceil(batches / trainer.accumulate_grad_batches)
        # A time budget's provisional step count (before its plan) is no total to show.
        if trainer.max_steps is not None and 0 < trainer.max_steps < PROVISIONAL_STEPS:
            return min(steps, trainer.max_steps - trainer.global_step)
        return steps

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._steps_at_epoch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if should_accumulate(trainer):
            return  # a micro-batch inside an accumulation window: no optimizer step yet
        super().on_train_batch_end(trainer, pl_module, outputs, batch,
                                   trainer.global_step - self._steps_at_epoch_start - 1)


DEFAULT_PROMPTS = ("Azərbaycan", "Bakı şəhəri", "Bir gün")


class TextSamples(L.Callback):
    """After each validation, continues a few fixed prompts and logs them as TensorBoard text.

    The same seed every time, so what changes between steps is the model, not the dice. Every rank generates
    (a sharded model needs all ranks for a forward pass) but only rank zero writes, to every logger that
    holds text (TensorBoard's Text tab, a W&B table, ``text.csv`` beside CSVLogger's metrics).

    Args:
        prompts: texts to continue, one TensorBoard tag each (``samples/0``, ``samples/1``, ...).
        max_new_tokens: tokens generated per prompt; keep it small, it runs at every validation.
        temperature: 0 for greedy decoding.
        top_k: sample among the k most likely tokens only (None: all).
        seed: seed of the sampling.
    """

    def __init__(self, prompts: list[str] | None = None, max_new_tokens: int = 48, temperature: float = 0.8,
                 top_k: int | None = 50, seed: int = 1337) -> None:
        self.prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise AzGPTError(f"TextSamples: prompts must be a list of non-empty strings, got {prompts!r}")
        self.sampling = Sampling(max_new_tokens, temperature, top_k)
        self.seed = seed
        self._tokenizer: tuple[str, Any] | None = None  # (json, Tokenizer), rebuilt only if the json changes

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        tokenizer_json = getattr(pl_module, "tokenizer_json", None)
        if not any(can_hold_text(logger) for logger in trainer.loggers) or tokenizer_json is None:
            return
        samples = self._generate(pl_module.model, tokenizer_json)
        for i, (prompt, continuation) in enumerate(zip(self.prompts, samples)):
            log_text(trainer, f"samples/{i}", f"**{_markdown(prompt)}**{_markdown(continuation)}")

    def _generate(self, model: torch.nn.Module, tokenizer_json: str) -> list[str]:
        if self._tokenizer is None or self._tokenizer[0] != tokenizer_json:
            self._tokenizer = (tokenizer_json, tokenizer_from_json(tokenizer_json))
        generator = Generator(model, self._tokenizer[1])
        was_training = model.training
        model.eval()
        try:
            return [generator.generate(prompt, max_new_tokens=self.sampling.max_new_tokens,
                                       temperature=self.sampling.temperature, top_k=self.sampling.top_k,
                                       seed=self.seed)
                    for prompt in self.prompts]
        finally:
            model.train(was_training)


def _markdown(text: str) -> str:
    """Plain text for TensorBoard's markdown: markup characters escaped, line breaks kept."""
    escaped = "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in text)
    return escaped.replace("\n", "  \n")
