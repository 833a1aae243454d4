import math

import pytest

from unsupdistill.config import OptimConfig
from unsupdistill.losses import teacher_temperature
from unsupdistill.methods.dino.method import dino_values
from unsupdistill.methods.dino.settings import DINOConfig
from unsupdistill.train.schedules import scaled_lr, schedule_at

STEPS_PER_EPOCH, EPOCHS, BATCH = 10, 20, 512
TOTAL = STEPS_PER_EPOCH * EPOCHS


DINO_OPTIM = OptimConfig(lr=5e-4, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4)
DINO_SETTINGS = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5,
                           teacher_momentum=0.996, teacher_momentum_end=1.0, freeze_last_layer_epochs=1)


def at(step, optim=None):
    return schedule_at(step, TOTAL, STEPS_PER_EPOCH, BATCH, optim or DINO_OPTIM)


def dino_at(step):
    return dino_values(at(step), DINO_SETTINGS)


def test_learning_rate_scales_warms_up_and_decays_to_min():
    peak = scaled_lr(DINO_OPTIM, BATCH)
    assert peak == pytest.approx(5e-4 * 2)
    warmup = 2 * STEPS_PER_EPOCH
    assert at(0).lr == pytest.approx(peak / warmup)
    assert at(warmup - 1).lr == pytest.approx(peak)
    assert at(warmup).lr == pytest.approx(peak)
    lrs = [at(s).lr for s in range(warmup, TOTAL)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone cosine decay
    assert at(TOTAL - 1).lr == pytest.approx(1e-6)


def test_weight_decay_and_teacher_momentum_cosine_endpoints():
    assert at(0).weight_decay == pytest.approx(0.04)
    assert at(TOTAL - 1).weight_decay == pytest.approx(0.4)
    assert dino_at(0).teacher_momentum == pytest.approx(0.996)
    assert dino_at(TOTAL - 1).teacher_momentum == pytest.approx(1.0)
    mid = dino_at(TOTAL // 2).teacher_momentum
    assert 0.996 < mid < 1.0


def test_teacher_temperature_warmup_then_constant():
    cfg = DINO_SETTINGS
    assert teacher_temperature(0, STEPS_PER_EPOCH, cfg) == pytest.approx(0.04)
    assert teacher_temperature(25, STEPS_PER_EPOCH, cfg) == pytest.approx(0.055)
    assert teacher_temperature(50, STEPS_PER_EPOCH, cfg) == pytest.approx(0.07)
    assert teacher_temperature(TOTAL - 1, STEPS_PER_EPOCH, cfg) == pytest.approx(0.07)
    assert teacher_temperature(0, STEPS_PER_EPOCH, DINOConfig()) == DINOConfig().teacher_temp  # no warmup
    assert dino_at(25).teacher_temp == pytest.approx(0.055)  # DINO's scheduled values follow it


def test_last_layer_frozen_for_first_epoch_only():
    assert dino_at(0).freeze_last_layer and dino_at(STEPS_PER_EPOCH - 1).freeze_last_layer
    assert not dino_at(STEPS_PER_EPOCH).freeze_last_layer


def test_warmup_longer_than_run_is_clamped():
    short = schedule_at(3, 5, 5, 256, OptimConfig(warmup_epochs=10))
    assert math.isfinite(short.lr) and short.lr > 0
