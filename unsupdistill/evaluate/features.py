"""Batched feature extraction from a frozen backbone."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


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
) -> Tensor:
    """Features (N, D) of every image of a dataset of uint8 (3, H, W) tensors, in dataset order.

    Images are resized to ``input_size`` (when they differ) and normalised with ``mean``/``std``.
    """
    backbone = backbone.eval().to(device)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    autocast = (torch.autocast(torch.device(device).type, dtype=precision) if precision is not None
                else contextlib.nullcontext())
    for images in tqdm(DataLoader(dataset, batch_size=batch_size), desc="features", disable=not progress):
        x = images.to(device).float() / 255  # (B, 3, H, W)
        if x.shape[-1] != input_size or x.shape[-2] != input_size:
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        with autocast:
            out.append(backbone((x - mean_t) / std_t).float().cpu())
    return torch.cat(out)
