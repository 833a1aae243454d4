"""The models evaluation compares: a pretraining run, a checkpoint, an exported backbone, a randomly
initialised timm network (the random-init baseline) or raw pixels, each as a frozen feature extractor.

Nothing here unpickles code: checkpoints go through :func:`load_checkpoint` (``weights_only=True``)
and exports through safetensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn

from unsupdistill.config import ConfigError, config_from_dict
from unsupdistill.models.backbone import (
    BackboneSpec,
    apply_small_image_stem,
    describe_backbone,
    rebuild_backbone,
)
from unsupdistill.storage import CheckpointError, load_checkpoint

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0
"""Seed of the random-init baseline's weights, so every evaluation compares against the same network."""

_ACCEPTED = (
    "a run directory (backbone.safetensors + backbone.json, or checkpoints/last.pt), "
    "a checkpoint file (.pt), an exported backbone (.safetensors with its .json beside it), "
    "'timm:<name>[,key=value...]' for a randomly initialised timm backbone "
    "(e.g. timm:resnet18,small_image_stem=true or timm:vit_tiny_patch16_224,img_size=32,patch_size=4), "
    "or 'pixels'"
)


class ModelSpecError(ValueError):
    """A MODEL argument that names no loadable model."""


@dataclass
class FeatureModel:
    """A frozen backbone and the preprocessing it expects.

    Attributes:
        name: short label for tables, e.g. ``"run:myrun"``, ``"timm:resnet18"``, ``"pixels"``.
        backbone: in eval mode; maps a normalised float batch ``(B, 3, S, S)`` to features ``(B, D)``.
        input_size: the side ``S`` images are resized to.
        mean: per-channel mean subtracted from pixel values in [0, 1].
        std: per-channel standard deviation they are divided by.
        cache_key: sha256 hex identity of the weights and preprocessing, for feature caching.
        architecture: the timm model name, or ``"pixels"``.
        description: for trained models, the exported backbone's JSON sidecar (timm name and
            arguments, resize policy, normalisation, step); None for baselines.
    """

    name: str
    backbone: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cache_key: str
    architecture: str
    description: dict[str, Any] | None = None


class PixelFeatures(nn.Module):
    """Raw pixels as features: each image flattened and centred on its own mean.

    Cosine k-NN on these equals k-NN on images that are each centred and L2-normalised.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, 3, S, S). Returns (B, 3*S*S), every row with zero mean."""
        flat = x.flatten(1)  # (B, 3*S*S)
        return flat - flat.mean(dim=1, keepdim=True)


def load_model(spec: str, *, image_size: int | None = None, student: bool = False) -> FeatureModel:
    """Load the feature extractor a MODEL argument names.

    Args:
        spec: a run directory, a checkpoint ``.pt``, an exported ``.safetensors`` (with its ``.json``
            sidecar) or a directory holding one, ``timm:<name>[,key=value...]`` or ``pixels``.
        image_size: side of the images fed to the model; required for ``pixels`` and for a ``timm:``
            model without ``img_size``; for trained models it overrides the training crop size.
        student: use the student's backbone instead of the teacher's (checkpoints and run directories
            with a checkpoint only); ignored by ``timm:`` and ``pixels``, which have no teacher.

    Raises:
        ModelSpecError: the spec names nothing loadable; the message names it and the accepted forms.
    """
    spec = str(spec).strip()
    if image_size is not None and image_size < 1:
        raise ModelSpecError(f"image size {image_size} for model '{spec}' must be >= 1")
    if spec == "pixels":
        return _load_pixels(image_size)
    if spec.startswith("timm:"):
        return _load_random_timm(spec, image_size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(spec, path, image_size, student)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".pt":
            name = _checkpoint_name(path) + ("/student" if student else "")
            return _load_checkpoint(spec, path, image_size, student, name)
        if suffix == ".safetensors":
            if student:
                raise ModelSpecError(f"model '{spec}' is an exported backbone, which holds the teacher only; "
                                     "student weights are in the run's checkpoints: give the run directory or a .pt")
            return _load_export(spec, path, image_size, f"export:{path.stem}")
        raise ModelSpecError(f"model '{spec}' is a file that is neither a checkpoint (.pt) nor an exported "
                             f"backbone (.safetensors); expected {_ACCEPTED}")
    raise ModelSpecError(f"model '{spec}' does not exist; expected {_ACCEPTED}")


# ----------------------------------------------------------------------------------------------
# Trained models: run directories, checkpoints, exports
# ----------------------------------------------------------------------------------------------


def _load_directory(spec: str, path: Path, image_size: int | None, student: bool) -> FeatureModel:
    """A run directory (or any directory holding an export): the export if any, else its last checkpoint."""
    weights, checkpoint = path / "backbone.safetensors", path / "checkpoints" / "last.pt"
    has_export = weights.is_file() and weights.with_suffix(".json").is_file()
    name = f"run:{path.resolve().name}"
    if student:
        if not checkpoint.is_file():
            raise ModelSpecError(f"model '{spec}' has no {checkpoint}: student weights are only in checkpoints "
                                 "(an export holds the teacher); drop --student or give a run with checkpoints")
        return _load_checkpoint(spec, checkpoint, image_size, student, f"{name}/student")
    if has_export:
        return _load_export(spec, weights, image_size, name)
    if checkpoint.is_file():
        return _load_checkpoint(spec, checkpoint, image_size, student, name)
    raise ModelSpecError(f"model '{spec}' is a directory without backbone.safetensors + backbone.json or "
                         f"checkpoints/last.pt; expected {_ACCEPTED}")


def _load_checkpoint(spec: str, path: Path, image_size: int | None, student: bool, name: str) -> FeatureModel:
    """The teacher's (or student's) backbone of an unsupdistill checkpoint."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ModelSpecError(f"model '{spec}': {err}") from err
    try:
        backbone_spec = BackboneSpec(**state["backbone"])
        config = config_from_dict(state["config"], f"{path} config")
        input_size = config.augment.global_1.size
        mean, std = config.augment.mean, config.augment.std
        network = state["student" if student else "teacher"]
        description = describe_backbone(backbone_spec, config, int(state["step"]), "student" if student else "teacher")
    except (KeyError, TypeError, ValueError) as err:
        raise ModelSpecError(f"model '{spec}': checkpoint {path} lacks the backbone spec, augment config or "
                             f"weights ({type(err).__name__}: {err}); it may come from an older version") from err
    weights = {key.removeprefix("backbone."): value for key, value in network.items() if key.startswith("backbone.")}
    backbone = _rebuild(spec, backbone_spec, weights)
    size = image_size or input_size
    key = _digest(_file_sha256(path), backbone_spec.to_dict(), size, mean, std, student)
    return FeatureModel(name, backbone, size, mean, std, key, backbone_spec.name, description)


def _load_export(spec: str, weights_path: Path, image_size: int | None, name: str) -> FeatureModel:
    """An exported backbone: ``<stem>.safetensors`` plus its ``<stem>.json`` sidecar."""
    sidecar = weights_path.with_suffix(".json")
    if not sidecar.is_file():
        raise ModelSpecError(f"model '{spec}': exported weights {weights_path} have no {sidecar.name} beside "
                             "them (it says how to rebuild and feed the network); copy it along with the weights")
    try:
        meta = json.loads(sidecar.read_text())
        backbone_spec = BackboneSpec(meta["timm_name"], dict(meta.get("timm_kwargs") or {}),
                                     bool(meta.get("small_image_stem", False)), int(meta.get("feature_dim", 0)))
        input_size = int(meta["input_size"])
        mean, std = _triple(meta["mean"]), _triple(meta["std"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ModelSpecError(f"model '{spec}': {sidecar} is not an unsupdistill backbone description "
                             f"({type(err).__name__}: {err}); it needs timm_name, input_size, mean and std") from err
    try:
        weights = load_file(weights_path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type and OSError on bad files
        raise ModelSpecError(f"model '{spec}': {weights_path} is not a readable safetensors file "
                             f"({type(err).__name__}: {err})") from err
    backbone = _rebuild(spec, backbone_spec, weights)
    size = image_size or input_size
    key = _digest(_file_sha256(weights_path), backbone_spec.to_dict(), size, mean, std, False)
    return FeatureModel(name, backbone, size, mean, std, key, backbone_spec.name, meta)


def _rebuild(spec: str, backbone_spec: BackboneSpec, weights: dict[str, Tensor]) -> nn.Module:
    """Build the backbone a spec describes and load ``weights`` into it, all keys matching."""
    if not timm.is_model(backbone_spec.name):
        raise ModelSpecError(f"model '{spec}' needs timm model '{backbone_spec.name}', which this timm "
                             f"({timm.__version__}) does not have")
    try:
        backbone = rebuild_backbone(backbone_spec)
        backbone.load_state_dict(weights, strict=True)
    except (ConfigError, TypeError, RuntimeError) as err:
        raise ModelSpecError(f"model '{spec}': its weights do not fit a rebuilt '{backbone_spec.name}' "
                             f"({str(err).splitlines()[0]})") from err
    return _frozen(backbone)


def _checkpoint_name(path: Path) -> str:
    """``ckpt:<run>/<file>`` for a run's ``checkpoints/<file>``, else ``ckpt:<file>``."""
    resolved = path.resolve()
    if resolved.parent.name == "checkpoints":
        return f"ckpt:{resolved.parent.parent.name}/{resolved.name}"
    return f"ckpt:{resolved.name}"


# ----------------------------------------------------------------------------------------------
# Baselines: random-init timm networks and raw pixels
# ----------------------------------------------------------------------------------------------


def _load_random_timm(spec: str, image_size: int | None) -> FeatureModel:
    """A timm backbone with seeded random weights, from ``timm:<name>[,key=value...]``."""
    name, kwargs = parse_timm_spec(spec)
    small_image_stem = kwargs.pop("small_image_stem", False)
    if not isinstance(small_image_stem, bool):
        raise ModelSpecError(f"model '{spec}': small_image_stem must be true or false, got {small_image_stem!r}")
    if not timm.is_model(name):
        raise ModelSpecError(f"model '{spec}': '{name}' is not a timm model; list names with "
                             "python -c \"import timm; print(timm.list_models('resnet*'))\"")
    size = image_size or kwargs.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ModelSpecError(f"model '{spec}' has no input size: pass --image-size (or img_size=<int> in the spec)")
    # Only the CPU generator is seeded (the weights are created on CPU), and fork_rng restores it:
    # torch.manual_seed would also reseed CUDA generators, which devices=[] does not restore.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(RANDOM_INIT_SEED)
        try:
            backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            if small_image_stem:
                apply_small_image_stem(backbone)
        except (TypeError, ValueError, AssertionError, RuntimeError, ConfigError) as err:
            raise ModelSpecError(f"model '{spec}': timm '{name}' rejected the arguments {kwargs}: "
                                 f"{str(err).splitlines()[0]}") from err
    normalised = f"timm:{name}," + json.dumps({**kwargs, "small_image_stem": small_image_stem}, sort_keys=True)
    # the versions are part of the identity: another timm or torch may initialise differently
    identity = f"{normalised}|seed{RANDOM_INIT_SEED}|timm{timm.__version__}|torch{torch.__version__}"
    key = _digest(identity, None, size, IMAGENET_MEAN, IMAGENET_STD, False)
    label = spec.split(",", 1)[0] if "," in spec else spec
    return FeatureModel(label, _frozen(backbone), size, IMAGENET_MEAN, IMAGENET_STD, key, name)


def parse_timm_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``timm:<name>[,key=value...]`` into the name and keyword arguments.

    Commas inside brackets belong to the value (``channels=[32,64,128,256]``); values are parsed as
    YAML (``true``, ``4``, ``[1, 2]``, ``{a: 1}``).

    Raises:
        ModelSpecError: an empty name, an item without ``=``, a repeated key or a value that is not YAML.
    """
    name, *items = _split_top_level(spec.removeprefix("timm:"))
    name = name.strip()
    if not name:
        raise ModelSpecError(f"model '{spec}' names no timm model; expected {_ACCEPTED}")
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ModelSpecError(f"model '{spec}': '{item}' is not key=value "
                                 "(e.g. timm:resnet18,small_image_stem=true,stem_width=32)")
        if key in kwargs:
            raise ModelSpecError(f"model '{spec}' sets '{key}' twice")
        try:
            kwargs[key] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ModelSpecError(f"model '{spec}': value of '{key}' is not valid YAML: {text!r}") from err
    return name, kwargs


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside (), [] or {}."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _load_pixels(image_size: int | None) -> FeatureModel:
    """Raw pixels in [0, 1], resized to ``image_size`` and centred per image."""
    if image_size is None:
        raise ModelSpecError("model 'pixels' needs the size images are resized to: pass --image-size")
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    key = _digest("pixels|seed0", None, image_size, zero, one, False)
    return FeatureModel("pixels", PixelFeatures().eval(), image_size, zero, one, key, "pixels")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _frozen(backbone: nn.Module) -> nn.Module:
    backbone.requires_grad_(False)
    return backbone.eval()


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(weights: str, architecture: dict[str, Any] | None, input_size: int,
            mean: tuple[float, ...], std: tuple[float, ...], student: bool) -> str:
    """sha256 hex of the weights' identity and everything that changes the features they give."""
    parts = {"weights": weights, "architecture": architecture, "input_size": input_size, "mean": list(mean),
             "std": list(std), "student": student}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
