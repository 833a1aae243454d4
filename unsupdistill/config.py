"""Typed configuration: one dataclass per component, YAML recipes and ``key=value`` overrides.

A recipe holds only its differences from the defaults below; the defaults are the built-in
run (a small ViT on scikit-learn's digits). ``load_config`` merges defaults, recipe and
overrides, checks every key and value, and raises :class:`ConfigError` naming the key, the
source and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override names an unknown key or holds a bad value."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class CropSpec:
    """One kind of view in the multi-crop augmentation (DINO, Caron et al. 2021, Sec. 3.1)."""

    size: int
    """Output side length in pixels."""
    scale: tuple[float, float]
    """Range of the crop's area as a fraction of the image (RandomResizedCrop)."""
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Brightness, contrast, saturation, hue strengths."""
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range, in pixels of a 224-px crop; scaled with ``size``."""
    solarize_p: float = 0.0


@dataclass
class AugmentConfig:
    """DINO's multi-crop recipe: two global views that differ in blur/solarize, N local views.

    Probabilities and scales are DINO's; the sizes (16 / 8 px) suit the built-in 8x8 digits.
    """

    global_1: CropSpec = field(default_factory=lambda: CropSpec(size=16, scale=(0.4, 1.0), blur_p=1.0))
    global_2: CropSpec = field(
        default_factory=lambda: CropSpec(size=16, scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2)
    )
    local: CropSpec = field(default_factory=lambda: CropSpec(size=8, scale=(0.05, 0.4), blur_p=0.5))
    num_local_crops: int = 4
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


PATH = {"path": True}
"""Field metadata of path-valued keys: their ``key=value`` overrides are taken as written, never parsed as
YAML (a folder named ``2024``, ``true``, ``null`` or ``run #1`` stays that folder)."""


@dataclass
class DataConfig:
    path: str | None = field(default=None, metadata=PATH)
    """Folder of unlabeled images (searched recursively); null trains on scikit-learn's digits."""
    image_size: int | None = None
    """Side of the square each image is decoded to (shorter side resized, centre crop) before
    the batched augmentation crops it; null means the global crop size."""
    num_workers: int | None = None
    """DataLoader worker processes that decode images; null: none for the built-in digits (already
    in memory), otherwise one per CPU core up to 8."""
    strict: bool = False
    """Fail on the first unreadable file instead of skipping and counting it."""
    verify: Literal["full", "header"] = "full"
    """How the scan checks each file: a full decode (catches truncated files) or the header only
    (much faster on huge folders; a file that fails later stops the run with its path)."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """Any timm model name. The default is a half-width ResNet-18 sized for the built-in digits."""
    backbone_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"channels": [32, 64, 128, 256], "stem_width": 32}
    )
    """Extra keyword arguments for ``timm.create_model`` (e.g. img_size and patch_size for a ViT)."""
    small_image_stem: bool = True
    """ResNets only: 3x3 stride-1 first convolution and no max-pool, for images of 32 px or less."""
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_output_dim: int = 1024
    """DINO uses 65536 on ImageNet; small data and short runs learn faster with fewer outputs."""
    head_batch_norm: bool = True
    """BatchNorm in the head's MLP: removes the common component of ResNet features (which leaves
    the centred teacher uniform otherwise); DINO turns it off for ViTs."""
    norm_last_layer: bool = True
    """Weight-normalise the head's last layer with a fixed norm (more stable, DINO default)."""


@dataclass
class LossConfig:
    student_temp: float = 0.1
    teacher_temp: float = 0.01
    """Teacher temperature after warmup. DINO uses 0.04 (up to 0.07 when stable) on ImageNet; the
    built-in short run needs a sharper teacher (0.01) to leave the uniform plateau in ~100 steps."""
    warmup_teacher_temp: float = 0.01
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 8e-3
    """Peak learning rate per 256 images; the used value is lr * global_batch / 256 (DINO: 5e-4)."""
    min_lr: float = 1e-6
    warmup_epochs: float = 2.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    sgd_momentum: float = 0.9
    clip_grad: float = 3.0
    """Max total gradient norm of the student; 0 disables clipping."""
    freeze_last_layer_epochs: float = 1.0
    teacher_momentum: float = 0.99
    """EMA momentum at step 0, cosine to teacher_momentum_end. DINO: 0.996 for runs of 100k+ steps;
    a short run needs a teacher that follows the student faster."""
    teacher_momentum_end: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 64
    """Global batch size, split evenly across processes under torchrun."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CPU and on CUDA when supported; fp16 (CUDA only) uses a GradScaler."""
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
    """k-NN of the teacher's features on a labeled set during pretraining (logged as eval/knn_top1)."""

    train: str | None = field(default=None, metadata=PATH)
    """Labeled set the k-NN memory is built from: a folder with one subfolder per class, a CSV of
    path,label, or digits; null turns evaluation during pretraining off."""
    test: str | None = field(default=None, metadata=PATH)
    """Labeled set that is scored."""
    every_epochs: int = 1
    k: int = 20
    temperature: float = 0.07


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (``method: distill``).

    Teacher and student see the same view of each image (the "consistent teacher" recipe, Beyer et al.
    2022), each at its own input size and normalisation; the student's size and normalisation are
    ``augment.global_1.size``, ``augment.mean`` and ``augment.std``.
    """

    teacher: str | None = field(default=None, metadata=PATH)
    """The frozen teacher: a run directory of ours, an exported ``.safetensors`` (with its ``.json``), a
    checkpoint ``.pt``, or ``timm:NAME[,pretrained=true][,key=value...]`` (e.g.
    ``timm:vit_small_patch14_dinov2.lvd142m,pretrained=true,img_size=224``)."""
    teacher_size: int | None = None
    """Side of the teacher's input in pixels; null: its own (sidecar ``input_size``, a timm ``img_size``
    argument, or timm's pretrained config)."""
    loss: Literal["queue_kl", "cosine", "dino"] = "queue_kl"
    """queue_kl: the student's projected features and the teacher's, each as a softmax over similarities to
    a queue of teacher embeddings, matched by KL; cosine: regression of the projected student features onto
    the teacher's by cosine; dino: DINO's loss against the frozen teacher's own DINO head (a run of ours)."""
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
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Range of the shared crop's area as a fraction of the image (RandomResizedCrop)."""
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """Brightness, contrast, saturation, hue strengths."""
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    mixup_alpha: float = 0.0
    """Mix each view with another image of the batch, weight ~ Beta(alpha, alpha); 0 turns mixup off."""


@dataclass
class Config:
    method: Literal["dino", "distill"] = "dino"
    """dino: self-distillation with an EMA teacher, from scratch; distill: from the frozen ``distill.teacher``."""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("unsupdistill.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe(recipe: str) -> tuple[dict[str, Any], str]:
    """Return the recipe's mapping and a label for error messages.

    Args:
        recipe: a shipped recipe name (``cifar10``) or a path to a YAML file.
    """
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist")
        try:
            text, label = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"recipe file {recipe} cannot be read (UTF-8 text expected): {err}") from err
    else:
        candidate = resources.files("unsupdistill.recipes") / f"{recipe}.yaml"
        if not candidate.is_file():
            raise ConfigError(
                f"unknown recipe '{recipe}'; shipped recipes: {', '.join(recipe_names())} "
                "(or pass a path to a .yaml file)"
            )
        text, label = candidate.read_text(), f"recipes/{recipe}.yaml"
    try:
        data = _parse_yaml(text) or {}
    except ValueError as err:
        raise ConfigError(f"{label} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of sections (data, model, train, ...)")
    return data, label


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"train.epochs=5"`` into ``(["train", "epochs"], 5)``.

    The value is parsed as YAML, except for path-valued keys (``data.path``, ``eval.train``, ...), whose
    value is the text after the first ``=`` as written (one pair of enclosing quotes removed); nothing
    after the ``=`` is null.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5")
    if key in path_keys():
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":  # quoted, as a shell user might: unquote
            return key.split("."), raw[1:-1]
        return key.split("."), raw or None
    try:
        value = _parse_yaml(raw) if raw else None
    except ValueError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from err
    return key.split("."), value


def path_keys(node: Any = None, prefix: str = "") -> set[str]:
    """Dotted names of the path-valued keys (fields with ``PATH`` metadata)."""
    node = Config if node is None else node
    hints = typing.get_type_hints(node)
    keys = set()
    for f in dataclasses.fields(node):
        if f.metadata.get("path"):
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys |= path_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def absolute_paths(config: Config) -> Config:
    """``config`` with its relative paths made absolute, so the stored config works from any folder.

    A path that exists as written is taken as written (a folder named ``~`` stays that folder); otherwise
    ``~`` is expanded. ``digits`` in ``eval.train``/``eval.test`` stays the built-in set unless a file or
    folder of that name exists; a ``timm:`` teacher is a model name, not a path.
    """
    data: dict[str, Any] = {}
    for key in sorted(path_keys()):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is None or (section == "eval" and value == "digits" and not Path(value).exists()):
            continue
        if key == "distill.teacher" and value.startswith("timm:"):
            continue
        path = Path(value) if Path(value).exists() else Path(value).expanduser()
        data.setdefault(section, {})[name] = os.path.abspath(path)
    return merge(config, data, "absolute paths")


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises only ValueError for bad input.

    PyYAML also raises ValueError for impossible dates (``2020-13-45``) and RecursionError for
    deeply nested flow collections; both become ValueError here, like its own YAMLError.
    """
    try:
        return yaml.safe_load(text)
    except RecursionError as err:
        raise ValueError("nested too deeply") from err
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides in order.

    A key that reaches into a mapping field (``model.backbone_kwargs.img_size=16``) sets that one
    entry; a mapping given whole (``model.backbone_kwargs={}``) replaces the field, as in a recipe.
    """
    for item in overrides:
        parts, value = parse_override(item)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        config = merge(config, nested, "command line", update_dicts=_reaches_into_mapping(config, parts))
    return config


def _reaches_into_mapping(config: Any, parts: list[str]) -> bool:
    node = config
    for part in parts[:-1]:
        node = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
        if isinstance(node, dict):
            return True
    return False


def load_config(recipe: str | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Defaults, then the recipe's differences, then ``key=value`` overrides; validated unless ``check`` is
    false (the automatic settings complete the config first, then validate it)."""
    config = Config()
    if recipe:
        data, label = read_recipe(recipe)
        config = merge(config, data, label)
    config = apply_overrides(config, overrides or [])
    if check:
        validate(config)
    return config


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Rebuild a full config (e.g. one stored in a checkpoint) and validate it."""
    config = merge(Config(), data, source)
    validate(config)
    return config


def merge(config: Any, data: dict[str, Any], source: str, prefix: str = "", update_dicts: bool = False) -> Any:
    """Return a copy of dataclass ``config`` with the values in ``data`` checked and applied.

    Mapping fields (``model.backbone_kwargs``) are replaced whole, unless ``update_dicts`` is set
    (an override that names one entry of the mapping).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(config))
    fields = {f.name: f for f in dataclasses.fields(config)}
    names = list(fields)
    changes = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(
                f"{source}: unknown key '{path}'{hint}; allowed keys in {where}: {', '.join(names)}"
            )
        current = getattr(config, key)
        if fields[key].metadata.get("path") and not (value is None or isinstance(value, str)):
            raise ConfigError(f"{source}: {path}={_show(value)} is invalid; expected a path (in a YAML file, quote "
                              f"a path that YAML would read as a number, a boolean or null, e.g. '{value}')")
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, source, f"{path}.", update_dicts)
        elif update_dicts and isinstance(current, dict) and isinstance(value, dict):
            changes[key] = {**current, **value}
        else:
            changes[key] = _coerce(value, hints[key], path, source)
    return dataclasses.replace(config, **changes)


def _coerce(value: Any, hint: Any, path: str, source: str) -> Any:
    """Check ``value`` against the type hint; return it in the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = f"{source}: {path}={_show(value)} is invalid; "
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(bad + f"allowed values: {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(bad + "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(bad + "expected an integer")
        if not -(2**63) <= value < 2**63:  # sizes, steps and seeds all end up in 64-bit C integers
            raise ConfigError(bad + "expected an integer of at most 64 bits")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(bad + "expected a number")
        try:
            return float(value)
        except OverflowError as err:  # an integer beyond float range, e.g. 10**400
            raise ConfigError(bad + "expected a finite number") from err
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(bad + "expected a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(bad + f"expected a list of {len(args)} numbers")
        return tuple(_coerce(v, a, path, source) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(bad + "expected a mapping")
        return dict(value)
    raise TypeError(f"config field {path} has an unsupported type {hint}")  # a bug, not user input


def _show(value: Any) -> str:
    """``repr(value)`` for an error message, cut to 100 characters."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python will print
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= 100 else text[:97] + "..."


# ----------------------------------------------------------------------------------------------
# Validation: ranges and relations that types cannot express
# ----------------------------------------------------------------------------------------------


def validate(config: Config, ignore: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise ConfigError for out-of-range values, naming the key and what is allowed.

    Args:
        config: the config to check.
        ignore: keys whose errors are left out (the automatic settings will set them).
    """
    errors = [message for key, message in config_errors(config) if key not in ignore]
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def config_errors(config: Config) -> list[tuple[str, str]]:
    """(key, message) of every out-of-range value."""
    checks: list[tuple[bool, str, str]] = []

    def need(ok: bool, key: str, allowed: str) -> None:
        checks.append((ok, key, allowed))

    a = config.augment
    for name in ("global_1", "global_2", "local"):
        spec: CropSpec = getattr(a, name)
        key = f"augment.{name}"
        need(spec.size >= 1, f"{key}.size", "an integer >= 1")
        need(0 < spec.scale[0] <= spec.scale[1] <= 1, f"{key}.scale", "[min, max] with 0 < min <= max <= 1")
        for p in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            need(0 <= getattr(spec, p) <= 1, f"{key}.{p}", "a probability in [0, 1]")
        need(all(v >= 0 for v in spec.color_jitter) and spec.color_jitter[3] <= 0.5,
             f"{key}.color_jitter", "[brightness, contrast, saturation, hue], all >= 0, hue <= 0.5")
        need(0 < spec.blur_sigma[0] <= spec.blur_sigma[1], f"{key}.blur_sigma", "[min, max] with 0 < min <= max")
    need(a.global_1.size == a.global_2.size, "augment.global_2.size",
         f"the same size as augment.global_1.size ({a.global_1.size})")
    need(a.num_local_crops >= 0, "augment.num_local_crops", "an integer >= 0")
    need(a.local.size <= a.global_1.size, "augment.local.size",
         f"at most the global crop size ({a.global_1.size})")
    need(all(s > 0 for s in a.std), "augment.std", "three positive numbers")

    d = config.data
    need(d.path is None or bool(d.path.strip()), "data.path", "null (the built-in digits) or a folder path")
    need(d.image_size is None or d.image_size >= 1, "data.image_size", "null or an integer >= 1")
    need(d.num_workers is None or d.num_workers >= 0, "data.num_workers", "null or an integer >= 0")

    m = config.model
    need(bool(m.backbone.strip()), "model.backbone", "a timm model name, e.g. resnet18 or vit_small_patch16_224")
    need(_is_plain_mapping(m.backbone_kwargs), "model.backbone_kwargs",
         "a mapping of argument names to numbers, strings, booleans, null, or lists and mappings of these")
    for key in ("head_hidden_dim", "head_bottleneck_dim", "head_output_dim"):
        need(getattr(m, key) >= 1, f"model.{key}", "an integer >= 1")

    lo = config.loss
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        need(getattr(lo, key) > 0, f"loss.{key}", "a number > 0")
    need(lo.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs", "an integer >= 0")
    need(0 <= lo.center_momentum < 1, "loss.center_momentum", "a number in [0, 1)")

    o = config.optim
    need(o.lr > 0, "optim.lr", "a number > 0")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", f"a number in [0, optim.lr={o.lr}]")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", "a number >= 0")
    need(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay", "numbers >= 0")
    need(0 <= o.sgd_momentum < 1, "optim.sgd_momentum", "a number in [0, 1)")
    need(o.clip_grad >= 0, "optim.clip_grad", "a number >= 0 (0 disables clipping)")
    need(o.freeze_last_layer_epochs >= 0, "optim.freeze_last_layer_epochs", "a number >= 0")
    need(0 <= o.teacher_momentum <= 1, "optim.teacher_momentum", "a number in [0, 1]")
    need(0 <= o.teacher_momentum_end <= 1, "optim.teacher_momentum_end", "a number in [0, 1]")

    t = config.train
    need(t.epochs >= 1, "train.epochs", "an integer >= 1")
    need(0 <= t.seed <= _MAX_SEED, "train.seed", f"an integer in [0, {_MAX_SEED}]")
    need(t.batch_size >= 1, "train.batch_size", "an integer >= 1")
    need(t.log_every_steps >= 1, "train.log_every_steps", "an integer >= 1")
    need(t.save_every_steps >= 1, "train.save_every_steps", "an integer >= 1")
    need(t.keep_every_epochs >= 0, "train.keep_every_epochs", "an integer >= 0")
    need(t.threads is None or t.threads >= 1, "train.threads", "null or an integer >= 1")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "null or an integer >= 1")
    need(t.time_budget_s is None or t.time_budget_s > 0, "train.time_budget_s", "null or a number of seconds > 0")

    e = config.eval
    need((e.train is None) == (e.test is None), "eval.test" if e.test is None else "eval.train",
         "both eval.train and eval.test set (or neither)")
    for key in ("train", "test"):
        value = getattr(e, key)
        need(value is None or bool(value.strip()), f"eval.{key}", "null, digits, a folder or a CSV file")
    need(e.every_epochs >= 1, "eval.every_epochs", "an integer >= 1")
    need(e.k >= 1, "eval.k", "an integer >= 1")
    need(e.temperature > 0, "eval.temperature", "a number > 0")

    di = config.distill
    need(config.method != "distill" or bool(di.teacher and di.teacher.strip()), "distill.teacher",
         "a teacher when method=distill: a run directory, an exported .safetensors, a checkpoint .pt or "
         "timm:NAME[,pretrained=true]")
    need(di.teacher_size is None or di.teacher_size >= 1, "distill.teacher_size", "null or an integer >= 1")
    for key in ("temperature", "dense_temperature"):
        need(getattr(di, key) > 0, f"distill.{key}", "a number > 0")
    need(di.queue_size is None or di.queue_size >= 1, "distill.queue_size", "null (scaled with the data) or an "
         "integer >= 1")
    need(di.dense_weight >= 0, "distill.dense_weight", "a number >= 0 (0 turns the dense term off)")
    need(0 <= di.ema_momentum < 1, "distill.ema_momentum", "a number in [0, 1) (0: no EMA)")
    need(0 < di.crop_scale[0] <= di.crop_scale[1] <= 1, "distill.crop_scale", "[min, max] with 0 < min <= max <= 1")
    for p in ("flip_p", "color_jitter_p", "grayscale_p"):
        need(0 <= getattr(di, p) <= 1, f"distill.{p}", "a probability in [0, 1]")
    need(all(v >= 0 for v in di.color_jitter) and di.color_jitter[3] <= 0.5, "distill.color_jitter",
         "[brightness, contrast, saturation, hue], all >= 0, hue <= 0.5")
    need(di.mixup_alpha >= 0, "distill.mixup_alpha", "a number >= 0 (0 turns mixup off)")

    # NaN fails every range check above, but infinity passes the one-sided ones (lr > 0). A key
    # that is not finite gets this error alone: its range checks would only repeat it.
    not_finite = _non_finite_keys(config)
    errors = [(key, f"{key}: expected a finite number, got {value}") for key, value in not_finite.items()]
    errors += [(key, f"{key}: expected {allowed}") for ok, key, allowed in checks if not ok and key not in not_finite]
    return errors


_MAX_SEED = 2**32 - 1
"""Largest seed every generator in the run accepts (NumPy's limit; torch takes 64 bits)."""


def _non_finite_keys(node: Any, prefix: str = "") -> dict[str, float]:
    """Dotted keys of the float fields (and float tuples) holding NaN or infinity, with the bad value."""
    found: dict[str, float] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found.update(_non_finite_keys(value, f"{key}."))
            continue
        numbers = value if isinstance(value, tuple) else (value,)
        bad = [v for v in numbers if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            found[key] = bad[0]
    return found


def _is_plain_mapping(value: Any) -> bool:
    """True for a mapping with string keys whose values YAML and ``torch.load(weights_only=True)`` both
    read back as they were: numbers, strings, booleans, null, and lists or mappings of these."""
    return isinstance(value, dict) and all(isinstance(k, str) for k in value) and all(
        _is_plain_value(v) for v in value.values())


def _is_plain_value(value: Any) -> bool:
    """True for a YAML scalar, or a list or mapping of plain values."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_value(v) for v in value)
    return _is_plain_mapping(value)


def _to_plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the config dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
