"""Config sections: one dataclass per component, with the defaults of the built-in run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from unsupdistill import registry


class ConfigError(ValueError):
    """A recipe or override names an unknown key or holds a bad value."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ViewSpec:
    """The random augmentation of one kind of view, in DINO's order (Caron et al. 2021, App. D): random resized crop,
    flip, colour jitter, grayscale, Gaussian blur, solarization. A method's settings hold one per kind of view."""

    scale: tuple[float, float] = (0.4, 1.0)
    """Range of the crop's area as a fraction of the image (RandomResizedCrop)."""
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Brightness, contrast, saturation, hue strengths."""
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range, in pixels of a 224-px input; every kind of view is scaled by the model's input size
    over 224 (DINO gives its 96-px local crops the same sigma in pixels as its 224-px global ones)."""
    solarize_p: float = 0.0

    def checks(self, key: str) -> list[tuple[bool, str, str]]:
        """(ok, key, what is allowed) for the view's ranges; ``key`` is its dotted name."""
        return [
            (0 < self.scale[0] <= self.scale[1] <= 1, f"{key}.scale", "[min, max] with 0 < min <= max <= 1"),
            *((0 <= getattr(self, p) <= 1, f"{key}.{p}", "a probability in [0, 1]")
              for p in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p")),
            (all(v >= 0 for v in self.color_jitter) and self.color_jitter[3] <= 0.5, f"{key}.color_jitter",
             "[brightness, contrast, saturation, hue], all >= 0, hue <= 0.5"),
            (0 < self.blur_sigma[0] <= self.blur_sigma[1], f"{key}.blur_sigma", "[min, max] with 0 < min <= max"),
        ]


@dataclass
class CropSpec(ViewSpec):
    """A kind of view with a size of its own, smaller than the model's input (DINO's local crops)."""

    size: int = 8
    """Output side length in pixels."""

    def checks(self, key: str) -> list[tuple[bool, str, str]]:
        return [(self.size >= 1, f"{key}.size", "an integer >= 1"), *super().checks(key)]


@dataclass
class SoundViewSpec:
    """The random augmentation of one kind of view of a sound, on its mel spectrogram: a random span of the clip,
    resized in time to the view's frames, a random gain, mixing with another clip of the batch, then SpecAugment's
    frequency and time masks (Park et al. 2019)."""

    scale: tuple[float, float] = (0.5, 1.0)
    """Range of the span's length as a share of the clip (a random resized crop in time)."""
    gain_db: float = 6.0
    """The view's level changes by a uniform draw in [-gain_db, gain_db] decibels."""
    mix_p: float = 0.5
    """Probability that the view is mixed with another clip of the batch (in power, BYOL-A's mixup)."""
    mix_max: float = 0.4
    """Largest share of the other clip in a mix (drawn uniformly in [0, mix_max])."""
    freq_masks: int = 2
    """Frequency masks per view."""
    freq_mask_bands: int = 8
    """Widest frequency mask, in mel bands (each mask's width is drawn in [0, freq_mask_bands])."""
    time_masks: int = 2
    """Time masks per view."""
    time_mask_share: float = 0.1
    """Widest time mask, as a share of the view's frames."""

    def checks(self, key: str) -> list[tuple[bool, str, str]]:
        """(ok, key, what is allowed) for the view's ranges; ``key`` is its dotted name."""
        return [
            (0 < self.scale[0] <= self.scale[1] <= 1, f"{key}.scale", "[min, max] with 0 < min <= max <= 1"),
            (self.gain_db >= 0, f"{key}.gain_db", "a number of decibels >= 0"),
            (0 <= self.mix_p <= 1, f"{key}.mix_p", "a probability in [0, 1]"),
            (0 <= self.mix_max < 1, f"{key}.mix_max", "a share in [0, 1)"),
            (self.freq_masks >= 0 and self.time_masks >= 0, f"{key}.freq_masks/time_masks", "integers >= 0"),
            (self.freq_mask_bands >= 0, f"{key}.freq_mask_bands", "an integer >= 0"),
            (0 <= self.time_mask_share < 1, f"{key}.time_mask_share", "a share in [0, 1)"),
        ]


CSV_FORMAT = ("the header line path,label first, then one path,label row per image; a relative path is read from "
              "the CSV's own folder")
"""How a labeled CSV is written, for help texts and errors."""

PATH = {"path": True}
"""Field metadata of path-valued keys: their ``key=value`` overrides are taken as written, never parsed as
YAML (a folder named ``2024``, ``true``, ``null`` or ``run #1`` stays that folder)."""


@dataclass
class DataConfig:
    path: str | None = field(default=None, metadata=PATH)
    """Folder of unlabeled images or sound files (searched recursively); null trains on scikit-learn's digits."""
    kind: Literal["image", "audio"] | None = None
    """What ``data.path`` holds: images, or sound files read through the ``audio`` section's front end; null: what
    the folder's scan finds (a folder holding both is refused)."""
    image_size: int | None = None
    """Side of the square each image is decoded to (shorter side resized, centre crop) before
    the batched augmentation crops it; null: the method's choice (``model.input_size``)."""
    num_workers: int | None = None
    """DataLoader worker processes that decode images; null: none for the built-in digits (already
    in memory), otherwise one per CPU core up to 8."""
    strict: bool = False
    """Fail on the first unreadable file instead of skipping and counting it."""
    labels: str | None = field(default=None, metadata=PATH)
    """Labels of some or all training images, for a method that learns from labels too (``kd``): a folder of class
    subfolders or a .csv file whose images are among ``data.path``'s (the others stay unlabeled), or ``digits`` for
    the built-in digits' train split; null: none. The CSV's first line is the header ``path,label``, then one
    ``path,label`` row per image; a relative path is read from the CSV's own folder."""
    verify: Literal["full", "header"] = "full"
    """How the scan checks each file: a full decode (catches truncated files) or the header only
    (much faster on huge folders; a file that fails later stops the run with its path)."""
    keep_decoded: Literal["auto", True, False] = "auto"
    """Keep an image folder's images decoded at ``data.image_size`` after their first decode (uint8, in
    RUN/decoded_images, memory-mapped), so later epochs decode no file: auto and true: when they take at most
    ``data.keep_decoded_max_gb``; false: decode every epoch."""
    keep_decoded_max_gb: float = 4.0
    """Most disk (and page cache) the kept images may take; above it every epoch decodes the files."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """Any timm model name. The default is a half-width ResNet-18 sized for small images (the built-in digits
    run takes one block per stage, recipes/digits.yaml)."""
    backbone_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"channels": [32, 64, 128, 256], "stem_width": 32}
    )
    """Extra keyword arguments for ``timm.create_model`` (e.g. img_size and patch_size for a ViT)."""
    small_image_stem: bool = True
    """ResNets only: 3x3 stride-1 first convolution and no max-pool, for images of 32 px or less."""
    pretrained: bool = False
    """Start from timm's pretrained weights of ``model.backbone`` (downloaded by timm, or ``model.pretrained_file``)
    instead of a random initialisation; the automatic settings train from scratch. Not with small_image_stem (it
    replaces the pretrained first convolution) or with backbone_kwargs that change the shapes of the weights."""
    pretrained_file: str | None = field(default=None, metadata=PATH)
    """With ``model.pretrained``: a local weights file (.safetensors, .pth or .bin under timm's names for the
    model), as timm's ``pretrained_cfg_overlay={file: PATH}`` takes it; null: timm's own source."""
    input_size: int = 16
    """Side of the network's input in pixels (square): the size of the views it trains on (a method may add smaller
    ones) and the size a user's images are resized to for its features; the exported model's ``input_size``. For
    sounds: the columns (time steps) of the log-mel image it sees, whose rows are ``audio.n_mels``."""
    in_chans: int = 3
    """Channels of the network's input: 3 for images; 1 for sounds (set with ``data.kind``: a log-mel image)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean the input is normalised with (ImageNet's)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation the input is divided by."""


@dataclass
class AudioConfig:
    """Sound: how a folder of audio files becomes the one-channel images a network sees (log-mel spectrograms
    computed in the batch, on the device), and the views of a sound. Read only when the data are sounds; the
    front end's values go with the exported model. null: chosen from the folder, with the reason printed."""

    sample_rate: int | None = None
    """Every file is read mono and resampled to this rate (Hz); null: the folder's most common rate, at most 16 kHz."""
    clip_seconds: float | None = None
    """Each file is cut (centred) or padded with silence to this length; null: the 90th percentile of the
    folder's durations, at most 10 s."""
    n_mels: int = 64
    """Mel bands: the rows of the spectrogram image."""
    window_ms: float = 25.0
    """STFT window length (Hann); the FFT size is the next power of two."""
    hop_ms: float = 10.0
    """STFT hop: one spectrogram column per hop."""
    f_min: float = 0.0
    f_max: float | None = None
    """Highest mel band edge in Hz; null: half the sample rate."""
    mean: float | None = None
    std: float | None = None
    """Normalisation of the log-mel values; null: measured on a sample of the folder's clips."""
    local_frames: int = 32
    """Columns of a local view (DINO's local crops); a global view has ``model.input_size`` columns."""
    global_view: SoundViewSpec = field(default_factory=SoundViewSpec)
    """The global views (DINO) and the one shared view of distillation."""
    local_view: SoundViewSpec = field(default_factory=lambda: SoundViewSpec(scale=(0.15, 0.4), mix_p=0.0))
    """DINO's local views: short spans of the clip."""

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, key, what is allowed) for the section."""
        return [
            (self.sample_rate is None or self.sample_rate >= 1000, "audio.sample_rate", "null or a rate in Hz >= 1000"),
            (self.clip_seconds is None or self.clip_seconds > 0, "audio.clip_seconds", "null or seconds > 0"),
            (self.n_mels >= 1, "audio.n_mels", "an integer >= 1"),
            (self.window_ms > 0 and 0 < self.hop_ms <= self.window_ms, "audio.hop_ms",
             "milliseconds > 0, at most audio.window_ms"),
            (self.f_min >= 0 and (self.f_max is None or self.f_max > self.f_min), "audio.f_max",
             "null or a frequency in Hz above audio.f_min"),
            (self.std is None or self.std > 0, "audio.std", "null or a number > 0"),
            (self.local_frames >= 1, "audio.local_frames", "an integer >= 1"),
            *self.global_view.checks("audio.global_view"),
            *self.local_view.checks("audio.local_view"),
        ]


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 8e-3
    """Peak learning rate per 256 images; the used value is lr * global_batch / 256 (DINO: 5e-4)."""
    min_lr: float = 1e-6
    warmup_epochs: float = 2.0
    warmup_share: float | None = None
    """The lr warm-up as a share of the planned steps (those a time budget allows, or all epochs' steps); when
    set it replaces ``warmup_epochs``. The automatic settings use it (10 %), so a budgeted run warms up within
    the steps it will take."""
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    sgd_momentum: float = 0.9
    clip_grad: float = 3.0
    """Max gradient norm of the student (see ``clip_mode``); 0 disables clipping."""
    clip_mode: Literal["total", "per_param"] = "total"
    """``total``: the norm over all parameters together; ``per_param``: each parameter tensor's own norm
    (DINO's ``clip_gradients``, a much weaker limit)."""


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 64
    """Global batch size, split evenly across processes under torchrun."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a CPU with native bf16 (AVX-512 BF16 or AMX; elsewhere fp32: emulated bf16 trained 6x
    slower) and on CUDA when supported (else fp16); fp16 (CUDA only) uses a GradScaler."""
    log_every_steps: int = 10
    save_every_steps: int = 100
    """Write checkpoints/last.pt every this many steps (and at every epoch end)."""
    keep_every_epochs: int = 5
    """Also keep checkpoints/epoch_NNNN.pt every this many epochs; 0 keeps none."""
    threads: int | None = None
    """torch intra-op threads on CPU; null leaves torch's default."""
    max_steps: int | None = None
    """Stop after this many steps (for smoke tests); schedules still span all epochs."""
    time_budget_s: float | None = None
    """Wall-clock seconds of training (from the first step, resumed runs included; export not counted).
    The schedules are planned from the measured step rate to end when the budget does, and the run
    stops there, or after ``epochs`` if that comes first. null: train for ``epochs``."""
    compile: bool = False
    """torch.compile the student and teacher backbones: about a minute of compiling first, then
    faster steps (fused normalisation and activations); pays off on runs of more than ~15 minutes."""


@dataclass
class EvalConfig:
    """Scoring a run on labeled sets: at its end (``summary.json``) and, if asked, every few epochs during training
    (k-NN of the features, logged as eval/knn_top1)."""

    train: str | None = field(default=None, metadata=PATH)
    """Labeled set the k-NN memory is built from: a folder with one subfolder per class, a CSV of
    path,label, or digits; null turns evaluation during pretraining off."""
    test: str | None = field(default=None, metadata=PATH)
    """Labeled set that is scored."""
    every_epochs: int = 0
    """k-NN on ``eval.test`` every this many epochs while training, and after the last step; 0: only the end-of-run
    summary. Each probe extracts the features of both sets, and its time counts against ``train.time_budget_s``."""
    k: int = 20
    temperature: float = 0.07
    summary: bool = True
    """End the run with what it learned (``summary.json`` and a table): k-NN of the export, of the same network at
    random init and of raw pixels, by ``unsupdistill eval``'s code, on the digits' split for the built-in digits
    and on ``eval.train`` / ``eval.test`` (--eval-train / --eval-test) for a folder; none without labels."""


def reads_section(config: Config, section: str) -> bool:
    """Whether ``config.method`` reads the method section ``section`` (``kd`` reads ``distill``'s teacher too), so
    a section's checks that hold only when it is used can say so without naming every method that uses it."""
    return section in registry.sections_of(config.method or "")


def method_sections() -> dict[str, type]:
    """The registered methods' own sections by name (``unsupdistill.registry``; torch-free)."""
    return registry.sections()


def _default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in method_sections().items()}


@dataclass
class Config:
    method: str | None = None
    """The training method, one of the registered ones (``unsupdistill.registry``): ``dino``,
    self-distillation with an EMA teacher, from scratch; ``distill``, from the frozen ``distill.teacher``; ``kd``,
    the same with labels. null: the verb's own (``pretrain``: dino; ``distill``: distill, or kd with labels)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sections: dict[str, Any] = field(default_factory=_default_sections, repr=False)
    """The methods' own sections by name (``config.dino``, ``config.distill``), each defined in its method's file."""

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"'Config' has no section '{name}'")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-ready data: shared sections, then each method's."""
        plain = _to_plain(dataclasses.asdict(self))
        sections = plain.pop("sections")
        return {**plain, **sections}


def _to_plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the config dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
