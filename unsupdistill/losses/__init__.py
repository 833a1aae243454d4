"""Losses: self-distillation (DINO with an EMA or Sinkhorn-Knopp centre, iBOT, KoLeo) and distillation from a frozen
teacher (queue KL, cosine, dense patch KL, frozen-teacher DINO) and with labels (KD)."""

from unsupdistill.losses.cosine import CosineLoss
from unsupdistill.losses.dense import DensePatchKLLoss
from unsupdistill.losses.dino import FrozenTeacherDINOLoss, SinkhornDINOLoss, build_dino_loss, teacher_temperature
from unsupdistill.losses.ibot import MaskedPatchLoss
from unsupdistill.losses.kd import KDLoss
from unsupdistill.losses.koleo import KoLeo
from unsupdistill.losses.queue_kl import QueueKLLoss, default_queue_size
from unsupdistill.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "CosineLoss",
    "DensePatchKLLoss",
    "FrozenTeacherDINOLoss",
    "KDLoss",
    "KoLeo",
    "MaskedPatchLoss",
    "QueueKLLoss",
    "SinkhornDINOLoss",
    "build_dino_loss",
    "default_queue_size",
    "sinkhorn_knopp",
    "teacher_temperature",
]
