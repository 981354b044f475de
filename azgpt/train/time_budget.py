"""Train for the time you have: ``--budget 30min`` instead of a step count.

``TimeBudget`` measures the real time of an optimizer step over the first steps (after a couple of warm-up
steps) and the real cost of a validation (with its checkpoint writes and text samples), sets
``trainer.max_steps`` to the step count that ends on time, states that plan with the data budget, and re-plans
whenever the measured speed moves the predicted end by more than ``tolerance`` of the budget. The last planned
step is always followed by a validation, so the final metrics are the fully cooled-down model's.

The budget counts training time: from the first step to the last, validations and checkpoints included; data
preparation and start-up before it, and the final checkpoint and report after it, are not counted. The plan
lives in the checkpoint (this callback's state): a resumed run keeps it, counting the time the checkpoint
had already spent, and re-plans by the same rule if it then runs faster or slower.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from statistics import fmean, median
from time import monotonic
from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

from azgpt.errors import AzGPTError
from azgpt.train.budget import DataBudgetCheck
from azgpt.train.loggers import log_text

log = logging.getLogger(__name__)
PROVISIONAL_STEPS = 10**9  # max_steps until the first plan: far enough that a schedule reading it stays flat
_UNITS = {"h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|min|m|s)")


def parse_budget(text: str | float | int) -> float:
    """Seconds in a budget such as ``30min``, ``90s``, ``1.5h`` or ``1h30min``; a one-line error otherwise."""
    spec = str(text).strip().lower()
    parts = list(_PART.finditer(spec))
    covered = "".join(match.group(0) for match in parts)
    if not parts or re.sub(r"\s+", "", covered) != re.sub(r"\s+", "", spec):
        raise AzGPTError(f"--budget: {text!r} is not a duration; write a number and a unit (h, min, s), "
                         f"e.g. 30min, 90s, 1.5h or 1h30min")
    seconds = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in parts)
    if seconds <= 0:
        raise AzGPTError(f"--budget must be longer than zero, got {text!r}")
    return seconds


def _monotonic() -> float:
    return monotonic()  # the module's name, looked up at each call, so tests can replace it with a fake clock


def format_duration(seconds: float) -> str:
    """``seconds`` as minutes (or seconds under two minutes), for messages."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def validations_between(done: int, total: int, every: int | None) -> int:
    """Validations after optimizer step ``done`` up to ``total``: at multiples of ``every`` and at ``total``."""
    if total <= done:
        return 0
    periodic = total // every - done // every if every else 0
    return periodic + (0 if every and total % every == 0 else 1)


def plan_steps(budget_s: float, elapsed_s: float, step: int, step_s: float, validation_s: float,
               every: int | None, pending: bool = False) -> int:
    """The last optimizer step whose end, with the validations up to it, falls within ``budget_s``.

    ``step`` optimizer steps are done at ``elapsed_s``; each further step takes ``step_s`` and each validation
    (every ``every`` steps, and one after the last step) ``validation_s``; ``pending``: the validation after
    ``step`` itself has not run yet. Returns ``step`` when not even one more step fits.
    """
    def cost(total: int) -> float:
        validations = validations_between(step, total, every) + pending
        return elapsed_s + (total - step) * step_s + validations * validation_s

    per_step = step_s + (validation_s / every if every else 0.0)
    total = step + max(0, int((budget_s - elapsed_s - (1 + pending) * validation_s) / max(per_step, 1e-9)))
    while total > step and cost(total) > budget_s:
        total -= 1
    while cost(total + 1) <= budget_s:
        total += 1
    return total


class TimeBudget(L.Callback):
    """Sets ``trainer.max_steps`` so that training ends when ``budget`` has passed (see the module docstring).

    Args:
        budget: the training time, e.g. ``30min``, ``90s``, ``1.5h``, ``1h30min`` (or a number of seconds).
        skip_steps: optimizer steps not measured after training starts or resumes (allocator and thread warm-up).
        measure_steps: optimizer steps measured before the first plan.
        tolerance: re-plan when the predicted end moves by more than this fraction of the budget.
        window: the step time is the mean of the last ``window`` measured steps.
        clock: seconds from a monotonic clock (tests pass a fake one).
    """

    plans_steps = True  # DataBudgetCheck leaves the data budget to the plan

    def __init__(self, budget: str | float, skip_steps: int = 2, measure_steps: int = 8, tolerance: float = 0.02,
                 window: int = 10, clock: Callable[[], float] | None = None) -> None:
        self.budget = budget
        self.budget_s = parse_budget(budget)
        if skip_steps < 0 or measure_steps < 1 or not 0 < tolerance < 1 or window < 1:
            raise AzGPTError("TimeBudget: need skip_steps >= 0, measure_steps >= 1, 0 < tolerance < 1, window >= 1")
        self.skip_steps, self.measure_steps, self.tolerance = skip_steps, measure_steps, tolerance
        self._clock = clock or _monotonic
        self._step_times: deque[float] = deque(maxlen=window)
        self._validation_times: deque[float] = deque(maxlen=3)
        self.total_steps: int | None = None  # the plan
        self.step_s = 0.0
        self.validation_s = 0.0
        self.validation_measured = False
        self._offset = 0.0  # training time spent before this process started (a resumed run)
        self._start: float | None = None
        self._mark = 0.0  # clock at the end of the last optimizer step (or at the start)
        self._last_step = -1
        self._steps_here = 0
        self._validated = False
        self._restored: dict[str, Any] | None = None
        self._announced = 0  # the step count last announced on the console

    # -- time --------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Training time spent so far, resumed runs included."""
        return self._offset + (self._clock() - self._start if self._start is not None else 0.0)

    # -- checkpoint: the plan travels with the run -----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "elapsed_s": self.elapsed(), "total_steps": self.total_steps,
                "step_s": self.step_s, "validation_s": self.validation_s,
                "validation_measured": self.validation_measured}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # -- hooks ---------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if 0 < trainer.max_steps != PROVISIONAL_STEPS:
            rank_zero_info(f"azgpt: budget {self.budget}: the budget sets the step count "
                           f"(trainer.max_steps {trainer.max_steps} is not used)")
        trainer.fit_loop.epoch_loop.max_steps = PROVISIONAL_STEPS

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._mark = self._clock()
        self._last_step, self._steps_here = trainer.global_step, 0
        restored, self._restored = self._restored, None
        if not restored:
            return
        self._offset = float(restored.get("elapsed_s", 0.0))
        self.step_s = float(restored.get("step_s") or 0.0)
        self.validation_s = float(restored.get("validation_s") or 0.0)
        self.validation_measured = bool(restored.get("validation_measured"))
        saved_total = restored.get("total_steps")
        spent = f"{format_duration(self._offset)} of the budget already spent"
        if saved_total is None:
            rank_zero_info(f"azgpt: budget {self.budget}: resumed at step {trainer.global_step} with {spent}, "
                           f"before the first plan: measuring the speed as a new run does")
        elif abs(float(restored.get("budget_s", self.budget_s)) - self.budget_s) < 1e-6:
            self._set_total(trainer, int(saved_total))
            self._announced = self.total_steps
            rank_zero_info(f"azgpt: budget {self.budget}: resumed at step {trainer.global_step} with {spent}; "
                           f"keeping the checkpoint's plan of {self.total_steps:,} steps (re-planned only if the "
                           f"measured speed moves the end by more than {self.tolerance:.0%} of the budget)")
        else:
            was = format_duration(float(restored["budget_s"]))
            self._set_total(trainer, self._plan(trainer))
            self._announced = self.total_steps
            rank_zero_info(f"azgpt: budget {self.budget}: resumed at step {trainer.global_step} with {spent} of "
                           f"a {was} budget: re-planned to {self.total_steps:,} steps from the checkpoint's "
                           f"measured speed")
        if self.total_steps is not None and self.total_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # a micro-batch inside an accumulation window: no optimizer step yet
        self._last_step = step
        now = self._clock()
        took, self._mark = now - self._mark, now
        self._steps_here += 1
        if self._validated:  # this interval holds a validation (and its checkpoints and samples) too
            self._validated = False
            if self._step_times:  # minus the step's own time: the latest steps' (the speed may be changing)
                self._validation_times.append(max(0.0, took - median(list(self._step_times)[-3:])))
                self.validation_s, self.validation_measured = fmean(self._validation_times), True
        elif self._steps_here > self.skip_steps:
            self._step_times.append(took)
        if self._step_times and len(self._step_times) >= min(self.measure_steps, self._step_times.maxlen or 1):
            self.step_s = fmean(self._step_times)
        total = self._decide(trainer, pl_module, step, took)
        if trainer.world_size > 1:  # every rank's clock differs: rank zero decides for all
            total = trainer.strategy.broadcast(total, src=0)
        if total != self.total_steps:
            self._set_total(trainer, total)
        if self.total_steps is not None and step >= self.total_steps:
            trainer.should_stop = True  # also makes Lightning validate after this last step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        spent = self.elapsed()
        rank_zero_info(f"azgpt: budget {self.budget}: trained to step {trainer.global_step:,} in "
                       f"{format_duration(spent)} of training time ({spent / self.budget_s:.1%} of the budget)")

    # -- planning ----------------------------------------------------------------------------------------

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, took: float) -> int | None:
        """The step count this rank would plan now (None: still measuring); ``took``: the last step's time."""
        if self.total_steps is None:
            # A slow machine or a short budget: plan from fewer steps rather than spend a quarter of the budget.
            early = bool(self._step_times) and self.elapsed() >= 0.25 * self.budget_s
            if len(self._step_times) >= self.measure_steps or early:
                self.step_s = fmean(self._step_times)
                total = self._plan(trainer)
                self._announce(trainer, pl_module, total)
                self._announced = total
                return total
            # Not one measured step yet: stop before a step that would end past the budget.
            return step if self.elapsed() + took > self.budget_s else None
        if not self.step_s or step >= self.total_steps:
            return self.total_steps  # nothing measured yet, or done: a longer plan now would raise the rate again
        every, validation_s = self._validation_every(trainer), self._validation_cost(trainer)
        validations = validations_between(step, self.total_steps, every) + self._pending(step, every)
        predicted = self.elapsed() + (self.total_steps - step) * self.step_s + validations * validation_s
        # Early by less than a step and a validation is as close as a plan gets: no re-plan for that.
        early_by = max(self.tolerance * self.budget_s, self.step_s + validation_s)
        if self.budget_s - early_by <= predicted <= self.budget_s * (1 + self.tolerance):
            return self.total_steps
        total = self._plan(trainer)
        if total != self.total_steps:
            line = (f"azgpt: budget {self.budget}: at step {step:,} ({format_duration(self.elapsed())} spent) a "
                    f"step takes {self.step_s:.3g} s and a validation {self._validation_cost(trainer):.3g} s, so "
                    f"{self.total_steps:,} steps would end at {format_duration(predicted)}: re-planned to "
                    f"{total:,} steps")
            # Small corrections are frequent on a busy machine: the console hears of changes of 5% or more.
            if abs(total - self._announced) >= 0.05 * self._announced:
                self._announced = total
                rank_zero_info(line)
            else:
                log.debug(line)
        return total

    def _plan(self, trainer: L.Trainer) -> int:
        step = trainer.global_step
        every = self._validation_every(trainer)
        total = plan_steps(self.budget_s, self.elapsed(), step, self.step_s or 1e-9,
                           self._validation_cost(trainer), every, self._pending(step, every))
        # Past the budget already: stop now; otherwise at least one more step, whose rate _set_total applies.
        return step if self.elapsed() >= self.budget_s else max(total, step + 1)

    @staticmethod
    def _pending(step: int, every: int | None) -> bool:
        """Whether Lightning validates after ``step``, which has just ended (the plan is made before that)."""
        return bool(every) and step > 0 and step % every == 0

    def _validation_cost(self, trainer: L.Trainer) -> float:
        """Measured, or before the first validation: its forward passes at a third of a training micro-batch."""
        if self.validation_measured:
            return self.validation_s
        batches = sum(n for n in trainer.num_val_batches if n != float("inf")) if trainer.num_val_batches else 0
        return batches * self.step_s / (3 * max(trainer.accumulate_grad_batches, 1))

    @staticmethod
    def _validation_every(trainer: L.Trainer) -> int | None:
        """Optimizer steps between validations when they are counted in steps (azgpt's val_every_n_steps)."""
        interval = trainer.val_check_interval
        if isinstance(interval, int) and trainer.check_val_every_n_epoch is None and trainer.enable_validation:
            return max(1, interval // max(trainer.accumulate_grad_batches, 1))
        return None

    def _set_total(self, trainer: L.Trainer, total: int) -> None:
        """Make ``total`` the plan: max_steps, the learning rate of the next step, and the progress bar."""
        self.total_steps = total
        trainer.fit_loop.epoch_loop.max_steps = total
        # The scheduler already set the next step's rate from the old plan; apply the new one at once, so the
        # last step is at the schedule's floor even when a re-plan makes the next step the last.
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR):
                for group, base, rate in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                             scheduler.lr_lambdas):
                    group["lr"] = base * rate(scheduler.last_epoch)
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar):
            try:
                progress = bar.train_progress_bar
            except TypeError:  # not shown yet
                return
            progress.total = progress.n + total - trainer.global_step  # StepProgressBar counts optimizer steps
            progress.refresh()

    def _announce(self, trainer: L.Trainer, pl_module: L.LightningModule, total: int) -> None:
        step, every, validation_s = trainer.global_step, self._validation_every(trainer), self._validation_cost(trainer)
        validation = (f"{validation_s:.3g} s per validation (measured)" if self.validation_measured else
                      f"about {validation_s:.3g} s per validation (an estimate until the first "
                      f"one{f', at step {every}' if every else ''})")
        validations = validations_between(step, total, every) + self._pending(step, every)
        remaining = (total - step) * self.step_s + validations * validation_s
        hparams = pl_module.hparams
        schedule = hparams.get("lr_schedule")
        if schedule == "wsd":
            stable = total - max(1, round(hparams.get("cooldown_fraction", 0.2) * total))
            schedule += f" (at its peak until step {stable:,}, then down to its floor at step {total:,})"
        line = (f"azgpt: budget {self.budget}: {self.step_s:.3g} s per optimizer step (measured over "
                f"{len(self._step_times)} steps) and {validation}: planning {total:,} optimizer steps, ending in "
                f"about {format_duration(remaining)} ({format_duration(self.elapsed())} spent); "
                f"learning rate {schedule or 'as configured'}; re-planned if the speed changes")
        rank_zero_info(line)
        log_text(trainer, "budget/plan", line.removeprefix("azgpt: "))
        trainer.fit_loop.epoch_loop.max_steps = total  # the data budget reads the planned steps
        for check in trainer.callbacks:
            if isinstance(check, DataBudgetCheck):
                check.state(trainer, pl_module, remedy="shorten --budget (to about {steps:,} steps)")
