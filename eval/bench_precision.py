"""What bf16 feature extraction costs in accuracy: each MODEL's features in fp32 and under bf16 autocast.

For each MODEL and precision, the features of a labeled train/test pair are extracted by ``unsupdistill eval``'s
code (:func:`~unsupdistill.evaluate.run.model_features`, feature cache off) and scored by k-NN (k = 20,
T = 0.07) and the torch linear-probe grid. Each bf16 row also gives how far its features are from fp32's
(``feature_error_pct``: the mean over the training images of |f_bf16 - f_fp32| / |f_fp32|, in percent) and how
many test predictions changed (``flips``): a move of the top-1 is the net of flips both ways, so it shrinks as
the test split grows.

Commands behind BENCHMARKS.md ("Feature precision")::

    python eval/bench_precision.py --train /tmp/cifar10/train --test /tmp/cifar10/test --image-size 32 \\
        --model ../shared/teachers/cifar10_resnet18_half_supervised.safetensors \\
        --model 'timm:resnet18,small_image_stem=true,channels=[32,64,128,256],stem_width=32' \\
        --model /work/bench/vit30 --json /tmp/bench/precision.json
    python eval/bench_precision.py --quick
"""

from __future__ import annotations

import json
import time

import common
import torch

from unsupdistill.data.labeled import align_labels, load_labeled
from unsupdistill.evaluate.knn import knn_predict
from unsupdistill.evaluate.linear_grid import linear_probe_grid
from unsupdistill.evaluate.run import HEADLINE_K, EvalOptions, model_features
from unsupdistill.models.load import load_model

PRECISIONS = ("fp32", "bf16")


def score(spec: str, train: str, test: str, image_size: int | None) -> list[dict]:
    """One row per precision for one model; the bf16 row compared with the fp32 one."""
    model = load_model(spec, image_size=image_size)
    train_set = load_labeled(train, model.input_size, "train")
    test_set = load_labeled(test, model.input_size, "test")
    train_y, test_y = train_set.labels, align_labels(train_set, test_set)
    cpu = torch.device("cpu")
    rows, reference = [], None
    for precision in PRECISIONS:
        options = EvalOptions(image_size=image_size, precision=precision, cache=False)
        tic = time.perf_counter()
        train_x = model_features(model, train_set, options, cpu)  # (N, D) float32
        test_x = model_features(model, test_set, options, cpu)
        seconds = time.perf_counter() - tic
        knn = knn_predict(train_x, train_y, test_x, k=HEADLINE_K).argmax(dim=1)
        linear = linear_probe_grid(train_x, train_y, test_x, test_y, device="cpu")
        row = {"model": model.name, "test": len(test_y), "precision": precision,
               "knn_top1": (knn == test_y).double().mean().item() * 100, "linear_top1": linear["top1"],
               "extract_s": round(seconds, 1), "images_per_s": round((len(train_x) + len(test_x)) / seconds, 1)}
        if reference is None:
            reference = {"train_x": train_x, "knn": knn, "linear": linear["predictions"]}
        else:
            gap = (train_x - reference["train_x"]).norm(dim=1) / reference["train_x"].norm(dim=1).clamp(min=1e-12)
            row.update(feature_error_pct=gap.mean().item() * 100, knn_flips=int((knn != reference["knn"]).sum()),
                       linear_flips=int((linear["predictions"] != reference["linear"]).sum()))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.labeled_pair_parser(__doc__, "digits and a tiny random-init network (a smoke test)")
    args = common.parse_labeled_pair(parser, argv, [common.TINY_NETWORK])
    rows = [row for spec in args.model for row in score(spec, args.train, args.test, args.image_size)]
    common.print_table(rows, ["model", "test", "precision", "knn_top1", "linear_top1", "knn_flips", "linear_flips",
                              "feature_error_pct", "images_per_s"])
    common.write_result(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
