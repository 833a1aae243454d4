"""Self-distillation with an EMA teacher: DINO (Caron et al. 2021, Algorithm 1), from scratch."""

from __future__ import annotations

from typing import Any

import torch
from lightly.models.utils import update_momentum
from torch import Tensor, nn

from unsupdistill.augment import MultiCropAugmentation
from unsupdistill.config import Config
from unsupdistill.losses.dino import build_dino_loss
from unsupdistill.models import build_student_teacher
from unsupdistill.train.health import collapse_warnings, health_signals
from unsupdistill.train.method import Export, Method, Runtime
from unsupdistill.train.precision import avoid_cpu_bf16_faults
from unsupdistill.train.schedules import ScheduleValues


class DINO(Method):
    """A student on all crops matches its momentum teacher's centred, sharpened outputs on the global crops."""

    name = "dino"
    command = "pretrain"

    def __init__(self, config: Config, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        a = config.augment
        self.image_size = a.global_1.size
        self.augment = MultiCropAugmentation(a).to(runtime.device)
        self.num_local = a.num_local_crops
        crop_sizes = (a.global_1.size,) + ((a.local.size,) if a.num_local_crops else ())
        student, teacher, self.spec = build_student_teacher(config.model, crop_sizes)
        avoid_cpu_bf16_faults(student.backbone, crop_sizes, runtime.autocast_dtype, runtime.device)  # oneDNN fault
        # channels-last: the convolution kernels' preferred layout (student forward + backward ~17 % faster)
        self.student = student.to(runtime.device, memory_format=torch.channels_last)
        self.teacher = teacher.to(runtime.device, memory_format=torch.channels_last)
        if config.train.compile:  # in place: parameter names (checkpoints, exports) stay as they are
            self.student.backbone.compile(dynamic=False)
            self.teacher.backbone.compile(dynamic=False)
        self.loss_fn = build_dino_loss(config.loss, config.model.head_output_dim).to(runtime.device)
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def views(self, images: Tensor) -> list[Tensor]:
        global_views, local_views = self.augment(images)
        views = [global_views.contiguous(memory_format=torch.channels_last)]  # (2B, 3, S, S)
        if local_views is not None:
            views.append(local_views.contiguous(memory_format=torch.channels_last))  # (N*B, 3, s, s)
        return views

    def loss(self, views: list[Tensor], sched: ScheduleValues) -> Tensor:
        with self.runtime.autocast():
            # teacher on global crops
            with torch.no_grad():
                _, teacher_out = self.teacher(views[:1])  # (2B, K)
            # student on all crops
            student_features, student_out = self.student_forward(views)  # (V*B, D), (V*B, K)
        self._last = (teacher_out.detach(), self.loss_fn.center.clone(), student_features.detach())
        # in float32, outside autocast: every teacher-global x student-view pair but same views
        return self.loss_fn(list(teacher_out.float().chunk(2)), list(student_out.float().chunk(2 + self.num_local)),
                            teacher_temp=sched.teacher_temp)

    def signals(self, sched: ScheduleValues) -> dict[str, float]:
        teacher_out, center, student_features = self._last
        return health_signals(teacher_out, center, sched.teacher_temp, student_features)

    def warnings(self, signals: dict[str, float]) -> dict[str, str]:
        return collapse_warnings(signals, self.config.model.head_output_dim, self.spec.feature_dim)

    def before_optimizer_step(self, sched: ScheduleValues) -> None:
        if sched.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, sched: ScheduleValues) -> None:
        update_momentum(self.student, self.teacher, m=sched.teacher_momentum)  # EMA update of the teacher

    def checkpoint_state(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "center": self.loss_fn.center}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss_fn.center.copy_(state["center"])

    def probe_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def export(self) -> Export:
        return Export(self.teacher.backbone.state_dict(), self.spec, "teacher", {})
