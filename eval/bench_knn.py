"""Time weighted k-NN evaluation: :func:`~unsupdistill.evaluate.knn.knn_evaluate` (faiss) against
scikit-learn's brute-force cosine ``KNeighborsClassifier`` with the same exp(similarity / 0.07) weights.

A benchmark, not a test: run it from the repository root::

    python eval/bench_knn.py                       # 50,000 x 512 train, 10,000 queries, 100 classes
    python eval/bench_knn.py --quick --json out.json

The features are Gaussian clusters (fixed seed): one random centre per class plus isotropic noise.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor

from unsupdistill.evaluate.knn import knn_evaluate
from unsupdistill.evaluate.report import format_table, write_json

logger = logging.getLogger("bench_knn")

K = 20
TEMPERATURE = 0.07
AGREEMENT_POINTS = 0.5
SLOW_SECONDS = 10.0
"""A scikit-learn run longer than this is not repeated."""

# noise: the clusters' spread, chosen per size so that top-1 is neither 100% nor chance
PRESETS = {
    "full": {"train": 50_000, "test": 10_000, "dim": 512, "noise": 4.0},
    "quick": {"train": 2_000, "test": 500, "dim": 64, "noise": 2.0},
}


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


def best_time(run: Callable[[], float], repeats: int, warmup: bool) -> tuple[float, float, int]:
    """Best wall time of ``run`` over ``repeats`` calls (one untimed warm-up first when ``warmup``); a call
    slower than ``SLOW_SECONDS`` ends the repeats.

    Returns:
        ``(seconds, result of the last call, number of timed calls)``.
    """
    if warmup:
        run()
    best, result, calls = float("inf"), float("nan"), 0
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
        calls += 1
        if best > SLOW_SECONDS:
            break
    return best, result, calls


def sklearn_knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor) -> float:
    """Top-1 (%) of scikit-learn's brute-force cosine k-NN with exp(similarity / T) weights, fit + predict."""
    classifier = KNeighborsClassifier(n_neighbors=K, algorithm="brute", metric="cosine",
                                      weights=lambda distance: np.exp((1 - distance) / TEMPERATURE))
    classifier.fit(train.numpy(), train_labels.numpy())
    return float((classifier.predict(test.numpy()) == test_labels.numpy()).mean() * 100)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, help="training features (default 50,000; --quick: 2,000)")
    parser.add_argument("--test", type=int, help="queries (default 10,000; --quick: 500)")
    parser.add_argument("--dim", type=int, help="feature dimension (default 512; --quick: 64)")
    parser.add_argument("--classes", type=int, default=100, help="number of classes")
    parser.add_argument("--noise", type=float,
                        help="cluster spread (default 4.0; --quick: 2.0); larger is harder")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the best is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run (seconds)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sizes = dict(PRESETS["quick" if args.quick else "full"])
    sizes.update({key: getattr(args, key) for key in sizes if getattr(args, key) is not None})
    data = clustered_features(sizes["train"], sizes["test"], sizes["dim"], args.classes, sizes["noise"], args.seed)

    ours_seconds, ours_top1, ours_calls = best_time(
        lambda: knn_evaluate(*data, ks=(K,), temperature=TEMPERATURE)[K]["top1"], args.repeats, warmup=True)
    sklearn_seconds, sklearn_top1, sklearn_calls = best_time(
        lambda: sklearn_knn_accuracy(*data), args.repeats, warmup=False)

    environment = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss": faiss.__version__,
        "torch": torch.__version__,
    }
    rows = [
        {"method": "knn_evaluate (faiss IndexFlatIP)", "seconds": ours_seconds, "top1": ours_top1,
         "timed_runs": ours_calls},
        {"method": "scikit-learn KNeighborsClassifier (brute, cosine)", "seconds": sklearn_seconds,
         "top1": sklearn_top1, "timed_runs": sklearn_calls},
    ]
    speedup = sklearn_seconds / ours_seconds
    print(f"k-NN (k={K}, T={TEMPERATURE}): {sizes['train']:,} train x {sizes['dim']} dims, "
          f"{sizes['test']:,} queries, {args.classes} classes, noise {sizes['noise']}")
    print(", ".join(f"{key}={value}" for key, value in environment.items()))
    print()
    print(format_table(rows, ["method", "seconds", "top1", "timed_runs"], markdown=True, precision=3))
    print()
    print(f"knn_evaluate: {ours_seconds:.3f} s, scikit-learn: {sklearn_seconds:.3f} s, "
          f"scikit-learn / knn_evaluate = {speedup:.1f}x")
    agree = abs(ours_top1 - sklearn_top1) <= AGREEMENT_POINTS
    if not agree:
        logger.warning("WARNING: top-1 differs by %.2f points (knn_evaluate %.2f%%, scikit-learn %.2f%%), "
                       "more than %.1f", abs(ours_top1 - sklearn_top1), ours_top1, sklearn_top1, AGREEMENT_POINTS)
    results = {
        "config": {**sizes, "classes": args.classes, "k": K, "temperature": TEMPERATURE,
                   "repeats": args.repeats, "seed": args.seed},
        "environment": environment,
        "knn_evaluate": {"seconds": ours_seconds, "top1": ours_top1, "timed_runs": ours_calls},
        "sklearn": {"seconds": sklearn_seconds, "top1": sklearn_top1, "timed_runs": sklearn_calls},
        "sklearn_over_knn_evaluate": speedup,
        "accuracies_agree": agree,
    }
    if args.json is not None:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
