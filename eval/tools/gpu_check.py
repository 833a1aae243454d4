"""A few-minute check of pretraining speed on a GPU: images/s, the time spent waiting for data, and model FLOP
utilisation (MFU) against this GPU's measured matmul peak.

The workload is ImageNet pretraining as ``recipes/imagenet_vit_small.yaml`` sets it up: DINO with a ViT-S/16,
2 global 224-px crops and 10 local 96-px crops, the recipe's precision (bf16 where the GPU has it) and DataLoader
workers. It runs through the real :class:`~unsupdistill.train.loop.Trainer`: its loader decodes synthetic JPEGs
(written first, about an ImageNet photo's pixel count each, then hard-linked so that one epoch covers every
measured step: no epoch restart, which ImageNet has once in 1,251 steps, lands in the timing), and its
``train_step`` runs as ``Trainer.fit`` runs it (``UnsupdistillPipeline`` of ``eval/bench_train.py``; no
checkpoints, no evaluation). Overrides of the recipe: the data folder, the batch size, the last layer trained
from the first step (``dino.freeze_last_layer_epochs=0``: the steady state after DINO's first epoch), and
with ``--quick`` a tiny ViT on small crops.

Steps:

1. Batch size: on CUDA, the largest that fits: one real step at 32, 64, ... up to ``--max-batch``, stopping at
   the first ``torch.cuda.OutOfMemoryError``. On CPU, with ``--quick`` or with ``--batch-size``, none is searched.
2. Throughput: ``--warmup`` untimed steps (by default 2 x workers + 1, which drains the batches the workers
   prefetched), then ``--steps`` timed ones: images/s, and the share of their wall time spent blocked in the
   loader's ``next()`` (data wait).
3. A breakdown of a few steps into stages (``timed_step`` of bench_train; synchronised between stages, so it
   adds up to more than an unsynchronised step).
4. FLOPs per image of one real step: ``FlopCounterMode``'s matmul, convolution and fused-attention FLOPs of the
   teacher's forward, the student's forward and backward and the loss (element-wise operations, normalisation,
   the optimizer and the EMA update are not counted; on CPU neither is fused attention).
5. MFU = FLOPs per image x images/s / the measured peak of a large square matmul in the run's precision.

Run it from the repository root::

    python eval/tools/gpu_check.py --json /tmp/gpu_check.json    # on a GPU machine, a few minutes
    python eval/tools/gpu_check.py --quick                       # on CPU: a tiny ViT, well under a minute
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py and the benchmarks

import bench_train
import common
import torch
from tqdm import tqdm

from unsupdistill.config import Config, load_config
from unsupdistill.data import num_workers
from unsupdistill.devices import resolve_device
from unsupdistill.train.method import Batch

logger = logging.getLogger("gpu_check")

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "imagenet_vit_small.yaml"
STEADY_STATE = ["dino.freeze_last_layer_epochs=0"]
"""DINO freezes the head's last layer (over a third of the parameters) for the first epoch, which skips its optimizer
update; the check times the other 99 epochs."""
QUICK = ["model.backbone_kwargs={img_size: 32, patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3, "
         "drop_path_rate: 0.1}", *common.TINY_HEAD,
         "model.input_size=32", "model.input_size=32", "dino.local.size=16",
         "dino.num_local_crops=2", "data.image_size=40"]
"""The recipe's ViT scaled down for a CPU smoke run in seconds: 2 x 32-px + 2 x 16-px crops."""
STAGE_STEPS = 3
FLOPS_COUNTED = ("matmul, convolution and fused-attention FLOPs (torch FlopCounterMode) of one real train_step: "
                 "teacher forward, student forward and backward, loss; not element-wise operations, "
                 "normalisation, the optimizer or the EMA update (nor fused attention on CPU)")


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------


def fill_epoch(unique: Path, root: Path, entries: int) -> None:
    """Hard-link the JPEGs of ``unique`` (a folder under ``root``) into ``root/repeat_NNNN`` folders until
    ``root`` holds at least ``entries`` files. Each file is still decoded on every read; only the disk space
    is shared."""
    files = sorted(unique.glob("*.jpg"))
    copies = math.ceil(entries / len(files))
    for copy in range(1, copies):
        folder = root / f"repeat_{copy:04d}"
        folder.mkdir()
        for file in files:
            os.link(file, folder / file.name)


# ----------------------------------------------------------------------------------------------
# The batch size
# ----------------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    """Collect what the last pipeline left (its DataLoader workers too) and return cached CUDA memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(config: Config, run_dir: Path, cap: int) -> tuple[int, list[dict]]:
    """The largest batch of 32, 64, ... up to ``cap`` that runs one real ``train_step`` without running out of
    CUDA memory, and every try as ``{"batch": B, "fits": bool}``.

    One trainer (its batch set to ``cap``) steps on the first images of its folder, repeated to ``cap``; the
    optimizer state and the previous step's gradients stay allocated, as in training.
    """
    pipeline = bench_train.UnsupdistillPipeline(config, run_dir)
    t = pipeline.trainer
    decoded = torch.stack([t.dataset[i][0] for i in range(min(64, len(t.dataset)))])  # (n, 3, S, S) uint8
    images = decoded[torch.arange(cap) % len(decoded)].to(t.device)  # (cap, 3, S, S)
    tries: list[dict] = []
    batch = min(32, cap)
    while batch <= cap:
        try:
            t.train_step(Batch(images[:batch], torch.arange(batch)), pipeline.schedule(), with_signals=False)
            common.synchronize(t.device)
        except torch.cuda.OutOfMemoryError:
            tries.append({"batch": batch, "fits": False})
            break
        tries.append({"batch": batch, "fits": True})
        logger.info("batch %d fits (%.1f GiB at most)", batch, torch.cuda.max_memory_allocated(t.device) / 2**30)
        torch.cuda.empty_cache()
        batch *= 2
    device = t.device
    del pipeline, t, images
    free_memory(device)
    fitting = [entry["batch"] for entry in tries if entry["fits"]]
    if not fitting:
        raise SystemExit(f"not even a batch of {tries[0]['batch']} fits in this GPU's memory")
    return fitting[-1], tries


# ----------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------


def timed_batches(batches: Iterator, waits: list[float]) -> Iterator:
    """``batches``, appending the seconds each ``next()`` was blocked to ``waits``."""
    while True:
        start = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - start)
        yield batch


def measure(config: Config, run_dir: Path, warmup: int, steps: int) -> dict:
    """Throughput, data wait, stage times, FLOPs per image and memory of the real pipeline on ``config``."""
    pipeline = bench_train.UnsupdistillPipeline(config, run_dir)
    t = pipeline.trainer
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    for _ in range(warmup):
        pipeline.step()

    # ---- timed steps: images/s and the time blocked on the loader ------------------------------
    waits: list[float] = []
    batches, pipeline.batches = pipeline.batches, timed_batches(pipeline.batches, waits)
    step_seconds = []
    common.synchronize(t.device)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="timed steps", unit="step"):
        tic = time.perf_counter()
        pipeline.step()
        step_seconds.append(time.perf_counter() - tic)
    common.synchronize(t.device)
    seconds = time.perf_counter() - start
    pipeline.batches = batches

    # ---- stages (synchronised), FLOPs of one step ------------------------------------------------
    timer, stage_steps = bench_train.StageTimer(t.device), min(STAGE_STEPS, steps)
    for _ in range(stage_steps):
        bench_train.timed_step(pipeline, timer)
    flops = bench_train.flops_per_image(pipeline)
    memory = torch.cuda.max_memory_allocated(t.device) / 2**30 if t.device.type == "cuda" else None
    return {
        "images_per_s": steps * t.local_batch / seconds,
        "seconds": seconds,
        "step_seconds_mean": seconds / steps,
        "step_seconds_median": statistics.median(step_seconds),
        "data_wait_seconds": sum(waits),
        "data_wait_share": sum(waits) / seconds,
        "stage_steps": stage_steps,
        "stage_seconds": {name: statistics.median(values) for name, values in timer.seconds.items()},
        "gflop_per_image": flops / 1e9,
        "precision": bench_train.dtype_name(t.autocast_dtype),
        "autocast_dtype": t.autocast_dtype,
        "dataset_images": len(t.dataset),
        "steps_per_epoch": t.steps_per_epoch,
        "max_memory_gib": memory,
    }


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def check_config(args: argparse.Namespace, device: torch.device, folder: Path, batch_size: int) -> Config:
    """The recipe with the check's overrides (see the module docstring), then ``--set``."""
    overrides = [f"data.path={folder}", f"train.device={device.type}", f"train.batch_size={batch_size}",
                 *STEADY_STATE, *(QUICK + ["train.threads=1"] if args.quick else [])]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    return load_config(str(RECIPE), overrides + args.set)


def workload(config: Config, args: argparse.Namespace) -> dict:
    """What ran: the recipe's network, crops and data settings as overridden."""
    a, m = config.dino, config.model
    return {
        "recipe": str(RECIPE.relative_to(RECIPE.parents[1])), "quick": args.quick, "set": args.set,
        "backbone": m.backbone, "backbone_kwargs": m.backbone_kwargs, "head_output_dim": a.head_output_dim,
        "crops": f"2x{m.input_size} + {a.num_local_crops}x{a.local.size}",
        "workers": num_workers(config.data), "decoded_px": config.data.image_size or m.input_size,
        "jpeg_px": args.image_px, "unique_jpegs": args.images, "compile": config.train.compile,
    }


def print_report(r: dict) -> None:
    """The figures of ``main``'s results, and a table of the stages."""
    env, w, b = r["environment"], r["workload"], r["batch"]
    print(f"\n## GPU check: {env['device']}, torch {env['torch']}, {r['precision']}\n")
    print(f"workload: {w['recipe']}{' (--quick: tiny ViT)' if w['quick'] else ''}: {w['backbone']}, "
          f"{w['crops']} crops, head {w['head_output_dim']}, DataLoader workers: {w['workers']}, "
          f"{w['unique_jpegs']} JPEGs of {w['jpeg_px']} px decoded to {w['decoded_px']} px "
          f"({r['dataset_images']:,} files with links, {r['steps_per_epoch']} steps per epoch)")
    if b["searched"]:
        tried = ", ".join(f"{x['batch']} {'fits' if x['fits'] else 'out of memory'}" for x in b["tries"])
        print(f"batch: {b['size']}, the largest that fits ({tried})")
    else:
        print(f"batch: {b['size']}, as given (no search on CPU, with --quick or with --batch-size)")
    print(f"throughput: {r['images_per_s']:,.1f} images/s over {r['steps']} steps after {r['warmup']} warm-up "
          f"({r['step_seconds_mean'] * 1e3:.1f} ms per step, median {r['step_seconds_median'] * 1e3:.1f})")
    print(f"data wait: {100 * r['data_wait_share']:.1f} % of the time blocked on the loader")
    if r["max_memory_gib"] is not None:
        print(f"memory: {r['max_memory_gib']:.1f} GiB at most of {env['gpu_memory_gib']:.1f} GiB")
    print(f"FLOPs: {r['gflop_per_image']:.4g} GFLOP per image, counted: {FLOPS_COUNTED}")
    print(f"MFU: {r['achieved_tflop_per_s']:.4g} TFLOP/s achieved / {r['peak_tflop_per_s']:.4g} TFLOP/s measured "
          f"{r['precision']} matmul peak = {100 * r['mfu']:.1f} %")
    rows = [{"stage": name, "ms per step": s * 1e3} for name, s in r["stage_seconds"].items()]
    rows.append({"stage": "sum (synchronised between stages)", "ms per step": sum(r["stage_seconds"].values()) * 1e3})
    print("\nStages of a step (median):\n")
    common.print_table(rows, precision=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.script_parser(__doc__, quick="tiny ViT, small crops, a few steps: a CPU smoke run",
                                  json="also write the results to this JSON file",
                                  out="where the temporary folder of JPEGs goes (default: the system's)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available")
    parser.add_argument("--batch-size", type=int, help="images per step, no search (default: on CUDA the "
                                                       "largest that fits; on CPU 32; --quick 8)")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch the search tries (default 1024)")
    parser.add_argument("--steps", type=int, help="timed steps (default 30; --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2 x workers + 1; --quick 1)")
    parser.add_argument("--images", type=int, help="distinct synthetic JPEGs (default 2048; --quick 16)")
    parser.add_argument("--image-px", type=int, help="side of the JPEGs (default 400, about an average ImageNet "
                                                     "photo's pixel count; --quick 48)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the recipe's 8; --quick 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.compile=true (repeatable)")
    args = parser.parse_args(argv)
    common.quick_defaults(args, steps=(30, 3), images=(2048, 16), image_px=(400, 48), workers=(None, 1))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common.log_to_console()
    device = resolve_device(args.device)
    search = device.type == "cuda" and not args.quick and args.batch_size is None
    batch_size = args.batch_size or (8 if args.quick else 32)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        root = Path(tmp) / "images"
        unique = common.write_random_images(root / "unique", args.images, args.image_px)
        batch = {"size": batch_size, "searched": search, "tries": []}
        if search:
            cap = min(args.max_batch, args.images)
            config = check_config(args, device, unique, cap)
            batch["size"], batch["tries"] = largest_batch(config, Path(tmp) / "search", cap)
        config = check_config(args, device, root, batch["size"])
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2 * num_workers(config.data) + 1)
        # one epoch covers every step measured: warm-up, timed, stages and the FLOP count
        fill_epoch(unique, root, batch["size"] * (warmup + args.steps + min(STAGE_STEPS, args.steps) + 1))
        measured = None
        while measured is None:
            try:
                measured = measure(config, Path(tmp) / "run", warmup, args.steps)
            except torch.cuda.OutOfMemoryError:
                if not search or batch["size"] == 1:
                    raise
                logger.warning("batch %d fitted one step but ran out of memory later: halving it", batch["size"])
                batch["size"] //= 2
                config = check_config(args, device, root, batch["size"])
            free_memory(device)  # before the peak's large matrices
    dtype = measured.pop("autocast_dtype") or torch.float32
    peak = bench_train.measure_peak(device, dtype, args.quick)
    achieved = measured["gflop_per_image"] * measured["images_per_s"]
    machine = common.environment(*bench_train.LIBRARIES, device=device)
    if device.type == "cuda":
        machine["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    results = {
        "environment": machine, "workload": workload(config, args), "batch": batch, "warmup": warmup,
        "steps": args.steps, **measured, "flops_counted": FLOPS_COUNTED,
        "achieved_tflop_per_s": achieved / 1e3,
        "peak": {"dtype": measured["precision"], "matmul_tflop_per_s": peak["matmul_gflop_per_s"] / 1e3,
                 "conv2d_tflop_per_s": peak["conv2d_gflop_per_s"] / 1e3},
        "peak_tflop_per_s": peak["matmul_gflop_per_s"] / 1e3,
        "mfu": achieved / peak["matmul_gflop_per_s"],
    }
    print_report(results)
    common.save_json(results, args.json)
    if args.json is None:
        print("\nno file written (the JPEGs were temporary; --json PATH keeps the results)")
    return results


if __name__ == "__main__":
    main()
