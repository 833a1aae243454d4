"""The frozen teacher of knowledge distillation: a run of ours, an export, a checkpoint or ``timm:NAME``.

The backbone is loaded by :func:`unsupdistill.models.load.load_model` (the loader evaluation uses), then
frozen and tried once on a batch of the size it will be given, so a teacher that cannot take its inputs
fails before training starts rather than at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unsupdistill.config import ConfigError, config_from_dict
from unsupdistill.models.backbone import pooled_and_spatial
from unsupdistill.models.classifier import Classifier
from unsupdistill.models.dino import build_dino_head
from unsupdistill.models.frozen import FeatureModel, ModelSpecError, frozen
from unsupdistill.models.load import load_model
from unsupdistill.models.timm_spec import parse_timm_spec
from unsupdistill.run_dir import last_checkpoint
from unsupdistill.storage import CheckpointError, load_checkpoint

_FORMS = ("a run directory of ours, an exported backbone (.safetensors with its .json beside it), a checkpoint "
          "(.pt), or timm:NAME[,pretrained=true][,key=value...]")


class TeacherError(ModelSpecError):
    """A teacher that cannot be loaded or cannot take the inputs it would be given.

    A :class:`ModelSpecError` (hence a ``ValueError``): the CLI reports it as a user error, like any bad
    MODEL argument; errors of :func:`load_model` reach the caller as this type.
    """


@dataclass
class Teacher:
    """A frozen teacher and the preprocessing it expects.

    Attributes:
        name: label, e.g. ``"run:myrun"``, ``"export:x"``, ``"timm:vit_small_patch14_dinov2.lvd142m,pretrained"``.
        backbone: frozen (no parameter requires gradients) and in eval mode; a timm model, so
            :func:`pooled_and_spatial` gives its pooled (B, D) and spatial (B, h, w, C) features.
        head: the frozen DINO head of a run of ours (from its checkpoint's teacher), if asked for; else None.
        head_config: that run's DINO settings (the head's sizes), so a student can get the same head; else None.
        input_size: the side S of the (B, 3, S, S) batches the teacher is given.
        mean: per-channel mean subtracted from pixel values in [0, 1].
        std: per-channel standard deviation they are divided by.
        feature_dim: D, the width of the pooled features.
        architecture: the timm model name.
        description: the export's JSON sidecar, or a summary of timm's pretrained config; None for a
            random-init timm network.
        cache_key: sha256 hex identity of the weights and preprocessing (a teacher cache is keyed by it).
        classifier: the classifier that belongs to the teacher's weights (a model distilled with labels: its export's,
            or the one its checkpoint holds), or None.
        frontend: a teacher of sounds' front end (:attr:`~unsupdistill.models.frozen.FeatureModel.frontend`): its
            inputs are then log-mel images (B, 1, n_mels, input_size); None for a network of images.
    """

    name: str
    backbone: nn.Module
    head: nn.Module | None
    head_config: Any
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    architecture: str
    description: dict[str, Any] | None
    cache_key: str = ""
    classifier: Classifier | None = None
    frontend: dict[str, Any] | None = None


def load_teacher(spec: str, input_size: int | None = None, need_head: bool = False) -> Teacher:
    """Load, freeze and try the teacher ``spec`` names.

    Args:
        spec: a run directory of ours (its export if any, else ``checkpoints/last.pt``), an exported
            ``.safetensors`` with its ``.json`` sidecar, a checkpoint ``.pt`` (its EMA teacher), or
            ``timm:NAME[,pretrained=true][,key=value...]``.
        input_size: the teacher's input side (``distill.teacher_size``); None: its own (the sidecar's or
            checkpoint's crop size, a timm ``img_size`` argument, or timm's pretrained config).
        need_head: also load the run's frozen DINO head (``distill.loss=dino``); a run directory then
            uses its ``checkpoints/last.pt`` for both backbone and head.

    Raises:
        TeacherError: the spec names nothing loadable, has no DINO head while one is needed, or the
            teacher fails on a (1, 3, S, S) batch; the message names the teacher and the fix.
    """
    spec = str(spec).strip()
    if input_size is not None and input_size < 1:
        raise TeacherError(f"teacher '{spec}': distill.teacher_size={input_size} must be >= 1, or null for its own")
    try:
        source, name = _source(spec, input_size, need_head)
        model = load_model(str(source), image_size=input_size)
        head, head_config = _load_head(spec, source) if need_head else (None, None)
    except TeacherError:
        raise
    except ModelSpecError as err:
        raise TeacherError(f"teacher: {err}") from err
    feature_dim = _check_inputs(spec, model, head)
    return Teacher(name or model.name, model.backbone, head, head_config, model.input_size, model.mean, model.std,
                   feature_dim, model.architecture, model.description, model.cache_key, model.classifier,
                   model.frontend)


def _source(spec: str, input_size: int | None, need_head: bool) -> tuple[str | Path, str | None]:
    """What to load the backbone from (a checkpoint when the head is needed) and its label, if not load_model's."""
    if spec == "pixels":
        raise TeacherError(f"teacher 'pixels' is no network; give {_FORMS}")
    if spec.startswith("timm:"):
        _, kwargs = parse_timm_spec(spec)
        if need_head:
            raise _no_head(spec, "a timm network")
        if input_size is None and not kwargs.get("pretrained") and "img_size" not in kwargs:
            raise TeacherError(f"teacher '{spec}' has no input size: set distill.teacher_size=N (its input side in "
                               "px), or add img_size=<int> to the spec of a network that takes it (a ViT)")
        return spec, None
    path = Path(spec).expanduser()
    if not path.exists() and path.with_name(path.name + ".safetensors").is_file():  # an export named by its stem
        path = path.with_name(path.name + ".safetensors")
    if not path.exists():
        raise TeacherError(f"teacher '{spec}' does not exist; give {_FORMS}")
    if not need_head:
        return spec, None
    if path.is_dir():
        checkpoint = last_checkpoint(path)
        if not checkpoint.is_file():
            raise _no_head(spec, f"a directory without {checkpoint.relative_to(path)} (an export holds no head)")
        return checkpoint, f"run:{path.resolve().name}"
    if path.suffix.lower() != ".pt":
        raise _no_head(spec, "not a checkpoint (an export holds no head)")
    return path, None


def _no_head(spec: str, what: str) -> TeacherError:
    return TeacherError(f"teacher '{spec}' is {what}, which has no DINO head: distill.loss=dino needs a "
                        "run directory or checkpoint (.pt) of ours; use distill.loss=queue_kl (or cosine) with it")


def _load_head(spec: str, checkpoint: str | Path) -> tuple[nn.Module, Any]:
    """The frozen DINO head of a checkpoint's teacher network, and the run's DINO settings (its sizes)."""
    try:
        state = load_checkpoint(checkpoint, mmap=True)  # read in full by load_model already: map, don't copy
        head_config = config_from_dict(state["config"], f"{checkpoint} config").dino
        weights = {k.removeprefix("head."): v for k, v in state["teacher"].items() if k.startswith("head.")}
        head = build_dino_head(head_config, int(state["backbone"]["feature_dim"]))
        head.load_state_dict(weights, strict=True)
    except (CheckpointError, ConfigError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TeacherError(f"teacher '{spec}': the DINO head in {checkpoint} does not load "
                           f"({type(err).__name__}: {str(err).splitlines()[0]}); use distill.loss=queue_kl, "
                           "which needs no head") from err
    return frozen(head), head_config


def _check_inputs(spec: str, model: FeatureModel, head: nn.Module | None) -> int:
    """Run the teacher once on a zero batch of its input size (a teacher of sounds: a log-mel image of its mel
    bands and columns); returns the pooled feature width D."""
    size = model.input_size
    shape = (1, 1, int(model.frontend["n_mels"]), size) if model.frontend is not None else (1, 3, size, size)
    try:
        with torch.no_grad():
            pooled, _ = pooled_and_spatial(model.backbone, torch.zeros(shape))  # (1, D)
            if pooled.ndim != 2:
                raise ValueError(f"pooled features of shape {tuple(pooled.shape)}, expected (B, D)")
            if head is not None:
                head(pooled)
    except Exception as err:  # noqa: BLE001 - networks refuse an input size with AssertionError, RuntimeError, ...
        fix = "set distill.teacher_size to the size it was built for (null: its own size)"
        if spec.startswith("timm:"):
            fix += f", or add dynamic_img_size=true (or img_size={size}) to the timm: spec"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TeacherError(f"teacher '{model.name}' ({spec}) cannot take {shape[-2]}x{shape[-1]} inputs "
                           f"({type(err).__name__}: {cause}): {fix}") from err
    return int(pooled.shape[-1])
