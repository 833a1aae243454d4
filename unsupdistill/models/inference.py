"""The fastest way to run a frozen network on this machine that keeps its outputs.

A distillation teacher or a backbone under evaluation only runs forward, often for hours, and how it runs decides
its speed more than anything else. On the 2-core AMD EPYC VM (AVX-512 BF16), EfficientNet-Lite0 at 224 px, batch
64, ran at (images/s): eager fp32 26, bf16 autocast NCHW 35, channels-last fp32 45, traced + frozen fp32 68,
channels-last bf16 106, ONNX Runtime fp32 123; at 160 px channels-last bf16 ran at 285 and ONNX Runtime at 240.
The winner depends on the network, the input size and the CPU, so :func:`fastest_path` builds every candidate,
checks its outputs against the eager fp32 network's on the caller's batch, times it on that batch, and returns
the fastest one that keeps the outputs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from unsupdistill.devices import cpu_has_native_bf16

logger = logging.getLogger(__name__)

Run = Callable[[Tensor], Tensor]
"""A way to run the network: (B, 3, S, S) normalised float input -> its output (B, ...)."""

REFERENCE = "eager fp32"
"""The module as given: the path every other one is checked against, and the choice where no allowed one keeps
the outputs."""
ONNX_OPSET = 18
"""The opset of the ONNX Runtime path's graph, that of ``unsupdistill export``'s (not imported from there: that
module's imports take seconds)."""
CHOICE_IMAGES = 16
"""Images of a caller's first batch the paths are timed and checked on (a whole batch of 224-px photos would make
the choice cost as much as a few hundred images' features)."""
TIMING_SECONDS = 0.2
"""Each path is timed over repeated runs on the example until this long (at least one run)."""


@dataclass
class InferencePath:
    """How to run a frozen network, as :func:`fastest_path` chose it.

    Attributes:
        name: e.g. ``"eager fp32"``, ``"channels-last bf16"``, ``"traced fp32"``, ``"onnxruntime fp32"``.
        run: (B, 3, S, S) normalised float input, any B -> the output as float32, on the input's device.
        images_per_s: measured during the choice, on its example batch.
        cosine: worst per-image cosine against eager fp32 on the example batch (1.0 for eager fp32).
        report: one line naming every candidate's images/s and cosine, and why each refused one was refused.
    """

    name: str
    run: Run
    images_per_s: float
    cosine: float
    report: str


@dataclass
class FrozenNetwork:
    """What a path is built from: the module (eval mode, frozen), the example batch and the device."""

    module: nn.Module
    example: Tensor
    device: torch.device

    @functools.cached_property
    def channels_last(self) -> nn.Module:
        """The module with its 4-D weights in channels-last layout, shared by the channels-last paths: the module
        itself when they already are, else a copy (``nn.Module.to`` would change the caller's module)."""
        weights = [p for p in self.module.parameters() if p.dim() == 4]
        if all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
            return self.module
        return copy.deepcopy(self.module).to(memory_format=torch.channels_last)


PathBuilder = Callable[[FrozenNetwork], Run]
"""Builds one candidate path; raises (any exception, its message the reason) where it cannot be built here."""


def channels_last_input(x: Tensor) -> Tensor:
    """``x`` (B, 3, S, S) in channels-last layout, the one oneDNN's and cuDNN's convolutions prefer."""
    return x.contiguous(memory_format=torch.channels_last)


def traced_for_cpu(module: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """``module`` traced on ``example`` in channels-last layout, frozen and optimised for CPU inference.

    ``torch.jit.optimize_for_inference`` folds BatchNorm into the convolutions, fuses their activations and keeps
    the weights pre-packed in oneDNN's layout: 1.3-1.6x the images/s of the eager network for a ResNet at 32 px on
    2 cores (BENCHMARKS.md, "Feature extraction"). Nothing checks the output here: :func:`fastest_path` does.

    Raises:
        RuntimeError, TypeError, ValueError, torch.jit.Error: what the tracer raises on a module it cannot trace.
    """
    with warnings.catch_warnings():  # TorchScript's deprecation and tracer notices
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, channels_last_input(example), check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _eager(net: FrozenNetwork) -> Run:
    return net.module


def _channels_last(net: FrozenNetwork) -> Run:
    module = net.channels_last
    return lambda x: module(channels_last_input(x))


def _autocast(dtype: torch.dtype) -> PathBuilder:
    """Autocast to ``dtype`` over the channels-last module, where the device computes in ``dtype`` natively."""

    def build(net: FrozenNetwork) -> Run:
        if net.device.type == "cpu" and not cpu_has_native_bf16():
            raise RuntimeError("no native bf16 on this CPU (AVX-512 BF16 or AMX): oneDNN would emulate it")
        if net.device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU has no bf16")
        module = net.channels_last

        def run(x: Tensor) -> Tensor:
            with torch.autocast(net.device.type, dtype=dtype):
                return module(channels_last_input(x))

        return run

    return build


def _traced(net: FrozenNetwork) -> Run:
    traced = traced_for_cpu(net.module, net.example)
    return lambda x: traced(channels_last_input(x))


def _onnxruntime(net: FrozenNetwork) -> Run:
    """The module exported to ONNX with a dynamic batch axis and run by ONNX Runtime's CPU provider on as many threads
    as torch. The TorchScript-based exporter first: it exported EfficientNet-Lite0 (224 px) in 2-4.5 s on 2 AVX2
    cores (2026-12-07), the torch.export-based one ``unsupdistill export`` uses in 22-25 s, and ONNX Runtime ran the
    former's graph at least as fast; the latter where the former fails (or is gone from torch)."""
    import onnxruntime  # imported here: only this path needs it

    # the exporters specialise a batch of 1 (a size-1 axis is a constant): export a batch of 2
    batch = (net.example[:2] if len(net.example) > 1 else net.example.expand(2, *net.example.shape[1:])).contiguous()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        path = str(Path(tmp) / "network.onnx")
        try:
            torch.onnx.export(net.module, (batch,), path, opset_version=ONNX_OPSET, dynamo=False,
                              input_names=["images"], dynamic_axes={"images": {0: "batch"}})
        except Exception as err:  # an op the TorchScript exporter lacks, or the exporter removed
            logger.debug("onnxruntime fp32: the TorchScript-based ONNX export failed (%s); trying torch.export", err)
            torch.onnx.export(net.module, (batch,), path, opset_version=ONNX_OPSET, dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().float().contiguous().cpu().numpy()})[0])


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Loggers ``names`` at WARNING for the block: the ONNX optimiser logs a dozen INFO lines per export."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [one.level for one in loggers]
    for one in loggers:
        one.setLevel(max(one.level, logging.WARNING))
    try:
        yield
    finally:
        for one, level in zip(loggers, levels):
            one.setLevel(level)


PATHS: dict[str, dict[str, PathBuilder]] = {
    "cpu": {REFERENCE: _eager, "channels-last fp32": _channels_last, "channels-last bf16": _autocast(torch.bfloat16),
            "traced fp32": _traced, "onnxruntime fp32": _onnxruntime},
    "cuda": {REFERENCE: _eager, "channels-last fp32": _channels_last, "channels-last bf16": _autocast(torch.bfloat16),
             "channels-last fp16": _autocast(torch.float16)},
}
"""The candidate paths per device type, in the order they are tried; any other device runs eager fp32 only."""


def path_names() -> list[str]:
    """Every candidate name of any device, as ``allowed`` may give them."""
    return list(dict.fromkeys(name for table in PATHS.values() for name in table))


def worst_cosine(output: Tensor, reference: Tensor) -> float:
    """The smallest per-image cosine similarity of two outputs (B, ...) flattened per image; two all-zero images
    count as equal (1.0), an all-zero image against another as 0.0."""
    a, b = output.reshape(len(output), -1).double(), reference.reshape(len(reference), -1).double()
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    cosine = (a * b).sum(dim=1) / (norm_a * norm_b).clamp(min=torch.finfo(torch.float64).tiny)
    return float(torch.where((norm_a == 0) & (norm_b == 0), torch.ones_like(cosine), cosine).min())


def _refusal(output: Tensor, reference: Tensor, min_cosine: float) -> tuple[float, str | None]:
    """(worst cosine, why ``output`` does not keep ``reference``, or None where it does)."""
    if not isinstance(output, Tensor) or output.shape != reference.shape:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        return math.nan, f"output {shape}, not {tuple(reference.shape)}"
    if not torch.isfinite(output).all():
        return math.nan, "non-finite output"
    cosine = worst_cosine(output, reference)
    if not cosine >= min_cosine:
        return cosine, f"cosine {cosine:.4f} < {min_cosine:g}"
    return cosine, None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(run: Run, example: Tensor, device: torch.device, seconds: float) -> float:
    """Images/s of ``run`` on ``example``, timed over repeated runs until ``seconds`` (at least one run)."""
    runs, elapsed = 0, 0.0
    while runs == 0 or elapsed < seconds:
        _synchronize(device)
        tic = time.perf_counter()
        run(example)
        _synchronize(device)
        elapsed += time.perf_counter() - tic
        runs += 1
    return runs * len(example) / max(elapsed, 1e-9)


def _final(name: str, run: Run, module: nn.Module, trailing: torch.Size) -> Run:
    """``run`` without gradients and returning float32; a path other than eager fp32 that raises or returns the
    wrong shape for a batch (a traced graph that baked in the example's batch size) runs the eager module instead."""
    if name == REFERENCE:
        return torch.no_grad()(lambda x: module(x).float())
    warned = []

    @torch.no_grad()
    def guarded(x: Tensor) -> Tensor:
        try:
            out = run(x)
            if out.shape[:1] == x.shape[:1] and out.shape[1:] == trailing:
                return out.float()
            why = f"output {tuple(out.shape)} for a batch of {len(x)}"
        except Exception as err:  # a graph that cannot take this batch: ORT's errors are not RuntimeErrors
            why = _first_line(err)
        if not warned:
            logger.warning("%s: running the eager network for a batch of %d instead (%s)", name, len(x), why)
            warned.append(True)
        return module(x).float()

    return guarded


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _speed(images_per_s: float) -> str:
    return f"{images_per_s:.1f}" if images_per_s < 100 else f"{images_per_s:.0f}"


def fastest_path(module: nn.Module, example: Tensor, device: torch.device, allowed: Sequence[str] | str = "auto",
                 min_cosine: float = 0.995, seconds: float | None = None) -> InferencePath:
    """The fastest way to run ``module`` on ``device`` whose outputs agree with the eager fp32 module's.

    Each allowed candidate of :data:`PATHS` is built (one that cannot be is skipped, its reason in the report), run
    once on ``example`` (its warm-up, and the output checked), and if it keeps the outputs timed on ``example``.
    It keeps them when its output has the reference's shape, is finite, and every image's flattened output has a
    cosine of at least ``min_cosine`` with the eager fp32 one. Eager fp32 is always run (the reference) and timed.

    Args:
        module: eval mode, frozen; maps a normalised float batch (B, 3, S, S) to one tensor (B, ...). Left as it is.
        example: a batch as the caller will run, e.g. its first one; the choice is made on it.
        device: where ``module`` is; ``example`` is moved there.
        allowed: ``"auto"`` (every candidate), or the candidate names to choose from (one name forces that path
            where it keeps the outputs). Eager fp32 is the choice where no allowed path keeps the outputs.
        min_cosine: the worst per-image cosine a path may have against eager fp32.
        seconds: the time all timings together may take (each path runs at least once); by default
            :data:`TIMING_SECONDS` per path.

    Raises:
        ValueError: ``allowed`` names an unknown path, or none.
    """
    known = path_names()
    names = known if allowed == "auto" else [allowed] if isinstance(allowed, str) else list(allowed)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown inference path {', '.join(map(repr, unknown)) or '(none given)'}; allowed values: "
                         f"auto, or any of {', '.join(known)}")
    device = torch.device(device)
    example = example.to(device)
    table = PATHS.get(device.type, {REFERENCE: _eager})
    tried = [name for name in table if name in names and name != REFERENCE]
    budget = TIMING_SECONDS if seconds is None else seconds / (1 + len(tried))
    net = FrozenNetwork(module, example, device)
    with torch.no_grad():
        reference = module(example)  # also eager fp32's warm-up
        eager = InferencePath(REFERENCE, module, _images_per_s(module, example, device, budget), 1.0, "")
        notes = [f"{REFERENCE} {_speed(eager.images_per_s)} (1.0000{'' if REFERENCE in names else ', not allowed'})"]
        if allowed != "auto":
            notes += [f"{name} skipped (no {device.type} path)" for name in names if name not in table]
        accepted = [eager] if REFERENCE in names else []
        for name in tried:
            try:
                run = table[name](net)
                output = run(example)
            except Exception as err:  # a path that cannot be built or run here is skipped, never a crash
                notes.append(f"{name} skipped ({type(err).__name__}: {_first_line(err)})")
                continue
            cosine, refusal = _refusal(output, reference, min_cosine)
            if refusal is not None:
                notes.append(f"{name} refused ({refusal})")
                continue
            accepted.append(InferencePath(name, run, _images_per_s(run, example, device, budget), cosine, ""))
            notes.append(f"{name} {_speed(accepted[-1].images_per_s)} ({cosine:.4f})")
    if not accepted:
        notes.append("none of the allowed paths kept the outputs")
    chosen = max(accepted or [eager], key=lambda path: path.images_per_s)
    chosen.run = _final(chosen.name, chosen.run, module, reference.shape[1:])
    chosen.report = (f"inference paths on {device.type}, batch {tuple(example.shape)} (images/s, worst cosine vs "
                     f"eager fp32): {'; '.join(notes)}; chose {chosen.name}")
    logger.info("%s", chosen.report)
    return chosen
