"""Distillation's settings (the ``distill`` section), torch-free: a recipe loads without importing the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from unsupdistill.config.sections import PATH, ViewSpec, reads_section
from unsupdistill.registry import Flag

if TYPE_CHECKING:
    from unsupdistill.config import Config


def uses_maps(d: DistillConfig) -> bool:
    """Whether ``distill.targets`` resolves to the stored teacher maps: auto does, except with mixup or the dense
    term, whose targets need the teacher on the mixed view or its patch map of the crop."""
    return d.targets == "map" or (d.targets == "auto" and d.mixup_alpha == 0 and d.dense_weight == 0)


@dataclass
class DistillConfig:
    """Distillation's own settings (the ``distill`` section): the frozen teacher, the loss, the shared view, the cache.

    Teacher and student see the same view of each image (the "consistent teacher" recipe, Beyer et al.
    2022), each at its own input size and normalisation; the student's size and normalisation are
    ``model.input_size``, ``model.mean`` and ``model.std``.
    """

    teacher: str | None = field(default=None, metadata={**PATH, "not_paths": ("timm:",)})
    """The frozen teacher: a run directory of ours, an exported ``.safetensors`` (with its ``.json``), a
    checkpoint ``.pt``, or ``timm:NAME[,pretrained=true][,key=value...]`` (e.g.
    ``timm:vit_small_patch14_dinov2.lvd142m,pretrained=true,img_size=224``)."""
    teacher_size: int | None = None
    """Side of the teacher's input in pixels; null: its own (sidecar ``input_size``, a timm ``img_size``
    argument, or timm's pretrained config)."""
    loss: Literal["cosine", "queue_kl", "dino"] = "cosine"
    """cosine: regression of the student's linearly projected features onto the teacher's, by cosine (the
    best of the three in 10-minute CIFAR-10 trials, see BENCHMARKS.md); queue_kl: both as softmaxes over
    similarities to a queue of teacher embeddings, matched by KL (LightlyTrain's loss); dino: DINO's loss
    against the frozen teacher's own DINO head (a run of ours)."""
    temperature: float = 0.07
    """Softmax temperature of queue_kl."""
    queue_size: int | None = None
    """Teacher embeddings in the queue_kl queue; null: scaled with the dataset (see the README)."""
    dense_weight: float = 0.0
    """Weight of the dense term (patch-to-patch similarity KL) added to the global loss; 0 turns it off."""
    dense_temperature: float = 0.1
    """Softmax temperature of the dense term."""
    ema_momentum: float = 0.0
    """Keep an exponential moving average of the student with this momentum and export it (DINOv2's small
    models); 0 exports the student as trained."""
    view: ViewSpec = field(default_factory=lambda: ViewSpec(scale=(0.2, 1.0)))
    """The shared view's random augmentation: crop scale, flip, colour jitter, grayscale (no blur or
    solarization: the teacher sees the view too)."""
    mixup_alpha: float = 0.0
    """Mix each view with another image of the batch, weight ~ Beta(alpha, alpha); 0 turns mixup off."""
    cache: Literal["auto", True, False] = "auto"
    """Teacher cache (FKD, Shen & Xing 2022): the first ``cache_views`` epochs store each image's view (crop box,
    flip, colour jitter) with the teacher's features for it in RUN/teacher_cache; later epochs replay a stored
    view without running the teacher. auto: on when the teacher's forward costs more FLOPs per image than the
    student's training step and the run has more epochs than ``cache_views`` (never with mixup or the dense
    term, whose targets cannot be stored); true (or on): whenever it can be; false (or off): never."""
    cache_views: int = 2
    """Views stored per image: the teacher runs in the first this many epochs, later epochs replay one of them."""
    cache_max_gb: float = 8.0
    """Most disk the cache or the teacher maps may take; fewer views are stored, or the maps are pooled to a coarser
    grid (down to whole-image targets), when they would not fit."""
    targets: Literal["auto", "map", "views"] = "auto"
    """What the student's targets come from. map: the teacher runs once per image before training, at its input
    size, and its spatial feature map is stored (RUN/teacher_maps); each random crop's target is that map averaged
    over the region the crop covers (ReLabel, Yun et al. 2021), and the images stay decoded at the student's
    working size, so epochs run at the student's speed. views: the teacher sees each step's view (the
    "consistent teacher"), or a stored one (distill.cache). auto: map, except with distill.mixup_alpha > 0 or
    distill.dense_weight > 0 (their targets need the teacher on the view itself)."""
    teacher_runtime: str = "auto"
    """How the frozen teacher runs: auto: the fastest of eager fp32, channels-last fp32 and bf16 (where the CPU has
    bf16), a traced and frozen graph and ONNX Runtime, timed on the first batch and checked against eager fp32
    (cosine >= 0.995); or one of those paths by name (e.g. "eager fp32")."""

    def checks(self, config: Config) -> list[tuple[bool, str, str]]:
        """(ok, key, what is allowed) for the values types cannot check."""
        checks = [
            (not reads_section(config, "distill") or bool(self.teacher and self.teacher.strip()), "distill.teacher",
             f"a teacher when method={config.method}: a run directory, an exported .safetensors, a checkpoint .pt "
             "or timm:NAME[,pretrained=true]"),
            (self.teacher_size is None or self.teacher_size >= 1, "distill.teacher_size", "null or an integer >= 1"),
            *((getattr(self, key) > 0, f"distill.{key}", "a number > 0")
              for key in ("temperature", "dense_temperature")),
            (self.queue_size is None or self.queue_size >= 1, "distill.queue_size",
             "null (scaled with the data) or an integer >= 1"),
            (self.dense_weight >= 0, "distill.dense_weight", "a number >= 0 (0 turns the dense term off)"),
            (0 <= self.ema_momentum < 1, "distill.ema_momentum", "a number in [0, 1) (0: no EMA)"),
            *self.view.checks("distill.view"),
            *((getattr(self.view, p) == 0, f"distill.view.{p}", "0: the shared view has no blur or solarization")
              for p in ("blur_p", "solarize_p")),
            (self.mixup_alpha >= 0, "distill.mixup_alpha", "a number >= 0 (0 turns mixup off)"),
            (self.cache_views >= 1, "distill.cache_views", "an integer >= 1"),
            (self.cache is not True or (self.mixup_alpha == 0 and self.dense_weight == 0), "distill.cache",
             "auto or off with distill.mixup_alpha > 0 or distill.dense_weight > 0 (a mixed view's or a patch map's "
             "teacher output is not stored)"),
            (self.cache_max_gb > 0, "distill.cache_max_gb", "a number of gigabytes > 0"),
            (self.targets != "map" or (self.mixup_alpha == 0 and self.dense_weight == 0), "distill.targets",
             "auto or views with distill.mixup_alpha > 0 or distill.dense_weight > 0 (a mixed view's or a crop's "
             "patch map has no stored target)"),
        ]
        if config.data.kind == "audio":  # what needs an image's view: refused rather than ignored
            checks += [
                (self.targets != "map", "distill.targets", "auto or views for sounds (the stored teacher maps pool an "
                 "image's crop box; a sound's view has none)"),
                (self.cache is not True, "distill.cache", "auto or off for sounds (the cache stores an image's view "
                 "parameters)"),
                (self.mixup_alpha == 0, "distill.mixup_alpha", "0 for sounds: their view mixes clips already "
                 "(audio.global_view.mix_p)"),
                (self.dense_weight == 0, "distill.dense_weight", "0 for sounds (no dense term on spectrograms yet)"),
            ]
        return checks


SECTIONS = {"distill": DistillConfig}
"""The config sections distillation reads besides the shared ones."""

RENAMED = {"distill.crop_scale": "distill.view.scale", **{
    f"distill.{key}": f"distill.view.{key}" for key in ("flip_p", "color_jitter", "color_jitter_p", "grayscale_p")}}
"""Keys that moved (old dotted name -> new): the shared view's settings are a ``ViewSpec`` since issue 34."""

FLAGS = (Flag("--teacher", "distill.teacher", metavar="TEACHER",
              help="the frozen teacher (sets distill.teacher): a run directory, an exported .safetensors (with its "
                   ".json), a checkpoint .pt, or timm:NAME[,pretrained=true][,key=value...], e.g. "
                   "timm:vit_small_patch14_dinov2.lvd142m,pretrained=true,img_size=224"),)
"""The flags distillation adds to its verb."""
