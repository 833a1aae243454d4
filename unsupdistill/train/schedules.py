"""DINO's schedules as pure functions of the global step (Caron et al. 2021, Sec. 3 and App. B)."""

from __future__ import annotations

from dataclasses import dataclass

from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

from unsupdistill.config import LossConfig, OptimConfig


@dataclass(frozen=True)
class ScheduleValues:
    """Every scheduled quantity at one step."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float
    freeze_last_layer: bool


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: the recipe's lr is per 256 images."""
    return cfg.lr * global_batch / 256


def schedule_at(
    step: int, total_steps: int, steps_per_epoch: int, global_batch: int, optim: OptimConfig, loss: LossConfig
) -> ScheduleValues:
    """All schedules at ``step`` (0-based) of a run of ``total_steps`` steps."""
    warmup_steps = min(round(optim.warmup_epochs * steps_per_epoch), total_steps)
    lr = cosine_warmup_schedule(
        step, total_steps, scaled_lr(optim, global_batch), optim.min_lr, warmup_steps, warmup_start_value=0.0
    )
    return ScheduleValues(
        lr=lr,
        weight_decay=cosine_schedule(step, total_steps, optim.weight_decay, optim.weight_decay_end),
        teacher_momentum=cosine_schedule(step, total_steps, optim.teacher_momentum, optim.teacher_momentum_end),
        teacher_temp=teacher_temperature(step, steps_per_epoch, loss),
        freeze_last_layer=step < optim.freeze_last_layer_epochs * steps_per_epoch,
    )


def teacher_temperature(step: int, steps_per_epoch: int, cfg: LossConfig) -> float:
    """Linear warmup from ``warmup_teacher_temp`` to ``teacher_temp``, then constant."""
    warmup_steps = cfg.warmup_teacher_temp_epochs * steps_per_epoch
    if step >= warmup_steps:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup_steps
