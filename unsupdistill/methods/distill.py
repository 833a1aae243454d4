"""Knowledge distillation: a frozen teacher's features guide a small student on unlabeled images.

The student's pooled features are projected to the teacher's dimension and matched to the teacher's: by
cosine (the default, :class:`~unsupdistill.losses.CosineLoss`), or as softmax distributions over a queue of
teacher embeddings (:class:`~unsupdistill.losses.QueueKLLoss`, LightlyTrain's ``distillation``), optionally
with a dense patch-similarity term. ``loss=dino`` is DINOv2's recipe for its small models: DINO's loss
against the frozen teacher's own head, with an EMA of the student kept as the exported model. Teacher and
student see the same view of each image ("consistent teacher", Beyer et al. 2022), each at its own input
size and normalisation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from unsupdistill.augment import DistillAugmentation
from unsupdistill.config import Config, ConfigError
from unsupdistill.losses import CosineLoss, DensePatchKLLoss, FrozenTeacherDINOLoss, QueueKLLoss, default_queue_size
from unsupdistill.models.backbone import create_backbone, pooled_and_spatial
from unsupdistill.models.teachers import load_teacher
from unsupdistill.train.health import feature_spread, health_signals
from unsupdistill.train.method import Export, Method, Runtime
from unsupdistill.train.optimizer import update_ema
from unsupdistill.train.precision import avoid_cpu_bf16_faults
from unsupdistill.train.schedules import ScheduleValues


class Student(nn.Module):
    """The student backbone and the head that maps its pooled features into the teacher's space.

    ``forward`` returns everything a step uses in one call (one DDP forward): pooled features (B, D), the
    spatial map (B, h, w, C) or None, and the head's output (B, K).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        pooled, spatial = pooled_and_spatial(self.backbone, x)  # (B, D), (B, h, w, C) | None
        return pooled, spatial, self.head(pooled)


class Distillation(Method):
    """Distillation from the frozen ``distill.teacher`` into the ``model`` section's backbone."""

    name = "distill"
    command = "distill"

    def __init__(self, config: Config, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        d, a = config.distill, config.augment
        self.teacher = load_teacher(d.teacher, d.teacher_size, need_head=d.loss == "dino")
        self.teacher.backbone.to(runtime.device, memory_format=torch.channels_last)
        if self.teacher.head is not None:
            self.teacher.head.to(runtime.device)
        size = a.global_1.size
        self.image_size = max(size, self.teacher.input_size)  # images are decoded for the larger network
        self.augment = DistillAugmentation(d, size, a.mean, a.std, self.teacher.input_size, self.teacher.mean,
                                           self.teacher.std).to(runtime.device)

        backbone, self.spec = create_backbone(config.model, (size,))
        avoid_cpu_bf16_faults(backbone, (size,), runtime.autocast_dtype, runtime.device)  # a oneDNN bf16 fault
        self.student = Student(backbone, self._head()).to(runtime.device, memory_format=torch.channels_last)
        self.ema: Student | None = None
        if d.ema_momentum > 0:
            self.ema = Student(create_backbone(config.model, (size,))[0], self._head())
            self.ema.load_state_dict(self.student.state_dict())
            self.ema.requires_grad_(False)
            self.ema.to(runtime.device, memory_format=torch.channels_last)
        if d.loss == "dino":
            h = self.teacher.head_config
            self.global_loss: nn.Module = FrozenTeacherDINOLoss(h.head_output_dim, config.loss.student_temp,
                                                                config.loss.center_momentum)
        else:  # QueueKLLoss is sized in setup(), once the dataset's size is known
            self.global_loss = CosineLoss() if d.loss == "cosine" else QueueKLLoss(self.teacher.feature_dim, 1,
                                                                                   d.temperature)
        self.dense_loss = None
        if d.dense_weight > 0:
            self._check_spatial(size)
            self.dense_loss = DensePatchKLLoss(d.dense_temperature)
        self.global_loss.to(runtime.device)
        self._last: dict[str, Tensor] = {}

    @torch.no_grad()
    def _check_spatial(self, size: int) -> None:
        """The dense term needs spatial features (a CNN map, ViT patch tokens) from both networks."""
        device, teacher_size = self.runtime.device, self.teacher.input_size
        for name, backbone, side in (("student", self.student.backbone, size),
                                     ("teacher", self.teacher.backbone, teacher_size)):
            was_training = backbone.training
            _, spatial = pooled_and_spatial(backbone.eval(), torch.zeros(2, 3, side, side, device=device))
            backbone.train(was_training)
            if spatial is None:
                raise ConfigError(f"distill.dense_weight={self.config.distill.dense_weight:g} needs spatial features, "
                                  f"but the {name} ({type(backbone).__name__}) gives none; set distill.dense_weight=0")

    def _head(self) -> nn.Module:
        """loss=dino: a DINO head shaped like the teacher run's; otherwise a linear map to the teacher's dimension."""
        if self.config.distill.loss != "dino":
            return nn.Linear(self.spec.feature_dim, self.teacher.feature_dim)
        h = self.teacher.head_config
        with warnings.catch_warnings():  # lightly's head calls the deprecated nn.utils.weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            return DINOProjectionHead(self.spec.feature_dim, h.head_hidden_dim, h.head_bottleneck_dim,
                                      h.head_output_dim, batch_norm=h.head_batch_norm,
                                      norm_last_layer=h.norm_last_layer)

    def setup(self, num_images: int) -> None:
        d = self.config.distill
        if isinstance(self.global_loss, QueueKLLoss):
            size = d.queue_size or default_queue_size(num_images)
            self.global_loss = QueueKLLoss(self.teacher.feature_dim, size, d.temperature).to(self.runtime.device)

    def describe(self) -> str:
        d = self.config.distill
        dense = f" + {d.dense_weight:g} x dense" if self.dense_loss is not None else ""
        queue = f", queue {self.global_loss.queue.shape[0]}" if isinstance(self.global_loss, QueueKLLoss) else ""
        return (f"distill: {self.spec.name} ({self.config.augment.global_1.size} px) from teacher {self.teacher.name} "
                f"({self.teacher.input_size} px, {self.teacher.feature_dim}-d), loss {d.loss}{dense}{queue}")

    def views(self, images: Tensor, sched: ScheduleValues) -> tuple[Tensor, Tensor]:
        student_views, teacher_views = self.augment(images)  # the same crop: (B, 3, s, s), (B, 3, t, t)
        return (student_views.contiguous(memory_format=torch.channels_last),
                teacher_views.contiguous(memory_format=torch.channels_last))

    def loss(self, views: tuple[Tensor, Tensor], sched: ScheduleValues) -> Tensor:
        student_views, teacher_views = views
        with self.runtime.autocast():
            # frozen teacher on the view, at its own size
            with torch.no_grad():
                teacher_pooled, teacher_spatial = pooled_and_spatial(self.teacher.backbone, teacher_views)
                target = teacher_pooled if self.teacher.head is None or self.config.distill.loss != "dino" \
                    else self.teacher.head(teacher_pooled)  # (B, Dt) or (B, K)
            # student on the same view
            student_pooled, student_spatial, student_out = self.student_forward(student_views)
        target, student_out = target.float(), student_out.float()
        self._last = {"student": student_pooled.detach(), "teacher": teacher_pooled.detach(),
                      "target": target.detach(), "output": student_out.detach()}
        if isinstance(self.global_loss, FrozenTeacherDINOLoss):
            self._last["center"] = self.global_loss.center.clone()
            loss = self.global_loss(target, student_out, teacher_temp=sched.teacher_temp)
        else:
            loss = self.global_loss(student_out, target)
        if self.dense_loss is not None:
            dense = self.dense_loss(student_spatial.float(), teacher_spatial.float())
            self._last["dense"] = dense.detach()
            loss = loss + self.config.distill.dense_weight * dense
        return loss

    @torch.no_grad()
    def signals(self, sched: ScheduleValues) -> dict[str, float]:
        last = self._last
        out = {
            # how far the student has come: cosine of its head output and the teacher's target
            "teacher_agreement": F.cosine_similarity(last["output"], last["target"], dim=-1).mean().item(),
            "student_feature_std": feature_spread(last["student"]).item(),
            "teacher_feature_std": feature_spread(last["teacher"]).item(),
        }
        if "center" in last:
            out |= health_signals(last["target"], last["center"], sched.teacher_temp, last["student"])
        if "dense" in last:
            out["dense_loss"] = last["dense"].item()
        return out

    def warnings(self, signals: dict[str, float]) -> dict[str, str]:
        healthy = 1 / math.sqrt(self.spec.feature_dim)
        std = signals.get("student_feature_std", healthy)
        if std < 0.1 * healthy:
            return {"features": f"student features have collapsed to a point (std {std:.2e}, healthy about "
                                f"{healthy:.2e}). Lower optim.lr or check the augmentation."}
        return {}

    def after_optimizer_step(self, sched: ScheduleValues) -> None:
        if isinstance(self.global_loss, QueueKLLoss):
            self.global_loss.push(self._last["teacher"].float())
        if self.ema is not None:
            update_ema(self.student, self.ema, self.config.distill.ema_momentum)
            for ema_buffer, buffer in zip(self.ema.buffers(), self.student.buffers()):  # BatchNorm statistics
                ema_buffer.copy_(buffer)

    def checkpoint_state(self) -> dict[str, Any]:
        state = {"student": self.student.state_dict(), "losses": self.global_loss.state_dict(),
                 "exported": "student_ema" if self.ema is not None else "student",
                 "distill_teacher": {"name": self.teacher.name, "feature_dim": self.teacher.feature_dim}}
        if self.ema is not None:
            state["student_ema"] = self.ema.state_dict()
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        saved = state.get("distill_teacher", {})
        if saved.get("feature_dim") != self.teacher.feature_dim:
            raise ConfigError(f"the checkpoint was distilled from teacher {saved.get('name')} "
                              f"({saved.get('feature_dim')}-d features), but distill.teacher="
                              f"{self.config.distill.teacher} gives {self.teacher.feature_dim}-d features; resume "
                              "with the run's own teacher")
        self.student.load_state_dict(state["student"])
        self.global_loss.load_state_dict(state["losses"])
        if self.ema is not None:
            self.ema.load_state_dict(state["student_ema"])

    def probe_backbone(self) -> nn.Module:
        return (self.ema or self.student).backbone

    def export(self) -> Export:
        network, source = (self.ema, "student_ema") if self.ema is not None else (self.student, "student")
        return Export(network.backbone.state_dict(), self.spec, source,
                      {"distilled_from": self.teacher.name, "distill_loss": self.config.distill.loss})
