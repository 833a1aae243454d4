"""train.time_budget_s (schedules planned from the measured step rate end with the budget) and train.compile."""

import math

import pytest
import torch
from conftest import TINY, read_metrics

from unsupdistill.config import ConfigError, load_config
from unsupdistill.methods import train
from unsupdistill.storage import load_checkpoint
from unsupdistill.train import schedules
from unsupdistill.train.schedules import TimeBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plan_follows_the_measured_step_rate(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(schedules.time, "perf_counter", clock)
    budget = TimeBudget(seconds=60.0, max_steps=1000)
    budget.start(step=0)
    assert budget.plan(0) == 1000  # nothing measured yet: the cap
    clock.now += 3.0  # the first step took 3 s: 57 s left fit 19 more
    assert budget.plan(1) == 20
    clock.now += 9.0  # 10 steps in 12 s: 48 s left fit 40 more
    assert budget.plan(10) == 50
    clock.now += 47.9  # 0.1 s left, less than a step: the run ends here
    assert budget.plan(49) == 49
    clock.now += 1.0
    assert budget.plan(50) == 50


def test_plan_is_capped_and_counts_time_before_a_resume(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(schedules.time, "perf_counter", clock)
    budget = TimeBudget(seconds=100.0, max_steps=30, spent=40.0)
    budget.start(step=20)
    clock.now += 1.0
    assert budget.plan(21) == 30  # 59 s left would fit 59 steps; the epochs allow 30
    assert budget.spent() == pytest.approx(41.0)
    budget = TimeBudget(seconds=100.0, max_steps=1000, spent=40.0)
    budget.start(step=20)
    clock.now += 2.0  # 2 s per step, 58 s left: 29 more
    assert budget.plan(21) == 50


def test_run_ends_with_its_budget_and_completes_its_schedules(tmp_path):
    run = tmp_path / "run"
    config = load_config(None, [*TINY, "train.epochs=10000", "train.time_budget_s=8", "train.log_every_steps=1",
                                "train.save_every_steps=1000000", "optim.warmup_epochs=0"])
    train(config, run)
    records = [r for r in read_metrics(run) if "loss" in r]
    last = records[-1]
    assert 5 <= len(records) < 10000 * 28 // 16  # stopped by the budget, long before the epochs end
    # the last step starts when the next one is expected to fit, so the run ends within about one step of the
    # budget, either side (a step takes well under a second here; seen: 4 ms over on a busy machine)
    assert -1.0 < last["budget_left_s"] < 2.0
    assert last["planned_steps"] == last["step"]
    # the cosine reached its end: the last lr is close to the minimum, far below the peak
    peak = max(r["lr"] for r in records)
    assert last["lr"] < 0.05 * peak
    assert last["teacher_momentum"] > 0.99
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 7.0 < state["train_seconds"] <= 8.5
    assert torch.isfinite(state["center"]).all()


def test_budget_must_be_positive():
    with pytest.raises(ConfigError, match=r"train.time_budget_s.*> 0"):
        load_config(None, ["train.time_budget_s=0"])


def test_compiled_backbones_train_and_keep_their_parameter_names(tmp_path):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    args = [*TINY, "train.max_steps=2", "train.log_every_steps=1"]
    train(load_config(None, args), plain)
    train(load_config(None, [*args, "train.compile=true"]), compiled)
    for name in ("student", "teacher"):
        keys = [load_checkpoint(run / "checkpoints" / "last.pt")[name].keys() for run in (plain, compiled)]
        assert list(keys[0]) == list(keys[1])
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (plain, compiled)]
    assert len(losses[1]) == 2 and all(map(math.isfinite, losses[1]))
    assert losses[1] == pytest.approx(losses[0], abs=0.05)  # the same network and data; kernels differ


def test_plan_follows_a_forecast_of_cheaper_epochs(monkeypatch):
    """A method whose steps get cheaper after epoch 1 (a teacher cache) plans those epochs at their own cost."""
    clock = FakeClock()
    monkeypatch.setattr(schedules.time, "perf_counter", clock)
    budget = TimeBudget(seconds=100.0, max_steps=1000)
    budget.start(step=0)
    clock.now += 20.0  # 10 steps of 2 s (epochs of 10 steps): 80 s left
    assert budget.plan(10) == 50  # without a forecast: 40 more steps of 2 s
    # epoch 1 on costs 1.5 s less a step than the 2 s so far: 80 s fit 160 steps of 0.5 s
    assert budget.plan(10, lambda epoch: -1.5 if epoch >= 1 else 0.0, steps_per_epoch=10) == 170
    # epoch 1 still at 2 s, then 0.5 s: 20 s for epoch 1, 60 s for 120 more
    assert budget.plan(10, lambda epoch: -1.5 if epoch >= 2 else 0.0, steps_per_epoch=10) == 140
    # the run ends inside an epoch: at step 47, 5 s left fit 2 steps of 95 / 47 s
    clock.now += 75.0
    assert budget.plan(47, lambda epoch: 0.0, steps_per_epoch=10) == 49
