"""A linear classifier over a backbone's pooled features, with its class names: exported beside the backbone by
methods that learn from labels (``kd``), read back by ``eval``, ``predict`` and a next generation's teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from unsupdistill.models.frozen import ModelSpecError
from unsupdistill.run_dir import run_of
from unsupdistill.storage import CLASSIFIER_FILE


class Classifier(nn.Linear):
    """``nn.Linear`` (D -> C) that knows its classes' names (``classes``, in index order)."""

    def __init__(self, feature_dim: int, classes: list[str]) -> None:
        super().__init__(feature_dim, len(classes))
        self.classes = list(classes)


def classifier_path(model: str | Path) -> Path | None:
    """Where the classifier of a model spec (a run directory, its ``backbone.safetensors``, a checkpoint in its
    ``checkpoints/``) would be: ``classifier.safetensors`` beside the backbone; None for a ``timm:`` spec."""
    text = str(model)
    if text.startswith(("timm:", "pixels")):
        return None
    path = Path(text).expanduser()
    return (run_of(path) or path.parent) / CLASSIFIER_FILE


def load_classifier(model: str | Path) -> Classifier | None:
    """The exported classifier of a model spec, frozen and in eval mode; None when it has none.

    Raises:
        ModelSpecError: the files exist but do not load (the message names them).
    """
    path = classifier_path(model)
    if path is None or not path.is_file():
        return None
    sidecar = path.with_suffix(".json")
    try:
        classes = json.loads(sidecar.read_text())["classes"]
        tensors = load_file(str(path))
        weight, bias = tensors["weight"], tensors["bias"]
        classifier = Classifier(weight.shape[1], classes)
        classifier.load_state_dict({"weight": weight, "bias": bias})
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise ModelSpecError(f"classifier {path} (with {sidecar.name}) does not load ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); export the run again") from err
    classifier.requires_grad_(False)
    return classifier.eval()


@torch.no_grad()
def top_k(classifier: Classifier, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` most probable classes (B, k) int64 and their softmax probabilities (B, k) for features (B, D)."""
    probs = classifier(features.float()).softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return indices, values
