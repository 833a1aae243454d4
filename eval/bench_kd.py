"""Distillation with labels on CIFAR-10 with 10 % of the labels, 2 CPU cores, one wall-clock budget per run.

``--per-class`` labeled images per class are drawn from the training folder (fixed seed) into ``OUT/labels.csv``;
all training images stay usable without labels; the test split scores every row. Each row is the CLI command a
user would type (called in this process, one after the other), for ``--budget`` seconds of training:

- teacher: ``unsupdistill eval TEACHER --eval-train labels.csv``: its k-NN and linear probe on the labels alone;
- (a) labels only: ``distill LABELED --labels labels.csv kd.alpha=0 kd.feature_weight=0``, where LABELED holds the
  labeled images alone: cross-entropy on the labels (the teacher's terms weigh nothing);
- (b) unlabeled distillation of every training image, then the linear probe on the labels (``eval --train
  labels.csv``);
- (c) distillation with labels: ``distill TRAIN --teacher T --labels labels.csv`` (and ``--generations N``: (d),
  the born-again generations, each taught by the one before).

Every run is scored by ``unsupdistill eval RUN --eval-train labels.csv --eval-test TEST --speed``: its
classifier's top-1 where it has one, the linear probe (fitted on the labels) and k-NN (k = 20, memory: the labeled
images), with training images/s, inference images/s and GFLOPs. A run whose ``eval.json`` exists is not run again.
The commands behind BENCHMARKS.md::

    python eval/bench_kd.py --data /tmp/cifar10 --out /work/bench/kd26 --budget 1800 --generations 2 \\
        --teacher "lite0=timm:tf_efficientnet_lite0,pretrained=true,pretrained_cfg_overlay={file: PATH}"
    python eval/bench_kd.py --quick --out /tmp/kd-smoke --json /tmp/kd-smoke/result.json
"""

from __future__ import annotations

import csv
import logging
import random
import sys
from pathlib import Path

import common

from unsupdistill.data import list_image_files

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


def table_row(r: dict) -> dict:
    """A result row's cells in the markdown table."""
    return {"run": r["run"], "kind": r["kind"], "classifier top-1": common.cell(r, "classifier_top1", ".2f"),
            "linear top-1": common.cell(r, "linear_top1", ".2f"), "k-NN top-1": common.cell(r, "knn_top1", ".2f"),
            "train img/s": common.cell(r, "images_per_s", ".0f"), "epochs": common.cell(r, "epochs", ".2f"),
            "inference img/s": common.cell(r, "inference_images_per_s", ".0f"),
            "params M": common.cell(r, "parameters", ".2f", 1e-6),
            "GFLOPs/image": common.cell(r, "gflops_per_image", ".3f")}


def main(argv: list[str] | None = None) -> int:
    parser = common.runs_parser(__doc__, "result.json", budget=1800)
    parser.add_argument("--student", default="resnet18-quarter", choices=list(common.STUDENTS))
    parser.add_argument("--per-class", type=int, default=500, help="labeled images per class (default 500: 10 %%)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the labeled draw")
    parser.add_argument("--generations", type=int, default=2, help="generations of (c) (1: no born-again row)")
    parser.add_argument("--rows", default="a,b,c", help="which of a, b, c to run (c with its generations)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the runs with labels (e.g. kd.alpha=0.7)")
    parser.add_argument("--tag", default="", help="suffix of the runs' names (for trials)")
    args = parser.parse_args(argv)
    common.log_to_console()
    args.out.mkdir(parents=True, exist_ok=True)

    teachers = dict(item.split("=", 1) for item in args.teacher)
    student, extra = common.STUDENTS[args.student], []
    if args.quick:
        args.data = common.make_quick_data(args.out / "quick")
        teachers = {"tiny": str(common.make_quick_teacher(args.data, args.out / "quick" / "teacher"))}
        student, extra = common.QUICK_STUDENTS["resnet18-tiny"], common.QUICK_RUN
        args.budget, args.per_class, args.generations = 6, 8, 2  # 3 s: no step left after the teacher's pass
    if args.data is None or not teachers:
        parser.error("give --data and at least one --teacher NAME=SPEC (or --quick)")
    labels, labeled_only = draw_labels(args.data / "train", args.per_class, args.seed, args.out)
    test, budget, rows = args.data / "test", [f"train.time_budget_s={args.budget}"], []
    wanted = set(args.rows.split(","))

    def run(name: str, kind: str, command: list[str], run_dir: Path) -> None:
        common.train_unless_done(run_dir, command, f"{kind}, {args.budget:.0f} s per run")
        rows.append({"run": name, "kind": kind, **common.score_run(run_dir, labels, test, run_dir / "eval",
                                                                      speed_seconds=common.speed_seconds(args)),
                     **common.training_summary(run_dir)})

    for tname, spec in teachers.items():
        rows.append({"run": f"teacher:{tname}", "kind": "teacher, probe on the labels",
                     **common.score_run(spec, labels, test, args.out / f"teacher-{tname}",
                                        speed_seconds=common.speed_seconds(args))})
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
            if args.generations > 1:  # one command trains every generation
                common.train_unless_done(out / f"gen_{args.generations}", command, f"{args.generations} generations")
            for k in range(1, args.generations + 1):
                run_dir = out / f"gen_{k}" if args.generations > 1 else out
                kind = "(c) distillation with labels" if k == 1 else f"(d) born-again generation {k}"
                run(f"{out.name}/gen_{k}", kind, command, run_dir)

    common.print_table([table_row(r) for r in rows])
    common.write_result(args.json or args.out / "result.json", rows, budget_s=args.budget, labels=str(labels),
                        per_class=args.per_class, seed=args.seed, overrides=args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
