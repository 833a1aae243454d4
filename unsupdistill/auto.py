"""Settings chosen from the data and the device, for a folder trained without a recipe.

``unsupdistill pretrain /photos`` has no recipe to say how large the photos are or how many there
are. The built-in defaults are sized for 8x8 digits, so the settings that depend on the images are
chosen here from the folder's scan and the device, each with the reason, and every value the user
gave (``key=value``) wins:

- shared by every method: the student's crop size follows the images' median shorter side, capped by
  what the device trains in reasonable time; the network follows the crop size (the small-image ResNet
  stem below 64 px, a ViT patch size that gives 8-14 patches a side (or the nearest count), 64 px at least for
  a mobile network); the batch, epochs and the lr warm-up follow the number of images, the warm-up as a share
  of the planned steps (a time budget's too);
- each method adds its own choices through ``Method.auto_settings`` (DINO: local crops, decode size, head and
  temperatures; distillation: the teacher's input size and a decode size that serves both networks).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unsupdistill import registry
from unsupdistill.config import Config, merge, validate
from unsupdistill.data.scan import FolderScan

MAX_CROP = {"cpu": 96, "cuda": 224}
"""Largest global crop chosen per device: 96 px keeps a CPU epoch of 10k images to minutes; 224 is DINO's."""
RESNETS = ("resnet", "wide_resnet", "resnext", "seresnet", "skresnet")
"""timm name prefixes of the networks that take the small-image stem (``model.small_image_stem``)."""
SMALL_STEM_BELOW = 64
"""ResNets get the 3x3 stride-1 stem (no max-pool) for global crops under this many pixels."""
WARMUP_SHARE, WARMUP_MAX_STEPS = 0.1, 12_500
"""lr warm-up: 10 % of the steps, at most DINO's 10 ImageNet epochs of batch 1024."""
MIN_STEPS = 1_000
"""Tiny sets train for enough epochs to reach this many steps (at least 100 epochs)."""

SHARED_KEYS = frozenset({
    "model.input_size", "model.backbone_kwargs", "model.small_image_stem", "train.batch_size", "train.epochs",
    "optim.warmup_share", "audio.local_frames",
})
"""The keys the shared part of :func:`auto_settings` may set; a method adds its own (``Method.automatic_keys``)."""
SAMPLE_FILES = 16
"""Files of the folder named in :attr:`FolderFacts.sample_paths`."""
MOBILE_MIN_CROP = 64
"""Least input of a network that downsamples 32x and has no small-image stem (a 2x2 last feature map)."""


@dataclass
class Choice:
    """One automatic setting: the dotted config key, its value and why."""

    key: str
    value: Any
    why: str


@dataclass(frozen=True)
class FolderFacts:
    """What the automatic settings know of the data and the machine.

    Attributes:
        images: readable images (or sound files) in the folder.
        shorter_side: the images' median shorter side in pixels (sounds: the spectrogram's mel bands).
        device_type: ``"cpu"`` or ``"cuda"``.
        world_size: processes the global batch is split over.
        sample_paths: a few of the images' files, spread over the folder (a method may time decoding them).
    """

    images: int
    shorter_side: float
    device_type: str
    world_size: int
    sample_paths: tuple[str, ...] = ()
    kind: str = "image"
    """``image`` or ``audio`` (``data.kind``)."""

    @property
    def device(self) -> str:
        return self.device_type.upper()


MAX_SAMPLE_RATE = 16_000
"""Sounds are read at their folder's most common rate, at most this (AST, BYOL-A, EfficientAT: 16 kHz)."""
MIN_CLIP_SECONDS, MAX_CLIP_SECONDS = 0.1, 10.0
"""The clip's length follows the folder's durations within these bounds (AudioSet's clips last 10 s)."""
STAT_CLIPS = 256
"""Clips the log-mel normalisation of a folder of sounds is measured on."""
SOUND_SMALL_STEM_BELOW = 32
"""ResNets of spectrograms with fewer mel bands or columns than this get the small-image stem: on FSDD's 64 bands x 56
columns the stride-1 stem took 13 s a step of 64 clips on 2 CPU cores."""
LOCAL_SHARE = 96 / 224
"""A local view's columns as a share of the global view's (DINO's 96 and 224 px)."""
SOUND_KEYS = frozenset({"data.kind", "model.in_chans", "audio.sample_rate", "audio.clip_seconds", "audio.mean",
                        "audio.std"})
"""The keys :func:`sound_settings` may set."""


def automatic_keys(method: Any) -> frozenset[str]:
    """Every key :func:`auto_settings` may set for ``method`` (a bad value the user gave for one is still an error)."""
    return SHARED_KEYS | frozenset(getattr(method, "automatic_keys", frozenset()))


def auto_settings(config: Config, scan: FolderScan, device_type: str, explicit: set[str],
                  world_size: int = 1, method: Any = None) -> tuple[Config, list[Choice]]:
    """Choose the settings that depend on the images and the device; keys in ``explicit`` are kept.

    The data- and device-driven part is shared: the student's crop size and network, the batch, epochs and lr
    warm-up. Then the method (``method.auto_settings(chooser, config, facts)``, a class of ``unsupdistill.methods``)
    adds its own choices in between (DINO's crops and head, distillation's teacher size), each with its reason.

    Args:
        config: defaults with the user's overrides applied.
        scan: the folder's scan (file count and image sizes).
        device_type: ``"cpu"`` or ``"cuda"``.
        explicit: dotted keys the user set (``model.input_size``); a key, its parents and its
            children are never changed.
        world_size: processes the global batch is split over.
        method: the method class; None: the one ``config.method`` names (null: the first registered, dino).

    Returns:
        The config with the choices applied, validated, and the choices.
    """
    if method is None:
        method = registry.method_class(config.method or registry.names()[0])
    sample = scan.files[::max(1, len(scan.files) // SAMPLE_FILES)][:SAMPLE_FILES]  # not a Path per file: 20 s for 2M
    sound = config.data.kind == "audio"
    shorter = config.audio.n_mels if sound else statistics.median(min(w, h) for w, h in scan.sizes)
    facts = FolderFacts(len(scan.files), shorter, device_type, world_size,
                        tuple(str(Path(scan.root) / name) for name in sample), "audio" if sound else "image")
    chooser = Chooser(explicit, automatic_keys(method))
    if sound:
        _sound_network(chooser, config, facts)
    else:
        _network(chooser, config, facts, method.crop_headroom)
    _schedule(chooser, chooser.apply(config), facts, getattr(method, "auto_batch", {}))
    method.auto_settings(chooser, chooser.apply(config), facts)
    config = chooser.apply(config)
    validate(config)
    return config, chooser.choices


def _network(chooser: Chooser, config: Config, facts: FolderFacts, headroom: float) -> None:
    """The student's input size (``model.input_size``) and network, from the images and the device; the crop
    is the images' shorter side / ``headroom`` (the method's: DINO crops from a larger decode)."""
    m = config.model
    cap = MAX_CROP["cuda" if facts.device_type == "cuda" else "cpu"]
    vit = is_vit(m.backbone)
    resnet = m.backbone.startswith(RESNETS)
    if chooser.is_explicit("model.input_size"):
        crop = m.input_size
    else:
        fit = facts.shorter_side / headroom
        wanted = min(cap, fit)
        unit = patch_size(wanted) if vit else (8 if wanted >= 64 else 4)
        crop = max(unit, int(wanted // unit) * unit)
        limit = "" if fit <= cap else f", capped at {cap} px on {facts.device}"
        why = f"median shorter side {facts.shorter_side:g} px" + (f" / {headroom}" if headroom != 1 else "") + limit
        if not vit and not resnet and crop < MOBILE_MIN_CROP:
            crop, why = MOBILE_MIN_CROP, (f"{m.backbone} downsamples 32x and has no small-image stem: "
                                          f"{MOBILE_MIN_CROP} px for a 2x2 last feature map (upsampled)")
        chooser.set("model.input_size", crop, why)
    if vit:
        patch = patch_size(crop)
        chooser.set("model.backbone_kwargs", {"img_size": crop, "patch_size": patch},
                    f"patch {patch} px: {crop // patch} patches a side")
        chooser.set("model.small_image_stem", False, "a ViT has no ResNet stem")
        return
    if m.pretrained:
        chooser.set("model.small_image_stem", False, "pretrained weights: their own first convolution")
        chooser.set("model.backbone_kwargs", {}, f"timm's own arguments for {m.backbone}: the pretrained weights' "
                    "shapes")
        return
    if resnet:
        small = crop < SMALL_STEM_BELOW
        chooser.set("model.small_image_stem", small,
                    f"3x3 stride-1 stem, no max-pool, for crops under {SMALL_STEM_BELOW} px" if small else
                    f"ImageNet stem (7x7 stride 2 + max-pool) for crops of {SMALL_STEM_BELOW} px or more")
    else:
        chooser.set("model.small_image_stem", False, f"{m.backbone} is not a ResNet")
    _width(chooser, m, facts)


def _width(chooser: Chooser, m: Any, facts: FolderFacts) -> None:
    """``model.backbone_kwargs`` of a network trained from scratch: timm's own for a backbone the user named, the
    full width on a GPU, the default's half width on a CPU."""
    if chooser.is_explicit("model.backbone"):
        chooser.set("model.backbone_kwargs", {}, f"timm's own arguments for {m.backbone}")
    elif facts.device_type == "cuda":
        chooser.set("model.backbone_kwargs", {}, "full-width ResNet-18 on a GPU")
    else:
        chooser.set("model.backbone_kwargs", dict(m.backbone_kwargs), "half-width ResNet-18: 4x fewer FLOPs on CPU")


def _sound_network(chooser: Chooser, config: Config, facts: FolderFacts) -> None:
    """A network of spectrograms: one input channel, the global view's columns (``model.input_size``) from the clip's
    (at most :data:`MAX_CROP` on the device), the local views' at DINO's share, and the stem from the smaller side."""
    m, audio = config.model, config.audio
    columns = 1 + round(audio.clip_seconds * 1000 / audio.hop_ms)
    cap = MAX_CROP["cuda" if facts.device_type == "cuda" else "cpu"]
    frames = m.input_size
    if not chooser.is_explicit("model.input_size"):
        frames = max(16, min(cap, columns) // 8 * 8)
        why = f"the clip's {columns} spectrogram columns ({audio.clip_seconds:g} s at {audio.hop_ms:g} ms a hop)"
        chooser.set("model.input_size", frames, why + (f", at most {cap} on {facts.device}" if columns > cap else
                                                       ", to a multiple of 8"))
    if is_vit(m.backbone):
        _sound_vit(chooser, config, frames)
        return
    local = max(8, round(frames * LOCAL_SHARE / 4) * 4)
    chooser.set("audio.local_frames", local, f"{LOCAL_SHARE:.2f} x the global view's columns (DINO: 96 / 224)")
    small = min(audio.n_mels, frames) < SOUND_SMALL_STEM_BELOW
    if m.backbone.startswith(RESNETS) and not m.pretrained:
        chooser.set("model.small_image_stem", small,
                    f"3x3 stride-1 stem for spectrograms under {SOUND_SMALL_STEM_BELOW} rows or columns" if small else
                    f"ImageNet stem (4x fewer rows and columns) for {audio.n_mels} mel bands x {frames} columns: "
                    "the stride-1 stem trained 16x slower")
    else:
        chooser.set("model.small_image_stem", False, f"{m.backbone} is not a ResNet trained from scratch")
    _width(chooser, m, facts)


def _sound_vit(chooser: Chooser, config: Config, frames: int) -> None:
    """A ViT on spectrograms, AST's layout (Gong et al. 2021): square patches over mel bands x columns, position
    embeddings for the global view's grid, interpolated for the shorter local views. The patch is :func:`patch_size`
    of the shorter side, halved until it divides the mel bands and the global view's columns; the local views get
    whole patches too."""
    audio = config.audio
    patch = patch_size(min(audio.n_mels, frames))
    while patch > 1 and (audio.n_mels % patch or frames % patch):
        patch //= 2
    local = max(patch, round(frames * LOCAL_SHARE / patch) * patch)
    chooser.set("audio.local_frames", local, f"{LOCAL_SHARE:.2f} x the global view's columns (DINO: 96 / 224), "
                f"whole patches of {patch}")
    chooser.set("model.backbone_kwargs", {"img_size": [audio.n_mels, frames], "patch_size": patch},
                f"patches of {patch} x {patch}: {audio.n_mels // patch} x {frames // patch} on the global view "
                "(AST's layout)")
    chooser.set("model.small_image_stem", False, "a ViT has no ResNet stem")


def sound_settings(config: Config, scan: FolderScan, explicit: set[str]) -> tuple[Config, list[Choice]]:
    """The front end of a folder of sounds, with or without a recipe: ``data.kind``, the rate files are read at, the
    clip's length and the log-mel normalisation (measured on up to :data:`STAT_CLIPS` clips spread over the folder).
    Only the keys left null are chosen (a recipe's values, a resumed run's and the user's are kept).

    Returns:
        The config with the choices applied and validated, and the choices.
    """
    from unsupdistill.data.sounds import sound_summary

    rate, durations = sound_summary(scan)
    audio = config.audio
    chooser = Chooser(explicit, SOUND_KEYS)
    if config.data.kind is None:
        chooser.set("data.kind", "audio", f"{len(scan.files)} sound files")
    chooser.set("model.in_chans", 1, "one input channel: the log-mel spectrogram")
    if audio.sample_rate is None:
        if rate > MAX_SAMPLE_RATE:
            chooser.set("audio.sample_rate", MAX_SAMPLE_RATE, f"the folder's most common rate {rate} Hz, at most "
                        f"{MAX_SAMPLE_RATE} Hz (speech and most sounds lie below {MAX_SAMPLE_RATE // 2000} kHz)")
        else:
            chooser.set("audio.sample_rate", rate, "the folder's most common rate")
    if audio.clip_seconds is None:
        longest = statistics.quantiles(durations, n=10)[-1] if len(durations) > 1 else durations[0]
        clip = round(min(MAX_CLIP_SECONDS, max(MIN_CLIP_SECONDS, longest)), 2)
        chooser.set("audio.clip_seconds", clip, f"90 % of the files last {longest:.2f} s or less"
                    + (f" (at most {MAX_CLIP_SECONDS:g} s)" if longest > MAX_CLIP_SECONDS else ""))
    config = chooser.apply(config)
    if config.audio.mean is None or config.audio.std is None:
        mean, std, count = _log_mel_statistics(config, scan)
        if config.audio.mean is None:
            chooser.set("audio.mean", round(mean, 4), f"mean log-mel of {count} clips spread over the folder")
        if config.audio.std is None:
            chooser.set("audio.std", round(std, 4), f"its standard deviation over those {count} clips")
        config = chooser.apply(config)
    validate(config)
    return config, chooser.choices


def _log_mel_statistics(config: Config, scan: FolderScan) -> tuple[float, float, int]:
    """Mean and standard deviation of the un-normalised log-mel of up to :data:`STAT_CLIPS` clips of the folder."""
    import torch

    from unsupdistill.augment.audio import LogMel
    from unsupdistill.data import clip_samples
    from unsupdistill.data.audio import fit_clip, read_sound

    audio = config.audio
    samples = clip_samples(audio)
    files = scan.paths[::max(1, len(scan.files) // STAT_CLIPS)][:STAT_CLIPS]
    waves = torch.stack([torch.from_numpy(fit_clip(read_sound(f, audio.sample_rate, samples), samples))
                         for f in files])  # (N, S)
    frontend = LogMel(audio.sample_rate, audio.window_ms, audio.hop_ms, audio.n_mels, audio.f_min, audio.f_max)
    mean, std = frontend.statistics(waves)
    return mean, std, len(files)


def _schedule(chooser: Chooser, config: Config, facts: FolderFacts, bases: dict[str, int]) -> None:
    """Batch, epochs and the lr warm-up, from the number of images (``bases``: the method's batch per device)."""
    n, world = facts.images, facts.world_size
    batch = config.train.batch_size
    if not chooser.is_explicit("train.batch_size"):
        base = bases.get(facts.device_type, 128 if facts.device_type == "cuda" else 64)
        batch = min(base, 2 ** int(math.log2(max(2, n // 2))))
        batch = max(world, batch // world * world)
        chooser.set("train.batch_size", batch, f"{base} on {facts.device}, at most half the {n} images")
    steps_per_epoch = max(1, n // batch)
    if not chooser.is_explicit("train.epochs"):
        epochs = max(100, math.ceil(MIN_STEPS / steps_per_epoch))
        chooser.set("train.epochs", epochs, f"at least 100 epochs and {MIN_STEPS} steps ({steps_per_epoch} per epoch)")
    budget = config.train.time_budget_s
    share = WARMUP_SHARE if budget else min(WARMUP_SHARE, WARMUP_MAX_STEPS / (steps_per_epoch * config.train.epochs))
    chooser.set("optim.warmup_share", round(share, 4),
                f"{share:.1%} of the planned steps" + (f" (those {budget:g} s allow)" if budget else
                                                       f", at most {WARMUP_MAX_STEPS} steps"))


def format_choices(choices: list[Choice]) -> str:
    """The choices as an aligned table: key, value, why."""
    rows = [(c.key, _show(c.value), c.why) for c in choices]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"  {k:<{width[0]}}  {v:<{width[1]}}  {why}" for k, v, why in rows)


class Chooser:
    """Collects choices, leaving out the keys the user set (the key, a parent or a child of it); a later choice of a
    key replaces an earlier one (a method's choice wins over the shared one).

    Args:
        explicit: dotted keys the user set.
        allowed: the keys that may be chosen.
    """

    def __init__(self, explicit: set[str], allowed: frozenset[str]) -> None:
        self.explicit, self.allowed, self.choices = explicit, allowed, []

    def is_explicit(self, key: str) -> bool:
        return any(key == e or key.startswith(e + ".") or e.startswith(key + ".") for e in self.explicit)

    def set(self, key: str, value: Any, why: str) -> None:
        assert key in self.allowed, key  # the CLI validates the others before it scans the folder
        if not self.is_explicit(key):
            self.choices = [c for c in self.choices if c.key != key] + [Choice(key, value, why)]

    def apply(self, config: Config) -> Config:
        """``config`` with the choices so far merged in."""
        data: dict[str, Any] = {}
        for choice in self.choices:
            node = data
            *parents, last = choice.key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = choice.value
        return merge(config, data, "automatic settings")


def explicit_keys(overrides: list[str]) -> set[str]:
    """Dotted keys named by ``key=value`` overrides."""
    return {item.partition("=")[0].strip() for item in overrides if "=" in item}


def is_vit(name: str) -> bool:
    return name.startswith(("vit", "deit", "eva", "beit"))


def patch_size(crop: float) -> int:
    """ViT patch size (4, 8 or 16 px) giving 8-14 patches a side: exactly for crops of 32-56, 64-112 and 128-224 px,
    else the nearest count (the switch points, 58.7 and 117.3 px, are as far from 14 patches of the smaller size as
    from 8 of the larger)."""
    return 4 if crop < 58.7 else 8 if crop < 117.3 else 16


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)

