"""scikit-learn's bundled handwritten digits: the built-in dataset that needs no download."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``(1797, 8, 8)`` float values 0..16 and ``(1797,)`` labels.

    Read from the CSV file scikit-learn bundles (64 pixel values and the label a row), without importing scikit-learn:
    its import (SciPy's) took 3.5 s of the built-in run's start, and every process of a run under torchrun pays it.
    ``sklearn.datasets.load_digits`` where the file is not where this version keeps it."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    folders = spec.submodule_search_locations if spec else None
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits  # imported lazily: only the built-in run needs it

        digits = load_digits()
        return digits.images, digits.target
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # (1797, 65)
    return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images) as ``(3, S, S)`` uint8 images.

    Pixel values 0..16 become ``round(v * 255 / 16)``, gray is repeated to three channels and the
    8x8 image is resized bilinearly (``align_corners=False``) to ``S x S`` when it is read, so a
    large ``S`` (a 224-px recipe's dry run) costs no memory up front.

    Args:
        image_size: side ``S`` of the returned images.
        indices: which of the 1,797 digits to use, in this order; all by default.
    """

    def __init__(self, image_size: int, indices: Sequence[int] | None = None) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        pixels, labels = _load_digits()
        if indices is not None:
            chosen = np.asarray(indices, dtype=np.int64)
            pixels, labels = pixels[chosen], labels[chosen]
        self.gray = torch.from_numpy(np.rint(pixels * (255.0 / 16.0))).float().unsqueeze(1)  # (N, 1, 8, 8)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.image_size = image_size
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.gray)

    def __getitem__(self, index: int) -> torch.Tensor:
        """The image as a ``uint8`` tensor of shape ``(3, image_size, image_size)``."""
        return self._upscale(self.gray[index : index + 1])[0]

    @property
    def images(self) -> torch.Tensor:
        """All images, ``(N, 3, S, S)`` uint8."""
        return self._upscale(self.gray)

    def _upscale(self, gray: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if size != gray.shape[-1]:
            gray = torch.nn.functional.interpolate(
                gray, size=(size, size), mode="bilinear", align_corners=False,
                antialias=size < gray.shape[-1],  # only matters when shrinking
            )
        return gray.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (n, 3, S, S)


def digits_split() -> tuple[list[int], list[int]]:
    """The fixed train/test split of the digits used by tests and evaluation.

    A stratified split of indices 0..1796: ``sklearn.model_selection.train_test_split(range(1797),
    test_size=0.3, random_state=0, stratify=labels)``, giving 1,257 train and 540 test images.

    Returns:
        Sorted train indices and sorted test indices.
    """
    from sklearn.model_selection import train_test_split

    _, labels = _load_digits()
    train, test = train_test_split(list(range(len(labels))), test_size=0.3, random_state=0, stratify=labels)
    return sorted(train), sorted(test)
