"""Batched feature extraction from a frozen backbone."""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from unsupdistill.models.frozen import SoundFeatures, hears_as_picture
from unsupdistill.models.inference import CHOICE_IMAGES, REFERENCE, fastest_path

logger = logging.getLogger(__name__)

FP32_PATHS = (REFERENCE, "channels-last fp32", "traced fp32", "onnxruntime fp32")
"""The inference paths an fp32 extraction chooses from: fp32 arithmetic all of them, in another order of summation
(bf16 is the caller's choice: ``precision``, resolved by :func:`~unsupdistill.evaluate.run.extraction_precision`)."""
FP32_MIN_COSINE = 0.9999
"""The worst per-image cosine against the eager network an fp32 path may have: they differ only in rounding
(cosine > 0.99999), so a lower one is a conversion fault."""
CHOICE_PAYS_S = 60.0
"""A CPU fp32 extraction that the eager network would take at least this long for (its first batch's time, times
the batches) runs its other batches through :func:`fastest_path`'s choice: the choice builds a traced and an ONNX
graph and runs each path a few times on :data:`CHOICE_IMAGES` images (about 15 s for EfficientNet-Lite0 at 224 px on
the 2-core VM, where ONNX Runtime then runs at 1.7x the eager network's images/s)."""


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
    frontend: dict | None = None,
) -> Tensor:
    """Features (N, D) of every image of a dataset of uint8 (3, H, W) tensors, in dataset order.

    Images are resized to ``input_size`` (when they differ) and normalised with ``mean``/``std``;
    ``num_workers`` DataLoader processes decode them (into pinned memory when ``device`` is CUDA).
    On CPU in fp32 with ``optimize``, when the eager network would take :data:`CHOICE_PAYS_S` or more, the batches
    after the first run through the fastest of :data:`FP32_PATHS` that keeps the eager network's features (chosen on
    the first batch by :func:`~unsupdistill.models.inference.fastest_path`); ``optimize=False`` runs the eager network
    throughout.
    The features are float32 on the CPU whatever the device and precision.

    With a sound ``frontend`` (:attr:`~unsupdistill.models.frozen.FeatureModel.frontend`) the dataset holds waves
    ``(1, S)`` and the network gets their log-mel (:class:`~unsupdistill.models.frozen.SoundFeatures`); ``input_size``,
    ``mean`` and ``std`` are then unused and ``optimize`` does not apply.
    """
    device = torch.device(device)
    if frontend is not None:
        picture = (input_size, mean, std) if hears_as_picture(backbone) else None  # an image network hearing sounds
        return _sound_features(SoundFeatures(backbone, frontend, picture).eval().to(device), dataset, batch_size,
                               precision, device, progress, num_workers)
    # channels-last: the convolution kernels' preferred layout (as in training)
    model = NormalizedBackbone(backbone, mean, std).eval().to(device, memory_format=torch.channels_last)
    out = []
    autocast = (torch.autocast(device.type, dtype=precision) if precision is not None
                else contextlib.nullcontext())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    choose = optimize and device.type == "cpu" and precision is None
    run = model
    for images in tqdm(loader, desc="features", unit="batch", disable=not progress):
        x = to_unit_range(images.to(device, non_blocking=True), input_size)  # (B, 3, S, S)
        x = x.contiguous(memory_format=torch.channels_last)
        tic = time.perf_counter()
        with autocast:
            out.append(run(x).float().cpu())
        if choose:  # after the first batch: the choice where the eager network would take long enough to pay it
            choose = False
            if (time.perf_counter() - tic) * len(loader) >= CHOICE_PAYS_S:
                run = fastest_path(model, x[:CHOICE_IMAGES], device, allowed=FP32_PATHS,
                                   min_cosine=FP32_MIN_COSINE).run
    return torch.cat(out)


def _sound_features(model: nn.Module, dataset: Dataset, batch_size: int, precision: torch.dtype | None,
                    device: torch.device, progress: bool, num_workers: int) -> Tensor:
    """Features (N, D) of a dataset of waves (1, S) through a :class:`SoundFeatures` network, float32 on the CPU."""
    autocast = (torch.autocast(device.type, dtype=precision) if precision is not None
                else contextlib.nullcontext())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    out = []
    for waves in tqdm(loader, desc="features", unit="batch", disable=not progress):
        with autocast:
            out.append(model(waves.to(device, non_blocking=True)).float().cpu())  # (B, 1, S) -> (B, D)
    return torch.cat(out)
