"""Distillation against DINO from scratch: small students on CIFAR-10, 2 CPU cores, one wall-clock budget.

For every student (a quarter-width ResNet-18 with the small-image stem, a ViT-Tiny with 4-px patches at
32 px) and every teacher (``--teacher NAME=PATH``, e.g. the stand-in of ``../shared/teachers`` and a
``recipes/cifar10_cpu.yaml`` run of ours), it runs, each as the CLI command a user would type (called in
this process, one after the other):

- ``unsupdistill distill TRAIN --recipe cifar10_distill --teacher PATH`` with the student's model section,
  for ``--budget`` seconds (``train.time_budget_s``);
- ``unsupdistill pretrain TRAIN --recipe cifar10_cpu`` with the same student, for the same budget (DINO from
  scratch, the comparison);
- ``unsupdistill eval`` of every student and teacher: k-NN (k = 20, T = 0.07) and the linear probe on the
  full test split, with the training split as memory and probe training set.

Reported per run: k-NN and linear top-1, training images/s (median of the logged rates), forward GFLOPs
per image of the network at its input size, and the training seconds. A run whose ``eval.json`` exists
is not run again, so a long benchmark can be continued. The commands behind BENCHMARKS.md::

    python eval/bench_distill.py --data /tmp/cifar10 --out /work/bench/distill --budget 1800 \\
        --teacher standin=../shared/teachers/cifar10_resnet18_half_supervised --teacher ours=RUN
    python eval/bench_distill.py --quick --out /tmp/distill-smoke --json /tmp/distill-smoke/result.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from unsupdistill.cli import main as cli_main
from unsupdistill.evaluate.report import format_table, write_json
from unsupdistill.models.load import load_model

logger = logging.getLogger("bench_distill")

STUDENTS = {
    "resnet18-quarter": ["model.backbone=resnet18", "model.backbone_kwargs={channels: [16, 32, 64, 128], "
                         "stem_width: 16}", "model.small_image_stem=true"],
    "vit-tiny-p4": ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 4}",
                    "model.small_image_stem=false", "model.head_batch_norm=false"],
}
"""The students, as model-section overrides of the recipes."""
QUICK_STUDENTS = {
    "resnet18-tiny": ["model.backbone=resnet18", "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
                      "model.small_image_stem=true"],
}
QUICK = ["train.batch_size=16", "data.num_workers=0", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
         "model.head_output_dim=256", "train.log_every_steps=1"]
"""Overrides of every run in ``--quick`` (a smoke run of the whole script in about a minute)."""


def run_cli(*args: str) -> None:
    """``unsupdistill ARGS`` in this process, as a user would type it; raises on a non-zero exit."""
    code = cli_main(list(args))
    if code != 0:
        raise RuntimeError(f"unsupdistill {' '.join(args[:2])} failed with status {code} (see the log above)")


def evaluate(model: str | Path, data: Path, out: Path, linear: bool) -> dict:
    """``unsupdistill eval`` on the full splits (kept in ``out/eval.json``, run again only to add the linear
    probe; features come from the feature cache); k-NN@20 and linear top-1."""
    report = out / "eval.json"
    if not report.is_file() or (linear and "linear" not in json.loads(report.read_text())):
        run_cli("eval", str(model), "--train", str(data / "train"), "--test", str(data / "test"), "--out", str(out),
                "--no-plots", "--no-clustering", *([] if linear else ["--no-linear"]))
    results = json.loads(report.read_text())
    knn = results["knn"].get("20") or results["knn"][min(results["knn"], key=lambda k: abs(int(k) - 20))]
    return {"knn_top1": knn["top1"], "linear_top1": results.get("linear", {}).get("top1")}


def forward_gflops(model: str | Path) -> float:
    """Forward GFLOPs (matmuls and convolutions) of one image through the backbone at its input size."""
    loaded = load_model(str(model))
    x = torch.zeros(1, 3, loaded.input_size, loaded.input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loaded.backbone(x)
    return counter.get_total_flops() / 1e9


def training_summary(run: Path) -> dict:
    """Median logged images/s and the training seconds of a run directory."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    budget = [r for r in records if "budget_left_s" in r]
    return {"images_per_s": statistics.median(rates) if rates else None, "steps": records[-1]["step"],
            "epochs": records[-1].get("epoch"), "budget_left_s": budget[-1]["budget_left_s"] if budget else None}


def train_and_score(kind: str, name: str, args: argparse.Namespace, command: list[str], linear: bool) -> dict:
    """Train (unless its export exists) and evaluate one student; the row of the table."""
    run = args.out / name
    if not (run / "backbone.safetensors").is_file():
        logger.info("training %s (%s, %.0f s)", name, kind, args.budget)
        run_cli(*command, "--out", str(run))
    row = {"run": name, "kind": kind, **evaluate(run, args.data, run / "eval", linear), **training_summary(run),
           "gflops_per_image": forward_gflops(run)}
    logger.info("%s: k-NN %.2f", name, row["knn_top1"])
    return row


def make_quick_data(root: Path) -> tuple[Path, Path]:
    """A labeled folder (3 classes of coloured noise, 24 images each per split) and a tiny DINO teacher run."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, count in (("train", 24), ("test", 12)):
        for label, colour in enumerate(colours):
            folder = root / "data" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    teacher = root / "teacher"
    if not (teacher / "backbone.safetensors").is_file():
        run_cli("pretrain", str(root / "data" / "train"), "--recipe", "cifar10_cpu", "--out", str(teacher), *QUICK,
                "model.backbone_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "train.max_steps=4")
    return root / "data", teacher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder with train/ and test/ (one subfolder per class)")
    parser.add_argument("--teacher", action="append", default=[], metavar="NAME=PATH",
                        help="a teacher to distill from (repeat for several)")
    parser.add_argument("--students", default=",".join(STUDENTS), help=f"comma-separated: {', '.join(STUDENTS)}")
    parser.add_argument("--budget", type=float, default=1800, help="training seconds of every run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the distillation runs (e.g. distill.loss=cosine)")
    parser.add_argument("--tag", default="", help="suffix of the distillation runs' names (for trials)")
    parser.add_argument("--no-scratch", action="store_true", help="skip DINO from scratch")
    parser.add_argument("--no-linear", action="store_true", help="k-NN only")
    parser.add_argument("--out", type=Path, required=True, help="where the runs and their evaluations go")
    parser.add_argument("--json", type=Path, help="write the results here (default OUT/result.json)")
    parser.add_argument("--quick", action="store_true", help="generated images, a tiny teacher, seconds per run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)

    students = {name: STUDENTS[name] for name in args.students.split(",")} if not args.quick else QUICK_STUDENTS
    extra = QUICK if args.quick else []
    teachers = dict(item.split("=", 1) for item in args.teacher)
    if args.quick:
        args.data, quick_teacher = make_quick_data(args.out / "quick")
        teachers = {"tiny": str(quick_teacher)}
        args.budget = 3
    if args.data is None or not teachers:
        parser.error("give --data and at least one --teacher NAME=PATH (or --quick)")
    budget = [f"train.time_budget_s={args.budget}"]

    rows = []
    for tname, path in teachers.items():
        scores = evaluate(path, args.data, args.out / f"teacher-{tname}", not args.no_linear)
        rows.append({"run": f"teacher:{tname}", "kind": "teacher", **scores, "gflops_per_image": forward_gflops(path)})
    for sname, model in students.items():
        for tname, path in teachers.items():
            command = ["distill", str(args.data / "train"), "--recipe", "cifar10_distill", "--teacher", path,
                       *model, *budget, *extra, *args.set]
            rows.append(train_and_score(f"distilled from {tname}", f"{sname}-from-{tname}{args.tag}", args, command,
                                        not args.no_linear))
        if not args.no_scratch:
            command = ["pretrain", str(args.data / "train"), "--recipe", "cifar10_cpu", *model, *budget, *extra]
            rows.append(train_and_score("DINO from scratch", f"{sname}-dino", args, command, not args.no_linear))

    table = [{"run": r["run"], "kind": r["kind"], "k-NN top-1": f"{r['knn_top1']:.2f}",
              "linear top-1": "-" if r.get("linear_top1") is None else f"{r['linear_top1']:.2f}",
              "images/s": "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}",
              "GFLOPs/image": f"{r['gflops_per_image']:.3f}"} for r in rows]
    print(format_table(table, list(table[0]), markdown=True))
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "torch": torch.__version__, "budget_s": args.budget,
              "overrides": args.set, "command": " ".join(sys.argv), "rows": rows}
    write_json(result, args.json or args.out / "result.json")
    print(f"\nresults: {args.json or args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
