"""Settings chosen from the data and the device, for a folder trained without a recipe.

``unsupdistill pretrain /photos`` has no recipe to say how large the photos are or how many there
are. The built-in defaults are sized for 8x8 digits, so the settings that depend on the images are
chosen here from the folder's scan and the device, each with the reason, and every value the user
gave (``key=value``) wins:

- the crop sizes follow the images' median shorter side, capped by what the device trains in
  reasonable time; the decode size leaves the crops close to 1:1 (DINO crops from the whole image);
- the network follows the crop size: the small-image ResNet stem below 64 px, a ViT patch size that
  gives 8-14 patches a side;
- DINO's dataset-size-dependent settings are scaled the way LightlyTrain scales them: head output
  1,024 below 20k images up to 65,536, teacher temperature 0.02 -> 0.07 and momentum 0.99 -> 0.996
  between 20k and 1M images; warm-ups are a share of the run's steps, not a number of epochs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from unsupdistill.config import Config, merge, validate
from unsupdistill.data.scan import FolderScan

MAX_CROP = {"cpu": 96, "cuda": 224}
"""Largest global crop chosen per device: 96 px keeps a CPU epoch of 10k images to minutes; 224 is DINO's."""
DECODE_HEADROOM = 1.15
"""The decoded image is at least this much larger than the global crop (ImageNet's 256 for 224)."""
DECODE_RATIO = 1.25
"""Decode size as a multiple of the global crop when the images are large enough."""
LOCAL_RATIO = 96 / 224
"""Local crop size as a share of the global one (DINO's 96 and 224 px)."""
SMALL_STEM_BELOW = 64
"""ResNets get the 3x3 stride-1 stem (no max-pool) for global crops under this many pixels."""
OUTPUT_DIM_BUCKETS = ((20_000, 1024), (50_000, 2048), (100_000, 4096), (200_000, 16384), (500_000, 32768))
"""(images below, head output dim); 65,536 above the last bucket."""
SCALE_FROM, SCALE_TO = 20_000, 1_000_000
"""Teacher temperature and momentum move from their small-data to their ImageNet values over this range."""
WARMUP_SHARE, WARMUP_MAX_STEPS = 0.1, 12_500
"""lr warm-up: 10 % of the steps, at most DINO's 10 ImageNet epochs of batch 1024."""
MIN_STEPS = 1_000
"""Tiny sets train for enough epochs to reach this many steps (at least 100 epochs)."""

AUTOMATIC_KEYS = frozenset({
    "augment.global_1.size", "augment.global_2.size", "augment.local.size", "augment.num_local_crops",
    "augment.global_1.blur_p", "augment.global_2.blur_p", "augment.local.blur_p", "data.image_size",
    "model.backbone_kwargs", "model.small_image_stem", "model.head_batch_norm", "model.norm_last_layer",
    "model.head_hidden_dim", "model.head_bottleneck_dim", "model.head_output_dim",
    "loss.teacher_temp", "loss.warmup_teacher_temp", "loss.warmup_teacher_temp_epochs",
    "optim.lr", "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "optim.teacher_momentum",
    "train.batch_size", "train.epochs",
})
"""Every key :func:`auto_settings` may set (a bad value the user gave for one is still an error)."""


@dataclass
class Choice:
    """One automatic setting: the dotted config key, its value and why."""

    key: str
    value: Any
    why: str


def auto_settings(config: Config, scan: FolderScan, device_type: str, explicit: set[str],
                  world_size: int = 1) -> tuple[Config, list[Choice]]:
    """Choose the settings that depend on the images and the device; keys in ``explicit`` are kept.

    Args:
        config: defaults with the user's overrides applied.
        scan: the folder's scan (file count and image sizes).
        device_type: ``"cpu"`` or ``"cuda"``.
        explicit: dotted keys the user set (``augment.global_1.size``); a key, its parents and its
            children are never changed.
        world_size: processes the global batch is split over.

    Returns:
        The config with the choices applied, validated, and the choices.
    """
    chooser = _Chooser(explicit)
    n = len(scan.files)
    short = statistics.median(min(w, h) for w, h in scan.sizes)
    m, a = config.model, config.augment
    cap = MAX_CROP["cuda" if device_type == "cuda" else "cpu"]

    # ---- network family, crop sizes, decode size ----------------------------------------------
    vit = _is_vit(m.backbone)
    backbone_given = chooser.is_explicit("model.backbone")
    if chooser.is_explicit("augment.global_1.size"):
        crop = a.global_1.size
        patch = _patch_size(crop)
    else:
        fit = short / DECODE_HEADROOM
        wanted = min(cap, fit)
        patch = _patch_size(wanted)
        unit = patch if vit else (8 if wanted >= 64 else 4)
        crop = max(unit, int(wanted // unit) * unit)
        limit = "" if fit <= cap else f", capped at {cap} px on {device_type.upper()}"
        chooser.set("augment.global_1.size", crop, f"median shorter side {short:g} px / {DECODE_HEADROOM}{limit}")
    chooser.set("augment.global_2.size", crop, "the same as augment.global_1.size")
    unit = patch if vit else 4
    local = min(crop, max(unit if vit else 8, round(crop * LOCAL_RATIO / unit) * unit))
    chooser.set("augment.local.size", local, f"{LOCAL_RATIO:.2f} x the global crop (DINO: 96 / 224)")
    decode = max(crop, min(int(short), round(crop * DECODE_RATIO)))
    chooser.set("data.image_size", decode,
                f"decode to {decode / crop:.2f} x the global crop, no larger than the images: crops stay near 1:1")
    if crop < 64:
        for name in ("global_1", "global_2", "local"):
            chooser.set(f"augment.{name}.blur_p", 0.0, "no Gaussian blur on crops under 64 px (too little detail)")
    locals_wanted = 6 if device_type == "cuda" else 4
    chooser.set("augment.num_local_crops", locals_wanted, f"{locals_wanted} local crops on {device_type.upper()}")

    if vit:
        chooser.set("model.backbone_kwargs", {"img_size": crop, "patch_size": patch},
                    f"patch {patch} px: {crop // patch} patches a side")
        chooser.set("model.small_image_stem", False, "a ViT has no ResNet stem")
        chooser.set("model.head_batch_norm", False, "ViT: no BatchNorm in the head (DINO)")
        chooser.set("model.norm_last_layer", False, "ViT: DINO's setting for ViT-S")
        chooser.set("optim.lr", 5e-4, "DINO's ViT learning rate per 256 images")
    else:
        resnet = m.backbone.startswith(("resnet", "wide_resnet", "resnext", "seresnet", "skresnet"))
        if resnet:
            small = crop < SMALL_STEM_BELOW
            chooser.set("model.small_image_stem", small,
                        f"3x3 stride-1 stem, no max-pool, for crops under {SMALL_STEM_BELOW} px" if small else
                        f"ImageNet stem (7x7 stride 2 + max-pool) for crops of {SMALL_STEM_BELOW} px or more")
        else:
            chooser.set("model.small_image_stem", False, f"{m.backbone} is not a ResNet")
        if backbone_given:
            chooser.set("model.backbone_kwargs", {}, f"timm's own arguments for {m.backbone}")
        elif device_type == "cuda":
            chooser.set("model.backbone_kwargs", {}, "full-width ResNet-18 on a GPU")
        else:
            chooser.set("model.backbone_kwargs", dict(m.backbone_kwargs), "half-width ResNet-18: 4x fewer FLOPs on CPU")
        chooser.set("optim.lr", 2e-3, "per 256 images: left DINO's plateau soonest in our CIFAR-10 CPU trials")

    # ---- batch, epochs, warm-ups ----------------------------------------------------------------
    batch = config.train.batch_size
    if not chooser.is_explicit("train.batch_size"):
        base = 128 if device_type == "cuda" else 64
        batch = min(base, 2 ** int(math.log2(max(2, n // 2))))
        batch = max(world_size, batch // world_size * world_size)
        chooser.set("train.batch_size", batch, f"{base} on {device_type.upper()}, at most half the {n} images")
    steps_per_epoch = max(1, n // batch)
    epochs = config.train.epochs
    if not chooser.is_explicit("train.epochs"):
        epochs = max(100, math.ceil(MIN_STEPS / steps_per_epoch))
        chooser.set("train.epochs", epochs, f"at least 100 epochs and {MIN_STEPS} steps ({steps_per_epoch} per epoch)")
    total = steps_per_epoch * epochs
    warmup_steps = min(WARMUP_MAX_STEPS, WARMUP_SHARE * total)
    chooser.set("optim.warmup_epochs", round(warmup_steps / steps_per_epoch, 3),
                f"{warmup_steps:.0f} steps: {WARMUP_SHARE:.0%} of the run, at most {WARMUP_MAX_STEPS}")
    chooser.set("optim.freeze_last_layer_epochs", round(min(1.0, 0.05 * epochs), 3),
                "one epoch (DINO), at most 5 % of the run")

    # ---- DINO settings scaled with the number of images ----------------------------------------
    output_dim = next((dim for below, dim in OUTPUT_DIM_BUCKETS if n < below), 65536)
    chooser.set("model.head_output_dim", output_dim, f"{n} images (LightlyTrain's buckets: 1,024 below 20k)")
    chooser.set("model.head_hidden_dim", 2048, "DINO")
    chooser.set("model.head_bottleneck_dim", 256, "DINO")
    teacher_temp = round(_interpolate(n, 0.02, 0.07), 2)
    chooser.set("loss.teacher_temp", teacher_temp, "0.02 below 20k images, 0.07 from 1M (sharper on small data)")
    warm_temp = min(teacher_temp, round(_interpolate(n, 0.02, 0.04), 2))
    chooser.set("loss.warmup_teacher_temp", warm_temp, "starts at most at DINO's 0.04")
    chooser.set("loss.warmup_teacher_temp_epochs", int(min(30, 0.3 * epochs)) if warm_temp < teacher_temp else 0,
                "30 % of the epochs, at most 30 (DINO)" if warm_temp < teacher_temp else "no warm-up needed")
    chooser.set("optim.teacher_momentum", round(_interpolate(n, 0.99, 0.996), 3),
                "0.99 below 20k images, 0.996 from 1M (a teacher that follows faster on small data)")

    data = {}
    for choice in chooser.choices:
        node = data
        *parents, last = choice.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = choice.value
    config = merge(config, data, "automatic settings")
    validate(config)
    return config, chooser.choices


def format_choices(choices: list[Choice]) -> str:
    """The choices as an aligned table: key, value, why."""
    rows = [(c.key, _show(c.value), c.why) for c in choices]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"  {k:<{width[0]}}  {v:<{width[1]}}  {why}" for k, v, why in rows)


class _Chooser:
    """Collects choices, leaving out the keys the user set (the key, a parent or a child of it)."""

    def __init__(self, explicit: set[str]) -> None:
        self.explicit, self.choices = explicit, []

    def is_explicit(self, key: str) -> bool:
        return any(key == e or key.startswith(e + ".") or e.startswith(key + ".") for e in self.explicit)

    def set(self, key: str, value: Any, why: str) -> None:
        assert key in AUTOMATIC_KEYS, key  # the CLI validates the others before it scans the folder
        if not self.is_explicit(key):
            self.choices.append(Choice(key, value, why))


def explicit_keys(overrides: list[str]) -> set[str]:
    """Dotted keys named by ``key=value`` overrides."""
    return {item.partition("=")[0].strip() for item in overrides if "=" in item}


def _interpolate(n: int, small: float, large: float) -> float:
    """``small`` below 20k images, ``large`` from 1M, linear in between."""
    t = min(1.0, max(0.0, (n - SCALE_FROM) / (SCALE_TO - SCALE_FROM)))
    return small + t * (large - small)


def _is_vit(name: str) -> bool:
    return name.startswith(("vit", "deit", "eva", "beit"))


def _patch_size(crop: float) -> int:
    """ViT patch size giving 8-14 patches a side: 4 px under 64, 8 px under 160, else 16."""
    return 4 if crop < 64 else 8 if crop < 160 else 16


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)

