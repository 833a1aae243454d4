"""Distillation with labels on CIFAR-10 with 10 % of the labels, 2 CPU cores, one wall-clock budget per run.

``--per-class`` labeled images per class are drawn from the training folder (fixed seed) into ``OUT/labels.csv``;
all training images stay usable without labels; the test split scores every row. Each row is the CLI command a
user would type (called in this process, one after the other), for ``--budget`` seconds of training:

- teacher: ``unsupdistill eval TEACHER --train labels.csv``: its k-NN and linear probe on the labels alone;
- (a) labels only: ``distill LABELED --labels labels.csv kd.alpha=0 kd.feature_weight=0``, where LABELED holds the
  labeled images alone: cross-entropy on the labels (the teacher's terms weigh nothing);
- (b) unlabeled distillation of every training image, then the linear probe on the labels (``eval --train
  labels.csv``);
- (c) distillation with labels: ``distill TRAIN --teacher T --labels labels.csv`` (and ``--generations N``: (d),
  the born-again generations, each taught by the one before).

Every run is scored by ``unsupdistill eval RUN --train labels.csv --test TEST --speed``: its classifier's top-1
where it has one, the linear probe (fitted on the labels) and k-NN (k = 20, memory: the labeled images), with
training images/s, inference images/s and GFLOPs. A run whose ``eval.json`` exists is not run again. The commands
behind BENCHMARKS.md::

    python eval/bench_kd.py --data /tmp/cifar10 --out /work/bench/kd26 --budget 1800 --generations 2 \\
        --teacher "lite0=timm:tf_efficientnet_lite0,pretrained=true,pretrained_cfg_overlay={file: PATH}"
    python eval/bench_kd.py --quick --out /tmp/kd-smoke --json /tmp/kd-smoke/result.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
from pathlib import Path

from bench_distill import (
    QUICK,
    QUICK_STUDENTS,
    STUDENTS,
    cell,
    make_quick_data,
    run_cli,
    training_summary,
    write_result,
)

from unsupdistill.data import list_image_files
from unsupdistill.evaluate.report import format_table

logger = logging.getLogger("bench_kd")


def draw_labels(train: Path, per_class: int, seed: int, out: Path) -> tuple[Path, Path]:
    """``per_class`` images of each class of ``train`` (class subfolders), drawn with ``seed``: a ``path,label`` CSV,
    and a folder of links to those images alone (row (a) trains on it)."""
    rng = random.Random(seed)
    rows = []
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        files = sorted(list_image_files(folder))
        rows += [(str(path), folder.name) for path in rng.sample(files, min(per_class, len(files)))]
    labels, linked = out / "labels.csv", out / "labeled-only"
    out.mkdir(parents=True, exist_ok=True)
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    for path, label in rows:
        link = linked / label / Path(path).name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return labels, linked


def score(model: Path | str, labels: Path, test: Path, out: Path, linear: bool = True) -> dict:
    """``unsupdistill eval --speed`` with the labels as the probe's training set: classifier, linear and k-NN top-1."""
    report = out / "eval.json"
    if not report.is_file():
        run_cli("eval", str(model), "--train", str(labels), "--test", str(test), "--out", str(out), "--no-plots",
                "--no-clustering", "--speed", *([] if linear else ["--no-linear"]))
    results = json.loads(report.read_text())
    speed = results.get("speed") or {}
    return {"classifier_top1": results.get("classifier", {}).get("top1"),  # None: no classifier, or not scored
            "linear_top1": results.get("linear", {}).get("top1"), "knn_top1": results["knn"]["20"]["top1"],
            "inference_images_per_s": speed.get("images_per_s"), "parameters": speed.get("parameters"),
            "gflops_per_image": speed.get("gflops")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder with train/ and test/ (one subfolder per class)")
    parser.add_argument("--teacher", action="append", default=[], metavar="NAME=SPEC",
                        help="a teacher to distill from (repeat for several)")
    parser.add_argument("--student", default="resnet18-quarter", choices=list(STUDENTS))
    parser.add_argument("--per-class", type=int, default=500, help="labeled images per class (default 500: 10 %%)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labeled draw")
    parser.add_argument("--generations", type=int, default=2, help="generations of (c) (1: no born-again row)")
    parser.add_argument("--rows", default="a,b,c", help="which of a, b, c to run (c with its generations)")
    parser.add_argument("--budget", type=float, default=1800, help="training seconds of every run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the runs with labels (e.g. kd.alpha=0.7)")
    parser.add_argument("--tag", default="", help="suffix of the runs' names (for trials)")
    parser.add_argument("--out", type=Path, required=True, help="where the runs and their evaluations go")
    parser.add_argument("--json", type=Path, help="write the results here (default OUT/result.json)")
    parser.add_argument("--quick", action="store_true", help="generated images, a tiny teacher, seconds per run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)

    teachers = dict(item.split("=", 1) for item in args.teacher)
    student, extra = STUDENTS[args.student], []
    if args.quick:
        args.data, quick_teacher = make_quick_data(args.out / "quick")
        teachers, student, extra = {"tiny": str(quick_teacher)}, QUICK_STUDENTS["resnet18-tiny"], QUICK
        args.budget, args.per_class, args.generations = 3, 8, 2
    if args.data is None or not teachers:
        parser.error("give --data and at least one --teacher NAME=SPEC (or --quick)")
    labels, labeled_only = draw_labels(args.data / "train", args.per_class, args.seed, args.out)
    test, budget, rows = args.data / "test", [f"train.time_budget_s={args.budget}"], []
    wanted = set(args.rows.split(","))

    def run(name: str, kind: str, command: list[str], run_dir: Path) -> None:
        if not (run_dir / "backbone.safetensors").is_file():
            logger.info("training %s (%s, %.0f s per run)", name, kind, args.budget)
            run_cli(*command)
        rows.append({"run": name, "kind": kind, **score(run_dir, labels, test, run_dir / "eval"),
                     **training_summary(run_dir)})

    for tname, spec in teachers.items():
        rows.append({"run": f"teacher:{tname}", "kind": "teacher, probe on the labels",
                     **score(spec, labels, test, args.out / f"teacher-{tname}")})
        if "a" in wanted:
            out = args.out / f"a-labels-only-{tname}{args.tag}"
            run(out.name, "(a) cross-entropy on the labels only", [
                "distill", str(labeled_only), "--teacher", spec, "--labels", str(labels), "--out", str(out), *student,
                *budget, *extra, "kd.alpha=0", "kd.feature_weight=0", *args.set], out)
        if "b" in wanted:
            out = args.out / f"b-unlabeled-{tname}{args.tag}"
            run(out.name, "(b) distillation without labels, then the probe", [
                "distill", str(args.data / "train"), "--teacher", spec, "--out", str(out), *student, *budget,
                *extra], out)
        if "c" in wanted:
            out = args.out / f"c-kd-{tname}{args.tag}"
            command = ["distill", str(args.data / "train"), "--teacher", spec, "--labels", str(labels), "--out",
                       str(out), "--generations", str(args.generations), *student, *budget, *extra, *args.set]
            if args.generations > 1 and not (out / f"gen_{args.generations}" / "backbone.safetensors").is_file():
                run_cli(*command)
            for k in range(1, args.generations + 1):
                run_dir = out / f"gen_{k}" if args.generations > 1 else out
                kind = "(c) distillation with labels" if k == 1 else f"(d) born-again generation {k}"
                run(f"{out.name}/gen_{k}", kind, command, run_dir)

    table = [{"run": r["run"], "kind": r["kind"], "classifier top-1": cell(r, "classifier_top1", ".2f"),
              "linear top-1": cell(r, "linear_top1", ".2f"), "k-NN top-1": cell(r, "knn_top1", ".2f"),
              "train img/s": cell(r, "images_per_s", ".0f"), "epochs": cell(r, "epochs", ".2f"),
              "inference img/s": cell(r, "inference_images_per_s", ".0f"),
              "params M": "-" if r.get("parameters") is None else f"{r['parameters'] / 1e6:.2f}",
              "GFLOPs/image": cell(r, "gflops_per_image", ".3f")} for r in rows]
    print(format_table(table, list(table[0]), markdown=True))
    write_result(args.json or args.out / "result.json", rows, budget_s=args.budget, labels=str(labels),
                 per_class=args.per_class, seed=args.seed, overrides=args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
