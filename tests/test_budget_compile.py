"""train.time_budget_s (schedules planned from the measured step rate end with the budget) and train.compile."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, read_metrics

from unsupdistill.config import ConfigError, load_config
from unsupdistill.methods import train
from unsupdistill.storage import load_checkpoint
from unsupdistill.train import schedules
from unsupdistill.train.loop import Trainer
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


def test_run_ends_with_its_budget_and_completes_its_schedules(tmp_path, monkeypatch):
    """Every training step takes 0.5 s of the budget's clock (a fake one, whatever this machine's speed): an 8 s
    budget holds exactly 16 steps of the 10,000 epochs, re-planned as the steps go, and the schedules end with it."""
    clock = FakeClock()
    monkeypatch.setattr(schedules, "time", SimpleNamespace(perf_counter=clock))  # the budget's clock only
    step = Trainer.train_step

    def half_a_second_step(self, *args, **kwargs):
        clock.now += 0.5
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", half_a_second_step)
    run = tmp_path / "run"
    config = load_config(None, [*TINY, "train.epochs=10000", "train.time_budget_s=8", "train.log_every_steps=1",
                                "train.save_every_steps=1000000", "optim.warmup_epochs=0",
                                "train.max_steps=40"])  # a run that ignored its budget would stop here
    train(config, run)
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 17))  # stopped by the budget, not the epochs
    assert [r["planned_steps"] for r in records] == [16] * 16  # from the first measured step on: 16 in 8 s
    assert [r["budget_left_s"] for r in records] == [8 - 0.5 * r["step"] for r in records]
    # the cosines reached their ends at the last step: the lr its minimum, the teacher momentum 1
    last = records[-1]
    assert last["lr"] == pytest.approx(config.optim.min_lr) and max(r["lr"] for r in records) > 100 * last["lr"]
    assert last["teacher_momentum"] == pytest.approx(config.dino.teacher_momentum_end)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 16 and state["train_seconds"] == 8.0
    assert torch.isfinite(state["center"]).all()


def test_a_methods_setup_is_spent_from_the_budget_before_the_first_step(tmp_path, monkeypatch):
    """A method's setup (distillation's pass of the teacher over the images) takes 2 s of the budget's clock: an 8 s
    budget of 0.5-s steps then holds 12 steps, not 16."""
    from unsupdistill.methods.dino.method import DINO

    clock = FakeClock()
    monkeypatch.setattr(schedules, "time", SimpleNamespace(perf_counter=clock))
    step, setup = Trainer.train_step, DINO.setup

    def half_a_second_step(self, *args, **kwargs):
        clock.now += 0.5
        return step(self, *args, **kwargs)

    def two_second_setup(self, *args, **kwargs):
        clock.now += 2.0
        return setup(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", half_a_second_step)
    monkeypatch.setattr(DINO, "setup", two_second_setup)
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.epochs=10000", "train.time_budget_s=8", "train.log_every_steps=1",
                             "train.save_every_steps=1000000", "optim.warmup_epochs=0", "train.max_steps=40"]), run)
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["budget_left_s"] for r in records] == [6 - 0.5 * r["step"] for r in records]


def test_budget_must_be_positive():
    with pytest.raises(ConfigError, match=r"train.time_budget_s.*> 0"):
        load_config(None, ["train.time_budget_s=0"])


def test_compiled_backbones_train_and_keep_their_parameter_names(tmp_path, monkeypatch):
    """train.compile=true compiles the backbones in place (checkpoint keys unchanged) and they train. Compiled with
    AOTAutograd's eager backend: dynamo's graph capture and the autograd trace are what the run relies on;
    inductor's code generation (torch's own, tested by torch) costs 40-80 s on 2 cores with a cold cache."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda module, *args, **kwargs: compile_module(module, *args, backend="aot_eager", **kwargs))
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
