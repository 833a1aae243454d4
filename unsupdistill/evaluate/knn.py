"""Weighted k-NN classification (Wu et al. 2018; the DINO evaluation protocol) with faiss."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor


def knn_predict(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """Class scores (Q, C) of each query: votes of its k nearest training features by cosine
    similarity, each weighted by exp(similarity / temperature)."""
    train = np.ascontiguousarray(torch.nn.functional.normalize(train_features.float(), dim=1).numpy())
    test = np.ascontiguousarray(torch.nn.functional.normalize(test_features.float(), dim=1).numpy())
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    k = min(k, train.shape[0])
    similarity, neighbours = index.search(test, k)  # (Q, k) each
    num_classes = int(train_labels.max()) + 1
    votes = torch.zeros(test.shape[0], num_classes)
    weights = torch.from_numpy(similarity / temperature).exp()
    votes.scatter_add_(1, train_labels[torch.from_numpy(neighbours)], weights)
    return votes


def knn_accuracy(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
    k: int = 20, temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in percent of weighted k-NN."""
    votes = knn_predict(train_features, train_labels, test_features, k, temperature)
    return (votes.argmax(dim=1) == test_labels).float().mean().item() * 100
