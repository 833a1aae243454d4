"""A frozen teacher's spatial feature map of every image, on disk: the teacher runs once per image, not per epoch.

ReLabel (Yun et al., "Re-labeling ImageNet", CVPR 2021) stores a strong network's dense output for every image
once and gives each random crop the output pooled over the region the crop covers (RoIAlign); here the dense
output is the teacher's last feature map (a CNN's, or a ViT's patch tokens on their grid), and a crop's target is
that map averaged over the crop's box (:func:`pool_regions`). Against FKD's stored views (``teacher_cache.py``)
it costs one teacher forward per image instead of one per stored view, and every epoch draws new crops. The maps
are fp16 numpy memory maps in the run directory, keyed by everything they depend on, so a resume reuses them
and another teacher, input size or image set replaces them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from unsupdistill.storage import open_arrays

logger = logging.getLogger(__name__)

MAPS_DIR = "teacher_maps"
"""The store's folder in the run directory."""
MAPS_FORMAT = "unsupdistill.teacher_maps/1"


def maps_bytes(num_images: int, grid: tuple[int, int], channels: int) -> int:
    """Bytes on disk of ``num_images`` fp16 maps of ``grid`` x ``channels``, with a filled flag each."""
    return num_images * (grid[0] * grid[1] * channels * 2 + 1)


def fitting_grid(num_images: int, grid: tuple[int, int], channels: int, max_bytes: float) -> tuple[int, int]:
    """``grid``, or the largest coarser square-ish grid (each side one cell less at a time) whose maps fit in
    ``max_bytes``; (1, 1) (whole-image targets) at the least, which the caller checks fits."""
    h, w = grid
    while (h > 1 or w > 1) and maps_bytes(num_images, (h, w), channels) > max_bytes:
        h, w = max(1, h - 1), max(1, w - 1)
    return h, w


def pool_regions(maps: Tensor, boxes: Tensor) -> Tensor:
    """The mean of each map over a box: a crop's target from the teacher's map of the whole image.

    Bilinear samples of the map, one per cell the box spans in each direction, averaged (``roi_align`` with
    ``aligned=True`` and an adaptive sampling ratio): a box on cell borders gives exactly the mean of the cells
    it covers, the whole image the map's mean.

    Args:
        maps: (B, h, w, C) feature maps, channels last, any float dtype.
        boxes: (B, 4) boxes as (left, top, width, height) shares of the image side (a view's first four
            parameters, :data:`~unsupdistill.augment.distill.VIEW_PARAMS`).

    Returns:
        (B, C) float32.
    """
    b, h, w, _ = maps.shape
    x0, y0 = boxes[:, 0] * w, boxes[:, 1] * h
    x1, y1 = x0 + boxes[:, 2] * w, y0 + boxes[:, 3] * h
    rois = torch.stack([torch.arange(b, dtype=torch.float32, device=maps.device), x0, y0, x1, y1], dim=1)
    pooled = roi_align(maps.permute(0, 3, 1, 2).float(), rois.to(maps.device, torch.float32), output_size=1,
                       spatial_scale=1.0, sampling_ratio=-1, aligned=True)  # (B, C, 1, 1)
    return pooled.flatten(1)


def coarser(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h, w, C) maps average-pooled to ``grid`` (the store's, when the full maps would not fit)."""
    if tuple(maps.shape[1:3]) == tuple(grid):
        return maps
    return F.adaptive_avg_pool2d(maps.permute(0, 3, 1, 2).float(), grid).permute(0, 2, 3, 1)


class TeacherMaps:
    """The teacher's (h, w, C) map of every image, as fp16 memory maps in ``folder``; use :meth:`open`.

    Attributes:
        folder: where the files are.
        grid: (h, w) of the stored maps.
        maps: (N, h, w, C) float16 memory map.
        filled: (N,) uint8 memory map, 1 where an image's map is stored.
    """

    def __init__(self, folder: Path, grid: tuple[int, int], maps: np.memmap, filled: np.memmap) -> None:
        self.folder, self.grid, self.maps, self.filled = folder, grid, maps, filled

    @classmethod
    def open(cls, folder: Path, key: str, num_images: int, grid: tuple[int, int], channels: int) -> TeacherMaps:
        """The store in ``folder`` if it was made under ``key`` with this shape, else an empty one there (process 0
        makes it; the others wait, so every process of a torchrun calls this together)."""
        arrays = open_arrays(folder, key, MAPS_FORMAT, {"maps": ((num_images, *grid, channels), np.float16),
                                                        "filled": ((num_images,), np.uint8)},
                             "made for another teacher, input size or image set", "distill.cache_max_gb")
        maps, filled = arrays["maps"], arrays["filled"]
        return cls(folder, grid, maps, filled)

    def missing(self) -> np.ndarray:
        """Indices of the images whose map is not stored yet."""
        return np.flatnonzero(np.asarray(self.filled) == 0)

    def store(self, indices: Tensor, maps: Tensor) -> None:
        """Keep ``maps`` (B, h, w, C) of images ``indices`` (B,), pooled to the store's grid where coarser."""
        i = indices.cpu().numpy()
        self.maps[i] = coarser(maps, self.grid).to(torch.float16).cpu().numpy()
        self.filled[i] = 1  # after the maps

    def targets(self, indices: Tensor, boxes: Tensor) -> Tensor:
        """The stored maps of images ``indices`` (B,) pooled over ``boxes`` (B, 4): (B, C) float32."""
        maps = torch.from_numpy(np.ascontiguousarray(self.maps[np.sort(indices.numpy())]))
        order = np.argsort(np.argsort(indices.numpy()))  # sorted reads are faster on a memory map
        return pool_regions(maps[torch.from_numpy(order)], boxes)

    def flush(self) -> None:
        for array in (self.maps, self.filled):
            array.flush()

