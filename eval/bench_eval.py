"""Evaluation speed: k-NN and k-means against scikit-learn, and feature extraction in images per second.

- k-NN: :func:`~unsupdistill.evaluate.knn.knn_evaluate` (faiss) against scikit-learn's brute-force cosine
  ``KNeighborsClassifier`` with the same exp(similarity / 0.07) weights, k = 20, as ``bench_knn.py`` (whose
  features, options and scikit-learn baseline this script reuses), for each number of classes.
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

import time
from pathlib import Path

import common
import faiss
import sklearn
import torch
from bench_knn import FEATURE_SIZES, TEMPERATURE, K, add_feature_options, clustered_features, sklearn_knn_accuracy
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor
from torch.utils.data import Dataset, Subset

from unsupdistill.config import load_config
from unsupdistill.data import ImageFolderDataset
from unsupdistill.evaluate.clustering import cluster, hungarian_accuracy
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.knn import knn_evaluate
from unsupdistill.models.backbone import create_backbone

IMAGE_SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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
        "ours": common.best_time(lambda: knn_evaluate(*data, ks=(K,), temperature=TEMPERATURE)[K]["top1"],
                                 repeats, warmup=True),
        "sklearn": common.best_time(lambda: sklearn_knn_accuracy(*data), repeats, warmup=False),
    }
    scores: dict[str, dict] = {}

    def ours_kmeans() -> float:
        scores["ours"] = cluster(test, test_labels, classes, seeds=(seed,), niter=KMEANS_ITERATIONS)
        return scores["ours"]["nmi"]

    def theirs_kmeans() -> float:
        scores["sklearn"] = sklearn_kmeans(test, test_labels, classes, seed)
        return scores["sklearn"]["nmi"]

    kmeans = {"ours": common.best_time(ours_kmeans, repeats, warmup=True),
              "sklearn": common.best_time(theirs_kmeans, repeats, warmup=False)}
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
    config = load_config(None, ["model.backbone=resnet18", "model.small_image_stem=true",
                                *(common.TINY_MODEL if quick else [])])
    backbone, spec = create_backbone(config.model)
    batch_size = 32 if quick else 256
    results = {}
    for name, precision in (("fp32", None), ("bf16", torch.bfloat16)):
        def run(dataset: Dataset = images, precision: torch.dtype | None = precision) -> float:
            return float(extract_features(backbone, dataset, IMAGE_SIZE, MEAN, STD, batch_size=batch_size,
                                          precision=precision, device=device, progress=False).shape[0])

        run(Subset(images, range(min(batch_size, len(images)))))  # warm-up: one batch
        seconds, count, calls = common.best_time(run, repeats, warmup=False)
        results[name] = {"seconds": seconds, "images": int(count), "images_per_s": count / seconds,
                         "timed_runs": calls}
    results["feature_dim"] = spec.feature_dim
    results["bf16_over_fp32"] = results["bf16"]["images_per_s"] / results["fp32"]["images_per_s"]
    return results


def print_report(results: dict) -> None:
    """The machine, then markdown tables of k-NN, k-means and feature extraction."""
    print(common.environment_line(results["environment"]))
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
    common.print_table(rows, precision=3)
    e = results["extraction"]
    rows = [{"precision": p, "images": e[p]["images"], "seconds": e[p]["seconds"],
             "images/s": e[p]["images_per_s"]} for p in ("fp32", "bf16")]
    print(f"\nFeature extraction, ResNet-18 (CIFAR stem, {e['feature_dim']}-d features) at {IMAGE_SIZE} px, "
          f"{results['config']['extract_source']}:\n")
    common.print_table(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = common.script_parser(__doc__, quick="tiny sizes and network, a smoke run in seconds",
                                  json="also write the results to this JSON file")
    add_feature_options(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100], help="numbers of classes")
    parser.add_argument("--extract-images", type=int, help="images for feature extraction (default 2,048; "
                                                           "--quick: 64)")
    parser.add_argument("--data", type=Path, help="image folder to extract from (decode included; default: "
                                                  "random images in memory)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="feature extraction device")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    common.log_to_console()
    common.quick_defaults(args, **FEATURE_SIZES, extract_images=(2048, 64))
    sizes = {key: getattr(args, key) for key in FEATURE_SIZES}
    count = args.extract_images
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
        "environment": common.environment(faiss, sklearn, faiss_threads=faiss.omp_get_max_threads()),
        "classes": {str(c): bench_knn_and_kmeans(sizes, c, args.repeats, args.seed) for c in args.classes},
        "extraction": bench_extraction(images, args.quick, torch.device(args.device), args.repeats),
    }
    results["total_seconds"] = time.perf_counter() - start
    print_report(results)
    common.save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
