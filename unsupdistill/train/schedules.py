"""The engine's schedules as pure functions of the global step: the lr's warm-up and cosine decay, the weight
decay's cosine (DINO, Caron et al. 2021, App. B). A method derives its own scheduled values from these."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

from unsupdistill.config import OptimConfig


@dataclass(frozen=True)
class ScheduleValues:
    """The engine's scheduled values at one step; a method computes its own from them (e.g. with :func:`cosine_at`).

    Attributes:
        step: the steps done before this one (0-based).
        total_steps: the steps the schedules span (all epochs', or a time budget's plan).
        steps_per_epoch: steps in one epoch.
        lr: the learning rate of this step.
        weight_decay: the weight decay of this step.
    """

    step: int
    total_steps: int
    steps_per_epoch: int
    lr: float
    weight_decay: float

    @property
    def progress(self) -> float:
        """The share of the planned steps done before this one."""
        return self.step / max(self.total_steps, 1)

    @property
    def epoch(self) -> float:
        """Epochs done before this step."""
        return self.step / self.steps_per_epoch


def cosine_at(sched: ScheduleValues, start: float, end: float) -> float:
    """A cosine from ``start`` at step 0 to ``end`` at the last planned step."""
    return cosine_schedule(sched.step, sched.total_steps, start, end)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: the recipe's lr is per 256 images."""
    return cfg.lr * global_batch / 256


def schedule_at(step: int, total_steps: int, steps_per_epoch: int, global_batch: int,
                optim: OptimConfig) -> ScheduleValues:
    """The schedules at ``step`` (0-based) of a run of ``total_steps`` steps (a time budget's plan)."""
    if optim.warmup_share is not None:  # a share of the planned steps, however many a budget allows
        warmup_steps = round(optim.warmup_share * total_steps)
    else:
        warmup_steps = min(round(optim.warmup_epochs * steps_per_epoch), total_steps)
    lr = cosine_warmup_schedule(
        step, total_steps, scaled_lr(optim, global_batch), optim.min_lr, warmup_steps, warmup_start_value=0.0
    )
    return ScheduleValues(step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, lr=lr,
                          weight_decay=cosine_schedule(step, total_steps, optim.weight_decay, optim.weight_decay_end))


def budget_clock() -> float:
    """The clock a time budget is counted on (seconds; ``time.perf_counter``)."""
    return time.perf_counter()


class TimeBudget:
    """How many steps fit in a wall-clock budget, re-planned from the step rate measured so far.

    The schedules span the planned steps, so they end when the budget does: planned this way at
    every step, the cosine position follows the elapsed share of the budget.

    Args:
        seconds: the budget (``train.time_budget_s``).
        max_steps: the most steps to plan (all epochs).
        spent: seconds already used by the run before a resume.
    """

    def __init__(self, seconds: float, max_steps: int, spent: float = 0.0) -> None:
        self.seconds, self.max_steps, self.spent_before = seconds, max_steps, spent
        self.start_time: float | None = None
        self.start_step = 0

    def start(self, step: int) -> None:
        """Start the clock at ``step`` (the first step of this process's part of the run)."""
        self.start_time, self.start_step = time.perf_counter(), step

    def spent(self) -> float:
        """Seconds used so far, earlier sessions of a resumed run included."""
        return self.spent_before + (time.perf_counter() - self.start_time if self.start_time is not None else 0.0)

    def plan(self, step: int, forecast: Callable[[int], float] | None = None, steps_per_epoch: int = 1) -> int:
        """Total steps of the run, as planned at ``step``: ``step`` itself once the next would not fit.

        Args:
            step: the steps done.
            forecast: seconds a step of epoch ``e`` is expected to take more (or, negative, less) than the
                average step so far (a method whose teacher runs in the first epochs only says so); None: the
                same for every step.
            steps_per_epoch: the epoch length ``forecast`` is given in.
        """
        remaining = self.seconds - self.spent()
        done = step - self.start_step
        if remaining <= 0:
            return min(step, self.max_steps)
        if done == 0 or self.start_time is None:
            return self.max_steps
        seconds_per_step = (time.perf_counter() - self.start_time) / done
        if forecast is None:
            return min(self.max_steps, step + int(remaining / seconds_per_step))
        planned = step
        while planned < self.max_steps:  # epoch by epoch, each at its forecast cost per step
            epoch_end = min(self.max_steps, (planned // steps_per_epoch + 1) * steps_per_epoch)
            cost = max(seconds_per_step + forecast(planned // steps_per_epoch), 0.05 * seconds_per_step)
            fit = min(epoch_end - planned, int(remaining / cost))
            planned, remaining = planned + fit, remaining - fit * cost
            if planned < epoch_end:
                break
        return planned
