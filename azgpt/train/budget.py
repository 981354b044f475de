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
    """Tokens available and tokens a run consumes (max_steps x effective batch x block)."""

    train_tokens: int
    max_steps: int
    effective_batch: int  # sequences per optimizer step: micro-batch x accumulation x world size
    block_size: int
    parameters: int

    @property
    def consumed_tokens(self) -> int:
        return self.max_steps * self.effective_batch * self.block_size

    @property
    def epochs(self) -> float:
        return self.consumed_tokens / max(self.train_tokens, 1)

    @property
    def tokens_per_parameter(self) -> float:
        """Tokens consumed per parameter (compute-optimal training is about 20, Hoffmann et al. 2022)."""
        return self.consumed_tokens / max(self.parameters, 1)

    def lines(self) -> list[str]:
        return [f"train tokens: {self.train_tokens:,}",
                f"tokens this run consumes: {self.consumed_tokens:,} = {self.max_steps:,} steps x "
                f"{self.effective_batch} sequences x {self.block_size} tokens",
                f"epochs: {self.epochs:,.2f}",
                f"tokens per parameter: {self.tokens_per_parameter:,.1f} ({self.parameters:,} parameters; "
                f"about 20 is compute-optimal)"]

    def warning(self, above_epochs: float, remedy: str = "lower trainer.max_steps to about {steps:,}") -> str | None:
        """The warning above ``above_epochs``; ``remedy`` says how to run fewer steps (``{steps}`` filled in)."""
        if self.epochs <= above_epochs:
            return None
        steps = int(above_epochs * self.train_tokens / (self.effective_batch * self.block_size))
        return (f"DATA BUDGET: this run reads its {self.train_tokens:,} training tokens {self.epochs:,.0f} times "
                f"over (more than {above_epochs:g} epochs), so the model will memorise them rather than learn the "
                f"language: train on a bigger corpus (azgpt corpora lists real ones; data.corpus: [fineweb2-az] "
                f"with prepare's --max_bytes) or {remedy.format(steps=max(steps, 1))}")


def budget_of(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> DataBudget:
    """The budget of ``trainer.fit(pl_module, datamodule)``; the data module must be set up (``meta`` read)."""
    meta = getattr(datamodule, "meta", None) or {}
    train_tokens = (meta.get("splits") or {}).get("train", {}).get("tokens")
    if train_tokens is None:
        raise AzGPTError("the data module has no meta.json with train token counts: set it up first")
    return DataBudget(train_tokens=int(train_tokens), max_steps=max(trainer.max_steps, 0),
                      effective_batch=datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
                      block_size=datamodule.block_size,
                      parameters=sum(p.numel() for p in pl_module.parameters()))


class DataBudgetCheck(L.Callback):
    """Prints the data budget when ``fit`` starts, logs it to TensorBoard's Text tab, and warns above
    ``warn_above_epochs``.

    Args:
        warn_above_epochs: warn when the run would read its training tokens more times over than this.
    """

    def __init__(self, warn_above_epochs: float = 10.0) -> None:
        if warn_above_epochs <= 0:
            raise AzGPTError(f"DataBudgetCheck warn_above_epochs must be positive, got {warn_above_epochs}")
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
