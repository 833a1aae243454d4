"""What the scripts of eval/ share: the machine record, best-of-n timing, the CLI called in this process, the
command line (``--quick``, ``--json``, ``--out``), the result JSON and markdown tables, the tiny networks and
generated data of ``--quick``, and the training and scoring of the runs the distillation, KD and trial benchmarks
compare.

The benchmarks (eval/bench_*.py, eval/benchmark.py) import it as ``common``: Python puts a script's own folder
first on ``sys.path``. The tools in eval/tools/ put eval/ there first themselves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from unsupdistill import run_dir
from unsupdistill.cli import main as cli_main
from unsupdistill.evaluate.report import format_table, write_json
from unsupdistill.evaluate.run import HEADLINE_K

logger = logging.getLogger("eval")

# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------


def environment(*modules: ModuleType, device: torch.device | None = None, **extra: object) -> dict:
    """Where and when a benchmark ran: the date, the processor and its cores, the device (when given), torch's
    threads, the versions of torch and of ``modules``, then ``extra``."""
    record: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device is not None:
        record["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    record["torch_threads"] = torch.get_num_threads()
    record.update({module.__name__: module.__version__ for module in (torch, *modules)})
    return record | extra


def environment_line(record: Mapping[str, object]) -> str:
    """``key=value, ...`` of an :func:`environment` record, the first line of a report."""
    return ", ".join(f"{key}={value}" for key, value in record.items())


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

SLOW_SECONDS = 10.0
"""A timed call longer than this is not repeated."""


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work, so that wall time covers it (nothing to wait for on a CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(NamedTuple):
    """The best of several timed calls."""

    seconds: float
    result: Any
    """What the last call returned."""
    calls: int
    """Timed calls made (fewer than asked for where one was slower than ``SLOW_SECONDS``)."""


def best_time(run: Callable[[], object], repeats: int = 5, warmup: bool = True,
              device: torch.device | None = None) -> Timing:
    """Best wall time of ``run`` over ``repeats`` calls, after one untimed call when ``warmup``; the device is
    synchronised around each call, and a call slower than ``SLOW_SECONDS`` ends the repeats."""
    if warmup:
        run()
    best, result, calls = float("inf"), None, 0
    for _ in range(max(repeats, 1)):
        synchronize(device)
        start = time.perf_counter()
        result = run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        calls += 1
        if best > SLOW_SECONDS:
            break
    return Timing(best, result, calls)


# ----------------------------------------------------------------------------------------------
# The CLI and the command line
# ----------------------------------------------------------------------------------------------


def run_cli(*args: str) -> None:
    """``unsupdistill ARGS`` in this process, as a user would type it; exits when it fails."""
    code = cli_main(list(args))
    if code != 0:
        raise SystemExit(f"unsupdistill {shlex.join(args)} failed with status {code} (see the log above)")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this script (``argv``: its arguments when ``main`` was called with them)."""
    return shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])


def script_parser(doc: str, *, quick: str | None = None, json: str | None = None, out: str | None = None,
                  out_required: bool = False) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring (its commands kept as written), with ``--quick``,
    ``--json PATH`` and ``--out PATH`` where their help is given."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    if json:
        parser.add_argument("--json", type=Path, metavar="PATH", help=json)
    if out:
        parser.add_argument("--out", type=Path, required=out_required, help=out)
    return parser


def quick_defaults(args: argparse.Namespace, **defaults: tuple[object, object]) -> None:
    """Set each option named in ``defaults`` that the command line left unset to its ``(default, --quick
    default)``."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def log_to_console() -> None:
    """INFO messages with their time, as every script logs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


# ----------------------------------------------------------------------------------------------
# Results: tables and JSON
# ----------------------------------------------------------------------------------------------


def cell(row: Mapping[str, Any], key: str, form: str, scale: float = 1) -> str:
    """``row[key] * scale`` formatted for a table (an integer stays one at the default scale), ``-`` where the row
    has none."""
    return "-" if row.get(key) is None else format(row[key] * scale, form)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, precision: int = 2) -> None:
    """``rows`` as a markdown table (columns: the first row's keys unless given)."""
    print(format_table(rows, list(columns or rows[0]), markdown=True, precision=precision))


def save_json(results: Mapping[str, Any], path: Path | None) -> None:
    """Write ``results`` as JSON at ``path`` and say where (nothing without a path)."""
    if path is not None:
        write_json(results, path)
        print(f"\nwrote {path}")


def write_result(path: Path | None, rows: list[dict], **fields: object) -> None:
    """Save a benchmark's rows with the machine, ``fields`` and the command that ran it (see :func:`save_json`)."""
    save_json({"environment": environment(), **fields, "command": command_line(), "rows": rows}, path)


# ----------------------------------------------------------------------------------------------
# --quick: tiny networks and generated images
# ----------------------------------------------------------------------------------------------

TINY_HEAD = ["dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "dino.head_output_dim=256"]
TINY_MODEL = ["model.backbone_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", *TINY_HEAD]
"""A ResNet-18 at 1/8 width with a small DINO head (tests/conftest.py's TINY): a step in tens of milliseconds."""
TINY_NETWORK = "timm:resnet18,small_image_stem=true,channels=[8,8,16,16],stem_width=8"
"""A random-init MODEL argument with 16-d features, for the scripts that score models."""


def write_random_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """Write ``count`` random-ish RGB JPEGs of ``size`` px (smooth colour blobs plus noise, quality 75)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        blobs = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(blobs, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=75)
    return folder


# ----------------------------------------------------------------------------------------------
# Training runs and their scores (bench_distill, bench_kd, bench_trials)
# ----------------------------------------------------------------------------------------------

STUDENTS = {
    "resnet18-quarter": ["model.backbone=resnet18", "model.backbone_kwargs={channels: [16, 32, 64, 128], "
                         "stem_width: 16}", "model.small_image_stem=true"],
    "mobilenetv3-small": ["model.backbone=mobilenetv3_small_100"],
    "resnet10t": ["model.backbone=resnet10t"],
    "vit-tiny-p4": ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 4}",
                    "model.small_image_stem=false", "dino.head_batch_norm=false"],
}
"""The students, as model-section overrides (without a recipe the automatic settings choose their input size)."""
QUICK_STUDENTS = {
    "resnet18-tiny": ["model.backbone=resnet18", "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
                      "model.small_image_stem=true"],
}
QUICK_RUN = ["train.batch_size=16", "data.num_workers=0", *TINY_HEAD, "train.log_every_steps=1", "train.epochs=3"]
"""Overrides of every training run in ``--quick`` (a smoke run of a whole benchmark in about a minute)."""


def runs_parser(doc: str, result: str, budget: float, teachers: bool = True) -> argparse.ArgumentParser:
    """:func:`script_parser` of a benchmark that trains runs on a labeled folder for a budget each: ``--data``,
    ``--budget``, ``--out`` (required), ``--json`` (default OUT/``result``), ``--quick`` and, where ``teachers``,
    ``--teacher NAME=SPEC`` (repeated)."""
    parser = script_parser(doc, quick=f"generated images{', a tiny teacher' if teachers else ''}, seconds per run",
                           json=f"write the results here (default OUT/{result})",
                           out="where the runs and their evaluations go", out_required=True)
    parser.add_argument("--data", type=Path, help="folder with train/ and test/ (one subfolder per class)")
    if teachers:
        parser.add_argument("--teacher", action="append", default=[], metavar="NAME=SPEC",
                            help="a teacher to distill from (repeat for several)")
    parser.add_argument("--budget", type=float, default=budget, help="training seconds of every run")
    return parser


def make_quick_data(root: Path) -> Path:
    """A labeled folder under ``root``: 3 classes of coloured noise, 24 images each in train/, 12 in test/."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, count in (("train", 24), ("test", 12)):
        for label, colour in enumerate(colours):
            folder = root / "data" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root / "data"


def make_quick_teacher(data: Path, out: Path) -> Path:
    """A tiny DINO run on ``data``/train (4 steps, kept in ``out``): the teacher of ``--quick``."""
    if not (out / "backbone.safetensors").is_file():
        run_cli("pretrain", str(data / "train"), "--recipe", "cifar10_cpu", "--out", str(out), *QUICK_RUN,
                *TINY_MODEL, "train.max_steps=4")
    return out


def train_unless_done(run: Path, command: list[str], what: str) -> None:
    """Run the training ``command`` unless ``run`` has its export already (a long benchmark can be continued)."""
    if not (run / "backbone.safetensors").is_file():
        logger.info("training %s: %s", run.name, what)
        run_cli(*command)


def speed_seconds(args: argparse.Namespace) -> float:
    """Time limit of each inference-speed timing of :func:`score_run`: 2 s, 0.2 s with ``--quick`` (a smoke run's
    speeds are not read)."""
    return 0.2 if args.quick else 2.0


def score_run(model: Path | str, train: Path, test: Path, out: Path, linear: bool = True,
              size: int | None = None, speed_seconds: float = 2.0, extra: Sequence[str] = ()) -> dict:
    """``unsupdistill eval --speed`` of ``model`` with ``train`` (a folder or a labels CSV) as the k-NN memory and
    the probe's training set, kept in ``out/eval.json`` (run again only to add the linear probe; the features come
    from the feature cache); its classifier, linear and k-NN (k = 20) top-1 and its inference speed. ``extra``:
    more ``eval`` arguments (``--frontend-of RUN``)."""
    report = out / "eval.json"
    if not report.is_file() or (linear and "linear" not in json.loads(report.read_text())):
        run_cli("eval", str(model), "--eval-train", str(train), "--eval-test", str(test), "--out", str(out),
                "--no-plots", "--no-clustering", "--speed", "--speed-seconds", str(speed_seconds),
                *([] if linear else ["--no-linear"]),
                *([] if size is None else ["--image-size", str(size)]), *extra)
    results = json.loads(report.read_text())
    speed = results.get("speed") or {}
    return {"knn_top1": results["knn"][str(HEADLINE_K)]["top1"], "linear_top1": results.get("linear", {}).get("top1"),
            "classifier_top1": results.get("classifier", {}).get("top1"),  # None: no classifier, or not scored
            "input_size": speed.get("input_size"), "inference_images_per_s": speed.get("images_per_s"),
            "latency_ms": speed.get("latency_ms"), "parameters": speed.get("parameters"),
            "gflops_per_image": speed.get("gflops")}


def training_summary(run: Path) -> dict:
    """Median logged images/s (all, and after the first epoch), steps, epochs and the budget left of a run."""
    records = [r for r in run_dir.read_metrics(run)[0] if "images_per_s" in r]
    later = [r["images_per_s"] for r in records if r["epoch"] > 1.0 + 1e-9]
    budget = [r for r in records if "budget_left_s" in r]
    return {"images_per_s": statistics.median(r["images_per_s"] for r in records) if records else None,
            "images_per_s_after_epoch_1": statistics.median(later) if later else None,
            "steps": records[-1]["step"] if records else 0, "epochs": records[-1].get("epoch") if records else 0,
            "budget_left_s": budget[-1]["budget_left_s"] if budget else None}


# ----------------------------------------------------------------------------------------------
# Models scored on a labeled train/test pair (bench_probe, bench_precision)
# ----------------------------------------------------------------------------------------------


def labeled_pair_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """:func:`script_parser` of a benchmark that scores models on a labeled train/test pair: ``--train``,
    ``--test``, ``--model`` (repeated), ``--image-size``, ``--json`` and ``--quick`` (help ``quick``); add the
    script's own, then call :func:`parse_labeled_pair`."""
    parser = script_parser(doc, quick=quick, json="write the rows here")
    parser.add_argument("--train", default="digits", help="labeled train set (folder, CSV or digits)")
    parser.add_argument("--test", default="digits", help="labeled test set")
    parser.add_argument("--model", action="append", help="MODEL arguments (run directory, export, timm:, pixels)")
    parser.add_argument("--image-size", type=int, help="input side for pixels and random-init timm models")
    return parser


def parse_labeled_pair(parser: argparse.ArgumentParser, argv: list[str] | None,
                       quick_models: list[str]) -> argparse.Namespace:
    """The parsed arguments; --quick: the digits pair at 16 px and ``quick_models`` unless --model is given."""
    args = parser.parse_args(argv)
    if args.quick:
        args.train = args.test = "digits"
        args.image_size = args.image_size or 16
        args.model = args.model or quick_models
    if not args.model:
        parser.error("give at least one --model (or --quick)")
    return args
