"""The identity of a dataset's images (and labels): what a cache of anything computed from them is keyed by."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch


def data_fingerprint(dataset: Any) -> str:
    """sha256 hex identity of a labeled dataset's images and labels.

    A dataset of files (with ``paths``) is identified by every path with its size, modification time
    (ns) and label, so editing, replacing or touching a file changes it; an in-memory dataset (the
    digits) by its class name, length, labels and, when present, its source pixels (``gray``).
    The image size (``image_size``) is part of both.
    """
    dataset = getattr(dataset, "base", dataset)  # images kept decoded (data/decoded.py): their source
    digest = hashlib.sha256()
    digest.update(f"{type(dataset).__name__}|{len(dataset)}|{getattr(dataset, 'image_size', None)}\n".encode())
    labels = getattr(dataset, "labels", None)
    paths = getattr(dataset, "paths", None)
    paths = getattr(dataset, "files", None) if paths is None else paths  # an unlabeled ImageFolderDataset
    if paths is not None:
        label_list = labels.tolist() if labels is not None else [None] * len(paths)
        for path, label in zip(paths, label_list, strict=True):
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
        return digest.hexdigest()
    for name in ("labels", "gray"):  # gray: the digits' source pixels, cheap to hash (1,797 x 8 x 8)
        tensor = getattr(dataset, name, None)
        if isinstance(tensor, torch.Tensor):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
