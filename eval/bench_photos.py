"""Distillation on a folder of real photos, as a newcomer runs it: no recipe, a teacher and a time budget.

Every variant is the CLI command a user types, ``unsupdistill distill TRAIN --teacher SPEC
train.time_budget_s=BUDGET`` plus the variant's overrides (``--variant NAME=KEY=VALUE[;KEY=VALUE...]``; the
default variant ``all`` has none: the automatic settings), scored with ``unsupdistill eval`` on the test split
(k-NN with k = 20 and the linear probe, the training split as memory and probe set). Beside them the teacher at
its own input size and at ``--teacher-sizes``, raw pixels and the student's network at random init, and
``--score NAME=RUN`` runs trained elsewhere (the code of before this change, run from its own checkout). Each
row gives k-NN and linear top-1, the student's epochs, its training images/s and where its wall time went
(decode, views, teacher, student, rest). A run whose export exists is not trained again. The commands behind
BENCHMARKS.md::

    python eval/bench_photos.py --data /tmp/clothing-photos --out /work/bench/photos --budget 900 \\
        --teacher "lite0=timm:tf_efficientnet_lite0,pretrained=true,pretrained_cfg_overlay={file: PATH}" \\
        --teacher-sizes 160 --score before=/work/bench/before15
    python eval/bench_photos.py --quick --out /tmp/photos-smoke
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import common

from unsupdistill.evaluate.summary import random_init_spec
from unsupdistill.run_dir import BACKBONE_SIDECAR, read_metrics

logger = logging.getLogger("bench_photos")

PARTS = ("decode", "views", "teacher", "student", "rest")


def time_shares(run: Path) -> dict:
    """The run's last record's time shares (``share_<part>``) and wall seconds, where it has them."""
    records = [r for r in read_metrics(run)[0] if "time_wall_s" in r]
    if not records:
        return {}
    last = records[-1]
    return {f"share_{part}": last[f"time_{part}_share"] for part in PARTS} | {"wall_s": last["time_wall_s"]}


def table_row(r: dict) -> dict:
    shares = " / ".join(common.cell(r, f"share_{part}", ".0%") for part in PARTS)
    return {"run": r["run"], "k-NN top-1": common.cell(r, "knn_top1", ".2f"),
            "linear top-1": common.cell(r, "linear_top1", ".2f"), "input px": common.cell(r, "input_size", "d"),
            "epochs": common.cell(r, "epochs", ".1f"), "train img/s": common.cell(r, "images_per_s", ".0f"),
            "wall s": common.cell(r, "wall_s", ".0f"), "decode / views / teacher / student / rest": shares}


def main(argv: list[str] | None = None) -> int:
    parser = common.runs_parser(__doc__, "result.json", budget=900)
    parser.add_argument("--teacher-sizes", default="", metavar="S1,S2", help="score the teacher at these sizes too")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE]",
                        help="a distillation run with these overrides (default: one run, 'all', with none)")
    parser.add_argument("--score", action="append", default=[], metavar="NAME=RUN",
                        help="also score a run trained elsewhere (e.g. by the code of before a change)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the teacher, pixels and random-init rows")
    args = parser.parse_args(argv)
    common.log_to_console()
    args.out.mkdir(parents=True, exist_ok=True)
    teachers = dict(item.split("=", 1) for item in args.teacher)
    extra = [*common.QUICK_RUN, *common.QUICK_STUDENTS["resnet18-tiny"]] if args.quick else []
    if args.quick:
        args.data = common.make_quick_data(args.out / "quick")
        teachers = {"tiny": str(common.make_quick_teacher(args.data, args.out / "quick" / "teacher"))}
        args.budget = 3
    if args.data is None or len(teachers) != 1:
        parser.error("give --data and one --teacher NAME=SPEC (or --quick)")
    (tname, teacher), = teachers.items()
    train, test = args.data / "train", args.data / "test"
    variants = dict(item.split("=", 1) for item in args.variant) or {"all": ""}

    rows = []
    for name, overrides in variants.items():
        run = args.out / name
        sets = [item for item in overrides.split(";") if item]
        command = ["distill", str(train), "--teacher", teacher, f"train.time_budget_s={args.budget}", *extra, *sets,
                   "--out", str(run)]
        common.train_unless_done(run, command, f"{name}: {args.budget:.0f} s, {' '.join(sets) or 'no overrides'}")
        rows.append({"run": name, "overrides": sets, **score(run, train, test, args),
                     **common.training_summary(run), **time_shares(run)})
    for item in args.score:
        name, run = item.split("=", 1)
        run = Path(run)
        logged = any("images_per_s" in r for r in read_metrics(run)[0])  # a run of one step may have logged none
        rows.append({"run": name, "overrides": "trained elsewhere", **score(run, train, test, args),
                     **(common.training_summary(run) if logged else {}), **time_shares(run)})
    if not args.no_baselines:
        student = args.out / next(iter(variants))
        sizes = [int(size) for size in args.teacher_sizes.split(",") if size] if not args.quick else []
        for size in [None, *sizes]:
            rows.append({"run": f"teacher {tname}" + (f" at {size} px" if size else ""),
                         **common.score_run(teacher, train, test, args.out / f"teacher-{size or 'own'}", True, size,
                                            common.speed_seconds(args))})
        size = rows[0].get("input_size")
        rows.append({"run": f"raw pixels at {size} px", **common.score_run("pixels", train, test,
                                                                           args.out / "pixels", True, size,
                                                                           common.speed_seconds(args))})
        random_init = random_init_spec(json.loads((student / BACKBONE_SIDECAR).read_text()), seed=0)
        rows.append({"run": "the student's network at random init", **common.score_run(
            random_init, train, test, args.out / "random-init", True, size, common.speed_seconds(args))})
    common.print_table([table_row(r) for r in rows])
    common.write_result(args.json or args.out / "result.json", rows, budget_s=args.budget, teacher=teacher)
    return 0


def score(run: Path, train: Path, test: Path, args) -> dict:
    """k-NN and linear top-1 of a trained run on the test split, its evaluation kept in OUT/eval/NAME."""
    return common.score_run(run, train, test, args.out / "eval" / run.name, True, None, common.speed_seconds(args))


if __name__ == "__main__":
    sys.exit(main())
