"""Distillation's teacher, once per image, and the plan that splits a time budget between it and the student.

On a CPU the frozen teacher is the expensive network: EfficientNet-Lite0 at 224 px runs at 26 images/s eager and
~106 channels-last in bf16 on the 2-core VM, while the quarter-width ResNet-18 student trains at ~390 images/s at
96 px. So the teacher runs once over the images before the student's first step, through the fastest inference
path that keeps its outputs (:func:`~unsupdistill.models.inference.fastest_path`), and its feature maps are stored
(:class:`~unsupdistill.models.teacher_maps.TeacherMaps`); the same pass keeps the images decoded at the student's
working size (:class:`~unsupdistill.data.decoded.DecodedImages`), so no later epoch decodes a file or runs the
teacher. :func:`plan_budget` chooses the teacher's input size so that its pass takes a bounded share of a time
budget, from measured rates, and says how many epochs the student gets.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from unsupdistill.data.folder import load_rgb, resize_center_crop
from unsupdistill.models.backbone import pooled_and_spatial
from unsupdistill.models.inference import CHOICE_IMAGES, InferencePath, fastest_path
from unsupdistill.models.teacher_maps import TeacherMaps
from unsupdistill.train.sampler import IndexedDataset
from unsupdistill.train.timing import TimeShares

logger = logging.getLogger(__name__)

TEACHER_SHARE = 0.25
"""Most of a time budget the teacher's pass may take (a quarter): the rest trains the student."""
SIZE_STEP = 32
"""The teacher's input sizes tried, from its own down: multiples of this."""
LEAST_TEACHER_SIZE = 96
"""The smallest teacher input a plan chooses (CIFAR-10 k-NN of EfficientNet-Lite0: 75.5 % at 96 px, 80.1 % at
160, 78.8 % at 224; BENCHMARKS.md, Distillation)."""
PASS_BATCH = 64
SEARCH_PAYS_S = 20.0
"""With ``distill.teacher_runtime=auto``, the inference paths are tried (tracing and an ONNX export: seconds) only
when the eager network's pass would take at least this long."""


class SpatialOutput(nn.Module):
    """A backbone's spatial feature map (B, h, w, C) as one tensor (a CNN's map, a ViT's patch tokens on their
    grid); a backbone with neither gives its pooled features as a 1 x 1 map (B, 1, 1, D)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.train(False)  # frozen, as its backbone (tracing and freezing need eval mode)

    def forward(self, x: Tensor) -> Tensor:
        pooled, spatial = pooled_and_spatial(self.backbone, x)  # (B, D), (B, h, w, C) | None
        return spatial if spatial is not None else pooled[:, None, None, :]


def normalize(images: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 squares (B, 3, H, H) as a network's normalised channels-last input (B, 3, size, size): bilinear
    resize (antialiased when shrinking)."""
    x = images.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """uint8 squares (B, 3, H, H) resized to (B, 3, size, size) uint8 (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=size < images.shape[-1])
    return x.round_().clamp_(0, 255).to(torch.uint8)


def pass_decode_size(dataset: Dataset, teacher_size: int) -> int:
    """The side to decode images at for the teacher's pass: the teacher's input, but no larger than the images
    hold (their median shorter side; a small image is upsampled on the device, not by the decoder) and no smaller
    than the student's working size (``dataset.image_size``), which the pass keeps."""
    working = int(dataset.image_size)
    sizes = getattr(dataset, "sizes", None)
    held = statistics.median(min(w, h) for w, h in sizes) if sizes else teacher_size
    return max(working, min(teacher_size, int(held)))


@dataclass
class PassReport:
    """What the teacher's pass did: images, seconds of decoding and of the teacher, the path it ran through."""

    images: int
    seconds: float
    decode_s: float
    teacher_s: float
    path: str

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else float("inf")
        return (f"{self.images} images in {self.seconds:.1f} s ({rate:.0f} images/s; waiting for decoded images "
                f"{self.decode_s:.1f} s, teacher {self.teacher_s:.1f} s through {self.path})")


@torch.no_grad()
def teacher_pass(module: nn.Module, dataset: Dataset, indices: np.ndarray, store: TeacherMaps, teacher_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, workers: int,
                 allowed: str = "auto", keep: Dataset | None = None, timer: TimeShares | None = None) -> PassReport:
    """Run the frozen teacher once over images ``indices`` and store its maps; keep their decoded pixels too.

    Args:
        module: the teacher as a :class:`SpatialOutput`, eval mode, on ``device``.
        dataset: the training images (uint8 squares at the student's working size; their ``base`` decodes files).
        indices: the images to run on (those whose map is missing, this process's share under torchrun).
        store: where the maps go.
        teacher_size: the teacher's input side.
        mean, std: the teacher's normalisation.
        device: where the teacher runs.
        workers: DataLoader processes decoding the files.
        allowed: the inference paths to choose from (``distill.teacher_runtime``).
        keep: the kept decoded images (:class:`~unsupdistill.data.decoded.DecodedImages`) to fill, or None.
        timer: the run's :class:`~unsupdistill.train.timing.TimeShares`, or None.
    """
    tic = time.perf_counter()
    base = getattr(dataset, "base", dataset)
    decode = pass_decode_size(base, teacher_size)
    source = copy.copy(base)
    source.image_size = decode  # the same files, decoded once at the pass's size
    loader = DataLoader(IndexedDataset(Subset(source, indices.tolist())), batch_size=PASS_BATCH, num_workers=workers,
                        persistent_workers=False)
    working = int(base.image_size)
    path: InferencePath | None = None
    decode_s = teacher_s = 0.0
    failed = 0
    waited = time.perf_counter()
    for items, rows in tqdm(loader, desc=f"teacher pass ({teacher_size} px)", unit="batch"):
        decode_s += time.perf_counter() - waited
        images, bad = items if isinstance(items, (list, tuple)) else (items, torch.full((len(rows),), -1))
        ids = torch.as_tensor(indices)[rows]
        x = normalize(images.to(device), teacher_size, mean, std)  # (B, 3, T, T)
        t0 = time.perf_counter()
        if path is None:  # the fastest path that keeps the outputs, timed on the first real batch
            sample = x[:CHOICE_IMAGES]  # the eager network's time on the images the choice is made on
            eager_s = time.perf_counter()
            module(sample)
            eager_s = (time.perf_counter() - eager_s) * len(indices) / len(sample)
            if allowed == "auto" and eager_s < SEARCH_PAYS_S:  # a small pass: trying the others costs more
                allowed = "eager fp32"
            path = fastest_path(module, sample, device, allowed)
        maps = path.run(x)  # (B, h, w, C)
        teacher_s += time.perf_counter() - t0
        store.store(ids, maps)
        if keep is not None and hasattr(keep, "put"):
            ok = bad < 0  # a substituted file's pixels are another image's: not kept under its index
            if ok.any():
                keep.put(ids[ok], resize_uint8(images[ok], working))
        failed += int((bad >= 0).sum())
        waited = time.perf_counter()
    store.flush()
    if keep is not None and hasattr(keep, "flush"):
        keep.flush()
    if timer is not None:
        timer.add("decode", decode_s)
        timer.add("teacher", teacher_s)
    if failed:
        logger.warning("teacher pass: %d files failed after the start-up scan; the next readable image's map stands "
                       "in for each (they are listed in skipped.txt when training meets them)", failed)
    return PassReport(len(indices), time.perf_counter() - tic, decode_s, teacher_s, path.name if path else "none")


# ---- the plan for a time budget -------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetPlan:
    """How a time budget is split: the teacher's pass at one input size, the student's epochs after it.

    Attributes:
        budget_s: the run's ``train.time_budget_s``.
        images: images in the folder.
        teacher_size: the teacher's input side chosen.
        teacher_s: the pass's forecast seconds at that size.
        student_size: the student's input side.
        student_epochs: epochs the rest of the budget allows at the student's measured rate.
        why: the reason for the teacher's size.
    """

    budget_s: float
    images: int
    teacher_size: int
    teacher_s: float
    student_size: int
    student_epochs: float
    why: str

    def line(self) -> str:
        return (f"teacher: {self.images:,} images at {self.teacher_size} px, ~{self.teacher_s / 60:.1f} min; "
                f"student: ~{self.student_epochs:.0f} epochs at {self.student_size} px")


def plan_budget(budget_s: float, images: int, sizes: list[int], teacher_rate: float, rate_size: int,
                decode_rate: float, student_rate: float, student_size: int,
                share: float = TEACHER_SHARE) -> BudgetPlan:
    """The largest teacher input of ``sizes`` whose pass fits ``share`` of the budget, and the student's epochs.

    The pass's seconds per image are the decoding's (one process, ``decode_rate`` images/s: on a machine of few
    cores the decoding workers and the teacher share them) plus the teacher's, scaled from its rate measured at
    ``rate_size`` by the pixel count. The student trains at ``student_rate`` images/s (its measured step) over
    what is left.

    Args:
        budget_s: the time budget in seconds.
        images: images to pass over and train on.
        sizes: candidate teacher input sides, largest (its own) first.
        teacher_rate: the teacher's images/s at ``rate_size``, through its inference path.
        rate_size: the side it was measured at.
        decode_rate: images/s of decoding a file at the pass's size, in one process.
        student_rate: the student's training images/s.
        student_size: its input side.
        share: most of the budget the pass may take.
    """
    def pass_seconds(size: int) -> float:
        return images * (1 / decode_rate + (size / rate_size) ** 2 / teacher_rate)

    chosen = next((s for s in sizes if pass_seconds(s) <= share * budget_s), sizes[-1])
    seconds = pass_seconds(chosen)
    if chosen == sizes[0]:
        why = f"the teacher's own size: its pass fits {share:.0%} of the {budget_s:g} s budget"
    elif pass_seconds(chosen) <= share * budget_s:
        why = (f"the largest size whose pass fits {share:.0%} of the {budget_s:g} s budget (at {sizes[0]} px it would "
               f"take ~{pass_seconds(sizes[0]):.0f} s)")
    else:
        why = (f"the smallest size tried; even so its pass takes ~{seconds:.0f} s, more than {share:.0%} of the "
               f"{budget_s:g} s budget")
    epochs = max(0.0, budget_s - seconds) * student_rate / max(images, 1)
    return BudgetPlan(budget_s, images, chosen, seconds, student_size, epochs, why)


def teacher_sizes(own: int, least: int = LEAST_TEACHER_SIZE) -> list[int]:
    """The teacher's own size, then multiples of :data:`SIZE_STEP` below it down to ``least``."""
    below = range(math.floor((own - 1) / SIZE_STEP) * SIZE_STEP, least - 1, -SIZE_STEP)
    return [own, *[s for s in below if s >= least]]


@dataclass(frozen=True)
class Rates:
    """Rates measured for a plan: the teacher's (through its fastest path), decoding's and the student's step."""

    teacher: float
    teacher_size: int
    path: InferencePath
    decode: float
    student: float


def measure_rates(teacher_module: nn.Module, teacher_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                  paths: tuple[str, ...], decode_size: int, student: nn.Module, student_size: int,
                  autocast_dtype: torch.dtype | None, device: torch.device, allowed: str = "auto") -> Rates:
    """Time decoding ``paths`` at ``decode_size`` (one process), the teacher on those images through its fastest
    path (:func:`fastest_path`, checked against eager fp32 on them), and two training steps of ``student``
    (pooled features regressed onto random targets) on a batch of 64 at ``student_size`` under the run's autocast.
    ``student`` is trained in place: pass a throw-away copy."""
    tic = time.perf_counter()
    images = torch.stack([resize_center_crop(load_rgb(p, draft_size=decode_size), decode_size) for p in paths])
    decode = len(paths) / (time.perf_counter() - tic)
    x = normalize(images.to(device), teacher_size, mean, std)
    path = fastest_path(teacher_module, x, device, allowed)
    student = student.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch = torch.randn(64, 3, student_size, student_size, device=device).contiguous(memory_format=torch.channels_last)
    seconds = []
    for _ in range(3):  # the first warms the kernels up
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = student(batch)
        loss = out.float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return Rates(path.images_per_s, teacher_size, path, decode, 64 / statistics.mean(seconds[1:]))
