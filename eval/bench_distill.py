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

    python eval/bench_distill.py --data /tmp/cifar10 --out /work/bench/distill25 --budget 1800 --no-scratch \
        --teacher "lite0=timm:tf_efficientnet_lite0,pretrained=true,pretrained_cfg_overlay={file: PATH}" \
        --teacher-sizes 96,128,160,224 --students resnet18-quarter,mobilenetv3-small
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

from unsupdistill.cli import main as cli_main
from unsupdistill.evaluate.report import format_table, write_json

logger = logging.getLogger("bench_distill")

STUDENTS = {
    "resnet18-quarter": ["model.backbone=resnet18", "model.backbone_kwargs={channels: [16, 32, 64, 128], "
                         "stem_width: 16}", "model.small_image_stem=true"],
    "mobilenetv3-small": ["model.backbone=mobilenetv3_small_100"],
    "resnet10t": ["model.backbone=resnet10t"],
    "vit-tiny-p4": ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 4}",
                    "model.small_image_stem=false", "model.head_batch_norm=false"],
}
"""The students, as model-section overrides (without a recipe the automatic settings choose their input size)."""
QUICK_STUDENTS = {
    "resnet18-tiny": ["model.backbone=resnet18", "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
                      "model.small_image_stem=true"],
}
QUICK = ["train.batch_size=16", "data.num_workers=0", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
         "model.head_output_dim=256", "train.log_every_steps=1", "train.epochs=3"]
"""Overrides of every run in ``--quick`` (a smoke run of the whole script in about a minute)."""


def run_cli(*args: str) -> None:
    """``unsupdistill ARGS`` in this process, as a user would type it; raises on a non-zero exit."""
    code = cli_main(list(args))
    if code != 0:
        raise RuntimeError(f"unsupdistill {' '.join(args[:2])} failed with status {code} (see the log above)")


def evaluate(model: str | Path, data: Path, out: Path, linear: bool, size: int | None = None) -> dict:
    """``unsupdistill eval --speed`` on the full splits (kept in ``out/eval.json``, run again only to add the linear
    probe; features come from the feature cache); k-NN@20, linear top-1 and the inference speed."""
    report = out / "eval.json"
    if not report.is_file() or (linear and "linear" not in json.loads(report.read_text())):
        run_cli("eval", str(model), "--train", str(data / "train"), "--test", str(data / "test"), "--out", str(out),
                "--no-plots", "--no-clustering", "--speed", *([] if linear else ["--no-linear"]),
                *([] if size is None else ["--image-size", str(size)]))
    results = json.loads(report.read_text())
    knn = results["knn"].get("20") or results["knn"][min(results["knn"], key=lambda k: abs(int(k) - 20))]
    speed = results.get("speed") or {}
    return {"knn_top1": knn["top1"], "linear_top1": results.get("linear", {}).get("top1"),
            "input_size": speed.get("input_size"), "inference_images_per_s": speed.get("images_per_s"),
            "latency_ms": speed.get("latency_ms"), "parameters": speed.get("parameters"),
            "gflops_per_image": speed.get("gflops")}


def training_summary(run: Path) -> dict:
    """Median logged images/s (all, and after the first epoch), steps, epochs and the training seconds of a run."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "images_per_s" in r]
    later = [r["images_per_s"] for r in records if r["epoch"] > 1.0 + 1e-9]
    budget = [r for r in records if "budget_left_s" in r]
    return {"images_per_s": statistics.median(r["images_per_s"] for r in records) if records else None,
            "images_per_s_after_epoch_1": statistics.median(later) if later else None,
            "steps": records[-1]["step"], "epochs": records[-1].get("epoch"),
            "budget_left_s": budget[-1]["budget_left_s"] if budget else None}


def train_and_score(kind: str, name: str, args: argparse.Namespace, command: list[str], linear: bool) -> dict:
    """Train (unless its export exists) and evaluate one student; the row of the table."""
    run = args.out / name
    if not (run / "backbone.safetensors").is_file():
        logger.info("training %s (%s, %.0f s)", name, kind, args.budget)
        run_cli(*command, "--out", str(run))
    row = {"run": name, "kind": kind, **evaluate(run, args.data, run / "eval", linear), **training_summary(run)}
    logger.info("%s: k-NN %.2f", name, row["knn_top1"])
    return row


def cell(row: dict, key: str, form: str) -> str:
    """``row[key]`` formatted for a table, ``-`` where the row has none."""
    return "-" if row.get(key) is None else format(row[key], form)


def write_result(path: Path, rows: list[dict], **fields: object) -> None:
    """Write a benchmark's rows as JSON at ``path``, with the date, the machine, torch's version, ``fields`` and the
    command that ran it, and say where."""
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "torch": torch.__version__, **fields, "command": " ".join(sys.argv),
              "rows": rows}
    write_json(result, path)
    print(f"\nresults: {path}")


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
    parser.add_argument("--teacher-sizes", default="", metavar="S1,S2",
                        help="score every teacher at these input sizes too (default: its own size only)")
    parser.add_argument("--students", default="resnet18-quarter,mobilenetv3-small",
                        help=f"comma-separated: {', '.join(STUDENTS)}")
    parser.add_argument("--recipe", help="distill with this recipe (default: none, the automatic settings)")
    parser.add_argument("--cache", choices=("auto", "off", "both"), default="auto",
                        help="the teacher cache of the distillation runs: automatic, off, or a run of each")
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
    sizes = [int(size) for size in args.teacher_sizes.split(",") if size] if not args.quick else [16]
    for tname, path in teachers.items():
        for size in [None, *sizes]:
            scores = evaluate(path, args.data, args.out / f"teacher-{tname}" / str(size or "own"), not args.no_linear,
                              size)
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

    table = [{"run": r["run"], "kind": r["kind"], "input px": cell(r, "input_size", "d"),
              "k-NN top-1": f"{r['knn_top1']:.2f}", "linear top-1": cell(r, "linear_top1", ".2f"),
              "train img/s": cell(r, "images_per_s", ".0f"),
              "train img/s after epoch 1": cell(r, "images_per_s_after_epoch_1", ".0f"),
              "epochs": cell(r, "epochs", ".2f"), "inference img/s": cell(r, "inference_images_per_s", ".0f"),
              "latency ms": cell(r, "latency_ms", ".2f"),
              "params M": "-" if r.get("parameters") is None else f"{r['parameters'] / 1e6:.2f}",
              "GFLOPs/image": cell(r, "gflops_per_image", ".3f")} for r in rows]
    print(format_table(table, list(table[0]), markdown=True))
    write_result(args.json or args.out / "result.json", rows, budget_s=args.budget, overrides=args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
