"""A linear classifier over a backbone's pooled features, with its class names: trained by methods that learn from
labels (``kd``), held in their checkpoints and exported beside the backbone. :func:`~unsupdistill.models.load.
load_model` gives a loaded model the classifier that belongs to its weights (``FeatureModel.classifier``), which
``eval``, ``embed``, ``export`` and a next generation's teacher use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from unsupdistill.models.frozen import ModelSpecError
from unsupdistill.storage import CLASSIFIER_FILE


class Classifier(nn.Linear):
    """``nn.Linear`` (D -> C) that knows its classes' names (``classes``, in index order)."""

    def __init__(self, feature_dim: int, classes: list[str]) -> None:
        super().__init__(feature_dim, len(classes))
        self.classes = list(classes)


def read_classifier(path: Path) -> Classifier:
    """The classifier in ``path`` (``weight`` (C, D), ``bias`` (C,)) with the class names of the ``.json`` beside it
    (``classes``), frozen and in eval mode.

    Raises:
        ModelSpecError: the files do not load (the message names them).
    """
    sidecar = path.with_suffix(".json")
    try:
        classes = json.loads(sidecar.read_text())["classes"]
        tensors = load_file(str(path))
        classifier = _frozen(tensors["weight"], tensors["bias"], classes)
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ModelSpecError(f"classifier {path} (with {sidecar.name}) does not load ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); export the run again") from err
    return classifier


def export_classifier(weights: Path, meta: dict[str, Any]) -> Classifier | None:
    """The classifier of the exported backbone ``weights`` whose sidecar is ``meta``: the file the sidecar names
    (``classifier``, beside it: ``unsupdistill export`` writes it so), else a run's ``classifier.safetensors`` when
    its ``classifier.json`` says it belongs to this backbone file; None when it has none.

    Raises:
        ModelSpecError: the classifier named or found does not load, or is missing (the message names it).
    """
    named = meta.get("classifier")
    if named:
        path = weights.parent / str(named)
        if not path.is_file():
            raise ModelSpecError(f"{weights.with_suffix('.json')} names classifier {named}, which is not beside it; "
                                 "copy it (with its .json) along with the backbone")
        return read_classifier(path)
    path = weights.parent / CLASSIFIER_FILE
    if not path.is_file():
        return None
    try:
        owner = json.loads(path.with_suffix(".json").read_text()).get("backbone")
    except (OSError, ValueError, AttributeError):
        owner = weights.name  # read_classifier names the broken file
    return read_classifier(path) if owner == weights.name else None


def checkpoint_classifier(network: dict[str, Tensor], classes: Any) -> Classifier | None:
    """The classifier a checkpoint's network state holds (``classifier.weight`` (C, D), ``classifier.bias`` (C,),
    trained with that network), named by the checkpoint's ``classes``, frozen; None when it holds none.

    Raises:
        ValueError: the weights and the class names disagree.
    """
    if "classifier.weight" not in network:
        return None
    return _frozen(network["classifier.weight"], network["classifier.bias"], classes)


def _frozen(weight: Tensor, bias: Tensor, classes: Any) -> Classifier:
    if not isinstance(classes, list) or weight.ndim != 2 or len(classes) != weight.shape[0]:
        raise ValueError(f"weights of shape {tuple(weight.shape)} for classes {classes!r}")
    classifier = Classifier(weight.shape[1], [str(name) for name in classes])
    classifier.load_state_dict({"weight": weight, "bias": bias})
    classifier.requires_grad_(False)
    return classifier.eval()


@torch.no_grad()
def top_k(classifier: Classifier, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable classes (B, k) int64 and their softmax probabilities (B, k) for features (B, D)."""
    probs = classifier(features.float()).softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return indices, values
