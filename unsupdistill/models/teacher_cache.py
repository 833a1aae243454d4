"""A frozen teacher's outputs on stored views, on disk: pay for the teacher once, not every epoch.

FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022) stores, for
every image, the coordinates of its random crops with the teacher's soft outputs, so that later epochs train
the student on those crops without running the teacher. Here each of ``views`` slots per image holds one
view's parameters (the crop box, flip and colour jitter of
:meth:`~unsupdistill.augment.distill.DistillAugmentation.sample`) and the teacher's pooled features for it
(fp16). The files are numpy memory maps in the run directory, written by every process for the images it
trains on, and keyed by a fingerprint of everything the stored outputs depend on: a cache made for another
teacher, view recipe or set of images is never read, it is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unsupdistill.storage import open_arrays

logger = logging.getLogger(__name__)

CACHE_DIR = "teacher_cache"
"""The cache's folder in the run directory."""
CACHE_FORMAT = "unsupdistill.teacher_cache/1"


def cache_key(**parts: object) -> str:
    """sha256 hex of the things stored outputs depend on (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_bytes(num_images: int, views: int, feature_dim: int, num_params: int) -> int:
    """Bytes on disk of a cache of this shape: fp16 features, float32 parameters and a filled flag per slot."""
    return num_images * views * (2 * feature_dim + 4 * num_params + 1)


class TeacherCache:
    """``views`` stored views per image and the teacher's features for each, as memory maps in ``folder``.

    Use :meth:`open`; every process of a run opens the same files and writes only the images it trains on.

    Attributes:
        folder: where the files are.
        key: the fingerprint the stored outputs were made under.
        views: slots per image.
    """

    def __init__(self, folder: Path, key: str, views: int, features: np.memmap, params: np.memmap,
                 filled: np.memmap) -> None:
        self.folder, self.key, self.views = folder, key, views
        self.features, self.params, self.filled = features, params, filled

    @classmethod
    def open(cls, folder: Path, key: str, num_images: int, views: int, feature_dim: int,
             num_params: int) -> TeacherCache:
        """Open the cache in ``folder`` if it was made under ``key`` with this shape, else make an empty one there
        (process 0; the others wait for it, so every process of a torchrun calls this together)."""
        arrays = open_arrays(folder, key, CACHE_FORMAT, {
            "features": ((num_images, views, feature_dim), np.float16),
            "params": ((num_images, views, num_params), np.float32), "filled": ((num_images, views), np.uint8)},
            "made for another teacher, view recipe, image set or size", "distill.cache_max_gb")
        stored = int(np.count_nonzero(arrays["filled"]))
        if stored:
            logger.info("teacher cache %s reused: %d of %d views stored", folder, stored, num_images * views)
        return cls(folder, key, views, arrays["features"], arrays["params"], arrays["filled"])

    def lookup(self, indices: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The stored views ``slots`` (B,) of images ``indices`` (B,).

        Returns:
            params (B, P) float32, features (B, D) float16 and filled (B,) bool: whether each slot holds a view.
        """
        i, s = indices.numpy(), slots.numpy()
        return (torch.from_numpy(np.ascontiguousarray(self.params[i, s])),
                torch.from_numpy(np.ascontiguousarray(self.features[i, s])),
                torch.from_numpy(self.filled[i, s].astype(bool)))

    def store(self, indices: Tensor, slots: Tensor, params: Tensor, features: Tensor) -> None:
        """Keep views ``params`` (B, P) and the teacher's ``features`` (B, D) in ``slots`` (B,) of ``indices`` (B,)."""
        i, s = indices.numpy(), slots.numpy()
        self.params[i, s] = params.float().cpu().numpy()
        self.features[i, s] = features.to(torch.float16).cpu().numpy()
        self.filled[i, s] = 1

    def flush(self) -> None:
        """Write the maps' changed pages to disk (at epoch ends, before another process may read them)."""
        for array in (self.features, self.params, self.filled):
            array.flush()

