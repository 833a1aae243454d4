"""Inference speed of a frozen feature extractor: the reason to distill, measured.

A distilled student is worth its accuracy gap only if it is cheaper to run than its teacher. This module
measures what a deployed backbone costs, each model at its own input size, on the same device, batch size
and precision: throughput, single-image latency, parameter count and forward FLOPs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from unsupdistill.models.backbone import forward_gflops, input_channels
from unsupdistill.models.frozen import FeatureModel, hears_as_picture

PRECISIONS = ("fp32", "bf16")
WARMUP_BATCHES = 2
"""Untimed forward passes before each timing: CUDA's lazy initialisation and cuDNN's algorithm choice, oneDNN's
kernel creation for a new input shape."""
MIN_TIMED_BATCHES = 3
"""Timed passes made whatever the time limit, so a median exists for a slow network."""
SPEED_COLUMNS = ("images/s", "latency ms", "params M", "GFLOPs")
"""The columns :func:`speed_cells` gives, in table order."""


def measure_speed(model: FeatureModel, device: str | torch.device = "cpu", batch_size: int = 64,
                  precision: str = "fp32", seconds: float = 2.0) -> dict | None:
    """Throughput, latency, size and FLOPs of a frozen feature extractor at its own input size.

    The eager PyTorch network (no tracing, no compilation) runs on random normalised images (standard normal
    pixels) in channels-last layout under ``torch.inference_mode``; every timed pass waits for the device to
    finish (CUDA is synchronised). Each of the two timings makes :data:`WARMUP_BATCHES` untimed passes, then
    timed passes until ``seconds`` have gone by (at least :data:`MIN_TIMED_BATCHES`), and keeps the median.
    On the CPU the network uses torch's current intra-op threads (``torch.get_num_threads()``).

    Args:
        model: the feature extractor; its backbone is moved to ``device`` (in place, as feature extraction does).
        device: where the network runs.
        batch_size: images per pass of the throughput timing.
        precision: ``fp32``, or ``bf16`` (``torch.autocast`` on the device).
        seconds: time limit of each timing (throughput, then latency), warm-up excluded.

    Returns:
        ``images_per_s`` (median over batches of ``batch_size``), ``latency_ms`` (median of a batch of 1),
        ``parameters`` (count), ``gflops`` (per image, see :func:`forward_gflops`: a multiply-add is 2 FLOPs),
        ``input_size``, ``batch_size``, ``precision``, ``device`` and ``threads`` (torch's CPU intra-op threads);
        None for raw pixels (``architecture == "pixels"``), which are no network: their cost is the resize
        every model pays.

    Raises:
        ValueError: an unknown precision, or a batch size or time limit below 1 image or 0 s.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    if batch_size < 1 or seconds < 0:
        raise ValueError(f"batch_size must be >= 1 and seconds >= 0, got {batch_size} and {seconds}")
    if model.architecture in ("pixels", "logmel"):
        return None
    device = torch.device(device)
    # channels-last: the convolution kernels' preferred layout, as in feature extraction and training
    backbone = model.backbone.eval().to(device, memory_format=torch.channels_last)
    size = model.input_size
    # (C, H, W) of one input: an image's, or a sound's log-mel image (mel bands x columns; the front end not timed)
    # (an image network hearing sounds, e.g. a distillation's ImageNet teacher, sees them as (3, S, S) pictures)
    sound = model.frontend is not None and not hears_as_picture(backbone)
    shape = (input_channels(backbone), *((model.frontend["n_mels"], size) if sound else (size, size)))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def forward(x: torch.Tensor) -> None:
        with autocast:
            backbone(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        images = torch.randn(batch_size, *shape, device=device).contiguous(memory_format=torch.channels_last)
        batch_s = _median_seconds(forward, images, seconds)
        latency_s = _median_seconds(forward, images[:1], seconds)  # (1, C, H, W)
    return {"images_per_s": batch_size / batch_s, "latency_ms": latency_s * 1e3,
            "parameters": sum(p.numel() for p in backbone.parameters()),
            "gflops": forward_gflops(backbone, shape[1:]), "input_size": size, "batch_size": batch_size,
            "precision": precision, "device": str(device), "threads": torch.get_num_threads()}


def _median_seconds(forward: Callable[[torch.Tensor], None], x: torch.Tensor, seconds: float) -> float:
    """Median wall time of ``forward(x)`` after the warm-up, over the passes that fit in ``seconds``."""
    for _ in range(WARMUP_BATCHES):
        forward(x)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < MIN_TIMED_BATCHES or time.perf_counter() < deadline:
        tic = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def speed_cells(speed: dict | None) -> dict[str, str]:
    """The :data:`SPEED_COLUMNS` of a table row for a :func:`measure_speed` result; none for None."""
    if speed is None:
        return {}
    return {"images/s": f"{speed['images_per_s']:,.0f}", "latency ms": f"{speed['latency_ms']:.2f}",
            "params M": f"{speed['parameters'] / 1e6:.3g}", "GFLOPs": f"{speed['gflops']:.3g}"}


def describe_speed(speed: dict | None) -> str:
    """One line for a report: what was measured, and how."""
    if speed is None:
        return "speed: not measured (raw pixels are no network)"
    count = speed["threads"]
    threads = f", {count} thread{'s' if count != 1 else ''}" if speed["device"] == "cpu" else ""
    return (f"speed at {speed['input_size']} px on {speed['device']}{threads}, {speed['precision']}: "
            f"{speed['images_per_s']:,.0f} images/s (batch {speed['batch_size']}), "
            f"latency {speed['latency_ms']:.2f} ms (batch 1), {speed['parameters']:,} parameters, "
            f"{speed['gflops']:.3g} GFLOPs/image (multiply-add = 2 FLOPs)")


def speed_ratio(model: dict, reference: dict, whose: str = "the teacher's") -> str:
    """How ``model`` compares with ``reference``, e.g. ``"5.3x the teacher's images/s, 0.11x its GFLOPs and
    0.08x its parameters"``: both :func:`measure_speed` results, on the same device, batch and precision.

    Args:
        model: the measured model (a student).
        reference: the model it is compared with (its teacher); a quantity it has none of is left out.
        whose: names the reference in the first quantity (``"its"`` when the sentence already named it).
    """
    parts = [(model[key] / reference[key], label) for key, label in
             (("images_per_s", "images/s"), ("gflops", "GFLOPs"), ("parameters", "parameters")) if reference[key]]
    phrases = [f"{_times(ratio)} {whose if i == 0 else 'its'} {label}" for i, (ratio, label) in enumerate(parts)]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _times(ratio: float) -> str:
    """``5.3x``, ``0.11x``, ``12x``: two significant digits below 10."""
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"
