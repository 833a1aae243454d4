"""Weighted k-NN classification (Wu et al. 2018; the DINO evaluation protocol) with faiss.

Each query votes with its k nearest training features by cosine similarity, each neighbour weighted by
exp(similarity / temperature). One exact faiss search with the largest k serves every smaller k: faiss
returns neighbours sorted by similarity, so the votes of k are those of the previous k plus the next
neighbours.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import faiss
import numpy as np
import torch
from torch import Tensor

DEFAULT_BATCH_SIZE = 2048
"""Queries per faiss search: bounds the (B, k) neighbour and (B, C) vote buffers."""


def _normalised(features: Tensor) -> np.ndarray:
    """Contiguous float32 L2-normalised copy (N, D), as faiss wants it."""
    return np.ascontiguousarray(torch.nn.functional.normalize(features.detach().cpu().float(), dim=1).numpy())


def _search(
    train_features: Tensor, test_features: Tensor, k: int, batch_size: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Exact inner-product search of the normalised queries, one batch at a time.

    Yields:
        ``(start, similarity, neighbours)``: the batch's first query index, cosine similarities (B, k) in
        decreasing order and the training indices (B, k) of the neighbours; k is clamped to the train size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; allowed values: >= 1")
    train = _normalised(train_features)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    k = min(k, index.ntotal)
    test = _normalised(test_features)
    for start in range(0, test.shape[0], batch_size):
        similarity, neighbours = index.search(test[start:start + batch_size], k)  # (B, k) each
        yield start, torch.from_numpy(similarity), torch.from_numpy(neighbours)


def _add_votes(votes: Tensor, similarity: Tensor, neighbour_labels: Tensor, temperature: float) -> None:
    """Add the weighted votes exp(similarity / temperature) of neighbours (B, k) to ``votes`` (B, C) in place."""
    votes.scatter_add_(1, neighbour_labels, (similarity / temperature).exp())


def knn_predict(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """Class scores (Q, C) of each query: votes of its k nearest training features by cosine
    similarity, each weighted by exp(similarity / temperature)."""
    train_labels = train_labels.detach().cpu().long()
    num_classes = int(train_labels.max()) + 1
    votes = torch.zeros(test_features.shape[0], num_classes)
    for start, similarity, neighbours in _search(train_features, test_features, k, DEFAULT_BATCH_SIZE):
        _add_votes(votes[start:start + len(neighbours)], similarity, train_labels[neighbours], temperature)
    return votes


def knn_accuracy(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
    k: int = 20, temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in percent of weighted k-NN."""
    votes = knn_predict(train_features, train_labels, test_features, k, temperature)
    return (votes.argmax(dim=1) == test_labels.cpu()).double().mean().item() * 100


def knn_evaluate(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy for several k from one faiss search with the largest k.

    Args:
        train_features: training features (N, D).
        train_labels: class indices (N,), 0..C-1.
        test_features: query features (Q, D).
        test_labels: class indices (Q,).
        ks: numbers of neighbours; a k above N uses all N training points.
        temperature: vote weight exp(similarity / temperature).
        batch_size: queries per search, which bounds memory to O(batch_size * (max(ks) + C)).

    Returns:
        For each k, ``top1`` and, when there are more than 5 classes (C = largest label + 1), ``top5``:
        accuracies in percent. ``top1`` equals :func:`knn_accuracy` with the same k.
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks} is invalid; allowed values: a non-empty list of integers >= 1")
    train_labels = train_labels.detach().cpu().long()
    test_labels = test_labels.detach().cpu().long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with_top5 = num_classes > 5
    hits1 = dict.fromkeys(ks, 0)
    hits5 = dict.fromkeys(ks, 0)
    for start, similarity, neighbours in _search(train_features, test_features, ks[-1], batch_size):
        labels = test_labels[start:start + len(neighbours), None]  # (B, 1)
        neighbour_labels = train_labels[neighbours]  # (B, k)
        votes = torch.zeros(len(neighbours), num_classes)  # (B, C)
        done = 0
        for k in ks:  # increasing: add the votes of neighbours done..k-1 to those of the previous k
            upto = min(k, neighbours.shape[1])
            _add_votes(votes, similarity[:, done:upto], neighbour_labels[:, done:upto], temperature)
            done = upto
            correct1 = votes.argmax(dim=1, keepdim=True) == labels  # (B, 1)
            hits1[k] += int(correct1.sum())
            if with_top5:  # the top-1 class counts too, so top5 >= top1 even when votes tie
                correct5 = (votes.topk(5, dim=1).indices == labels).any(dim=1, keepdim=True) | correct1
                hits5[k] += int(correct5.sum())
    num_queries = len(test_labels)
    results = {}
    for k in ks:
        results[k] = {"top1": hits1[k] / num_queries * 100}
        if with_top5:
            results[k]["top5"] = hits5[k] / num_queries * 100
    return results
