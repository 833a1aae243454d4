"""Distillation against DINO from scratch: small students on CIFAR-10, 2 CPU cores, one wall-clock budget.

For every teacher (``--teacher NAME=SPEC``: the ImageNet EfficientNet-Lite0 of ``../shared/teachers`` as a
``timm:`` spec, the CIFAR-10 stand-in, a run of ours) it scores the teacher itself at each ``--teacher-sizes`` input
(k-NN, linear probe and inference speed), then, for every student (``--students``: the quarter-width ResNet-18 the
automatic settings choose on a CPU, ``mobilenetv3_small_100``, ``resnet10t``, a ViT-Tiny/4), runs, each as the CLI
command a user would type (called in this process, one after the other):

- ``unsupdistill distill TRAIN --teacher SPEC`` with the student's model overrides and nothing else: the automatic
  settings (teacher input size, decode size, teacher cache), for ``--budget`` seconds (``train.time_budget_s``);
  with ``--cache both`` once more with ``distill.cache=false`` (rows "no cache"); ``--recipe NAME`` uses a recipe;
- ``unsupdistill pretrain TRAIN --recipe cifar10_cpu`` with the same student, for the same budget (DINO from
  scratch, the comparison; ``--no-scratch`` skips it);
- ``unsupdistill eval --speed`` of every student and teacher: k-NN (k = 20, T = 0.07) and the linear probe on the
  full test split, with the training split as memory and probe training set, and inference images/s, latency,
  parameters and GFLOPs (same device, batch 64 and precision, each network at its own input size).

Reported per run: k-NN and linear top-1, training images/s (median of the logged rates, and after the first
epoch), epochs reached, inference images/s and latency, parameters and forward GFLOPs per image. A run whose
``eval.json`` exists is not run again, so a long benchmark can be continued. The commands behind BENCHMARKS.md::

    python eval/bench_distill.py --data /tmp/cifar10 --out /work/bench/distill25 --budget 1800 --no-scratch \\
        --teacher "lite0=timm:tf_efficientnet_lite0,pretrained=true,pretrained_cfg_overlay={file: PATH}" \\
        --teacher-sizes 96,128,160,224 --students resnet18-quarter,mobilenetv3-small
    python eval/bench_distill.py --quick --out /tmp/distill-smoke --json /tmp/distill-smoke/result.json
"""

from __future__ import annotations

import argparse
import logging
import sys

import common

logger = logging.getLogger("bench_distill")


def train_and_score(kind: str, name: str, args: argparse.Namespace, command: list[str], linear: bool) -> dict:
    """Train (unless its export exists) and score one student; its row of the table."""
    run = args.out / name
    common.train_unless_done(run, [*command, "--out", str(run)], f"{kind}, {args.budget:.0f} s")
    scores = common.score_run(run, args.data / "train", args.data / "test", run / "eval", linear,
                              speed_seconds=common.speed_seconds(args))
    row = {"run": name, "kind": kind, **scores, **common.training_summary(run)}
    logger.info("%s: k-NN %.2f", name, row["knn_top1"])
    return row


def table_row(r: dict) -> dict:
    """A result row's cells in the markdown table."""
    return {"run": r["run"], "kind": r["kind"], "input px": common.cell(r, "input_size", "d"),
            "k-NN top-1": common.cell(r, "knn_top1", ".2f"), "linear top-1": common.cell(r, "linear_top1", ".2f"),
            "train img/s": common.cell(r, "images_per_s", ".0f"),
            "train img/s after epoch 1": common.cell(r, "images_per_s_after_epoch_1", ".0f"),
            "epochs": common.cell(r, "epochs", ".2f"),
            "inference img/s": common.cell(r, "inference_images_per_s", ".0f"),
            "latency ms": common.cell(r, "latency_ms", ".2f"), "params M": common.cell(r, "parameters", ".2f", 1e-6),
            "GFLOPs/image": common.cell(r, "gflops_per_image", ".3f")}


def main(argv: list[str] | None = None) -> int:
    parser = common.runs_parser(__doc__, "result.json", budget=1800)
    parser.add_argument("--teacher-sizes", default="", metavar="S1,S2",
                        help="score every teacher at these input sizes too (default: its own size only)")
    parser.add_argument("--students", default="resnet18-quarter,mobilenetv3-small",
                        help=f"comma-separated: {', '.join(common.STUDENTS)}")
    parser.add_argument("--recipe", help="distill with this recipe (default: none, the automatic settings)")
    parser.add_argument("--cache", choices=("auto", "off", "both"), default="auto",
                        help="the teacher cache of the distillation runs: automatic, off, or a run of each")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the distillation runs (e.g. distill.loss=cosine)")
    parser.add_argument("--tag", default="", help="suffix of the distillation runs' names (for trials)")
    parser.add_argument("--no-scratch", action="store_true", help="skip DINO from scratch")
    parser.add_argument("--no-linear", action="store_true", help="k-NN only")
    args = parser.parse_args(argv)
    common.log_to_console()
    args.out.mkdir(parents=True, exist_ok=True)

    students = common.QUICK_STUDENTS if args.quick else {name: common.STUDENTS[name]
                                                         for name in args.students.split(",")}
    extra = common.QUICK_RUN if args.quick else []
    teachers = dict(item.split("=", 1) for item in args.teacher)
    if args.quick:
        args.data = common.make_quick_data(args.out / "quick")
        teachers = {"tiny": str(common.make_quick_teacher(args.data, args.out / "quick" / "teacher"))}
        args.budget = 6  # the teacher's pass (and its ONNX export) is in the budget: 3 s left no step on a busy CPU
    if args.data is None or not teachers:
        parser.error("give --data and at least one --teacher NAME=SPEC (or --quick)")
    budget = [f"train.time_budget_s={args.budget}"]

    rows = []
    sizes = [int(size) for size in args.teacher_sizes.split(",") if size] if not args.quick else [16]
    for tname, path in teachers.items():
        for size in [None, *sizes]:
            scores = common.score_run(path, args.data / "train", args.data / "test",
                                      args.out / f"teacher-{tname}" / str(size or "own"), not args.no_linear, size,
                                      common.speed_seconds(args))
            rows.append({"run": f"teacher:{tname}" + (f"@{size}" if size else ""), "kind": "teacher", **scores})
    caches = {"auto": [""], "off": ["off"], "both": ["", "off"]}[args.cache if not args.quick else "both"]
    recipe = ["--recipe", args.recipe] if args.recipe else []
    for sname, model in students.items():
        for tname, path in teachers.items():
            for cache in caches:
                command = ["distill", str(args.data / "train"), *recipe, "--teacher", path, *model, *budget, *extra,
                           *(["distill.cache=false"] if cache else []), *args.set]
                name = f"{sname}-from-{tname}{'-nocache' if cache else ''}{args.tag}"
                kind = f"distilled from {tname}" + (", no cache" if cache else "")
                rows.append(train_and_score(kind, name, args, command, not args.no_linear))
        if not args.no_scratch:
            command = ["pretrain", str(args.data / "train"), "--recipe", "cifar10_cpu", *model, *budget, *extra]
            rows.append(train_and_score("DINO from scratch", f"{sname}-dino", args, command, not args.no_linear))

    common.print_table([table_row(r) for r in rows])
    common.write_result(args.json or args.out / "result.json", rows, budget_s=args.budget, overrides=args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
