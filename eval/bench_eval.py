"""Evaluation speed: k-NN and k-means against scikit-learn, and feature extraction in images per second.

- k-NN: :func:`~unsupdistill.evaluate.knn.knn_evaluate` (faiss) against scikit-learn's brute-force cosine
  ``KNeighborsClassifier`` with the same exp(similarity / 0.07) weights, k = 20, as ``bench_knn.py`` (whose
  features, timer and scikit-learn baseline this script reuses), for each number of classes.
- k-means: :func:`~unsupdistill.evaluate.clustering.cluster` (faiss spherical k-means, 100 iterations,
  one seed, scored with NMI, ARI and Hungarian accuracy) against scikit-learn's ``KMeans`` with its defaults
  (k-means++, up to 300 iterations until converged) on the same L2-normalised features, scored the same
  way; k = number of classes, on the query features as ``unsupdistill eval`` clusters its test split.
- Feature extraction: :func:`~unsupdistill.evaluate.features.extract_features` with a ResNet-18 (CIFAR
  stem) at 32 px, fp32 and bf16 autocast, on uint8 images held in memory (or decoded from ``--data``).

Run it from the repository root::

    python eval/bench_eval.py --json /tmp/bench/eval.json     # 50,000 x 512 train, 10,000 queries
    python eval/bench_eval.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import faiss
import sklearn
import torch
from bench_knn import PRESETS, TEMPERATURE, K, best_time, clustered_features, sklearn_knn_accuracy
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor
from torch.utils.data import Dataset, Subset

from unsupdistill.config import ModelConfig
from unsupdistill.data import ImageFolderDataset
from unsupdistill.evaluate.clustering import cluster, hungarian_accuracy
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.knn import knn_evaluate
from unsupdistill.evaluate.report import format_table, write_json
from unsupdistill.models.backbone import create_backbone

IMAGE_SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
QUICK_BACKBONE = {"channels": [8, 16, 32, 64], "stem_width": 8}
KMEANS_ITERATIONS = 100
"""faiss k-means iterations: ``cluster``'s default, which ``unsupdistill eval`` uses."""


def sklearn_kmeans(features: Tensor, labels: Tensor, num_clusters: int, seed: int = 0) -> dict[str, float]:
    """scikit-learn ``KMeans`` (defaults) on the L2-normalised features, scored as ``cluster`` scores."""
    x = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    kmeans = KMeans(n_clusters=num_clusters, random_state=seed)
    assignments = kmeans.fit_predict(x)
    y = labels.numpy()
    return {"nmi": float(normalized_mutual_info_score(y, assignments)),
            "ari": float(adjusted_rand_score(y, assignments)),
            "accuracy": hungarian_accuracy(y, assignments), "iterations": int(kmeans.n_iter_)}


def bench_knn_and_kmeans(sizes: dict, classes: int, repeats: int, seed: int) -> dict:
    """Seconds, accuracy and ratios of k-NN and k-means, ours against scikit-learn, for one class count."""
    data = clustered_features(sizes["train"], sizes["test"], sizes["dim"], classes, sizes["noise"], seed)
    test, test_labels = data[2], data[3]
    knn = {
        "ours": best_time(lambda: knn_evaluate(*data, ks=(K,), temperature=TEMPERATURE)[K]["top1"],
                          repeats, warmup=True),
        "sklearn": best_time(lambda: sklearn_knn_accuracy(*data), repeats, warmup=False),
    }
    scores: dict[str, dict] = {}

    def ours_kmeans() -> float:
        scores["ours"] = cluster(test, test_labels, classes, seeds=(seed,), niter=KMEANS_ITERATIONS)
        return scores["ours"]["nmi"]

    def theirs_kmeans() -> float:
        scores["sklearn"] = sklearn_kmeans(test, test_labels, classes, seed)
        return scores["sklearn"]["nmi"]

    kmeans = {"ours": best_time(ours_kmeans, repeats, warmup=True),
              "sklearn": best_time(theirs_kmeans, repeats, warmup=False)}
    return {
        "knn": {name: {"seconds": s, "top1": top1, "timed_runs": n} for name, (s, top1, n) in knn.items()}
        | {"sklearn_over_ours": knn["sklearn"][0] / knn["ours"][0]},
        "kmeans": {"ours": {"seconds": kmeans["ours"][0], "nmi": kmeans["ours"][1], "iterations": KMEANS_ITERATIONS,
                            "timed_runs": kmeans["ours"][2]},
                   "sklearn": {"seconds": kmeans["sklearn"][0], "nmi": kmeans["sklearn"][1],
                               "iterations": scores["sklearn"]["iterations"], "timed_runs": kmeans["sklearn"][2]},
                   "sklearn_over_ours": kmeans["sklearn"][0] / kmeans["ours"][0]},
    }


def bench_extraction(images: Dataset, quick: bool, device: torch.device, repeats: int) -> dict:
    """Images per second of ``extract_features`` with a ResNet-18 (CIFAR stem) at 32 px, fp32 and bf16."""
    kwargs = QUICK_BACKBONE if quick else {}
    backbone, spec = create_backbone(ModelConfig(backbone="resnet18", backbone_kwargs=kwargs, small_image_stem=True))
    batch_size = 32 if quick else 256
    results = {}
    for name, precision in (("fp32", None), ("bf16", torch.bfloat16)):
        def run(dataset: Dataset = images, precision: torch.dtype | None = precision) -> float:
            return float(extract_features(backbone, dataset, IMAGE_SIZE, MEAN, STD, batch_size=batch_size,
                                          precision=precision, device=device, progress=False).shape[0])

        run(Subset(images, range(min(batch_size, len(images)))))  # warm-up: one batch
        seconds, count, calls = best_time(run, repeats, warmup=False)
        results[name] = {"seconds": seconds, "images": int(count), "images_per_s": count / seconds,
                         "timed_runs": calls}
    results["feature_dim"] = spec.feature_dim
    results["bf16_over_fp32"] = results["bf16"]["images_per_s"] / results["fp32"]["images_per_s"]
    return results


def environment() -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss": faiss.__version__, "torch": torch.__version__, "sklearn": sklearn.__version__,
    }


def print_report(results: dict) -> None:
    """Markdown tables of k-NN, k-means and feature extraction."""
    c = results["config"]
    print(f"\nk-NN (k={K}, T={TEMPERATURE}) and k-means: {c['train']:,} train x {c['dim']} dims, "
          f"{c['test']:,} queries (k-means clusters the queries), noise {c['noise']}\n")
    rows = []
    for classes, r in results["classes"].items():
        for task in ("knn", "kmeans"):
            for name in ("ours", "sklearn"):
                run = r[task][name]
                rows.append({"task": task, "classes": int(classes), "method": name, "seconds": run["seconds"],
                             "sklearn / ours": r[task]["sklearn_over_ours"] if name == "sklearn" else None,
                             "k-NN top-1 %": run.get("top1"), "k-means NMI": run.get("nmi"),
                             "k-means iterations": run.get("iterations")})
    print(format_table(rows, list(rows[0]), markdown=True, precision=3))
    e = results["extraction"]
    rows = [{"precision": p, "images": e[p]["images"], "seconds": e[p]["seconds"],
             "images/s": e[p]["images_per_s"]} for p in ("fp32", "bf16")]
    print(f"\nFeature extraction, ResNet-18 (CIFAR stem, {e['feature_dim']}-d features) at {IMAGE_SIZE} px, "
          f"{results['config']['extract_source']}:\n")
    print(format_table(rows, list(rows[0]), markdown=True, precision=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, help="training features (default 50,000; --quick: 2,000)")
    parser.add_argument("--test", type=int, help="queries (default 10,000; --quick: 500)")
    parser.add_argument("--dim", type=int, help="feature dimension (default 512; --quick: 64)")
    parser.add_argument("--noise", type=float, help="cluster spread (default 4.0; --quick: 2.0)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100], help="numbers of classes")
    parser.add_argument("--extract-images", type=int, help="images for feature extraction (default 2,048; "
                                                           "--quick: 64)")
    parser.add_argument("--data", type=Path, help="image folder to extract from (decode included; default: "
                                                  "random images in memory)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="feature extraction device")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and network, a smoke run in seconds")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    sizes = dict(PRESETS["quick" if args.quick else "full"])
    sizes.update({key: getattr(args, key) for key in sizes if getattr(args, key) is not None})
    count = args.extract_images or (64 if args.quick else 2048)
    if args.data is not None:
        folder = ImageFolderDataset(args.data, IMAGE_SIZE)
        images: Dataset = Subset(folder, range(min(count, len(folder))))
        source = f"{len(images):,} JPEGs decoded from {args.data}"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                               generator=generator)  # (N, 3, S, S) indexes as a dataset of images
        source = f"{count:,} uint8 images in memory"

    start = time.perf_counter()
    results = {
        "config": {**sizes, "classes": args.classes, "k": K, "temperature": TEMPERATURE, "repeats": args.repeats,
                   "seed": args.seed, "extract_images": count, "extract_source": source, "device": args.device,
                   "quick": args.quick},
        "environment": environment(),
        "classes": {str(c): bench_knn_and_kmeans(sizes, c, args.repeats, args.seed) for c in args.classes},
        "extraction": bench_extraction(images, args.quick, torch.device(args.device), args.repeats),
    }
    results["total_seconds"] = time.perf_counter() - start
    print(", ".join(f"{key}={value}" for key, value in results["environment"].items()))
    print_report(results)
    if args.json is not None:
        write_json(results, args.json)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
