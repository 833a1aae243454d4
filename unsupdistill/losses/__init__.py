"""Losses of knowledge distillation from a frozen teacher: queue KL, cosine, dense patch KL, frozen-teacher DINO."""

from unsupdistill.losses.cosine import CosineLoss
from unsupdistill.losses.dense import DensePatchKLLoss
from unsupdistill.losses.dino import FrozenTeacherDINOLoss, build_dino_loss
from unsupdistill.losses.queue_kl import QueueKLLoss, default_queue_size

__all__ = [
    "CosineLoss",
    "DensePatchKLLoss",
    "FrozenTeacherDINOLoss",
    "QueueKLLoss",
    "build_dino_loss",
    "default_queue_size",
]
