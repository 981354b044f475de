"""The time budget (--budget): parsing, planning, the warmup-stable-decay schedule, and resume, on a fake clock.

No test here measures real time: ``budget_helpers.Ticker`` advances a fake clock by 1 s per micro-batch and 3 s
per validation, so every plan is known in advance (4 micro-batches a step: 4 s a step, a validation every 2 steps).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import budget_helpers
from azgpt.cli import main
from azgpt.data.prepare import PrepareConfig, prepare
from azgpt.errors import AzGPTError
from azgpt.train import time_budget
from azgpt.train.module import warmup_cosine, warmup_stable_decay
from azgpt.train.time_budget import PROVISIONAL_STEPS, parse_budget, plan_steps
from budget_helpers import read_rates
from resume_helpers import read_final, read_losses, write_config

pytestmark = pytest.mark.filterwarnings("ignore")

LR, FLOOR = 3e-3, 0.1  # resume_helpers' learning_rate and the default min_lr_ratio
# 304 s, 4 s a step, 3 s a validation every 2 steps and one after the last: 55 steps end at 55*4 + 28*3 = 304 s
# (the 28th validation is the closing one: 55 is odd); a 56th would end at 224 + 28*3 = 308 s.
BUDGET, BUDGET_S, PLANNED_STEPS, PLANNED_END = "5min4s", 304.0, 55, 304.0


# --------------------------------------------------------------------------- parsing and arithmetic

@pytest.mark.parametrize("text, seconds", [("30min", 1800), ("90s", 90), ("1.5h", 5400), ("1h30min", 5400),
                                           ("45m", 2700), (" 3 min ", 180), ("5min4s", 304)])
def test_budget_spellings(text: str, seconds: float) -> None:
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["30", "30 minutes", "abc", "0s", "-5min", "1h30", "min", ""])
def test_bad_budget_is_one_line_naming_the_option(text: str) -> None:
    with pytest.raises(AzGPTError) as raised:
        parse_budget(text)
    message = str(raised.value)
    assert "--budget" in message and "\n" not in message


def test_plan_counts_steps_and_validations() -> None:
    # 10 steps done at 10 s; 1 s a step, 5 s a validation every 10 steps: 70 steps end at 10 + 60 + 6*5 = 100 s.
    assert plan_steps(100, 10, 10, 1.0, 5.0, every=10) == 70
    # A 71st would add a step and a closing validation (71 is no multiple of 10): 106 s.
    assert plan_steps(105.9, 10, 10, 1.0, 5.0, every=10) == 70
    # Validations not counted in steps: only the closing one.
    assert plan_steps(100, 10, 10, 1.0, 5.0, every=None) == 95
    assert plan_steps(100, 99, 10, 1.0, 5.0, every=None) == 10  # not even one more step fits
    # Step 10's own validation has not run yet when the plan is made after it: 5 s less, one step fewer.
    assert plan_steps(100, 10, 10, 1.0, 5.0, every=10, pending=True) == 65


def test_warmup_stable_decay_ends_at_its_floor() -> None:
    total, warmup = 100, 10
    rates = [warmup_stable_decay(s, warmup, total, 0.2, FLOOR) for s in range(total)]
    assert rates[0] == pytest.approx(0.1) and rates[warmup - 1] == 1.0
    assert all(rate == 1.0 for rate in rates[warmup:80])  # stable until the last 20%
    assert rates[-1] == pytest.approx(FLOOR)  # the last optimizer step (scheduler step total - 1)
    assert all(a > b for a, b in zip(rates[79:], rates[80:]))  # strictly down through the cooldown
    assert rates[89] == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)  # linear: halfway down at its middle
    sqrt_rate = warmup_stable_decay(89, warmup, total, 0.2, FLOOR, "1-sqrt")
    assert sqrt_rate == pytest.approx(FLOOR + (1 - FLOOR) * (1 - math.sqrt(0.5)))
    # The cosine a step-count run uses is unchanged.
    cosine = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * 40 / 90))
    assert warmup_cosine(50, 10, 100, FLOOR) == pytest.approx(cosine)


# --------------------------------------------------------------------------- a budgeted fit on the fake clock

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(PrepareConfig(out=out, vocab_size=300, block_size=32, val_fraction=0.1))
    return out


def budget_config(run: Path, data_dir: Path) -> Path:
    return write_config(run, data_dir, every_step_checkpoint=True, extra_callbacks=[
        {"class_path": "budget_helpers.Ticker", "init_args": {"micro_batch_s": 1.0, "validation_s": 3.0}},
        {"class_path": "budget_helpers.LRRecorder", "init_args": {"path": str(run / "rates.txt")}}])


def fit_on_fake_clock(monkeypatch, config: Path, *args: str) -> int:
    budget_helpers.CLOCK.now = 0.0
    monkeypatch.setattr(time_budget, "monotonic", budget_helpers.CLOCK)
    return main(["fit", "--config", str(config), "--budget", BUDGET, "--model.decay_steps", "null", *args])


def budget_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint, weights_only=True)["callbacks"]["TimeBudget"]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, data_dir) -> tuple[Path, str]:
    """A fit with --budget 5min4s on the fake clock, every step checkpointed; returns the run and its log."""
    run = tmp_path_factory.mktemp("budget")
    monkeypatch = pytest.MonkeyPatch()
    handler_records: list[str] = []

    import logging

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            handler_records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        assert fit_on_fake_clock(monkeypatch, budget_config(run, data_dir)) == 0
    finally:
        logger.removeHandler(handler)
        monkeypatch.undo()
    return run, "\n".join(handler_records)


@pytest.mark.slow
def test_budget_plans_the_steps_that_end_on_time(budget_run) -> None:
    run, log = budget_run
    assert f"planning {PLANNED_STEPS} optimizer steps" in log
    assert "4 s per optimizer step" in log and "3 s per validation (measured)" in log
    assert f"to {PLANNED_STEPS}) x 16 sequences x 32 tokens" in log  # the data budget of the planned steps left
    assert "re-planned to" not in log  # a steady clock never drifts
    assert f"{PROVISIONAL_STEPS:,} steps" not in log  # no data budget for the step count before the plan
    assert sorted(read_losses(run)) == list(range(1, PLANNED_STEPS + 1))
    last = next(run.glob("lightning_logs/*/checkpoints/last.ckpt"))
    state = budget_state(last)
    # elapsed_s counts the closing validation after step 55, which no periodic one would have given.
    assert state["total_steps"] == PLANNED_STEPS and state["elapsed_s"] == PLANNED_END <= BUDGET_S
    assert torch.load(last, weights_only=True)["hyper_parameters"]["lr_schedule"] == "wsd"


@pytest.mark.slow
def test_learning_rate_is_at_its_floor_on_the_last_step(budget_run) -> None:
    run, _ = budget_run
    rates = read_rates(run / "rates.txt")
    assert sorted(rates) == list(range(1, PLANNED_STEPS + 1))
    assert rates[PLANNED_STEPS] == pytest.approx(LR * FLOOR)
    cooldown_start = PLANNED_STEPS - round(0.2 * PLANNED_STEPS)  # 44: the last step at the peak
    assert all(rates[s] == pytest.approx(LR) for s in range(3, cooldown_start + 1))
    assert all(rates[s] > rates[s + 1] for s in range(cooldown_start, PLANNED_STEPS))


@pytest.mark.slow
def test_resume_mid_budget_keeps_the_plan(budget_run, data_dir, tmp_path, monkeypatch, caplog) -> None:
    """Resumed from step 31 (after the plan, before the cooldown) on a fresh clock: the same plan, and every
    later step's loss, learning rate and the final weights bitwise the uninterrupted run's."""
    reference, _ = budget_run
    checkpoint = next(reference.glob("lightning_logs/*/checkpoints/every-step=31.ckpt"))
    assert budget_state(checkpoint)["total_steps"] == PLANNED_STEPS
    resumed = tmp_path / "resumed"
    with caplog.at_level("INFO"):
        assert fit_on_fake_clock(monkeypatch, budget_config(resumed, data_dir), "--ckpt_path", str(checkpoint)) == 0
    assert f"keeping the checkpoint's plan of {PLANNED_STEPS} steps" in caplog.text
    assert "planning" not in caplog.text and "re-planned to" not in caplog.text
    losses, expected = read_losses(resumed), read_losses(reference)
    assert sorted(losses) == list(range(32, PLANNED_STEPS + 1))
    for step, loss in losses.items():
        assert torch.equal(loss, expected[step]), f"loss of step {step} differs after resume"
    rates, expected_rates = read_rates(resumed / "rates.txt"), read_rates(reference / "rates.txt")
    assert all(rates[s] == expected_rates[s] for s in rates)
    final, want = read_final(resumed), read_final(reference)
    assert final["global_step"] == want["global_step"] == PLANNED_STEPS
    for name, value in want["model"].items():
        assert torch.equal(final["model"][name], value), f"weight {name} differs after resume"
    # The budget kept counting from the checkpoint's 169 s (31 steps and 15 validations), not from zero.
    assert budget_state(checkpoint)["elapsed_s"] == 31 * 4 + 15 * 3
    last = next(resumed.glob("lightning_logs/*/checkpoints/last.ckpt"))
    assert budget_state(last)["elapsed_s"] == PLANNED_END


@pytest.mark.slow
def test_budget_re_plans_when_the_machine_slows_down(data_dir, tmp_path, monkeypatch, caplog) -> None:
    """From step 30 every step takes twice as long (another program started): azgpt says it re-plans, still ends
    within the budget, and the learning rate still reaches its floor on the new last step."""
    run = tmp_path / "slow"
    config = write_config(run, data_dir, extra_callbacks=[
        {"class_path": "budget_helpers.Ticker",
         "init_args": {"micro_batch_s": 1.0, "validation_s": 3.0, "slow_from_step": 30, "slow_factor": 2.0}},
        {"class_path": "budget_helpers.LRRecorder", "init_args": {"path": str(run / "rates.txt")}}])
    with caplog.at_level("INFO"):
        assert fit_on_fake_clock(monkeypatch, config) == 0
    assert f"planning {PLANNED_STEPS} optimizer steps" in caplog.text and "re-planned to" in caplog.text
    last_step = max(read_losses(run))
    # The slower steps leave time for 45 steps at most (step 45 ends at 29*4 + 16*8 + 23*3 = 313 s, 44 at 302 s).
    assert 40 <= last_step <= 45
    state = budget_state(next(run.glob("lightning_logs/*/checkpoints/last.ckpt")))
    # The measured mean lags behind the change, so the end may miss by up to the re-planning tolerance (2%).
    assert state["total_steps"] == last_step and abs(state["elapsed_s"] - BUDGET_S) <= 0.02 * BUDGET_S
    rates = read_rates(run / "rates.txt")
    assert rates[last_step] == pytest.approx(LR * FLOOR)


@pytest.mark.slow
def test_a_short_budget_plans_from_fewer_steps(data_dir, tmp_path, monkeypatch, caplog) -> None:
    """40 s at 4 s a step: once a quarter of the budget is spent azgpt plans from the steps it has measured (one,
    step 4, at 19 s) instead of the usual 8, so the run still ends on time with its learning rate at the floor."""
    run = tmp_path / "short"
    config = budget_config(run, data_dir)
    with caplog.at_level("INFO"):
        assert fit_on_fake_clock(monkeypatch, config, "--budget", "40s") == 0
    # The first plan guesses a validation at 0.67 s (2 forward batches at a third of a 4-micro-batch step's 4 s):
    # 8 steps. The one after step 4 takes 3 s, so at step 5 it re-plans: steps 5-7 and the validations after steps
    # 4, 6 and 7 end at exactly 19 + 12 + 9 = 40 s; step 8 would end at 44 s.
    assert "measured over 1 steps" in caplog.text and "planning 8 optimizer steps" in caplog.text
    assert "re-planned to 7 steps" in caplog.text
    assert max(read_losses(run)) == 7
    assert read_rates(run / "rates.txt")[7] == pytest.approx(LR * FLOOR)
    assert budget_state(next(run.glob("lightning_logs/*/checkpoints/last.ckpt")))["elapsed_s"] == 40.0


def test_a_plan_made_on_a_validation_step_counts_that_validation() -> None:
    """Lightning validates after step 10 only once the callbacks' step-end hooks (where the plan is made) ran."""
    from types import SimpleNamespace

    from azgpt.train.time_budget import TimeBudget

    budget = TimeBudget("100s", clock=lambda: 10.0)
    budget._start, budget.step_s, budget.validation_s, budget.validation_measured = 0.0, 1.0, 5.0, True
    trainer = SimpleNamespace(global_step=10, val_check_interval=40, check_val_every_n_epoch=None,
                              enable_validation=True, accumulate_grad_batches=4)
    assert budget._plan(trainer) == 65  # as plan_steps(..., pending=True); 70 if step 10's validation were done


def test_a_new_plan_sets_the_next_steps_rate_at_once() -> None:
    """The scheduler has already set the next step's rate from the old plan when a re-plan happens: the new plan
    applies it again, so a re-plan that makes the next step the last still gives it the floor rate."""
    from types import SimpleNamespace

    from torch.optim.lr_scheduler import LambdaLR

    from azgpt.train.time_budget import TimeBudget

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=100)), global_step=9,
                              progress_bar_callback=None, accumulate_grad_batches=1)
    scheduler = LambdaLR(optimizer, lambda s: warmup_stable_decay(s, 2, trainer.fit_loop.epoch_loop.max_steps,
                                                                  0.2, FLOOR))
    trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=scheduler)]
    for _ in range(9):  # 9 steps done: the rate of step 10 is set, at the peak of a 100-step plan
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR)
    TimeBudget("1min")._set_total(trainer, 10)
    assert trainer.fit_loop.epoch_loop.max_steps == 10
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * FLOOR)


def test_budget_errors_are_one_line_naming_the_option(data_dir, tmp_path, capsys) -> None:
    config = write_config(tmp_path / "run", data_dir)
    assert main(["fit", "--config", str(config), "--budget", "30 minutes"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--budget" in err and "30 minutes" in err and len(err.splitlines()) == 1
    assert main(["fit", "--config", str(config), "--budget", "1min"]) == 2  # write_config sets decay_steps 8
    err = capsys.readouterr().err.strip()
    assert "model.decay_steps" in err and "--budget" in err and len(err.splitlines()) == 1


def test_early_stopping_is_off_with_a_budget(data_dir, tmp_path, monkeypatch, caplog) -> None:
    """With a budget the rate stays at its peak until the cooldown, where val_loss falls most: a plateau there
    must not end the run (early_stopping 3 ended laptop.yaml's 30 minutes at 58%, before its cooldown)."""
    run = tmp_path / "patient"
    with caplog.at_level("INFO"):
        assert fit_on_fake_clock(monkeypatch, budget_config(run, data_dir), "--budget", "40s",
                                 "--early_stopping", "1") == 0
    assert "early_stopping 1 is off" in caplog.text
    callbacks = torch.load(next(run.glob("lightning_logs/*/checkpoints/last.ckpt")), weights_only=True)["callbacks"]
    assert "TimeBudget" in callbacks and not any(name.startswith("EarlyStopping") for name in callbacks)
