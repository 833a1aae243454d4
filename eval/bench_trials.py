"""Short pretraining trials of a recipe's levers, each scored by k-NN on a full test split.

Every trial is ``unsupdistill pretrain TRAIN --recipe RECIPE train.time_budget_s=BUDGET OVERRIDES...`` (called in
this process, one after the other, as a user would type it), then ``unsupdistill eval`` of its export: k-NN
(k = 20, T = 0.07) with the training split as memory and the test split as queries. A trial whose ``eval.json``
exists is not run again, so a long search can be continued; a trial with ``train.seed=1`` among its overrides
repeats another with a second seed where a difference is small. The table (markdown) and JSON list, per trial:
its overrides, steps, epochs, median images/s and k-NN top-1.

The commands behind the trial tables of BENCHMARKS.md look like::

    python eval/bench_trials.py --data /tmp/cifar10 --recipe cifar10_cpu --budget 600 --out /work/bench/t14 \\
        --trial base= --trial sk="dino.centering=sinkhorn" --trial koleo="dino.koleo_weight=0.1"
    python eval/bench_trials.py --quick --out /tmp/trials-smoke       # generated images, seconds per trial
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

import common

from unsupdistill.cli.training import split_pretrain_args
from unsupdistill.config import ConfigError, load_config

logger = logging.getLogger("bench_trials")


def run_trial(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """Train (unless its export exists) and score one trial; its row of the table."""
    run = args.out / name
    common.train_unless_done(run, ["pretrain", str(args.data / "train"), "--recipe", args.recipe, "--out", str(run),
                                   f"train.time_budget_s={args.budget}", *args.common, *overrides],
                             " ".join(overrides) or "the recipe as it is")
    scores = common.score_run(run, args.data / "train", args.data / "test", run / "eval", linear=False,
                              speed_seconds=common.speed_seconds(args))
    row = {"trial": name, "overrides": " ".join(overrides), **scores, **common.training_summary(run)}
    logger.info("%s: k-NN %.2f", name, row["knn_top1"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = common.runs_parser(__doc__, "trials.json", budget=600, teachers=False)
    parser.add_argument("--recipe", default="cifar10_cpu", help="shipped recipe or YAML file of every trial")
    parser.add_argument("--trial", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="a trial: its name and its config overrides, space-separated (repeat for several)")
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of every trial")
    args = parser.parse_args(argv)
    common.log_to_console()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.data = common.make_quick_data(args.out / "quick")
        args.budget = 3
        args.common = [*common.QUICK_RUN, *common.QUICK_STUDENTS["resnet18-tiny"], *args.common]
        args.trial = args.trial or ["base=", "sinkhorn=dino.centering=sinkhorn dino.koleo_weight=0.1"]
    if args.data is None or not args.trial:
        parser.error("give --data and at least one --trial NAME=OVERRIDES (or --quick)")
    trials = {}
    for item in args.trial:
        name, _, overrides = item.partition("=")
        if not name or name in trials:
            parser.error(f"--trial {item!r}: give each trial a new NAME before '='")
        trials[name] = shlex.split(overrides)
        try:  # every trial's overrides are checked before the first one trains, not when its turn comes
            paths, _ = split_pretrain_args(trials[name])
            if paths:
                raise ConfigError(f"{paths} are not section.key=value overrides (quote a value with spaces: "
                                  "\"name='key={a: 1, b: 2}'\")")
            load_config(args.recipe, [*args.common, *trials[name]])
        except ConfigError as err:
            parser.error(f"--trial {name}: {err}")

    rows = [run_trial(name, overrides, args) for name, overrides in trials.items()]
    common.print_table([{"trial": r["trial"], "overrides": r["overrides"] or "-", "steps": r["steps"],
                         "epochs": f"{r['epochs']:.2f}", "images/s": f"{r['images_per_s']:.0f}",
                         "k-NN top-1": f"{r['knn_top1']:.2f}"} for r in rows])
    common.write_result(args.json or args.out / "trials.json", rows, recipe=args.recipe, budget_s=args.budget,
                        common=args.common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
