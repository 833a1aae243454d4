"""timm networks named by ``timm:<name>[,key=value...]``: the seeded random-init baseline, or timm's
pretrained weights with ``pretrained=true`` (downloaded by timm, or a local file given with
``pretrained_cfg_overlay={file: PATH}``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from timm.data import resolve_model_data_config

from unsupdistill.config import ConfigError
from unsupdistill.models.backbone import apply_small_image_stem
from unsupdistill.models.frozen import (
    ACCEPTED,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_INIT_SEED,
    FeatureModel,
    ModelSpecError,
    cache_digest,
    frozen,
    state_sha256,
    triple,
)

_PRETRAINED_CFG_KEYS = ("architecture", "tag", "hf_hub_id", "url", "file", "license", "input_size", "mean", "std",
                        "interpolation", "crop_pct")
"""The parts of timm's pretrained config kept in a pretrained model's description."""


def load_timm(spec: str, image_size: int | None) -> FeatureModel:
    """A frozen timm backbone from ``timm:<name>[,pretrained=true][,small_image_stem=true][,seed=N][,key=value...]``.

    Other keys are ``timm.create_model`` keyword arguments. Without ``pretrained=true`` the weights are
    a random init seeded with ``seed`` (default ``RANDOM_INIT_SEED``: the same network every time); with it,
    timm loads its pretrained weights.

    Raises:
        ModelSpecError: a bad spec, arguments timm rejects, no input size, or weights timm cannot load.
    """
    name, kwargs = parse_timm_spec(spec)
    pretrained = kwargs.pop("pretrained", False)
    small_image_stem = kwargs.pop("small_image_stem", False)
    seed = kwargs.pop("seed", None)
    for key, value in (("pretrained", pretrained), ("small_image_stem", small_image_stem)):
        if not isinstance(value, bool):
            raise ModelSpecError(f"model '{spec}': {key} must be true or false, got {value!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or pretrained):
        raise ModelSpecError(f"model '{spec}': seed must be an integer and applies to a random init only "
                             f"(no pretrained=true), got {seed!r}")
    if not timm.is_model(name):
        raise ModelSpecError(f"model '{spec}': '{name}' is not a timm model; list names with "
                             "python -c \"import timm; print(timm.list_models('resnet*'))\"")
    if pretrained:
        if small_image_stem:
            raise ModelSpecError(f"model '{spec}': small_image_stem would replace the pretrained first "
                                 "convolution by an untrained one; drop small_image_stem with pretrained=true")
        return _load_pretrained(spec, name, kwargs, image_size)
    return _load_random(spec, name, kwargs, small_image_stem, image_size,
                        RANDOM_INIT_SEED if seed is None else seed)


def _load_random(spec: str, name: str, kwargs: dict[str, Any], small_image_stem: bool,
                 image_size: int | None, seed: int) -> FeatureModel:
    """A timm backbone with random weights drawn with ``seed`` (the random-init baseline)."""
    size = image_size or kwargs.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ModelSpecError(f"model '{spec}' has no input size: pass --image-size (or img_size=<int> in the spec of "
                             "a network that takes it, a ViT)")
    # Only the CPU generator is seeded (the weights are created on CPU), and fork_rng restores it:
    # torch.manual_seed would also reseed CUDA generators, which devices=[] does not restore.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        try:
            backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            if small_image_stem:
                apply_small_image_stem(backbone)
        except (TypeError, ValueError, AssertionError, RuntimeError, ConfigError) as err:
            raise ModelSpecError(f"model '{spec}': timm '{name}' rejected the arguments {kwargs}: "
                                 f"{str(err).splitlines()[0]}") from err
    normalised = f"timm:{name}," + json.dumps({**kwargs, "small_image_stem": small_image_stem}, sort_keys=True)
    # the versions are part of the identity: another timm or torch may initialise differently
    identity = f"{normalised}|seed{seed}|timm{timm.__version__}|torch{torch.__version__}"
    key = cache_digest(identity, None, size, IMAGENET_MEAN, IMAGENET_STD, False)
    label = spec.split(",", 1)[0] if "," in spec else spec
    return FeatureModel(label, frozen(backbone), size, IMAGENET_MEAN, IMAGENET_STD, key, name)


def _load_pretrained(spec: str, name: str, kwargs: dict[str, Any], image_size: int | None) -> FeatureModel:
    """timm's pretrained backbone: its input size and normalisation come from timm's pretrained config."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay is not None and not isinstance(overlay, dict):
        raise ModelSpecError(f"model '{spec}': pretrained_cfg_overlay must be a mapping such as "
                             f"{{file: /path/to/weights.safetensors}}, got {overlay!r}")
    local = (overlay or {}).get("file")
    if local is not None:
        if not Path(str(local)).expanduser().is_file():
            raise ModelSpecError(f"model '{spec}': the pretrained weights file {local} does not exist; give the "
                                 "path of a weights file saved from the same architecture, or drop "
                                 "pretrained_cfg_overlay to let timm download its weights (needs internet access)")
        kwargs = {**kwargs, "pretrained_cfg_overlay": {**overlay, "file": str(Path(str(local)).expanduser())}}
    try:
        with torch.random.fork_rng(devices=[]):  # the init drawn before the weights load leaves the caller's RNG
            backbone = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except TypeError as err:
        raise ModelSpecError(f"model '{spec}': timm '{name}' rejected the arguments {kwargs}: "
                             f"{str(err).splitlines()[0]}") from err
    except Exception as err:  # noqa: BLE001 - hub downloads, file reads and state-dict loads raise many types
        raise ModelSpecError(
            f"model '{spec}': timm could not load the pretrained weights of '{name}' ({_cause(err)}). "
            "pretrained=true needs internet access (timm downloads the weights once, then uses its cache) "
            "or a local weights file given in the spec as pretrained_cfg_overlay={file: /path/to/weights.safetensors}, "
            "saved from the same architecture"
        ) from err
    data_config = resolve_model_data_config(backbone)
    own_size = kwargs.get("img_size", data_config["input_size"][-1])
    size = image_size or own_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ModelSpecError(f"model '{spec}': input size {size!r} is not an integer; pass --image-size "
                             "(or img_size=<int> in the spec)")
    mean, std = triple(data_config["mean"]), triple(data_config["std"])
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    arguments = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}  # where the file lies is no identity
    identity = f"timm:{name}," + json.dumps(arguments, sort_keys=True) + f"|pretrained|{state_sha256(backbone)}"
    key = cache_digest(identity, None, size, mean, std, False)
    description = {
        "timm_name": name, "timm_kwargs": kwargs, "pretrained": True, "feature_dim": int(backbone.num_features),
        "input_size": size, "mean": list(mean), "std": list(std),
        "pretrained_cfg": {k: cfg[k] for k in _PRETRAINED_CFG_KEYS if cfg.get(k) is not None},
    }
    return FeatureModel(f"timm:{name},pretrained", frozen(backbone), size, mean, std, key, name, description)


def _cause(err: Exception, limit: int = 300) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters (state-dict errors list every key)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


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
        raise ModelSpecError(f"model '{spec}' names no timm model; expected {ACCEPTED}")
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
