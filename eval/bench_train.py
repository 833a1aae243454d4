"""Pretraining throughput of unsupdistill against the DINO pipeline that lightly's documentation shows.

Both pipelines train the same timm backbone and DINO head on the same views of the same image folder,
read and decoded from disk, with the same batch size, DataLoader workers and torch threads:

- ``ours``: :class:`~unsupdistill.train.loop.Trainer` built from ``recipes/bench_cifar10_r18.yaml``:
  images decoded in DataLoader workers, multi-crop batched with kornia in the training process, its real
  ``train_step`` on batches of its real ``loader`` with the schedule of ``schedule_at``, as ``Trainer.fit``
  runs it (health signals every ``train.log_every_steps`` steps; no checkpoints); its default precision.
- ``ref-fp32``: DINO written as in lightly's examples: ``DINOTransform`` per sample in DataLoader workers,
  one student forward per view and one teacher forward per global view, ``DINOProjectionHead``,
  ``DINOLoss``, ``update_momentum`` before each step, AdamW, float32.
- ``ref-bf16``: the same with ``torch.autocast(bfloat16)`` around the forward passes.
- ``ours-compiled`` (only when listed in ``--variants``): ``ours`` with ``train.compile=true``; its first
  warm-up step includes the compilation.

The variants run in alternating rounds (ours, ref-fp32, ref-bf16, ours, ...), each round warm-up steps
then timed steps. Reported: source images per second of each round, the ratio of ours to each reference
per round, and their medians. ``--breakdown`` adds the time of each stage of one unsupdistill step, its
FLOPs per source image and the utilisation of this machine's measured peak.

Run it from the repository root (see ../shared/data/README.md for the CIFAR-10 folder)::

    python eval/bench_train.py --data /tmp/cifar10/train --breakdown --json /tmp/bench/train.json
    python eval/bench_train.py --quick --breakdown --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import common
import kornia
import lightly
import timm
import torch
from lightly.data import LightlyDataset
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import DINOTransform
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from unsupdistill.augment import blur_sigma, sized
from unsupdistill.config import Config, DataConfig, apply_overrides, load_config, validate
from unsupdistill.data import num_workers
from unsupdistill.evaluate.report import format_table
from unsupdistill.methods import build_trainer
from unsupdistill.models.backbone import create_backbone
from unsupdistill.train.sampler import ResumableSampler
from unsupdistill.train.schedules import ScheduleValues, scaled_lr, schedule_at

logger = logging.getLogger("bench_train")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bench_cifar10_r18.yaml"
WORKLOADS = {"cifar10": [], "multicrop": ["dino.num_local_crops=6"]}
VARIANTS = ("ours", "ours-compiled", "ref-fp32", "ref-bf16")
"""``ours-compiled``: ours with ``train.compile=true`` (not run unless asked for)."""
LIBRARIES = (timm, kornia, lightly)
"""The libraries whose versions a result of the two pipelines records."""


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype``, or nothing for float32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# The two pipelines
# ----------------------------------------------------------------------------------------------


class UnsupdistillPipeline:
    """unsupdistill's training as ``Trainer.fit`` runs it, one step per call, without checkpoints.

    Args:
        config: the full config (data.path set).
        run_dir: the trainer's run directory (nothing is written there).
    """

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.trainer = build_trainer(config, run_dir)
        self.batches = endless(self.trainer.loader, self.trainer.sampler)

    def schedule(self) -> ScheduleValues:
        """The schedules at the trainer's current step."""
        t = self.trainer
        return schedule_at(t.step, t.total_steps, t.steps_per_epoch, t.global_batch, t.config.optim)

    def step(self) -> None:
        """Fetch a batch and run ``train_step``; at log steps read the loss, as ``fit`` does."""
        t = self.trainer
        log_now = (t.step + 1) % t.config.train.log_every_steps == 0
        out = t.train_step(t.batch(next(self.batches)), self.schedule(), with_signals=log_now)
        if log_now:
            out["loss"].item()
        t.step += 1


def endless(loader: DataLoader, sampler: ResumableSampler | None = None) -> Iterator:
    """The loader's batches, epoch after epoch; ``sampler`` is set up for each epoch as ``Trainer.fit`` does.

    A function, not a method: a generator held by the object whose method made it is a reference cycle, which
    would leave the DataLoader workers running until a garbage collection.
    """
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
            sampler.start = 0
        yield from loader
        epoch += 1


def dino_transform(config: Config) -> DINOTransform:
    """lightly's DINOTransform with the crops, scales, probabilities and normalisation of ``config``."""
    cfg, m = config.dino, config.model
    g1, g2, local = sized(cfg.global_1, m.input_size), sized(cfg.global_2, m.input_size), cfg.local
    shared = ("flip_p", "color_jitter", "color_jitter_p", "grayscale_p")
    differing = [f"{view}.{key}" for key in shared for view, spec in (("global_2", g2), ("local", local))
                 if getattr(spec, key) != getattr(g1, key)]
    if differing or g1.solarize_p or local.solarize_p or g2.size != g1.size or g2.scale != g1.scale:
        raise ValueError(f"DINOTransform cannot express this augmentation config (differs: {differing}, "
                         "or solarization outside global_2, or unequal global crops)")
    brightness, contrast, saturation, hue = g1.color_jitter
    return DINOTransform(
        global_crop_size=g1.size, global_crop_scale=g1.scale, local_crop_size=local.size,
        local_crop_scale=local.scale, n_local_views=cfg.num_local_crops, hf_prob=g1.flip_p,
        cj_prob=g1.color_jitter_p, cj_strength=1.0, cj_bright=brightness, cj_contrast=contrast,
        cj_sat=saturation, cj_hue=hue, random_gray_scale=g1.grayscale_p,
        gaussian_blur=(g1.blur_p, g2.blur_p, local.blur_p), sigmas=blur_sigma(g1),
        solarization_prob=g2.solarize_p, normalize={"mean": list(m.mean), "std": list(m.std)},
    )


class LightlyReference:
    """DINO as lightly's documentation writes it (examples/pytorch/dino.py, the CIFAR-10 benchmark).

    Per-sample ``DINOTransform`` in DataLoader workers; ``update_momentum`` at the start of each step; the
    teacher on each global view and the student on each view, one forward per view; ``DINOLoss``;
    ``cancel_last_layer_gradients``; AdamW. The backbone is the same timm model as unsupdistill's.

    Args:
        config: the config of the unsupdistill side; its model, dino and optim sections are used.
        workers: DataLoader worker processes.
        device: the training device.
        autocast_dtype: ``torch.autocast`` dtype around the forward passes; None for float32.
    """

    def __init__(self, config: Config, workers: int, device: torch.device, autocast_dtype: torch.dtype | None):
        a, m, o = config.dino, config.model, config.optim
        self.device, self.autocast_dtype = device, autocast_dtype
        self.dataset = LightlyDataset(input_dir=config.data.path, transform=dino_transform(config))
        self.loader = DataLoader(self.dataset, batch_size=config.train.batch_size, shuffle=True, drop_last=True,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda")
        self.steps_per_epoch = len(self.loader)
        self.total_steps = self.steps_per_epoch * config.train.epochs
        self.momentum = (config.dino.teacher_momentum, config.dino.teacher_momentum_end)

        crop_sizes = (m.input_size,) + ((a.local.size,) if a.num_local_crops else ())
        self.student_backbone, self.spec = create_backbone(m, crop_sizes)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        heads = [DINOProjectionHead(self.spec.feature_dim, a.head_hidden_dim, a.head_bottleneck_dim, a.head_output_dim,
                                    batch_norm=a.head_batch_norm,
                                    freeze_last_layer=round(config.dino.freeze_last_layer_epochs),
                                    norm_last_layer=a.norm_last_layer) for _ in range(2)]
        self.student_head, self.teacher_head = heads
        self.teacher_head.load_state_dict(self.student_head.state_dict())  # weight_norm cannot be deep-copied
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        for module in (self.student_backbone, self.student_head, self.teacher_backbone, self.teacher_head):
            module.to(device)
        lo = config.dino
        self.criterion = DINOLoss(
            output_dim=a.head_output_dim, warmup_teacher_temp=lo.warmup_teacher_temp, teacher_temp=lo.teacher_temp,
            warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs, student_temp=lo.student_temp,
            center_momentum=lo.center_momentum,
        ).to(device)
        params = [*self.student_backbone.parameters(), *self.student_head.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=scaled_lr(o, config.train.batch_size),
                                           weight_decay=o.weight_decay)
        self.step_index = 0
        self.batches = endless(self.loader)

    def forward(self, x: Tensor) -> Tensor:
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    def step(self) -> None:
        """One DINO step on the next batch of views."""
        epoch = self.step_index // self.steps_per_epoch
        momentum = cosine_schedule(self.step_index, self.total_steps, *self.momentum)
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        views, _, _ = next(self.batches)
        views = [view.to(self.device, non_blocking=True) for view in views]
        with autocast(self.device, self.autocast_dtype):
            teacher_out = [self.forward_teacher(view) for view in views[:2]]
            student_out = [self.forward(view) for view in views]
        loss = self.criterion([t.float() for t in teacher_out], [s.float() for s in student_out], epoch=epoch)
        loss.backward()
        self.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step_index += 1


# ----------------------------------------------------------------------------------------------
# Throughput in alternating rounds
# ----------------------------------------------------------------------------------------------


def images_per_second(step: Callable[[], None], warmup_steps: int, steps: int, batch_size: int,
                      device: torch.device) -> float:
    """Source images per second over ``steps`` timed steps after ``warmup_steps`` untimed ones."""
    for _ in range(warmup_steps):
        step()
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    common.synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def compare(pipelines: dict[str, Callable[[], None]], rounds: int, warmup_steps: int, steps: int,
            batch_size: int, device: torch.device) -> dict:
    """Run the pipelines in alternating rounds; images/s per round, ours/reference ratios and medians."""
    per_round = []
    for index in range(rounds):
        result = {}
        for name, step in pipelines.items():
            result[name] = images_per_second(step, warmup_steps, steps, batch_size, device)
            logger.info("round %d/%d %s: %.1f images/s", index + 1, rounds, name, result[name])
        per_round.append(result)
    ratios = {f"{ours}/{ref}": [r[ours] / r[ref] for r in per_round]
              for ours in pipelines if ours.startswith("ours") for ref in pipelines if ref.startswith("ref")}
    return {
        "rounds": per_round,
        "median_images_per_s": {name: statistics.median(r[name] for r in per_round) for name in pipelines},
        "ratios": ratios,
        "median_ratio": {pair: statistics.median(values) for pair, values in ratios.items()},
    }


# ----------------------------------------------------------------------------------------------
# Breakdown of one unsupdistill step, FLOPs and peak
# ----------------------------------------------------------------------------------------------


class StageTimer:
    """Wall time of named stages, with the device synchronised before and after each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        common.synchronize(self.device)
        start = time.perf_counter()
        yield
        common.synchronize(self.device)
        self.seconds.setdefault(name, []).append(time.perf_counter() - start)


def timed_step(pipeline: UnsupdistillPipeline, timer: StageTimer) -> None:
    """One real ``Trainer.train_step``, its stages timed by wrapping the method's hooks and the optimizer's step
    for this call (no health signals: ``fit`` computes them only every ``train.log_every_steps`` steps).

    The stages: the batch from the loader, the method's views (augmentation), the student's forward, the rest of
    the method's loss (teacher forward and the loss itself), the optimizer step, the method's after-step updates
    (EMA, queue); what remains of the step is the backward pass, the gradient norm and clipping.
    """
    t, sched = pipeline.trainer, pipeline.schedule()
    with timer("data loader wait (decode in workers)"):
        batch = t.batch(next(pipeline.batches))
    hooks = {"augmentation (the method's views)": (t.method, "views"),
             "student forward": (t.method, "student_forward"),
             "teacher forward and loss (rest of the method's loss)": (t.method, "loss"),
             "optimizer step": (t.optimizer, "step"),
             "after the step (EMA update, queue)": (t.method, "after_optimizer_step")}
    own: dict[str, list[float]] = {}
    for name, (owner, attribute) in hooks.items():
        setattr(owner, attribute, _timed(getattr(owner, attribute), name, t.device, own))
    try:
        common.synchronize(t.device)
        start = time.perf_counter()
        t.train_step(batch, sched, with_signals=False)
        common.synchronize(t.device)
        total = time.perf_counter() - start
    finally:
        for owner, attribute in hooks.values():
            delattr(owner, attribute)  # the class's method again
    seconds = {name: sum(own.get(name, [0.0])) for name in hooks}
    seconds["teacher forward and loss (rest of the method's loss)"] -= seconds["student forward"]
    seconds["backward, gradient norm, clip (rest of the step)"] = total - sum(seconds.values())
    for name, value in seconds.items():
        timer.seconds.setdefault(name, []).append(value)
    t.step += 1


def _timed(function: Callable, name: str, device: torch.device, seconds: dict[str, list[float]]) -> Callable:
    """``function``, recording the wall time of each call under ``name``."""
    def wrapper(*args, **kwargs):
        common.synchronize(device)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        common.synchronize(device)
        seconds.setdefault(name, []).append(time.perf_counter() - start)
        return result
    return wrapper


def flops_per_image(pipeline: UnsupdistillPipeline) -> float:
    """Matmul and convolution FLOPs per source image of one real ``train_step``: the teacher's forward, the
    student's forward and backward, and the loss (``FlopCounterMode`` counts no element-wise operations)."""
    t = pipeline.trainer
    batch = t.batch(next(pipeline.batches))
    with FlopCounterMode(display=False) as counter:
        t.train_step(batch, pipeline.schedule(), with_signals=False)
    t.step += 1
    return counter.get_total_flops() / len(batch.indices)


def measure_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> dict[str, float]:
    """GFLOP/s of a square matmul and of a ResNet-18-style 3x3 convolution (64 channels, 32x32) in ``dtype``."""
    n = 256 if quick else (8192 if device.type == "cuda" else 2048)  # quick: a smoke run (CPU bf16 may be emulated)
    repeats = 2 if quick else 5
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = 2 * n**3 / common.best_time(lambda: a @ b, repeats, device=device).seconds / 1e9
    batch = 4 if quick else 128
    x = torch.randn(batch, 64, 32, 32, device=device, dtype=dtype)
    w = torch.randn(64, 64, 3, 3, device=device, dtype=dtype)
    conv_flops = 2 * batch * 64 * 32 * 32 * 64 * 9
    conv_seconds = common.best_time(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats,
                                    device=device).seconds
    conv = conv_flops / conv_seconds / 1e9
    return {"matmul_gflop_per_s": matmul, "conv2d_gflop_per_s": conv, "peak_gflop_per_s": max(matmul, conv)}


def dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def breakdown(pipeline: UnsupdistillPipeline, warmup_steps: int, steps: int, quick: bool) -> dict:
    """Median time of each stage of an unsupdistill step, FLOPs per image, measured peaks and utilisation."""
    t = pipeline.trainer
    timer = StageTimer(t.device)
    for _ in range(warmup_steps):
        timed_step(pipeline, StageTimer(t.device))
    for _ in range(max(steps, 1)):
        timed_step(pipeline, timer)
    stages = {name: statistics.median(values) for name, values in timer.seconds.items()}
    step_seconds = sum(stages.values())
    decode = common.best_time(lambda: [t.dataset[i] for i in range(t.local_batch)], repeats=3).seconds
    flops = flops_per_image(pipeline)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, dtype_name(t.autocast_dtype): t.autocast_dtype}
    peaks = {name: measure_peak(t.device, dtype or torch.float32, quick) for name, dtype in dtypes.items()}
    achieved = flops * t.local_batch / step_seconds / 1e9
    return {
        "stage_seconds": stages,
        "step_seconds": step_seconds,
        "images_per_s": t.local_batch / step_seconds,
        "decode_batch_in_process_seconds": decode,
        "gflop_per_image": flops / 1e9,
        "achieved_gflop_per_s": achieved,
        "precision": dtype_name(t.autocast_dtype),
        "peaks": peaks,
        "utilisation": achieved / peaks[dtype_name(t.autocast_dtype)]["peak_gflop_per_s"],
    }


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def bench_config(args: argparse.Namespace, workload: str, folder: Path) -> Config:
    """The recipe plus the workload's and the command line's overrides."""
    overrides = [f"data.path={folder}", f"train.threads={args.threads}", f"train.device={args.device}",
                 f"train.batch_size={args.batch_size}", *WORKLOADS[workload],
                 *(common.TINY_MODEL if args.quick else [])]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    return load_config(str(RECIPE), overrides)


def run_workload(config: Config, args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    """Build the pipelines of one workload, compare them and (with --breakdown) break ours down."""
    ours_config = apply_overrides(config, args.ours)
    validate(ours_config)
    ours = UnsupdistillPipeline(ours_config, tmp / "run")
    workers = num_workers(config.data)
    refs = {"ref-fp32": None, "ref-bf16": torch.bfloat16}
    pipelines: dict[str, Callable[[], None]] = {}
    precision = {}
    for name in args.variants:
        if name == "ours":
            pipelines[name], precision[name] = ours.step, dtype_name(ours.trainer.autocast_dtype)
        elif name == "ours-compiled":
            compiled = UnsupdistillPipeline(apply_overrides(ours_config, ["train.compile=true"]), tmp / "compiled")
            pipelines[name], precision[name] = compiled.step, dtype_name(compiled.trainer.autocast_dtype)
        else:
            pipelines[name] = LightlyReference(config, workers, device, refs[name]).step
            precision[name] = dtype_name(refs[name])
    result: dict = {"precision": precision, "images": len(ours.trainer.dataset), "workers": workers}
    if args.rounds > 0:
        result.update(compare(pipelines, args.rounds, args.warmup_steps, args.steps, args.batch_size, device))
    if args.breakdown:
        result["breakdown"] = b = breakdown(ours, args.warmup_steps, args.steps, args.quick)
        if args.rounds > 0:
            result["utilisation"] = {
                name: ips * b["gflop_per_image"] / b["peaks"][result["precision"][name]]["peak_gflop_per_s"]
                for name, ips in result["median_images_per_s"].items()}
    return result


def print_report(results: dict) -> None:
    """The machine, then markdown tables of the rounds, the breakdown and the utilisation."""
    print(common.environment_line(results["environment"]))
    for workload, r in results["workloads"].items():
        precisions = ", ".join(f"{name} {p}" for name, p in r["precision"].items())
        print(f"\n## {workload}: {r['images']:,} images, batch {results['config']['batch_size']}, "
              f"{r['workers']} workers, precision: {precisions}\n")
        if "rounds" in r:
            names = list(r["median_images_per_s"])
            rows = [{"round": str(i + 1), **{f"{n} img/s": x[n] for n in names},
                     **{p: v[i] for p, v in r["ratios"].items()}} for i, x in enumerate(r["rounds"])]
            rows.append({"round": "median", **{f"{n} img/s": r["median_images_per_s"][n] for n in names},
                         **r["median_ratio"]})
            print(format_table(rows, list(rows[0]), markdown=True))
        if "breakdown" in r:
            b = r["breakdown"]
            rows = [{"stage": name, "ms per step": s * 1e3, "share %": 100 * s / b["step_seconds"]}
                    for name, s in b["stage_seconds"].items()]
            rows.append({"stage": "step total", "ms per step": b["step_seconds"] * 1e3, "share %": 100.0})
            rows.append({"stage": "(decode one batch in the training process, for reference)",
                         "ms per step": b["decode_batch_in_process_seconds"] * 1e3})
            print("\nStages of one unsupdistill step (median):\n")
            print(format_table(rows, ["stage", "ms per step", "share %"], markdown=True, precision=1))
            rows = [{"dtype": d, "matmul GFLOP/s": p["matmul_gflop_per_s"], "conv2d GFLOP/s": p["conv2d_gflop_per_s"]}
                    for d, p in b["peaks"].items()]
            print("\nMeasured peak of this machine:\n")
            print(format_table(rows, list(rows[0]), markdown=True, precision=1))
            rows = [{"pipeline": "ours (breakdown step)", "precision": b["precision"],
                     "images/s": b["images_per_s"], "GFLOP/s": b["achieved_gflop_per_s"],
                     "utilisation %": 100 * b["utilisation"]}]
            for name, u in r.get("utilisation", {}).items():
                ips = r["median_images_per_s"][name]
                rows.append({"pipeline": f"{name} (rounds, median)", "precision": r["precision"][name],
                             "images/s": ips, "GFLOP/s": ips * b["gflop_per_image"], "utilisation %": 100 * u})
            print(f"\nModel FLOPs: {b['gflop_per_image']:.3f} GFLOP per source image (matmul and conv only); "
                  "utilisation = achieved / measured peak of the precision used:\n")
            print(format_table(rows, list(rows[0]), markdown=True, precision=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.script_parser(__doc__, quick="tiny network and sizes, a smoke run in seconds",
                                  json="also write the results to this JSON file")
    parser.add_argument("--data", type=Path, help="image folder read by both pipelines (default: generated JPEGs)")
    parser.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both",
                        help="cifar10: 2x32-px views; multicrop: plus 6x16-px local views")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["ours", "ref-fp32", "ref-bf16"],
                        help="pipelines to run, in this order within each round (default: all but ours-compiled)")
    parser.add_argument("--threads", type=int, help="torch threads, both pipelines (default: torch's; --quick 1, "
                                                    "as tiny ops on shared cores stall in thread barriers)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (both; default: unsupdistill's)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3; --quick 1); 0: breakdown only")
    parser.add_argument("--warmup-steps", type=int,
                        help="untimed steps per round (default 2 x workers + 1, which drains the prefetched "
                             "batches; --quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default 10; --quick 1)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 128, the recipe's; --quick 8)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="training device (both)")
    parser.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for our pipeline only, e.g. train.compile=true (repeatable)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each stage of an unsupdistill step, its FLOPs and the machine's peak")
    args = parser.parse_args(argv)
    workers = num_workers(DataConfig(path=str(args.data), num_workers=args.workers))
    common.quick_defaults(args, rounds=(3, 1), steps=(10, 1), batch_size=(128, 8), threads=(torch.get_num_threads(), 1),
                          warmup_steps=(2 * workers + 1, 1))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common.log_to_console()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported() and "ref-bf16" in args.variants:
        logger.warning("this GPU has no bfloat16: ref-bf16 left out")
        args.variants.remove("ref-bf16")
    workloads = list(WORKLOADS) if args.workload == "both" else [args.workload]
    results: dict = {"config": {key: str(value) if isinstance(value, Path) else value
                                for key, value in vars(args).items()},
                     "environment": common.environment(*LIBRARIES, device=device), "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if folder is None:
            size = load_config(str(RECIPE)).model.input_size
            folder = common.write_random_images(Path(tmp) / "images", max(64, 4 * args.batch_size), size)
        for workload in workloads:
            config = bench_config(args, workload, folder)
            results["workloads"][workload] = run_workload(config, args, device, Path(tmp))
            gc.collect()  # any cycle left holds DataLoader workers, whose shutdown at interpreter exit can hang
    print_report(results)
    common.save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
