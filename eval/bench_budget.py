"""The reference pipeline's k-NN after a wall-clock training budget, for comparison with a budgeted recipe.

Trains DINO as lightly's documentation writes it (``LightlyReference`` of ``eval/bench_train.py``:
per-sample ``DINOTransform`` in DataLoader workers, one forward per view, ``DINOLoss``, float32 unless
``--precision bf16``) on an image folder for ``--minutes`` of wall-clock time, with the teacher-momentum
schedule planned to end with the budget (as ``train.time_budget_s`` plans ours). The teacher backbone is
then exported like an unsupdistill run (``backbone.safetensors`` + ``backbone.json``), so ``unsupdistill
eval`` scores both sides with the same protocol; with ``--test`` this script runs that evaluation (k-NN
only) itself.

The figure it is compared with (see BENCHMARKS.md)::

    unsupdistill pretrain /tmp/cifar10/train --recipe cifar10_cpu --out /tmp/bench/ours30
    python eval/bench_budget.py --data /tmp/cifar10/train --test /tmp/cifar10/test --minutes 30 \\
        --out /tmp/bench/ref30
    python eval/bench_budget.py --quick --out /tmp/budget-smoke      # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import bench_train
import common
import torch
from tqdm import tqdm

from unsupdistill.config import load_config
from unsupdistill.data import num_workers
from unsupdistill.evaluate.report import write_json
from unsupdistill.models.backbone import describe_backbone
from unsupdistill.storage import save_backbone
from unsupdistill.train.metrics import MetricsLogger
from unsupdistill.train.schedules import TimeBudget

logger = logging.getLogger("bench_budget")


def train_reference(args: argparse.Namespace, folder: Path) -> dict:
    """Train the reference for the budget; export its teacher backbone to ``args.out``; a summary."""
    overrides = [f"data.path={folder}", f"train.threads={args.threads}", f"train.device={args.device}",
                 *(common.TINY_MODEL + ["train.batch_size=8"] if args.quick else []), *args.set]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    config = load_config(str(args.recipe), overrides)
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
    ref = bench_train.LightlyReference(config, num_workers(config.data), device, dtype)
    budget = TimeBudget(args.minutes * 60, ref.total_steps)
    metrics = MetricsLogger(args.out)
    bar = tqdm(desc=f"reference ({args.precision}), {args.minutes:g} min", unit="step", file=sys.stderr)
    budget.start(0)
    tic, images = time.perf_counter(), 0
    while ref.step_index < (planned := budget.plan(ref.step_index)):
        ref.total_steps = planned  # the teacher-momentum cosine ends with the budget
        ref.step()
        images += config.train.batch_size
        bar.update()
        if ref.step_index % config.train.log_every_steps == 0:
            record = {"images_per_s": images / (time.perf_counter() - tic), "planned_steps": planned,
                      "epoch": ref.step_index / ref.steps_per_epoch}
            metrics.log(ref.step_index, record)
            bar.set_postfix(img_s=f"{record['images_per_s']:.0f}", planned=planned)
            tic, images = time.perf_counter(), 0
    bar.close()
    metrics.close()
    seconds = budget.spent()
    steps = ref.step_index
    metadata = describe_backbone(ref.spec, config, steps, "teacher")
    save_backbone(ref.teacher_backbone.state_dict(), metadata, args.out)
    summary = {"pipeline": f"ref-{args.precision}", "minutes": args.minutes, "train_seconds": seconds, "steps": steps,
               "epochs": steps / ref.steps_per_epoch, "images_per_s": steps * config.train.batch_size / seconds,
               "recipe": str(args.recipe), "overrides": overrides,
               "environment": common.environment(*bench_train.LIBRARIES, device=device)}
    del ref
    gc.collect()  # the loader's workers, before evaluation starts its own
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.script_parser(__doc__, quick="tiny network, generated images, a few seconds",
                             out="output folder (backbone, metrics.jsonl, summary.json)", out_required=True)
    p.add_argument("--data", type=Path, help="image folder to train on (default: generated JPEGs)")
    p.add_argument("--test", type=Path, help="labeled test set: also score k-NN with unsupdistill eval, "
                                             "memory from --train (default --data)")
    p.add_argument("--train", type=Path, help="labeled k-NN memory (default --data)")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget (default 30)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: as users run the reference (default); bf16: with autocast")
    p.add_argument("--recipe", type=Path, default=bench_train.RECIPE, help="config of the reference's network, "
                   "crops, loss and optimizer (default: lightly's CIFAR-10 setting, recipes/bench_cifar10_r18.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workers", type=int, help="DataLoader workers (default: unsupdistill's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes = min(args.minutes, 0.1)
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common.log_to_console()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if folder is None:
            folder = Path(tmp) / "images"
            for label in ("a", "b"):
                common.write_random_images(folder / label, 32, 32, seed=ord(label))
            args.test = args.test or folder
        summary = train_reference(args, folder)
        if args.test is not None:
            report = args.out / "eval"
            common.run_cli("eval", str(args.out), "--eval-train", str(args.train or folder), "--eval-test",
                           str(args.test), "--out", str(report), "--no-linear", "--no-clustering", "--no-plots",
                           "--no-cache")
            summary["eval"] = json.loads((report / "eval.json").read_text())
    write_json(summary, args.out / "summary.json")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("environment", "overrides")}, indent=2))
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'backbone.safetensors'} and {args.out / 'metrics.jsonl'}")
    return summary


if __name__ == "__main__":
    main()
