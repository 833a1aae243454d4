"""k-means clustering of frozen features, scored against the labels: NMI, ARI and Hungarian-matched accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from torch import Tensor


def hungarian_accuracy(labels: Tensor | np.ndarray, assignments: Tensor | np.ndarray) -> float:
    """Clustering accuracy (%): the share of points whose cluster maps to their class under the best
    one-to-one map of clusters to classes (Hungarian algorithm on the contingency matrix).

    With more clusters than classes, the unmatched clusters count as wrong.
    """
    counts = contingency_matrix(np.asarray(labels), np.asarray(assignments))  # (classes, clusters)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / counts.sum() * 100)


def cluster(
    features: Tensor, labels: Tensor, num_clusters: int | None = None, seeds: Sequence[int] = (0, 1, 2, 3, 4),
    niter: int = 100, nredo: int = 1,
) -> dict[str, Any]:
    """Spherical k-means (faiss) of L2-normalised features, once per seed, scored against the labels.

    Args:
        features: features (N, D).
        labels: class indices (N,).
        num_clusters: k; the number of classes in ``labels`` by default.
        seeds: one k-means run per seed.
        niter: k-means iterations per run.
        nredo: k-means restarts per seed, keeping the one with the best objective (more guards
            against a poor random initialisation).

    Returns:
        ``nmi``, ``ari`` (scikit-learn's scores, 0..1) and ``accuracy`` (Hungarian-matched, %): each the
        mean over seeds, with ``*_std`` (population standard deviation); ``per_seed``: a dict of the
        three scores per seed; ``num_clusters``; ``assignments``: (N,) int64 clusters of the first seed.
    """
    if not seeds:
        raise ValueError("seeds is empty; give at least one k-means seed")
    y = labels.detach().cpu().long().numpy()
    k = num_clusters if num_clusters is not None else len(np.unique(y))
    x = np.ascontiguousarray(torch.nn.functional.normalize(features.detach().cpu().float(), dim=1).numpy())
    if not 1 <= k <= len(x):
        raise ValueError(f"num_clusters={k} is invalid for {len(x)} points; allowed values: 1..{len(x)}")
    per_seed = []
    first_assignments = None
    for seed in seeds:
        # max_points_per_centroid: cluster every point (faiss subsamples to 256 per centroid by default);
        # min_points_per_centroid=1 silences faiss's "provide at least 39*k points" warning on small sets.
        kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=int(seed), spherical=True,
                              max_points_per_centroid=math.ceil(len(x) / k) + 1, min_points_per_centroid=1)
        kmeans.train(x)
        _, nearest = kmeans.index.search(x, 1)  # (N, 1) with spherical centroids: max inner product
        assignments = nearest[:, 0].astype(np.int64)
        if first_assignments is None:
            first_assignments = assignments
        per_seed.append({
            "seed": int(seed),
            "nmi": float(normalized_mutual_info_score(y, assignments)),
            "ari": float(adjusted_rand_score(y, assignments)),
            "accuracy": hungarian_accuracy(y, assignments),
        })
    result: dict[str, Any] = {}
    for metric in ("nmi", "ari", "accuracy"):
        values = np.array([run[metric] for run in per_seed])
        result[metric], result[f"{metric}_std"] = float(values.mean()), float(values.std())
    result.update(per_seed=per_seed, num_clusters=k, assignments=torch.from_numpy(first_assignments))
    return result
