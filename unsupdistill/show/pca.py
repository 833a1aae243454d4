"""PCA of patch features as colours (DINOv2, Oquab et al. 2023, Fig. 1).

A PCA fitted on the patch features of a set of images: its first component separates foreground from
background; a second PCA on the foreground patches maps its first three components to red, green and
blue, min-max scaled per component, with the background black. Works for any backbone with spatial
features: a CNN's feature-map cells or a ViT's patch tokens (``pooled_and_spatial``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from unsupdistill.models.backbone import pooled_and_spatial
from unsupdistill.models.frozen import FeatureModel
from unsupdistill.show.canvas import PictureDoesNotFit, join, normalise, to_uint8, upsample_nearest

NEGLIGIBLE_VARIANCE = 1e-9
"""A foreground component whose variance is below this share of all patches' total variance is constant (rounding
noise): it gets mid-grey instead of noise stretched to 0..255."""


@torch.no_grad()
def spatial_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's spatial features (B, h, w, C) of a normalised batch (B, 3, H, W).

    Raises:
        PictureDoesNotFit: the backbone has no spatial grid (neither a feature map nor patch tokens).
    """
    _, grid = pooled_and_spatial(backbone, x)
    if grid is None:
        raise PictureDoesNotFit(f"'{type(backbone).__name__}' gives no spatial features (no feature map, or tokens "
                                "that do not fill its patch grid), so there is nothing to colour; use a CNN or a ViT "
                                "backbone")
    return grid


def principal_components(points: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact PCA by eigendecomposition of the covariance (deterministic, unlike ``torch.pca_lowrank``).

    Args:
        points: samples (M, C).
        count: number of components, at most C.

    Returns:
        ``(mean (C,), components (count, C), variances (count,))``, by decreasing variance, in float64.
    """
    x = points.double()
    mean = x.mean(dim=0)
    centred = x - mean  # (M, C)
    variances, vectors = torch.linalg.eigh(centred.T @ centred / max(len(x) - 1, 1))  # (C,), (C, C) ascending
    return mean, vectors.flip(1)[:, :count].T, variances.flip(0)[:count].clamp_min(0)


def foreground_mask(features: Tensor, threshold: float | None = None) -> Tensor:
    """The patches on the foreground side of the first principal component of all patch features.

    The component's sign is chosen so that the larger side is background. Without ``threshold`` the split is
    at the features' mean (projection 0); with it, the projection is min-max scaled to [0, 1] and patches
    above ``threshold`` are foreground.

    Args:
        features: patch features (N, h, w, C) of a set of images.
        threshold: in [0, 1], or None to split at the mean.

    Returns:
        A boolean mask (N, h, w).
    """
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold} is invalid; allowed values: None (split at the mean) or [0, 1]")
    flat = features.reshape(-1, features.shape[-1])  # (N*h*w, C)
    mean, axis, _ = principal_components(flat, 1)
    score = (flat.double() - mean) @ axis[0]  # (N*h*w,)
    if (score > 0).sum() > (score < 0).sum():
        score = -score  # the larger part is background
    if threshold is None:
        return (score > 0).reshape(features.shape[:-1])
    low, high = score.min(), score.max()
    scaled = (score - low) / (high - low) if high > low else torch.zeros_like(score)
    return (scaled > threshold).reshape(features.shape[:-1])


def pca_colours(features: Tensor, threshold: float | None = None) -> np.ndarray:
    """DINOv2's picture of patch features: foreground patches coloured by the first three components of a
    PCA fitted on them, each min-max scaled to 0..255 (red, green, blue); background black.

    Args:
        features: patch features (N, h, w, C) of a set of images (one PCA for all of them).
        threshold: the foreground threshold of :func:`foreground_mask`.

    Returns:
        Colours (N, h, w, 3) uint8.
    """
    foreground = foreground_mask(features, threshold).reshape(-1)  # (N*h*w,)
    flat = features.reshape(-1, features.shape[-1])  # (N*h*w, C)
    colours = torch.zeros(len(flat), 3, dtype=torch.float64)
    picked = flat[foreground]  # (F, C)
    if len(picked) > 0:
        mean, components, variances = principal_components(picked, min(3, flat.shape[1]))
        projection = (picked.double() - mean) @ components.T  # (F, n)
        low, high = projection.min(dim=0).values, projection.max(dim=0).values
        varies = variances > NEGLIGIBLE_VARIANCE * flat.double().var(dim=0).sum()  # against all patches' variance
        scaled = torch.where(varies, (projection - low) / (high - low).clamp_min(1e-30), torch.full_like(low, 0.5))
        colours[foreground, :scaled.shape[1]] = scaled
    pixels = (colours * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.reshape(*features.shape[:-1], 3).numpy()  # (N, h, w, 3)


def pca_picture(image: np.ndarray, colours: np.ndarray, gap: int = 2) -> np.ndarray:
    """The image and its PCA colours upsampled (nearest) to its size, side by side: (H, 2 W + gap, 3) uint8.

    Args:
        image: the picture (H, W, 3) uint8.
        colours: its patch colours (h, w, 3) from :func:`pca_colours`.
        gap: white pixels between the two.
    """
    return join([image, upsample_nearest(colours, image.shape[0], image.shape[1])], axis=1, gap=gap)


def show_pca(model: FeatureModel, pixels: Tensor, threshold: float | None = None) -> np.ndarray:
    """The PCA picture of a set of images (one PCA for all), one row per image.

    Args:
        model: a loaded backbone with spatial features (``unsupdistill.models.load.load_model``).
        pixels: images (B, 3, S, S) in [0, 1] at the model's input size (``canvas.load_pixels``).
        threshold: the foreground threshold of :func:`foreground_mask`.

    Returns:
        The rows of :func:`pca_picture` stacked with 2-pixel gaps, uint8 (rows, columns, 3).
    """
    features = spatial_features(model.backbone, normalise(pixels, model.mean, model.std))  # (B, h, w, C)
    colours = pca_colours(features.cpu(), threshold)  # (B, h, w, 3)
    return join([pca_picture(image, grid) for image, grid in zip(to_uint8(pixels), colours)], axis=0, gap=2)
