"""Multi-crop augmentation (DINO, Caron et al. 2021, Sec. 3.1 and App. D), batched on any device with kornia.

Each view kind runs DINO's torchvision pipeline in the same order: random resized crop, horizontal flip,
colour jitter, grayscale, Gaussian blur, solarization, normalisation. Every sample of a batch draws its own
parameters from torch's global RNG, so ``torch.manual_seed`` makes a run reproducible.
"""

from __future__ import annotations

import dataclasses
import math

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from unsupdistill.config import CropSpec, ViewSpec

REFERENCE_SIZE = 224
"""Crop size that ``CropSpec.blur_sigma`` is expressed in (DINO's 224-px global crops)."""
MIN_BLUR_SIGMA = 0.1
"""Smallest blur sigma in output pixels; below it a Gaussian kernel is the identity."""


def blur_sigma(spec: CropSpec, global_size: int | None = None) -> tuple[float, float]:
    """Return the blur sigma range in output pixels, scaled from the 224-px reference by the global crop's size
    (``spec.size`` when not given): DINO blurs its 96-px local crops with the same sigma in pixels, 0.1-2.0, as
    its 224-px global ones."""
    scale = (global_size or spec.size) / REFERENCE_SIZE
    low, high = (max(s * scale, MIN_BLUR_SIGMA) for s in spec.blur_sigma)
    return low, high


def blur_kernel_size(size: int, sigma_max: float) -> int:
    """Odd kernel side covering +/- 3 sigma, at most the (odd) crop size and at least 3."""
    kernel = 2 * math.ceil(3 * sigma_max) + 1
    largest = size if size % 2 else size - 1
    return max(min(kernel, largest), 3)


def build_view_transform(
    spec: CropSpec, mean: tuple[float, float, float], std: tuple[float, float, float],
    global_size: int | None = None, crop_mode: str = "slice",
) -> nn.Module:
    """Build the kornia pipeline for one kind of view; stages whose probability is 0 are left out.

    Args:
        spec: crop size, scale range and the probabilities and strengths of the photometric ops.
        mean: per-channel mean subtracted at the end.
        std: per-channel standard deviation divided by at the end.
        global_size: the global crop's size, which the blur sigma is scaled by (see :func:`blur_sigma`).
        crop_mode: kornia's ``cropping_mode``: ``slice`` (a resize per image) or ``resample`` (one batched warp).

    Returns:
        A module mapping float images (B, 3, H, W) in [0, 1] to normalised views (B, 3, size, size).
    """
    stages: list[nn.Module] = [
        # Bilinear with half-pixel centres as torchvision's tensor resize (DINO uses PIL bicubic, whose
        # overshoot PIL clamps away); kornia has no antialiasing here, so strong downscaling aliases.
        K.RandomResizedCrop(
            (spec.size, spec.size), scale=spec.scale, ratio=(3 / 4, 4 / 3), resample="bilinear",
            align_corners=False, cropping_mode=crop_mode,
        )
    ]
    if spec.flip_p > 0:
        stages.append(K.RandomHorizontalFlip(p=spec.flip_p))
    if spec.color_jitter_p > 0 and any(spec.color_jitter):
        # ColorJitter uses torchvision's formulas (ColorJiggle does not); one random op order per batch.
        stages.append(K.ColorJitter(*spec.color_jitter, p=spec.color_jitter_p))
    if spec.grayscale_p > 0:
        stages.append(K.RandomGrayscale(p=spec.grayscale_p))
    if spec.blur_p > 0 and spec.size >= 3:  # a 3-px kernel cannot reflect-pad a 1- or 2-px crop
        sigma = blur_sigma(spec, global_size)
        stages.append(K.RandomGaussianBlur(blur_kernel_size(spec.size, sigma[1]), sigma, p=spec.blur_p))
    if spec.solarize_p > 0:
        # thresholds=0.0 is a zero half-width around 0.5: DINO's fixed threshold (PIL's 128 of 255).
        stages.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_p))
    stages.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return nn.Sequential(*stages)


def sized(view: ViewSpec, size: int) -> CropSpec:
    """``view`` as a kind of crop of ``size`` px (a global view at the model's input size)."""
    return CropSpec(size=size, **{f.name: getattr(view, f.name) for f in dataclasses.fields(ViewSpec)})


class MultiCropAugmentation(nn.Module):
    """DINO's multi-crop: two global views that differ in blur and solarization, and N local views.

    Args:
        global_1: the first global view (its size: the model's input).
        global_2: the second global view, of the same size.
        local: the local views.
        num_local_crops: local views per image (0: none).
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.
        crop_mode: kornia's ``cropping_mode`` (see :func:`build_view_transform`).
    """

    def __init__(self, global_1: CropSpec, global_2: CropSpec, local: CropSpec, num_local_crops: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float], crop_mode: str = "slice") -> None:
        super().__init__()
        self.num_local_crops = num_local_crops
        size = global_1.size
        self.global_1 = build_view_transform(global_1, mean, std, size, crop_mode)
        self.global_2 = build_view_transform(global_2, mean, std, size, crop_mode)
        self.local = build_view_transform(local, mean, std, size, crop_mode) if num_local_crops else None

    @property
    def num_views(self) -> int:
        """Views per image: two global plus the local ones."""
        return 2 + self.num_local_crops

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Augment a batch into global and local views, with independent parameters for every view.

        Args:
            images: (B, 3, H, W), uint8 in 0..255 or float in [0, 1], on any device.

        Returns:
            global_views: (2B, 3, G, G), view 1 of all B images, then view 2 in the same order.
            local_views: (N*B, 3, L, L), local view 1 of all B images, then view 2, ...; None when N is 0.
        """
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        global_views = torch.cat([self.global_1(images), self.global_2(images)])  # (2B, 3, G, G)
        if self.local is None:
            return global_views.contiguous(), None
        local_views = self.local(images.repeat(self.num_local_crops, 1, 1, 1))  # (N*B, 3, L, L)
        return global_views.contiguous(), local_views.contiguous()
