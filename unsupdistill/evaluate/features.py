"""Batched feature extraction from a frozen backbone."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

logger = logging.getLogger(__name__)


class NormalizedBackbone(nn.Module):
    """A backbone that takes pixel values in [0, 1] and normalises them itself.

    This is the network exports hold (TorchScript and ONNX graphs include the normalisation).

    Args:
        backbone: maps a normalised batch ``(B, 3, S, S)`` to features ``(B, D)``.
        mean: per-channel mean subtracted from the pixel values.
        std: per-channel standard deviation they are divided by.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, 3, S, S) float in [0, 1]. Returns features (B, D)."""
        return self.backbone((x - self.mean) / self.std)


def to_unit_range(images: Tensor, input_size: int) -> Tensor:
    """uint8 (or float in [0, 1]) images ``(B, 3, H, W)`` as float in [0, 1], ``(B, 3, S, S)``.

    Images of another size get their shorter side resized to ``S`` (bilinear, antialiased) and are
    centre-cropped, the policy training and evaluation decode files with.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if x.shape[-2:] != (input_size, input_size):
        x = TF.resize(x, [input_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = TF.center_crop(x, [input_size, input_size])
    return x


def optimized_for_cpu(model: nn.Module, example: Tensor) -> nn.Module | None:
    """``model`` traced and frozen for CPU inference, or None where that fails or changes the output.

    ``torch.jit.optimize_for_inference`` folds BatchNorm into the convolutions, fuses their activations and
    keeps the weights pre-packed in oneDNN's layout: 1.3-1.6x the images/s of the eager network for a ResNet at
    32 px on 2 cores (BENCHMARKS.md, "Feature extraction"). The traced graph is checked against the eager
    output on ``example`` and used only for batches of its size.
    """
    try:
        with warnings.catch_warnings():  # TorchScript's deprecation and tracer notices
            warnings.simplefilter("ignore")
            traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
            expected, got = model(example), traced(example)
    except (RuntimeError, TypeError, ValueError, torch.jit.Error) as err:  # what tracing raises on a model it
        # cannot trace; anything else is a bug and raises
        logger.warning("features: the eager network, slower on CPU: tracing it for CPU inference failed (%s)",
                       str(err).splitlines()[0])
        return None
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(
            expected.abs().max().clamp(min=1.0))):
        logger.warning("features: the eager network, slower on CPU: the traced network's output differs from it")
        return None
    return traced


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    batch_size: int = 256,
    precision: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    num_workers: int = 0,
    optimize: bool = True,
) -> Tensor:
    """Features (N, D) of every image of a dataset of uint8 (3, H, W) tensors, in dataset order.

    Images are resized to ``input_size`` (when they differ) and normalised with ``mean``/``std``;
    ``num_workers`` DataLoader processes decode them (into pinned memory when ``device`` is CUDA).
    On CPU in fp32 with ``optimize`` and 40 batches or more, full batches go through
    :func:`optimized_for_cpu`'s traced network.
    The features are float32 on the CPU whatever the device and precision.
    """
    device = torch.device(device)
    # channels-last: the convolution kernels' preferred layout (as in training)
    model = NormalizedBackbone(backbone, mean, std).eval().to(device, memory_format=torch.channels_last)
    out = []
    autocast = (torch.autocast(device.type, dtype=precision) if precision is not None
                else contextlib.nullcontext())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    # CPU, fp32, at least 40 batches (tracing takes ~4 s on 2 cores, which ~10,000 images win back): the
    # traced network, for full batches
    optimize = optimize and device.type == "cpu" and precision is None and len(dataset) >= 40 * batch_size
    fast, fast_size = None, None
    for images in tqdm(loader, desc="features", unit="batch", disable=not progress):
        x = to_unit_range(images.to(device, non_blocking=True), input_size)  # (B, 3, S, S)
        x = x.contiguous(memory_format=torch.channels_last)
        if optimize and fast_size is None:
            fast, fast_size = optimized_for_cpu(model, x), len(x)
        with autocast:
            out.append((fast if fast is not None and len(x) == fast_size else model)(x).float().cpu())
    return torch.cat(out)
