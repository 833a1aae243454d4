"""Evaluation of frozen features: labeled data, extraction, k-NN, linear probe and clustering.

The names below load on first use, so importing a light submodule (``evaluate.options``) loads no torch.
"""

import importlib
from typing import Any

_HOMES = {
    "align_labels": "unsupdistill.data.labeled", "load_labeled": "unsupdistill.data.labeled",
    "cluster": "unsupdistill.evaluate.clustering", "hungarian_accuracy": "unsupdistill.evaluate.clustering",
    "extract_features": "unsupdistill.evaluate.features",
    "knn_accuracy": "unsupdistill.evaluate.knn", "knn_predict": "unsupdistill.evaluate.knn",
    "dino_vit_features": "unsupdistill.evaluate.linear", "linear_probe": "unsupdistill.evaluate.linear",
}

__all__ = ["align_labels", "cluster", "dino_vit_features", "extract_features", "hungarian_accuracy", "knn_accuracy",
           "knn_predict", "linear_probe", "load_labeled"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'unsupdistill.evaluate' has no attribute '{name}'")
