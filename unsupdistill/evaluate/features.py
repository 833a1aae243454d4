"""Batched feature extraction from a frozen backbone."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm


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
) -> Tensor:
    """Features (N, D) of every image of a dataset of uint8 (3, H, W) tensors, in dataset order.

    Images are resized to ``input_size`` (when they differ) and normalised with ``mean``/``std``;
    ``num_workers`` DataLoader processes decode them (into pinned memory when ``device`` is CUDA).
    The features are float32 on the CPU whatever the device and precision.
    """
    device = torch.device(device)
    # channels-last: the convolution kernels' preferred layout (as in training)
    model = NormalizedBackbone(backbone, mean, std).eval().to(device, memory_format=torch.channels_last)
    out = []
    autocast = (torch.autocast(device.type, dtype=precision) if precision is not None
                else contextlib.nullcontext())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    for images in tqdm(loader, desc="features", unit="batch", disable=not progress):
        x = to_unit_range(images.to(device, non_blocking=True), input_size)  # (B, 3, S, S)
        with autocast:
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out)
