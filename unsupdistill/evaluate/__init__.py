"""Evaluation of frozen features: extraction and k-NN classification."""

from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.knn import knn_accuracy

__all__ = ["extract_features", "knn_accuracy"]
