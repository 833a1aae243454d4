"""Time weighted k-NN evaluation: :func:`~unsupdistill.evaluate.knn.knn_evaluate` (faiss) against
scikit-learn's brute-force cosine ``KNeighborsClassifier`` with the same exp(similarity / 0.07) weights.

A benchmark, not a test: run it from the repository root::

    python eval/bench_knn.py                       # 50,000 x 512 train, 10,000 queries, 100 classes
    python eval/bench_knn.py --quick --json out.json

The features are Gaussian clusters (fixed seed): one random centre per class plus isotropic noise.
"""

from __future__ import annotations

import argparse
import logging

import common
import faiss
import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor

from unsupdistill.evaluate.knn import knn_evaluate

logger = logging.getLogger("bench_knn")

K = 20
TEMPERATURE = 0.07
AGREEMENT_POINTS = 0.5

FEATURE_SIZES = {"train": (50_000, 2_000), "test": (10_000, 500), "dim": (512, 64), "noise": (4.0, 2.0)}
"""The features' sizes and spread (default, ``--quick``); the spread, chosen per size, keeps top-1 neither 100 % nor
chance."""


def add_feature_options(parser: argparse.ArgumentParser) -> None:
    """``--train``, ``--test``, ``--dim`` and ``--noise``: the sizes and spread of the clustered features."""
    meaning = {"train": "training features", "test": "queries", "dim": "feature dimension",
               "noise": "cluster spread, larger is harder"}
    for name, (full, quick) in FEATURE_SIZES.items():
        parser.add_argument(f"--{name}", type=type(full),
                            help=f"{meaning[name]} (default {full:,}; --quick: {quick:,})")


def clustered_features(
    num_train: int, num_test: int, dim: int, num_classes: int, noise: float, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian class clusters: features ``centre[label] + noise * N(0, I)``, float32.

    Returns:
        train features (N, D), train labels (N,), test features (Q, D), test labels (Q,).
    """
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)  # (C, D)
    train_labels = torch.randint(num_classes, (num_train,), generator=generator)
    test_labels = torch.randint(num_classes, (num_test,), generator=generator)
    train = centres[train_labels] + noise * torch.randn(num_train, dim, generator=generator)
    test = centres[test_labels] + noise * torch.randn(num_test, dim, generator=generator)
    return train, train_labels, test, test_labels


def sklearn_knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor) -> float:
    """Top-1 (%) of scikit-learn's brute-force cosine k-NN with exp(similarity / T) weights, fit + predict."""
    classifier = KNeighborsClassifier(n_neighbors=K, algorithm="brute", metric="cosine",
                                      weights=lambda distance: np.exp((1 - distance) / TEMPERATURE))
    classifier.fit(train.numpy(), train_labels.numpy())
    return float((classifier.predict(test.numpy()) == test_labels.numpy()).mean() * 100)


def main(argv: list[str] | None = None) -> dict:
    parser = common.script_parser(__doc__, quick="small sizes, for a smoke run (seconds)",
                                  json="also write the results to this JSON file")
    add_feature_options(parser)
    parser.add_argument("--classes", type=int, default=100, help="number of classes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the best is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    args = parser.parse_args(argv)
    common.log_to_console()
    common.quick_defaults(args, **FEATURE_SIZES)
    sizes = {key: getattr(args, key) for key in FEATURE_SIZES}
    data = clustered_features(sizes["train"], sizes["test"], sizes["dim"], args.classes, sizes["noise"], args.seed)

    ours_seconds, ours_top1, ours_calls = common.best_time(
        lambda: knn_evaluate(*data, ks=(K,), temperature=TEMPERATURE)[K]["top1"], args.repeats, warmup=True)
    sklearn_seconds, sklearn_top1, sklearn_calls = common.best_time(
        lambda: sklearn_knn_accuracy(*data), args.repeats, warmup=False)

    machine = common.environment(faiss, faiss_threads=faiss.omp_get_max_threads())
    rows = [
        {"method": "knn_evaluate (faiss IndexFlatIP)", "seconds": ours_seconds, "top1": ours_top1,
         "timed_runs": ours_calls},
        {"method": "scikit-learn KNeighborsClassifier (brute, cosine)", "seconds": sklearn_seconds,
         "top1": sklearn_top1, "timed_runs": sklearn_calls},
    ]
    speedup = sklearn_seconds / ours_seconds
    print(f"k-NN (k={K}, T={TEMPERATURE}): {sizes['train']:,} train x {sizes['dim']} dims, "
          f"{sizes['test']:,} queries, {args.classes} classes, noise {sizes['noise']}")
    print(common.environment_line(machine))
    print()
    common.print_table(rows, precision=3)
    print()
    print(f"knn_evaluate: {ours_seconds:.3f} s, scikit-learn: {sklearn_seconds:.3f} s, "
          f"scikit-learn / knn_evaluate = {speedup:.1f}x")
    agree = abs(ours_top1 - sklearn_top1) <= AGREEMENT_POINTS
    if not agree:
        logger.warning("top-1 differs by %.2f points (knn_evaluate %.2f%%, scikit-learn %.2f%%), more than %.1f",
                       abs(ours_top1 - sklearn_top1), ours_top1, sklearn_top1, AGREEMENT_POINTS)
    results = {
        "config": {**sizes, "classes": args.classes, "k": K, "temperature": TEMPERATURE,
                   "repeats": args.repeats, "seed": args.seed},
        "environment": machine,
        "knn_evaluate": {"seconds": ours_seconds, "top1": ours_top1, "timed_runs": ours_calls},
        "sklearn": {"seconds": sklearn_seconds, "top1": sklearn_top1, "timed_runs": sklearn_calls},
        "sklearn_over_knn_evaluate": speedup,
        "accuracies_agree": agree,
    }
    common.save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
