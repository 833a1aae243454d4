"""Evaluation of frozen features: labeled data, extraction, k-NN, linear probe and clustering."""

from unsupdistill.data.labeled import align_labels, load_labeled
from unsupdistill.evaluate.clustering import cluster, hungarian_accuracy
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.knn import knn_accuracy, knn_predict
from unsupdistill.evaluate.linear import dino_vit_features, linear_probe

__all__ = ["align_labels", "cluster", "dino_vit_features", "extract_features", "hungarian_accuracy",
           "knn_accuracy", "knn_predict", "linear_probe", "load_labeled"]
