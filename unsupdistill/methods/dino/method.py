"""Self-distillation with an EMA teacher: DINO (Caron et al. 2021, Algorithm 1), from scratch, with DINOv2's parts
(Oquab et al. 2023) as options: Sinkhorn-Knopp centring, the KoLeo regulariser and, for ViTs, iBOT's masked patches."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unsupdistill.augment import MultiCropAugmentation, SoundMultiCrop, ibot_masks, sized
from unsupdistill.augment.audio import sound_frontend
from unsupdistill.auto import Chooser, FolderFacts, is_vit, patch_size
from unsupdistill.config import Config
from unsupdistill.losses import KoLeo, MaskedPatchLoss, build_dino_loss, teacher_temperature
from unsupdistill.losses.health import collapse_warnings, health_signals
from unsupdistill.methods.dino.settings import SECTIONS, DINOConfig
from unsupdistill.models import build_student_teacher
from unsupdistill.models.backbone import patch_grid
from unsupdistill.models.ema import update_ema
from unsupdistill.train.method import Batch, Export, Method, Runtime
from unsupdistill.train.precision import avoid_cpu_bf16_faults
from unsupdistill.train.schedules import ScheduleValues, cosine_at

logger = logging.getLogger(__name__)

DECODE_RATIO = 1.25
"""Decode size as a multiple of the global crop when the images are large enough."""
LOCAL_RATIO = 96 / 224
"""Local crop size as a share of the global one (DINO's 96 and 224 px)."""
OUTPUT_DIM_BUCKETS = ((20_000, 1024), (50_000, 2048), (100_000, 4096), (200_000, 16384), (500_000, 32768))
"""(images below, head output dim); 65,536 above the last bucket."""
SCALE_FROM, SCALE_TO = 20_000, 1_000_000
"""Teacher temperature and momentum move from their small-data to their ImageNet values over this range."""


@dataclass(frozen=True)
class DINOValues:
    """DINO's scheduled values at one step, from the engine's (:func:`dino_values`)."""

    teacher_momentum: float
    teacher_temp: float
    freeze_last_layer: bool


def dino_values(sched: ScheduleValues, cfg: DINOConfig) -> DINOValues:
    """The teacher's momentum (cosine to ``teacher_momentum_end``), its temperature (warm-up in epochs) and whether
    the head's last layer is frozen, at ``sched``'s step."""
    return DINOValues(
        teacher_momentum=cosine_at(sched, cfg.teacher_momentum, cfg.teacher_momentum_end),
        teacher_temp=teacher_temperature(sched.step, sched.steps_per_epoch, cfg),
        freeze_last_layer=sched.step < cfg.freeze_last_layer_epochs * sched.steps_per_epoch,
    )


class DINO(Method):
    """A student on all crops matches its momentum teacher's centred, sharpened outputs on the global crops."""

    name = "dino"
    command = "pretrain"
    settings: ClassVar[dict[str, type]] = SECTIONS

    def __init__(self, config: Config, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        lo, size = config.dino, config.model.input_size
        self.image_size = size
        self.augment = multi_crop(config, 1.0).to(runtime.device)
        self.num_local = lo.num_local_crops
        sound = config.data.kind == "audio"
        local = config.audio.local_frames if sound else lo.local.size  # a sound's views are columns of its log-mel
        crop_sizes = (size,) + ((local,) if lo.num_local_crops else ()) + ((config.audio.n_mels,) if sound else ())
        # progressive resizing: smaller crops of every kind for the first part of the run
        self.low_res_share = lo.low_res_share
        self.low_res_augment = None
        if lo.low_res_share > 0:
            self.low_res_augment = multi_crop(config, lo.low_res_scale).to(runtime.device)
            crop_sizes += (scaled(size, lo.low_res_scale),) + (
                (scaled(local, lo.low_res_scale),) if lo.num_local_crops else ())
        self.ibot = lo.ibot_weight > 0
        student, teacher, self.spec = build_student_teacher(config.model, lo, crop_sizes, self.ibot,
                                                            lo.ibot_separate_head)
        avoid_cpu_bf16_faults(student.backbone, crop_sizes, runtime.autocast_dtype, runtime.device)  # oneDNN fault
        # channels-last: the convolution kernels' preferred layout (student forward + backward ~17 % faster)
        self.student = student.to(runtime.device, memory_format=torch.channels_last)
        self.teacher = teacher.to(runtime.device, memory_format=torch.channels_last)
        if config.train.compile:  # in place: parameter names (checkpoints, exports) stay as they are
            self.student.backbone.compile(dynamic=False)
            self.teacher.backbone.compile(dynamic=False)
        self.loss_fn = build_dino_loss(lo, config.dino.head_output_dim).to(runtime.device)
        self.koleo = KoLeo() if lo.koleo_weight > 0 else None
        self.patch_loss = MaskedPatchLoss(config.dino.head_output_dim, lo.student_temp, lo.centering,
                                          lo.center_momentum, lo.sinkhorn_iterations).to(runtime.device) \
            if self.ibot else None
        self._last: tuple[Tensor, Tensor, Tensor] | None = None
        self._terms: dict[str, float] = {}

    automatic_keys: ClassVar[frozenset[str]] = frozenset({
        "dino.local.size", "dino.num_local_crops", "dino.global_1.blur_p", "dino.global_2.blur_p", "dino.local.blur_p",
        "data.image_size", "dino.head_batch_norm", "dino.norm_last_layer", "dino.head_hidden_dim",
        "dino.head_bottleneck_dim", "dino.head_output_dim",
        "dino.teacher_temp", "dino.warmup_teacher_temp", "dino.warmup_teacher_temp_epochs", "optim.lr",
        "dino.freeze_last_layer_epochs", "dino.teacher_momentum",
    })

    @classmethod
    def auto_settings(cls, chooser: Chooser, config: Config, facts: FolderFacts) -> None:
        """DINO's crops, decode size, head and temperatures for a folder without a recipe.

        Local crops are 0.43 x the global one (DINO's 96 / 224) and the decode 1.25 x it (crops stay near 1:1);
        the dataset-size-dependent settings are scaled the way LightlyTrain scales them: head output 1,024 below
        20k images up to 65,536, teacher temperature 0.02 -> 0.07 and momentum 0.99 -> 0.996 between 20k and 1M.
        """
        m, n = config.model, facts.images
        crop, vit = m.input_size, is_vit(m.backbone)
        if facts.kind == "image":  # a sound's views are the audio section's (auto.py chooses their columns)
            unit = patch_size(crop) if vit else 4
            local = min(crop, max(unit if vit else 8, round(crop * LOCAL_RATIO / unit) * unit))
            chooser.set("dino.local.size", local, f"{LOCAL_RATIO:.2f} x the global crop (DINO: 96 / 224)")
            decode = max(crop, min(int(facts.shorter_side), round(crop * DECODE_RATIO)))
            chooser.set("data.image_size", decode, f"decode to {decode / crop:.2f} x the global crop, no larger than "
                        "the images: crops stay near 1:1")
            if crop < 64:
                for name in ("global_1", "global_2", "local"):
                    chooser.set(f"dino.{name}.blur_p", 0.0, "no Gaussian blur on crops under 64 px (too little detail)")
        local_crops = 6 if facts.device_type == "cuda" else 4
        chooser.set("dino.num_local_crops", local_crops, f"{local_crops} local crops on {facts.device}")
        if vit:
            chooser.set("dino.head_batch_norm", False, "ViT: no BatchNorm in the head (DINO)")
            chooser.set("dino.norm_last_layer", False, "ViT: DINO's setting for ViT-S")
            chooser.set("optim.lr", 5e-4, "DINO's ViT learning rate per 256 images")
        else:
            chooser.set("optim.lr", 2e-3, "per 256 images: left DINO's plateau soonest in our CIFAR-10 CPU trials")
        chooser.set("dino.freeze_last_layer_epochs", round(min(1.0, 0.05 * config.train.epochs), 3),
                    "one epoch (DINO), at most 5 % of the epochs")
        output_dim = next((dim for below, dim in OUTPUT_DIM_BUCKETS if n < below), 65536)
        chooser.set("dino.head_output_dim", output_dim, f"{n} images (LightlyTrain's buckets: 1,024 below 20k)")
        chooser.set("dino.head_hidden_dim", 2048, "DINO")
        chooser.set("dino.head_bottleneck_dim", 256, "DINO")
        teacher_temp = round(interpolate(n, 0.02, 0.07), 2)
        chooser.set("dino.teacher_temp", teacher_temp, "0.02 below 20k images, 0.07 from 1M (sharper on small data)")
        warm_temp = min(teacher_temp, round(interpolate(n, 0.02, 0.04), 2))
        chooser.set("dino.warmup_teacher_temp", warm_temp, "starts at most at DINO's 0.04")
        if warm_temp >= teacher_temp:
            chooser.set("dino.warmup_teacher_temp_epochs", 0, "no warm-up needed")
        elif config.train.time_budget_s:
            chooser.set("dino.warmup_teacher_temp_epochs", 0,
                        "none under a time budget: a warm-up in epochs could outlast the run")
        else:
            chooser.set("dino.warmup_teacher_temp_epochs", int(min(30, 0.3 * config.train.epochs)),
                        "30 % of the epochs, at most 30 (DINO)")
        chooser.set("dino.teacher_momentum", round(interpolate(n, 0.99, 0.996), 3),
                    "0.99 below 20k images, 0.996 from 1M (a teacher that follows faster on small data)")

    def sync_batch_norm(self) -> None:
        super().sync_batch_norm()
        self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)  # DINO converts both networks

    def views(self, batch: Batch, sched: ScheduleValues) -> list[Tensor]:
        low_res = self.low_res_augment is not None and sched.progress < self.low_res_share
        if not low_res and self.low_res_augment is not None:
            logger.info("progressive resizing: full-size crops from here on (%.0f %% of the planned steps done)",
                        100 * sched.progress)
            self.low_res_augment = None  # a run never goes back to the small crops
        global_views, local_views = (self.low_res_augment if low_res else self.augment)(batch.images)
        views = [global_views.contiguous(memory_format=torch.channels_last)]  # (2B, 3, S, S)
        if local_views is not None:
            views.append(local_views.contiguous(memory_format=torch.channels_last))  # (N*B, 3, s, s)
        return views

    def loss(self, views: list[Tensor], sched: ScheduleValues) -> Tensor:
        lo = self.config.dino
        masks = ibot_masks(views[0].shape[0], patch_grid(self.student.backbone, views[0].shape[-2:]),
                           lo.ibot_mask_p, lo.ibot_mask_ratio, views[0].device) if self.ibot else None  # (2B, h, w)
        with self.runtime.autocast():
            # teacher on global crops (for iBOT also its tokens at the places masked in the student)
            with torch.no_grad():
                teacher = self.teacher(views[:1], masks, False) if self.ibot else self.teacher(views[:1])
            # student on all crops
            student = self.student_forward(views, masks) if self.ibot else self.student_forward(views)
        teacher_out, student_features, student_out = teacher[1], student[0], student[1]  # (2B, K), (V*B, D), (V*B, K)
        values = dino_values(sched, lo)
        self._last = (teacher_out.detach(), self.loss_fn.center.clone(), student_features.detach())
        # in float32, outside autocast: every teacher-global x student-view pair but same views
        loss = self.loss_fn(list(teacher_out.float().chunk(2)), list(student_out.float().chunk(2 + self.num_local)),
                            teacher_temp=values.teacher_temp)
        self._terms = {}
        if self.koleo is not None:
            koleo = self.koleo(student_features[:teacher_out.shape[0]], 2)  # global crops' backbone features
            loss = loss + lo.koleo_weight * koleo
            self._terms["koleo_loss"] = koleo.detach()
        if self.patch_loss is not None:
            ibot = self.patch_loss(teacher[2], student[2], masks, values.teacher_temp)
            loss = loss + lo.ibot_weight * ibot
            self._terms["ibot_loss"] = ibot.detach()
        return loss

    def signals(self, sched: ScheduleValues) -> dict[str, float]:
        teacher_out, center, student_features = self._last
        targets = getattr(self.loss_fn, "last_targets", None)  # Sinkhorn-Knopp's, when centred so
        temp = dino_values(sched, self.config.dino).teacher_temp
        return health_signals(teacher_out, center, temp, student_features, targets) | {
            name: value.item() for name, value in self._terms.items()}

    def scheduled(self, sched: ScheduleValues) -> dict[str, float]:
        values = dino_values(sched, self.config.dino)
        return {"teacher_momentum": values.teacher_momentum, "teacher_temp": values.teacher_temp}

    curves: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (
        ("teacher entropy (nats)", ("teacher_entropy",)), ("teacher momentum", ("teacher_momentum",)))

    def exported_network(self) -> str:
        return "teacher"  # the EMA teacher, DINO's better network

    def warnings(self, signals: dict[str, float]) -> dict[str, str]:
        return collapse_warnings(signals, self.config.dino.head_output_dim, self.spec.feature_dim)

    def before_optimizer_step(self, sched: ScheduleValues) -> None:
        if dino_values(sched, self.config.dino).freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, sched: ScheduleValues) -> None:
        momentum = dino_values(sched, self.config.dino).teacher_momentum
        update_ema(self.student, self.teacher, momentum)  # EMA update of the teacher

    def checkpoint_state(self) -> dict[str, Any]:
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "center": self.loss_fn.center}
        if self.patch_loss is not None:
            state["patch_center"] = self.patch_loss.center.center
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss_fn.center.copy_(state["center"])
        if self.patch_loss is not None:
            self.patch_loss.center.center = state["patch_center"].to(self.runtime.device)

    def probe_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def export(self) -> Export:
        return Export(self.teacher.backbone.state_dict(), self.spec, "teacher", {})


def multi_crop(config: Config, scale: float) -> MultiCropAugmentation | SoundMultiCrop:
    """DINO's views at ``scale`` x the configured sizes (rounded, at least 1 px; below 1 for the low-resolution part of
    a progressively resized run, ``dino.low_res_share``); of a sound, its multi-crop in time (``audio`` section)."""
    lo, m = config.dino, config.model
    if config.data.kind == "audio":
        audio = config.audio
        return SoundMultiCrop(sound_frontend(audio), audio.global_view, audio.local_view, scaled(m.input_size, scale),
                              scaled(audio.local_frames, scale), lo.num_local_crops)
    size, local = scaled(m.input_size, scale), dataclasses.replace(lo.local, size=scaled(lo.local.size, scale))
    return MultiCropAugmentation(sized(lo.global_1, size), sized(lo.global_2, size), local, lo.num_local_crops,
                                 m.mean, m.std, lo.crop_mode)


def scaled(px: int, scale: float) -> int:
    """A crop size times ``scale``, rounded, at least 1 px."""
    return max(1, round(px * scale))


def interpolate(n: int, small: float, large: float) -> float:
    """``small`` below 20k images, ``large`` from 1M, linear in between."""
    t = min(1.0, max(0.0, (n - SCALE_FROM) / (SCALE_TO - SCALE_FROM)))
    return small + t * (large - small)
