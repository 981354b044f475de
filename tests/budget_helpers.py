"""A fake clock for the time-budget tests: training "takes" exactly what these callbacks say, never real time."""

from __future__ import annotations

import lightning as L


class FakeClock:
    """Seconds that pass only when a test advances them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = FakeClock()


class Ticker(L.Callback):
    """Advances ``CLOCK`` by ``micro_batch_s`` as each micro-batch starts and ``validation_s`` per validation."""

    def __init__(self, micro_batch_s: float = 1.0, validation_s: float = 3.0, slow_from_step: int | None = None,
                 slow_factor: float = 1.0) -> None:
        self.micro_batch_s = micro_batch_s
        self.validation_s = validation_s
        self.slow_from_step = slow_from_step  # from this optimizer step on, micro-batches take slow_factor times longer
        self.slow_factor = slow_factor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        slow = self.slow_from_step is not None and trainer.global_step + 1 >= self.slow_from_step
        CLOCK.now += self.micro_batch_s * (self.slow_factor if slow else 1.0)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            CLOCK.now += self.validation_s


class LRRecorder(L.Callback):
    """Appends ``<optimizer step> <learning rate of param group 0 as float.hex()>`` for each optimizer step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module._micro_batches == 0:  # the first micro-batch of a step: the rate this step will use
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step + 1} {float(trainer.optimizers[0].param_groups[0]['lr']).hex()}\n")


def read_rates(path) -> dict[int, float]:
    """Optimizer step (1-based) -> its learning rate (the last record of a step wins)."""
    rates: dict[int, float] = {}
    for line in open(path).read().splitlines():
        step, value = line.split()
        rates[int(step)] = float.fromhex(value)
    return rates
