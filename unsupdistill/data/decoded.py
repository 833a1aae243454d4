"""Images kept decoded after their first decode: later epochs read uint8 pixels instead of decoding files again.

Decoding a 400-px JPEG for a 96-px student costs more than the student's training step on it (issue 33: replay
epochs at 74 images/s against the student's 393); the images decoded at the working size take 3 x S x S bytes each
(49 KB at 128 px, 186 MB for 3,781 photos), so after the first pass they are read from a memory map in the run
directory (shared by DataLoader workers and torchrun processes, kept across a resume) instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from unsupdistill.data.fingerprint import data_fingerprint
from unsupdistill.storage import DiskSpaceError, open_arrays

logger = logging.getLogger(__name__)

DECODED_DIR = "decoded_images"
"""The folder of the kept images in the run directory."""
DECODED_FORMAT = "unsupdistill.decoded_images/1"


def decoded_bytes(num_images: int, image_size: int) -> int:
    """Bytes of ``num_images`` uint8 RGB squares of side ``image_size``, with a filled flag each."""
    return num_images * (3 * image_size * image_size + 1)


class DecodedImages(Dataset):
    """``base``'s images (uint8 (3, S, S)), each kept after its first decode in memory maps in ``folder``.

    Items are what ``base`` returns: an image, or ``(image, failed_index)`` for a base that substitutes files
    that fail after the start-up scan; a substituted image is not kept, so the failing file is tried (and counted)
    again. Every other attribute is ``base``'s. Use :meth:`open`; every process of a run opens the same files.

    Attributes:
        base: the dataset that decodes files.
        folder: where the maps are.
    """

    def __init__(self, base: Dataset, folder: Path, pixels: np.memmap, filled: np.memmap) -> None:
        self.base, self.folder, self.pixels, self.filled = base, folder, pixels, filled

    @classmethod
    def open(cls, base: Dataset, folder: Path, key: str) -> DecodedImages:
        """Reuse the kept images in ``folder`` if they were made under ``key`` (the images' fingerprint and size),
        else start empty there (process 0 makes the files; the others wait)."""
        size = int(base.image_size)
        arrays = open_arrays(folder, key, DECODED_FORMAT, {"pixels": ((len(base), 3, size, size), np.uint8),
                                                           "filled": ((len(base),), np.uint8)},
                             "kept for other images or another size", "data.keep_decoded_max_gb")
        pixels, filled = arrays["pixels"], arrays["filled"]
        return cls(base, folder, pixels, filled)

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:  # the base dataset's files, root, skipped, image_size, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> Tensor | tuple[Tensor, int]:
        if self.filled[index]:
            image = torch.from_numpy(np.array(self.pixels[index]))  # a copy: the map stays read-only to torch
            return (image, -1) if getattr(self.base, "substitute", False) else image
        item = self.base[index]
        image, failed = item if isinstance(item, tuple) else (item, -1)
        if failed < 0:
            self.put(torch.tensor([index]), image[None])
        return item

    def put(self, indices: Tensor, images: Tensor) -> None:
        """Keep ``images`` (B, 3, S, S) uint8 as the decoded images ``indices`` (B,)."""
        i = indices.cpu().numpy()
        self.pixels[i] = images.cpu().numpy()
        self.filled[i] = 1  # after the pixels

    def kept(self) -> int:
        """How many images are kept."""
        return int(np.count_nonzero(self.filled))

    def flush(self) -> None:
        for array in (self.pixels, self.filled):
            array.flush()


def keep_decoded(dataset: Dataset, cfg: Any, run_dir: Path | None) -> Dataset:
    """``dataset`` with its images kept decoded in ``run_dir`` (see :class:`DecodedImages`) where ``cfg`` (the
    data section) allows it: an image folder (the digits are in memory already), a run directory (not a dry run),
    at most ``cfg.keep_decoded_max_gb`` and room on the disk (else a warning); else ``dataset`` itself."""
    if cfg.keep_decoded is False or run_dir is None or getattr(dataset, "image_size", None) is None \
            or not hasattr(dataset, "files"):
        return dataset  # the digits (in memory), sounds (read and resampled in milliseconds), a dry run
    size = int(dataset.image_size)
    need = decoded_bytes(len(dataset), size)
    if need > cfg.keep_decoded_max_gb * 1e9:
        logger.info("decoded images not kept: %d images at %d px would take %.2f GB, more than "
                    "data.keep_decoded_max_gb=%g; every epoch decodes the files", len(dataset), size, need / 1e9,
                    cfg.keep_decoded_max_gb)
        return dataset
    folder = run_dir / DECODED_DIR
    try:
        kept = DecodedImages.open(dataset, folder, data_fingerprint(dataset))
    except DiskSpaceError as err:  # an option: the run goes on without it
        logger.warning("decoded images not kept, every epoch decodes the files: %s", err)
        return dataset
    logger.info("decoded images kept after their first decode: %d images x 3 x %d x %d uint8 = %.2f GB in %s "
                "(%d kept already; limit data.keep_decoded_max_gb=%g)", len(dataset), size, size, need / 1e9, folder,
                kept.kept(), cfg.keep_decoded_max_gb)
    return kept
