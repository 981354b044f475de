"""The data budget of a run, stated before it trains: how many tokens it has, how many it will consume, and
how many times over that reads the corpus. A small corpus under a big recipe overfits silently otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from azgpt.errors import AzGPTError


@dataclass(frozen=True)
class DataBudget:
    """Tokens available and tokens the steps still to run consume (steps x effective batch x block).

    A fine-tune (``train_conversations`` given) draws whole conversations, not full blocks: its budget counts
    conversations drawn against the training conversations, and its tokens are the response tokens learned from.
    A resumed run (``start_step``) budgets only the steps it has left.
    """

    train_tokens: int
    max_steps: int
    effective_batch: int  # sequences per optimizer step: micro-batch x accumulation x world size
    block_size: int
    parameters: int
    start_step: int = 0
    train_conversations: int | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps this run still takes."""
        return max(self.max_steps - self.start_step, 0)

    @property
    def units(self) -> int:
        """What one pass over the training data holds: conversations for a fine-tune, else tokens."""
        return self.train_conversations if self.train_conversations is not None else self.train_tokens

    @property
    def units_per_step(self) -> int:
        return self.effective_batch * (1 if self.train_conversations is not None else self.block_size)

    @property
    def epochs(self) -> float:
        return self.steps * self.units_per_step / max(self.units, 1)

    @property
    def consumed_tokens(self) -> int:
        if self.train_conversations is not None:
            return round(self.epochs * self.train_tokens)
        return self.steps * self.effective_batch * self.block_size

    @property
    def tokens_per_parameter(self) -> float:
        """Tokens consumed per parameter (compute-optimal training is about 20, Hoffmann et al. 2022)."""
        return self.consumed_tokens / max(self.parameters, 1)

    def lines(self) -> list[str]:
        steps = f"{self.steps:,} steps" + (f" (from step {self.start_step:,} to {self.max_steps:,})"
                                            if self.start_step else "")
        if self.train_conversations is not None:
            head = [f"train conversations: {self.train_conversations:,} ({self.train_tokens:,} response tokens)",
                    f"conversations this run draws: {self.steps * self.effective_batch:,} = {steps} x "
                    f"{self.effective_batch} conversations",
                    f"passes over the conversations: {self.epochs:,.2f}"]
        else:
            head = [f"train tokens: {self.train_tokens:,}",
                    f"tokens this run consumes: {self.consumed_tokens:,} = {steps} x "
                    f"{self.effective_batch} sequences x {self.block_size} tokens",
                    f"epochs: {self.epochs:,.2f}"]
        return head + [f"tokens per parameter: {self.tokens_per_parameter:,.1f} ({self.parameters:,} parameters; "
                       f"about 20 is compute-optimal)"]

    def warning(self, above_epochs: float, remedy: str = "lower trainer.max_steps to about {steps:,}") -> str | None:
        """The warning above ``above_epochs``; ``remedy`` says how to run fewer steps (``{steps}`` filled in)."""
        if self.epochs <= above_epochs:
            return None
        steps = self.start_step + max(int(above_epochs * self.units / self.units_per_step), 1)
        times = f"{self.epochs:,.0f}" if self.epochs >= 10 else f"{self.epochs:.1f}"
        limit = f"more than {above_epochs:g} epoch{'' if above_epochs == 1 else 's'}"
        if self.train_conversations is not None:
            return (f"DATA BUDGET: this fine-tune draws its {self.train_conversations:,} training conversations "
                    f"{times} times over ({limit}), so the model will memorise their replies: fine-tune on more "
                    f"conversations (data.files: more .jsonl) or {remedy.format(steps=steps)}")
        return (f"DATA BUDGET: this run reads its {self.train_tokens:,} training tokens {times} times "
                f"over ({limit}), so the model will memorise them rather than learn the "
                f"language: train on a bigger corpus (azgpt corpora lists real ones; data.corpus: [fineweb2-az] "
                f"with prepare's --max_bytes) or {remedy.format(steps=steps)}")


def budget_of(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> DataBudget:
    """The budget of ``trainer.fit(pl_module, datamodule)`` from its current step on; the data module must be
    set up (``meta`` read)."""
    meta = getattr(datamodule, "meta", None) or {}
    train = (meta.get("splits") or {}).get("train", {})
    if train.get("tokens") is None:
        raise AzGPTError("the data module has no meta.json with train token counts: set it up first")
    conversations = train.get("conversations")
    return DataBudget(train_tokens=int(train["tokens"]), max_steps=max(trainer.max_steps, 0),
                      effective_batch=datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
                      block_size=datamodule.block_size,
                      parameters=sum(p.numel() for p in pl_module.parameters()),
                      start_step=trainer.global_step,
                      train_conversations=None if conversations is None else int(conversations))


class DataBudgetCheck(L.Callback):
    """Prints the data budget when ``fit`` starts, logs it to TensorBoard's Text tab, and warns above
    ``warn_above_epochs``.

    Args:
        warn_above_epochs: warn when the run would read its training tokens more times over than this.
    """

    def __init__(self, warn_above_epochs: float = 10.0) -> None:
        if not warn_above_epochs > 0:  # also refuses NaN, which every comparison lets through
            raise AzGPTError(f"DataBudgetCheck warn_above_epochs must be a positive number of epochs, got "
                             f"{warn_above_epochs}")
        self.warn_above_epochs = warn_above_epochs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not any(getattr(callback, "plans_steps", False) for callback in trainer.callbacks):
            self.state(trainer, pl_module)  # else the time budget states it with its plan

    def state(self, trainer: L.Trainer, pl_module: L.LightningModule,
              remedy: str = "lower trainer.max_steps to about {steps:,}") -> None:
        """Print the budget of ``trainer.max_steps``, log it as text, warn above ``warn_above_epochs``."""
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "meta", None) or trainer.max_steps <= 0:
            return  # not azgpt's data module, or no step limit to budget
        budget = budget_of(trainer, pl_module, datamodule)
        rank_zero_info("azgpt: data budget: " + "; ".join(budget.lines()))
        warning = budget.warning(self.warn_above_epochs, remedy)
        if warning:
            rank_zero_warn(warning)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                text = "\n".join(f"- {line}" for line in budget.lines()) + (f"\n\n**{warning}**" if warning else "")
                logger.experiment.add_text("data_budget", text, global_step=trainer.global_step)
