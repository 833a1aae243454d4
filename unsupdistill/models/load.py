"""Frozen feature extractors from a MODEL argument: a pretraining run, a checkpoint, an exported backbone,
a timm network (seeded random init, or timm's pretrained weights) or raw pixels.

Evaluation, export and the distillation teacher all load models through :func:`load_model`, and each takes the
classifier that belongs to the loaded weights (a model distilled with labels) from it: an export's, or the one a
checkpoint holds, never a run's final classifier beside an earlier checkpoint.
Nothing here unpickles code: checkpoints go through :func:`load_checkpoint` (``weights_only=True``)
and exports through safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import timm
from safetensors.torch import load_file
from torch import Tensor, nn

from unsupdistill.config import ConfigError, config_from_dict
from unsupdistill.models.backbone import BackboneSpec, describe_backbone, rebuild_backbone
from unsupdistill.models.classifier import Classifier, checkpoint_classifier, export_classifier
from unsupdistill.models.frozen import (
    ACCEPTED,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_INIT_SEED,
    FeatureModel,
    LogMelStatistics,
    ModelSpecError,
    PixelFeatures,
    cache_digest,
    file_sha256,
    frozen,
    triple,
)
from unsupdistill.models.timm_spec import load_timm, parse_timm_spec
from unsupdistill.run_dir import BACKBONE, last_checkpoint, run_of
from unsupdistill.storage import CLASSIFIER_FILE, CheckpointError, load_checkpoint

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RANDOM_INIT_SEED", "FeatureModel", "ModelSpecError", "PixelFeatures",
           "load_model", "parse_timm_spec"]

logger = logging.getLogger(__name__)

LOGMEL = "logmel"
"""The MODEL spec of the log-mel statistics baseline of sounds."""


def load_model(spec: str, *, image_size: int | None = None, student: bool = False,
               frontend: dict | None = None) -> FeatureModel:
    """Load the feature extractor a MODEL argument names, with the classifier that belongs to its weights
    (``FeatureModel.classifier``: an export's, or the one a checkpoint holds; None without one).

    Args:
        spec: a run directory, a checkpoint ``.pt``, an exported ``.safetensors`` (with its ``.json``
            sidecar; the path without ``.safetensors`` too) or a directory holding one,
            ``timm:<name>[,pretrained=true][,key=value...]`` or ``pixels``.
        image_size: side of the images fed to the model; required for ``pixels`` and for a random-init
            ``timm:`` model without ``img_size``; for trained and pretrained models it overrides their own
            input size (training crop, timm's pretrained config).
        student: use the student's backbone instead of the teacher's (checkpoints and run directories
            with a checkpoint only); ignored by ``timm:`` and ``pixels``, which have no teacher.
        frontend: a sound front end (:attr:`FeatureModel.frontend`) for the models that have none of their own:
            ``timm:`` networks (then of sounds) and ``logmel``, the log-mel statistics baseline of sounds.

    Raises:
        ModelSpecError: the spec names nothing loadable; the message names it and the accepted forms.
    """
    spec = str(spec).strip()
    if image_size is not None and image_size < 1:
        raise ModelSpecError(f"image size {image_size} for model '{spec}' must be >= 1")
    if spec == "pixels":
        return _load_pixels(image_size)
    if spec == LOGMEL:
        return _load_logmel(spec, frontend)
    if spec.startswith("timm:"):
        # a network of one input channel hears at the front end's columns; an image network (3 channels) sees the
        # clip's log-mel as a picture at its own size (SoundFeatures)
        of_sounds = frontend is not None and parse_timm_spec(spec)[1].get("in_chans") == 1
        model = load_timm(spec, int(frontend["frames"]) if of_sounds else image_size)
        return model if frontend is None else dataclasses.replace(model, frontend=frontend)
    path = Path(spec).expanduser()
    if not path.exists() and path.with_name(path.name + ".safetensors").is_file():  # an export named by its stem
        path = path.with_name(path.name + ".safetensors")
    if path.is_dir():
        return _load_directory(spec, path, image_size, student)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".pt":
            name = checkpoint_name(path) + ("/student" if student else "")
            return _load_checkpoint(spec, path, image_size, student, name)
        if suffix == ".safetensors":
            if student:
                raise ModelSpecError(f"model '{spec}' is an exported backbone, which holds the teacher only; "
                                     "student weights are in the run's checkpoints: give the run directory or a .pt")
            return _load_export(spec, path, image_size, f"export:{path.stem}")
        raise ModelSpecError(f"model '{spec}' is a file that is neither a checkpoint (.pt) nor an exported "
                             f"backbone (.safetensors); expected {ACCEPTED}")
    raise ModelSpecError(f"model '{spec}' does not exist; expected {ACCEPTED}")


def checkpoint_name(path: Path) -> str:
    """``ckpt:<run>/<file>`` for a run's ``checkpoints/<file>``, else ``ckpt:<file>``."""
    resolved = path.resolve()
    run = run_of(resolved)
    return f"ckpt:{run.name}/{resolved.name}" if run is not None else f"ckpt:{resolved.name}"


# ----------------------------------------------------------------------------------------------
# Trained models: run directories, checkpoints, exports
# ----------------------------------------------------------------------------------------------


def _load_directory(spec: str, path: Path, image_size: int | None, student: bool) -> FeatureModel:
    """A run directory (or any directory holding an export): the export if any, else its last checkpoint."""
    weights, checkpoint = path / BACKBONE, last_checkpoint(path)
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
                         f"checkpoints/last.pt; expected {ACCEPTED}")


def _load_checkpoint(spec: str, path: Path, image_size: int | None, student: bool, name: str) -> FeatureModel:
    """The exported network's backbone of an unsupdistill checkpoint (DINO's teacher, a distilled student or its
    EMA), or the student's, with the classifier that network was trained with (if it has one)."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ModelSpecError(f"model '{spec}': {err}") from err
    try:
        backbone_spec = BackboneSpec(**state["backbone"])
        config = config_from_dict(state["config"], f"{path} config")
        input_size, mean, std = config.model.input_size, config.model.mean, config.model.std
        source = "student" if student else state.get("exported", "teacher")  # distillation: student(_ema)
        network = state[source]
        description = describe_backbone(backbone_spec, config, int(state["step"]), source)
        frontend = description.get("frontend")
    except (KeyError, TypeError, ValueError) as err:
        raise ModelSpecError(f"model '{spec}': checkpoint {path} lacks the backbone spec, model config or "
                             f"weights ({type(err).__name__}: {err}); it may come from an older version") from err
    weights = {key.removeprefix("backbone."): value for key, value in network.items() if key.startswith("backbone.")}
    backbone = _rebuild(spec, backbone_spec, weights)
    classifier = _checkpoint_classifier(spec, path, network, state.get("classes"))
    size = image_size or input_size
    key = cache_digest(file_sha256(path), backbone_spec.to_dict(), size, mean, std, student)
    return FeatureModel(name, backbone, size, mean, std, key, backbone_spec.name, description, classifier, frontend)


def _checkpoint_classifier(spec: str, path: Path, network: dict[str, Tensor], classes: object) -> Classifier | None:
    """The classifier a checkpoint's network holds. The run's ``classifier.safetensors`` belongs to its final export,
    not to this checkpoint: a checkpoint without a classifier of its own gets none, and says so when the run has one."""
    try:
        classifier = checkpoint_classifier(network, classes)
    except (ValueError, RuntimeError) as err:
        raise ModelSpecError(f"model '{spec}': the classifier in checkpoint {path} does not load "
                             f"({type(err).__name__}: {str(err).splitlines()[0]})") from err
    run = run_of(path.resolve())
    if classifier is None and run is not None and (run / CLASSIFIER_FILE).is_file():
        logger.warning("%s holds no classifier, and the run's %s belongs to its final export, not to this checkpoint: "
                       "model '%s' has no classifier (give the run directory for the final one)", path,
                       CLASSIFIER_FILE, spec)
    return classifier


def _load_export(spec: str, weights_path: Path, image_size: int | None, name: str) -> FeatureModel:
    """An exported backbone: ``<stem>.safetensors`` plus its ``<stem>.json`` sidecar, and its classifier if it has
    one."""
    sidecar = weights_path.with_suffix(".json")
    if not sidecar.is_file():
        raise ModelSpecError(f"model '{spec}': exported weights {weights_path} have no {sidecar.name} beside "
                             "them (it says how to rebuild and feed the network); copy it along with the weights")
    try:
        meta = json.loads(sidecar.read_text())
        backbone_spec = BackboneSpec(meta["timm_name"], dict(meta.get("timm_kwargs") or {}),
                                     bool(meta.get("small_image_stem", False)), int(meta.get("feature_dim", 0)))
        input_size = int(meta["input_size"])
        mean, std = triple(meta["mean"]), triple(meta["std"])
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
    key = cache_digest(file_sha256(weights_path), backbone_spec.to_dict(), size, mean, std, False)
    return FeatureModel(name, backbone, size, mean, std, key, backbone_spec.name, meta,
                        export_classifier(weights_path, meta), meta.get("frontend"))


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
    return frozen(backbone)


# ----------------------------------------------------------------------------------------------
# Raw pixels
# ----------------------------------------------------------------------------------------------


def _load_logmel(spec: str, frontend: dict | None) -> FeatureModel:
    """The log-mel statistics of sounds (:class:`LogMelStatistics`), through ``frontend`` at the clip's own
    columns."""
    if frontend is None:
        raise ModelSpecError(f"model '{spec}' (log-mel statistics of sounds) needs a sound front end: score it beside "
                             "a model of sounds (the end-of-run summary does)")
    from unsupdistill.augment.audio import LogMel

    columns = LogMel.from_description(frontend).frames(int(frontend["clip_samples"]))
    own = {**frontend, "frames": columns}  # the whole clip, not resized
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    key = cache_digest("logmel|" + json.dumps(own, sort_keys=True), None, columns, zero, one, False)
    return FeatureModel(LOGMEL, LogMelStatistics().eval(), columns, zero, one, key, LOGMEL, frontend=own)


def _load_pixels(image_size: int | None) -> FeatureModel:
    """Raw pixels in [0, 1], resized to ``image_size`` and centred per image."""
    if image_size is None:
        raise ModelSpecError("model 'pixels' needs the size images are resized to: pass --image-size")
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    key = cache_digest("pixels|seed0", None, image_size, zero, one, False)
    return FeatureModel("pixels", PixelFeatures().eval(), image_size, zero, one, key, "pixels")
