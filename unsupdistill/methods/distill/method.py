"""Knowledge distillation: a frozen teacher's features guide a small student on unlabeled images.

The student's pooled features are projected to the teacher's dimension and matched to the teacher's: by
cosine (the default, :class:`~unsupdistill.losses.CosineLoss`), or as softmax distributions over a queue of
teacher embeddings (:class:`~unsupdistill.losses.QueueKLLoss`, LightlyTrain's ``distillation``), optionally
with a dense patch-similarity term. ``loss=dino`` is DINOv2's recipe for its small models: DINO's loss
against the frozen teacher's own head, with an EMA of the student kept as the exported model. Teacher and
student see the same view of each image ("consistent teacher", Beyer et al. 2022), each at its own input
size and normalisation. By default (``distill.targets=map``) the teacher runs once per image before training and
its spatial feature map is stored; each crop's target is the map pooled over the region the crop covers (ReLabel),
so no epoch runs the teacher (``teacher_pass.py``). With ``distill.targets=views`` the teacher sees every step's
view; with the teacher cache (``distill.cache``) the first epochs store every view with the teacher's features for
it and later epochs replay stored views without running the teacher (FKD).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from unsupdistill import distributed
from unsupdistill.augment import DistillAugmentation
from unsupdistill.augment.audio import sound_frontend
from unsupdistill.augment.distill import SoundDistillAugmentation
from unsupdistill.auto import Chooser, FolderFacts
from unsupdistill.config import Config, ConfigError
from unsupdistill.data import num_workers
from unsupdistill.data.fingerprint import data_fingerprint
from unsupdistill.data.labeled import TrainingLabels
from unsupdistill.losses import (
    CosineLoss,
    DensePatchKLLoss,
    FrozenTeacherDINOLoss,
    QueueKLLoss,
    default_queue_size,
    teacher_temperature,
)
from unsupdistill.losses.health import feature_collapse_warning, feature_spread, health_signals
from unsupdistill.methods.distill.settings import SECTIONS, uses_maps
from unsupdistill.methods.distill.sound import NO_CACHE, NO_MAPS, sound_augmentation, teacher_frontend
from unsupdistill.methods.distill.teacher_pass import (
    SpatialOutput,
    measure_rates,
    normalize,
    pass_decode_size,
    plan_budget,
    teacher_pass,
    teacher_sizes,
)
from unsupdistill.methods.distill.teacher_store import StoredViews, TeacherStore
from unsupdistill.models.backbone import create_backbone, pooled_and_spatial
from unsupdistill.models.dino import build_dino_head
from unsupdistill.models.ema import update_ema
from unsupdistill.models.teacher_cache import cache_key
from unsupdistill.models.teacher_maps import MAPS_DIR, TeacherMaps, fitting_grid, maps_bytes, pool_regions
from unsupdistill.models.teachers import Teacher, load_teacher
from unsupdistill.train.method import Batch, Export, Method, Runtime
from unsupdistill.train.precision import avoid_cpu_bf16_faults, resolve_precision
from unsupdistill.train.schedules import ScheduleValues

logger = logging.getLogger(__name__)

TEACHER_MAX_CPU = 224
"""Largest automatic teacher input on a CPU (a 518-px DINOv2 would take seconds per image)."""
TEACHER_LEAST_SHARE = 0.7
"""Images smaller than this share of the teacher's size are upsampled to it: EfficientNet-Lite0 (224 px) scored
its best CIFAR-10 k-NN at 160 px of 96-224 (BENCHMARKS, Distillation)."""
SOUND_PICTURE_PER_BAND = 2
"""On a CPU an image teacher sees a sound's log-mel view as a square picture of this many pixels per mel band (128 px
for 64 bands), at most its own size. On FSDD (BENCHMARKS, Sound) EfficientNet-Lite0 scored 77.7, 81.7 and 82.3 %
k-NN at 96, 128 and 160 px; at 128 px its 10-minute student got 111 steps instead of 80 and 69.3 % instead of 66.3."""
WORKING_SHARE = 4 / 3
"""With stored teacher maps the images are kept decoded at this many times the student's input (128 px for 96), the
random crops drawn from them (ImageNet's 224-px crops from 256-px images, and a bit more room)."""


@dataclass
class DistillViews:
    """One step's views: the student's, the teacher's for the images it runs on, and the cache's part.

    Attributes:
        student: (B, 3, S, S) the student's views.
        teacher: (M, 3, T, T) the teacher's views of the images ``run_teacher`` marks (all B without the cache),
            or None when every target comes from the cache.
        stored: the teacher cache's part of the step (which images run the teacher, the replayed features), or
            None without the cache.
        params: (B, P) the views' parameters (crop boxes, flips, jitter).
        indices: (B,) the images' dataset indices.
        labels: (B,) the images' class indices (-1: unlabeled) for a method that learns from labels, else None.
        images: (B, 3, H, H) uint8 images, for stored-map targets computed on the fly (a dry run), else None.
    """

    student: Tensor
    teacher: Tensor | None
    stored: StoredViews | None = None
    params: Tensor | None = None
    indices: Tensor | None = None
    labels: Tensor | None = None
    images: Tensor | None = None

    @property
    def run_teacher(self) -> Tensor | None:
        """(B,) bool, the images whose teacher output is computed this step; None without the cache (all of them)."""
        return None if self.stored is None else self.stored.run_teacher


class Student(nn.Module):
    """The student backbone, the head that maps its pooled features into the teacher's space and, for a method that
    learns from labels, a classifier.

    ``forward`` returns everything a step uses in one call (one DDP forward): pooled features (B, D), the
    spatial map (B, h, w, C) or None, the head's output (B, K), and the classifier's logits (B, C) or None.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        pooled, spatial = pooled_and_spatial(self.backbone, x)  # (B, D), (B, h, w, C) | None
        logits = self.classifier(pooled) if self.classifier is not None else None
        return pooled, spatial, self.head(pooled), logits


@dataclass
class DistillOutputs:
    """One step's forward passes: the student's outputs and the teacher's for the same views.

    Attributes:
        student_pooled: (B, D) the student's pooled features.
        student_spatial: (B, h, w, C) its spatial map, or None.
        student_out: (B, K) its head's output, float32.
        student_logits: (B, C) its classifier's logits, or None without one.
        teacher_pooled: (B, Dt) the teacher's pooled features (fp16-rounded when they pass through the cache).
        teacher_spatial: (B, h, w, C) the teacher's spatial map, or None (always None with the cache).
        target: (B, Dt) or (B, K) float32, what the student's head output is matched to.
    """

    student_pooled: Tensor
    student_spatial: Tensor | None
    student_out: Tensor
    student_logits: Tensor | None
    teacher_pooled: Tensor
    teacher_spatial: Tensor | None
    target: Tensor


def _constant_decay(chooser: Chooser) -> None:
    """A constant weight decay of 0.05: the student regresses fixed targets."""
    chooser.set("optim.weight_decay", 0.05, "constant 0.05: the student regresses fixed targets")
    chooser.set("optim.weight_decay_end", 0.05, "the same as optim.weight_decay")


class Distillation(Method):
    """Distillation from the frozen ``distill.teacher`` into the ``model`` section's backbone."""

    name = "distill"
    command = "distill"
    settings: ClassVar[dict[str, type]] = SECTIONS

    automatic_keys: ClassVar[frozenset[str]] = frozenset({
        "distill.teacher_size", "distill.teacher_runtime", "data.image_size", "model.backbone_kwargs", "optim.lr",
        "optim.weight_decay", "optim.weight_decay_end", "distill.targets", "distill.cache",
    })
    auto_batch: ClassVar[dict[str, int]] = {"cpu": 256, "cuda": 256}
    crop_headroom: ClassVar[float] = 1.0  # the student sees whole images, rescaled, as it will once deployed

    @classmethod
    def auto_settings(cls, chooser: Chooser, config: Config, facts: FolderFacts) -> None:
        """The teacher's input size, the decode size, the student's width and optimiser; with a time budget, the plan.

        The teacher runs at its own size, at most :data:`TEACHER_MAX_CPU` px on a CPU, and no larger than the
        images hold, except that images smaller than :data:`TEACHER_LEAST_SHARE` of its size are upsampled to that
        share (an ImageNet network sees objects too small below it). With stored teacher maps (``distill.targets``)
        the images are kept decoded at :data:`WORKING_SHARE` x the student's input, and a time budget is split by
        :func:`~unsupdistill.methods.teacher_pass.plan_budget` from rates measured here: the teacher's input size
        is the largest whose pass takes at most a quarter of the budget. With per-step teacher views the images are
        decoded at least at the teacher's size, so its views are not upsampled from a smaller decode.
        """
        d, crop = config.distill, config.model.input_size
        given = d.teacher_size if chooser.is_explicit("distill.teacher_size") else None
        teacher = run_teacher(d.teacher, given, d.loss == "dino", keep=True) if d.teacher else None
        if facts.kind == "audio":
            cls._sound_settings(chooser, config, facts, teacher)
            return
        native = teacher.input_size if teacher is not None else crop
        cap = native if facts.device_type == "cuda" else min(native, TEACHER_MAX_CPU)
        least = min(cap, max(32, round(TEACHER_LEAST_SHARE * native / 32) * 32))
        held = int(facts.shorter_side) // 32 * 32
        size = max(least, min(cap, held))
        if size == cap:
            why = f"the teacher's own size {native} px" + (f", capped at {cap} px on CPU" if cap < native else "")
        elif size == least:
            why = (f"images of {facts.shorter_side:g} px upsampled to {TEACHER_LEAST_SHARE:.1f} x the teacher's "
                   f"{native} px (CIFAR-10 k-NN of EfficientNet-Lite0: 75.5 % at 96, 80.1 % at 160, 78.8 % at 224 px)")
        else:
            why = f"the images' median shorter side {facts.shorter_side:g} px (to 32), below the teacher's {native}"
        if chooser.is_explicit("distill.teacher_size"):
            size = d.teacher_size or native
        maps = uses_maps(d)
        if maps:
            working = max(crop, min(int(facts.shorter_side), round(crop * WORKING_SHARE / 8) * 8))
            chooser.set("data.image_size", working, f"kept decoded at {WORKING_SHARE:.2g} x the student's {crop} px "
                        "input (no larger than the images), its random crops drawn from them; the teacher's pass "
                        "decodes once at its own size")
        else:
            decode = max(crop, min(int(facts.shorter_side), max(size, crop)))
            chooser.set("data.image_size", decode, f"the larger network's input ({max(size, crop)} px), no larger "
                        "than the images: neither view is upsampled from a smaller decode than they allow")
        if facts.device_type != "cuda" and not chooser.is_explicit("model.backbone") and \
                config.model.backbone == "resnet18" and not config.model.pretrained:
            chooser.set("model.backbone_kwargs", {"channels": [16, 32, 64, 128], "stem_width": 16},
                        "quarter-width ResNet-18: its training step at 96 px, batch 256, ran at 158 images/s in fp32 "
                        "on 2 AVX2 cores, epochs enough in a CPU budget (BENCHMARKS, Photos)")
            config = chooser.apply(config)
        budget = config.train.time_budget_s
        if maps and budget and teacher is not None and facts.sample_paths and \
                not chooser.is_explicit("distill.teacher_size"):
            size, why = cls._plan(chooser, config, facts, teacher, size)
        if not chooser.is_explicit("distill.teacher_size"):
            chooser.set("distill.teacher_size", size, why)
        if maps:
            chooser.set("optim.lr", 2e-2, "per 256 images: 5-minute trials on the clothing photos (k-NN 27.7 % at "
                        "2e-3, 35.2 % at 8e-3, 38.7 % at 2e-2; BENCHMARKS, Photos)")
        else:
            chooser.set("optim.lr", 2e-3, "per 256 images: recipes/cifar10_distill.yaml's (BENCHMARKS, Distillation)")
        _constant_decay(chooser)

    @classmethod
    def _sound_settings(cls, chooser: Chooser, config: Config, facts: FolderFacts, teacher: Teacher | None) -> None:
        """The teacher's input and the optimiser for a folder of sounds: a teacher of sounds at its own columns (its
        front end checked against the student's), an image network at its own size on a GPU and at
        :data:`SOUND_PICTURE_PER_BAND` pixels per mel band on a CPU; the teacher sees every step's view (no stored maps
        or cache)."""
        if teacher is not None and teacher.frontend is not None:
            teacher_frontend(sound_frontend(config.audio), teacher)  # refused now, before anything runs
            if not chooser.is_explicit("distill.teacher_size"):
                chooser.set("distill.teacher_size", teacher.input_size, "the sound teacher's own columns")
        elif teacher is not None and not chooser.is_explicit("distill.teacher_size"):
            native, bands = teacher.input_size, config.audio.n_mels
            if facts.device_type == "cuda":
                chooser.set("distill.teacher_size", native, f"the image teacher's own size {native} px")
            else:
                side = min(native, TEACHER_MAX_CPU, max(32, -(-SOUND_PICTURE_PER_BAND * bands // 32) * 32))
                chooser.set("distill.teacher_size", side,
                            f"the log-mel view as a picture of {SOUND_PICTURE_PER_BAND} px per mel band ({bands}), at "
                            f"most the image teacher's {native} px, on CPU (it runs on every step's view)")
        if not chooser.is_explicit("distill.targets"):
            chooser.set("distill.targets", "views", NO_MAPS)
        if not chooser.is_explicit("distill.cache"):
            chooser.set("distill.cache", False, NO_CACHE)
        chooser.set("optim.lr", 2e-3, "per 256 clips: recipes/cifar10_distill.yaml's for per-step teacher views "
                    "(BENCHMARKS, Distillation)")
        _constant_decay(chooser)

    @classmethod
    def _plan(cls, chooser: Chooser, config: Config, facts: FolderFacts, teacher: Any, own: int) -> tuple[int, str]:
        """Measure the rates, choose the teacher's size (and runtime) for the budget, log the plan; (size, why)."""
        d, crop = config.distill, config.model.input_size
        device = torch.device("cuda" if facts.device_type == "cuda" else "cpu")
        teacher.backbone.to(device, memory_format=torch.channels_last)
        backbone, spec = create_backbone(config.model, (crop,))
        student = nn.Sequential(backbone, nn.Linear(spec.feature_dim, teacher.feature_dim))
        decode = max(config.data.image_size or crop, min(own, int(facts.shorter_side)))
        rates = measure_rates(SpatialOutput(teacher.backbone), own, teacher.mean, teacher.std, facts.sample_paths,
                              decode, student, crop, resolve_precision(config.train.precision, device), device,
                              d.teacher_runtime)
        plan = plan_budget(float(config.train.time_budget_s), facts.images, teacher_sizes(own), rates.teacher, own,
                           rates.decode, rates.student, crop)
        logger.info("plan for the %g s budget: %s (measured: teacher %.0f images/s at %d px through %s, decoding "
                    "%.0f images/s, the student's step %.0f images/s)", plan.budget_s, plan.line(), rates.teacher, own,
                    rates.path.name, rates.decode, rates.student)
        if d.teacher_runtime == "auto":
            chooser.set("distill.teacher_runtime", rates.path.name, f"the fastest that keeps its outputs: "
                        f"{rates.path.report}")
        return plan.teacher_size, f"{plan.why}; plan: {plan.line()}"

    def __init__(self, config: Config, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        d, m = config.distill, config.model
        self.teacher = run_teacher(d.teacher, d.teacher_size, d.loss == "dino")
        self.teacher.backbone.to(runtime.device, memory_format=torch.channels_last)
        if self.teacher.head is not None:
            self.teacher.head.to(runtime.device)
        size = m.input_size
        self.sound = config.data.kind == "audio"
        self.use_maps = uses_maps(d) and not self.sound
        self.augment: DistillAugmentation | SoundDistillAugmentation
        if self.sound:  # a view in time of each clip's log-mel; the teacher sees it in its own form
            self.image_size = size  # (unused: a folder of sounds is read at audio.sample_rate and clip_seconds)
            self.augment = sound_augmentation(config, self.teacher).to(runtime.device)
        else:
            if self.use_maps:  # the teacher's maps are stored; only the student's views are rendered, from small images
                self.image_size = round(size * WORKING_SHARE / 8) * 8
                view_size, view_mean, view_std = size, m.mean, m.std
            else:  # the teacher sees the views: images are decoded for the larger network
                self.image_size = max(size, self.teacher.input_size)
                view_size, view_mean, view_std = self.teacher.input_size, self.teacher.mean, self.teacher.std
            self.augment = DistillAugmentation(d.view, d.mixup_alpha, size, m.mean, m.std, view_size, view_mean,
                                               view_std).to(runtime.device)
        self.maps: TeacherMaps | None = None  # the stored teacher maps (distill.targets=map), once set up

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
            with torch.no_grad():  # the teacher head's outputs: (2, K)
                outputs = self.teacher.head(torch.zeros(2, self.teacher.feature_dim, device=runtime.device)).shape[-1]
            self.global_loss: nn.Module = FrozenTeacherDINOLoss(outputs, config.dino.student_temp,
                                                                config.dino.center_momentum)
        else:  # QueueKLLoss is sized in setup(), once the dataset's size is known
            self.global_loss = CosineLoss() if d.loss == "cosine" else QueueKLLoss(self.teacher.feature_dim, 1,
                                                                                   d.temperature)
        self.dense_loss = None
        if d.dense_weight > 0:
            self._check_spatial(size)
            self.dense_loss = DensePatchKLLoss(d.dense_temperature)
        self.global_loss.to(runtime.device)
        self._last: dict[str, Tensor] = {}
        self.store = TeacherStore(d, config.train.epochs, self.teacher, (self.student.backbone, size), self.use_maps,
                                  runtime.device, NO_CACHE if self.sound else None)

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
        return build_dino_head(self.teacher.head_config, self.spec.feature_dim)

    def setup(self, dataset: Dataset, labels: TrainingLabels | None = None) -> None:
        d, num_images = self.config.distill, len(dataset)
        if isinstance(self.global_loss, QueueKLLoss):
            size = d.queue_size or default_queue_size(num_images)
            self.global_loss = QueueKLLoss(self.teacher.feature_dim, size, d.temperature).to(self.runtime.device)
        if self.use_maps and self.runtime.run_dir is not None:  # a dry run computes its targets on the fly
            self._setup_maps(dataset)
        self.store.open(dataset, self.runtime.run_dir, self.augment.student_size)

    @torch.no_grad()
    def _setup_maps(self, dataset: Dataset) -> None:
        """Open the stored teacher maps (RUN/teacher_maps) and run the teacher's pass over the images missing there,
        keeping them decoded at the student's working size on the way."""
        d, t, num_images = self.config.distill, self.teacher, len(dataset)
        device, module = self.runtime.device, SpatialOutput(t.backbone)
        own = tuple(module(torch.zeros(1, 3, t.input_size, t.input_size, device=device)).shape[1:])  # (h, w, C)
        grid = fitting_grid(num_images, own[:2], own[2], d.cache_max_gb * 1e9)
        size = maps_bytes(num_images, grid, own[2])
        if size > d.cache_max_gb * 1e9:
            raise ConfigError(f"the teacher's whole-image features of {num_images} images take {size / 1e9:.2f} GB, "
                              f"more than distill.cache_max_gb={d.cache_max_gb:g}: raise distill.cache_max_gb, or set "
                              "distill.targets=views (the teacher then runs on every step's views)")
        folder = self.runtime.run_dir / MAPS_DIR
        pooled = f", pooled from {own[0]}x{own[1]} to fit" if grid != own[:2] else ""
        logger.info("teacher maps: %d images x %dx%d x %d fp16 = %.2f GB in %s (limit distill.cache_max_gb=%g%s)",
                    num_images, grid[0], grid[1], own[2], size / 1e9, folder, d.cache_max_gb, pooled)
        key = cache_key(teacher=t.cache_key, teacher_size=t.input_size, images=data_fingerprint(dataset), grid=grid,
                        targets="map")
        self.maps = TeacherMaps.open(folder, key, num_images, grid, own[2])
        missing = self.maps.missing()
        mine = missing[distributed.rank()::self.runtime.world_size]  # each process passes over its share
        if len(missing) == 0:
            logger.info("teacher maps reused: all %d stored", num_images)
        if len(mine):
            logger.info("teacher pass: %d images at %d px (decoded at %d px)%s", len(mine), t.input_size,
                        pass_decode_size(getattr(dataset, "base", dataset), t.input_size),
                        f", {num_images - len(missing)} stored already" if len(missing) < num_images else "")
            try:
                report = teacher_pass(module, dataset, mine, self.maps, t.input_size, t.mean, t.std, device,
                                      num_workers(self.config.data), d.teacher_runtime, keep=dataset,
                                      timer=self.runtime.timer)
            except ValueError as err:  # an unknown distill.teacher_runtime
                raise ConfigError(f"distill.teacher_runtime: {err}") from err
            logger.info("teacher pass: %s", report.line())
        distributed.barrier()  # every process's maps are stored before any trains on them

    def _map_targets(self, views: DistillViews) -> Tensor:
        """The teacher's map pooled over each view's crop box: (B, Dt) float32 on the device; from the stored maps,
        or (a dry run) from the teacher on the whole images now."""
        boxes = views.params[:, :4]
        if self.maps is not None:
            return self.maps.targets(views.indices, boxes).to(self.runtime.device)
        t = self.teacher
        maps = SpatialOutput(t.backbone)(normalize(views.images, t.input_size, t.mean, t.std))  # (B, h, w, C)
        return pool_regions(maps.float(), boxes.to(maps.device))

    @torch.no_grad()
    def whole_image_targets(self, dataset: Dataset, rows: Tensor, batch: int = 128) -> Tensor:
        """The teacher's features of whole images ``rows`` (N,), as the student's targets hold them: (N, Dt) float32
        on the CPU (the stored maps' means with distill.targets=map; else the pooled features at its input size)."""
        whole = DistillAugmentation.whole(len(rows))[:, :4]
        if self.maps is not None:
            return torch.cat([self.maps.targets(chunk, box) for chunk, box in zip(rows.split(batch),
                                                                                  whole.split(batch))])
        out, t = [], self.teacher
        for chunk in rows.split(batch):
            items = [dataset[int(i)] for i in chunk]
            images = torch.stack([item[0] if isinstance(item, tuple) else item for item in items])
            if self.sound:  # waves (b, 1, S): the whole clip as the teacher hears it
                x = self.augment.whole(images.to(self.runtime.device))  # (b, 1, M, T) or (b, 3, T, T)
            else:
                x = normalize(images.to(self.runtime.device), t.input_size, t.mean, t.std)  # (b, 3, T, T)
            with self.runtime.autocast():
                if self.use_maps:
                    pooled = SpatialOutput(t.backbone)(x).float().mean(dim=(1, 2))
                else:
                    pooled, _ = pooled_and_spatial(t.backbone, x)
            out.append(pooled.float().cpu())  # (b, Dt)
        return torch.cat(out)

    def start_epoch(self, epoch: int) -> None:
        self.store.start_epoch(epoch)

    def describe(self) -> str:
        d = self.config.distill
        dense = f" + {d.dense_weight:g} x dense" if self.dense_loss is not None else ""
        queue = f", queue {self.global_loss.queue.shape[0]}" if isinstance(self.global_loss, QueueKLLoss) else ""
        unit = "columns" if self.sound else "px"
        teacher_unit = "columns" if self.teacher.frontend is not None else "px"
        return (f"{self.name}: {self.spec.name} ({self.config.model.input_size} {unit}) from teacher "
                f"{self.teacher.name} ({self.teacher.input_size} {teacher_unit}, {self.teacher.feature_dim}-d), loss "
                f"{d.loss}{dense}{queue}; " + ("targets: the teacher's stored maps pooled over each crop"
                                               if self.use_maps else f"teacher cache {self.store.reason}"))

    def views(self, batch: Batch, sched: ScheduleValues) -> DistillViews:
        if self.sound:  # one view in time of each clip, for both networks (no stored maps or cache for sounds)
            student, teacher = self.augment(batch.images)  # (B, 1, M, F), (B, 1, M, T) | (B, 3, T, T)
            return DistillViews(_channels_last(student), _channels_last(teacher))
        params = self.augment.sample(len(batch.indices))  # drawn every step alike, so a resume replays the RNG
        if self.use_maps:  # the student's view; its target is the stored map pooled over the same crop box
            student, _ = self.augment.render(batch.images, params, teacher=False)
            return DistillViews(_channels_last(student), None, params=params, indices=batch.indices,
                                images=None if self.maps is not None else batch.images)
        if not self.store.active:
            student, teacher = self.augment.render(batch.images, params)  # the same view: (B, 3, s, s), (B, 3, t, t)
            return DistillViews(_channels_last(student), _channels_last(teacher))
        stored = self.store.lookup(batch.indices, params)  # a stored view replayed, or a new one to store
        run = stored.run_teacher
        student, _ = self.augment.render(batch.images, stored.params, teacher=False)
        teacher, tic = None, time.perf_counter()
        if run.any():
            teacher = _channels_last(self.augment.render(batch.images[run.to(batch.images.device)],
                                                         stored.params[run])[1])
        self.store.timed_views(time.perf_counter() - tic)  # the teacher's views; its forward is timed in loss()
        return DistillViews(_channels_last(student), teacher, stored, stored.params, batch.indices)

    def loss(self, views: DistillViews, sched: ScheduleValues) -> Tensor:
        return self.feature_loss(self.forward_views(views), sched)

    def forward_views(self, views: DistillViews) -> DistillOutputs:
        """The frozen teacher (or its cache) and the student on one step's views."""
        with self.runtime.autocast():
            # frozen teacher on the views it has not seen yet, at its own size
            with torch.no_grad():
                tic = time.perf_counter()
                if self.use_maps:  # (B, Dt): stored maps pooled over the crops
                    teacher_pooled, teacher_spatial = self._map_targets(views), None
                else:
                    teacher_pooled, teacher_spatial = (None, None) if views.teacher is None else \
                        pooled_and_spatial(self.teacher.backbone, views.teacher)  # (M, Dt), (M, h, w, C) | None
                teacher_seconds = time.perf_counter() - tic
                self.runtime.timer.add("teacher", teacher_seconds)
            # student on the same views
            student_pooled, student_spatial, student_out, student_logits = self.student_forward(views.student)
        if views.stored is not None:  # the cache: stored features where there are some, the teacher's else
            teacher_pooled = self.store.features(views.stored, views.indices, teacher_pooled, teacher_seconds)
        with torch.no_grad(), self.runtime.autocast():
            target = teacher_pooled if self.teacher.head is None or self.config.distill.loss != "dino" \
                else self.teacher.head(teacher_pooled)  # (B, Dt) or (B, K)
        self._last = {"cache_hits": (~views.run_teacher).float().mean()} if views.run_teacher is not None else {}
        return DistillOutputs(student_pooled, student_spatial, student_out.float(), student_logits, teacher_pooled,
                              teacher_spatial, target.float())

    def feature_loss(self, out: DistillOutputs, sched: ScheduleValues) -> Tensor:
        """The loss between the student's head output and the teacher's target (``distill.loss``), plus the dense
        term; keeps what :meth:`signals` reads."""
        self._last |= {"student": out.student_pooled.detach(), "teacher": out.teacher_pooled.detach(),
                       "target": out.target.detach(), "output": out.student_out.detach()}
        if isinstance(self.global_loss, FrozenTeacherDINOLoss):
            self._last["center"] = self.global_loss.center.clone()
            loss = self.global_loss(out.target, out.student_out, teacher_temp=self._teacher_temp(sched))
        else:
            loss = self.global_loss(out.student_out, out.target)
        if self.dense_loss is not None:
            dense = self.dense_loss(out.student_spatial.float(), out.teacher_spatial.float())
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
            out |= health_signals(last["target"], last["center"], self._teacher_temp(sched), last["student"])
        if "dense" in last:
            out["dense_loss"] = last["dense"].item()
        if "cache_hits" in last:
            out["teacher_cache_hits"] = last["cache_hits"].item()
        return out

    def forecast_seconds(self, epoch: int) -> float:
        return self.store.forecast_seconds(epoch)

    def _teacher_temp(self, sched: ScheduleValues) -> float:
        """loss=dino: the teacher temperature of the ``dino`` section's schedule at this step."""
        return teacher_temperature(sched.step, sched.steps_per_epoch, self.config.dino)

    def scheduled(self, sched: ScheduleValues) -> dict[str, float]:
        return {"teacher_temp": self._teacher_temp(sched)} if self.config.distill.loss == "dino" else {}

    @classmethod
    def unused_keys(cls, config: Config) -> set[str]:
        """The other methods' sections; ``loss=dino`` reads the ``dino`` section's temperatures and centre."""
        unused = super().unused_keys(config)
        if config.distill.loss == "dino":
            unused.discard("dino")
        return unused

    @classmethod
    def teacher_of(cls, config: Config) -> tuple[str, int | None] | None:
        return config.distill.teacher, config.distill.teacher_size

    def warnings(self, signals: dict[str, float]) -> dict[str, str]:
        return feature_collapse_warning(signals, self.spec.feature_dim)

    def after_optimizer_step(self, sched: ScheduleValues) -> None:
        if isinstance(self.global_loss, QueueKLLoss):
            self.global_loss.push(self._last["teacher"].float())
        if self.ema is not None:
            update_ema(self.student, self.ema, self.config.distill.ema_momentum)
            for ema_buffer, buffer in zip(self.ema.buffers(), self.student.buffers()):  # BatchNorm statistics
                ema_buffer.copy_(buffer)

    def checkpoint_state(self) -> dict[str, Any]:
        state = {"student": self.student.state_dict(), "losses": self.global_loss.state_dict(),
                 "distill_teacher": {"name": self.teacher.name, "feature_dim": self.teacher.feature_dim,
                                     "key": self.teacher.cache_key}}
        if self.ema is not None:
            state["student_ema"] = self.ema.state_dict()
        return state

    curves: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (
        ("agreement with the teacher (cosine)", ("teacher_agreement",)),
        ("teacher entropy (nats)", ("teacher_entropy",)))

    def exported_network(self) -> str:
        return "student_ema" if self.ema is not None else "student"

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        saved = state.get("distill_teacher", {})
        if saved.get("feature_dim") != self.teacher.feature_dim:
            raise ConfigError(f"the checkpoint was distilled from teacher {saved.get('name')} "
                              f"({saved.get('feature_dim')}-d features), but distill.teacher="
                              f"{self.config.distill.teacher} gives {self.teacher.feature_dim}-d features; resume "
                              "with the run's own teacher")
        if saved.get("key") and saved["key"] != self.teacher.cache_key:  # (checkpoints before 2026-12-07: no key)
            raise ConfigError(f"the checkpoint was distilled from teacher {saved.get('name')}, but distill.teacher="
                              f"{self.config.distill.teacher} (distill.teacher_size="
                              f"{self.config.distill.teacher_size}) is another teacher: other weights, input size or "
                              "normalisation, though its features are as wide. Resume with the run's own teacher, or "
                              "distill from this one into a new run (--out DIR)")
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


_LOADED: dict[tuple[str, int | None, bool], Teacher] = {}
"""The teacher the automatic settings loaded, kept for the run they set up (one at a time)."""


def run_teacher(spec: str, size: int | None, need_head: bool, keep: bool = False) -> Teacher:
    """:func:`~unsupdistill.models.teachers.load_teacher`, once per run: the automatic settings load the teacher
    (``keep``) and the run takes the same one when it asks for the same spec, input size and head; a teacher loaded at
    its own size also serves a run at that size given explicitly."""
    key = (spec, size, need_head)
    teacher = _LOADED.get(key) or next((t for (s, z, h), t in _LOADED.items()
                                        if (s, h) == (spec, need_head) and z is None and t.input_size == size), None)
    _LOADED.clear()
    if teacher is None:
        teacher = load_teacher(spec, size, need_head=need_head)
    if keep:
        _LOADED[key] = teacher
    return teacher


def _channels_last(views: Tensor) -> Tensor:
    return views.contiguous(memory_format=torch.channels_last)
