"""Image plumbing shared by the pictures: loading and normalising inputs, uint8 conversion, nearest
upsampling, tinting, bordered cells and PNG writing.

Pictures are uint8 numpy arrays ``(H, W, 3)``; network inputs are float tensors ``(B, 3, S, S)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from unsupdistill.data import load_rgb, resize_center_crop
from unsupdistill.storage import atomic_write


class PictureDoesNotFit(ValueError):
    """The model cannot give this picture (a CNN has no class-token attention; a pooled-only network has no
    spatial grid): the reason is the message, and the model is fine."""

Colour = tuple[int, int, int]


def load_pixels(paths: Sequence[str | Path], size: int) -> Tensor:
    """Images decoded as in training: RGB, shorter side resized to ``size``, centre-cropped.

    Returns:
        float pixels (N, 3, size, size) in [0, 1].
    """
    if not paths:
        raise ValueError("no images given: pass at least one image file")
    return torch.stack([resize_center_crop(load_rgb(path, draft_size=size), size) for path in paths]).float() / 255


def normalise(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Network input (B, 3, H, W) from pixels in [0, 1] (B, 3, H, W) and the model's per-channel mean and std."""
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def to_uint8(pixels: Tensor) -> np.ndarray:
    """Pictures (B, H, W, 3) uint8 of pixels (B, 3, H, W): uint8 as they are, floats in [0, 1] scaled by 255."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
    x = pixels.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # (B, H, W, 3)


def upsample_nearest(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a map (h, w, ...) to (height, width, ...); any sizes, not only multiples."""
    rows = np.arange(height) * grid.shape[0] // height  # (height,) source row of each output row
    columns = np.arange(width) * grid.shape[1] // width  # (width,)
    return grid[rows[:, None], columns[None, :]]


def tint(image: np.ndarray, mask: np.ndarray, colour: Colour = (255, 40, 0), alpha: float = 0.6) -> np.ndarray:
    """``image`` (H, W, 3) uint8 blended with ``colour`` where ``mask`` (h, w) is on, unchanged elsewhere.

    The mask is upsampled (nearest) to the image size: a patch of the grid covers its square of pixels.
    """
    on = upsample_nearest(np.asarray(mask, dtype=bool), image.shape[0], image.shape[1])  # (H, W)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * np.asarray(colour, dtype=np.float32)
    return np.where(on[..., None], np.rint(blended).astype(np.uint8), image)


def framed(image: np.ndarray, border: int, colour: Colour) -> np.ndarray:
    """``image`` (H, W, 3) inside a ``border``-pixel frame: (H + 2 border, W + 2 border, 3)."""
    out = np.empty((image.shape[0] + 2 * border, image.shape[1] + 2 * border, 3), dtype=np.uint8)
    out[:] = colour
    out[border:border + image.shape[0], border:border + image.shape[1]] = image
    return out


def join(images: Sequence[np.ndarray], axis: int = 1, gap: int = 0, colour: Colour = (255, 255, 255)) -> np.ndarray:
    """Pictures side by side (``axis=1``, equal heights) or stacked (``axis=0``, equal widths), ``gap`` pixels
    of ``colour`` between them."""
    if gap == 0 or len(images) == 1:
        return np.concatenate(list(images), axis=axis)
    shape = list(images[0].shape)
    shape[axis] = gap
    spacer = np.empty(shape, dtype=np.uint8)
    spacer[:] = colour
    parts = [part for image in images for part in (image, spacer)][:-1]
    return np.concatenate(parts, axis=axis)


def save_png(image: np.ndarray, path: str | Path, palette: bool = False) -> Path:
    """Write a picture (H, W, 3) uint8 as a PNG, atomically; returns the path.

    With ``palette``, it is written as a palette PNG of at most 256 colours (a third of the bytes of a spectrogram
    picture's RGB): pixel for pixel the same where the picture has no more colours, else reduced to 256 by Pillow's
    median cut (the grey edges of a caption's letters, a few levels apart).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 picture (H, W, 3), got {image.dtype} {image.shape}")
    picture = Image.fromarray(image)
    if palette:
        packed = image.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)  # (H, W): np.unique of
        colours, index = np.unique(packed, return_inverse=True)  # integers, 50x faster than of rows (axis=0)
        if len(colours) <= 256:
            picture = Image.fromarray(index.reshape(image.shape[:2]).astype(np.uint8), mode="P")
            picture.putpalette(np.stack([colours >> 16, colours >> 8 & 255, colours & 255], axis=1).flatten().tolist())
        else:
            picture = picture.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path = Path(path)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path
