"""Unlabeled image folders: recursive listing, robust decoding to RGB, skip-and-count of bad files.

An image folder is scanned once at start-up: files that cannot be decoded (empty, truncated,
corrupt, not an image, unreadable, decompression bombs) are skipped and counted, or stop the run
when ``data.strict`` is true.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot be used: empty folder, unreadable images, too few images."""


# Formats Pillow can identify but not decode by itself: the stubs need an external handler
# (BUFR, GRIB, HDF5, WMF off Windows) and the MPEG plugin reads only the frame size.
_UNDECODABLE_FORMATS = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG"})


def _decodable_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format Pillow can open and decode."""
    extensions = Image.registered_extensions()  # first: it loads every plugin into Image.OPEN
    # MPO has no entry of its own in Image.OPEN: the JPEG plugin's factory opens it.
    openable = set(Image.OPEN) | {"MPO"}
    return frozenset(
        ext.lower() for ext, fmt in extensions.items() if fmt in openable and fmt not in _UNDECODABLE_FORMATS
    )


IMAGE_EXTENSIONS: frozenset[str] = _decodable_extensions()
"""File extensions (lower-case, with the dot) of the formats Pillow can decode; matched in any case."""

_COMMON_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MAX_LISTED = 5  # paths named in warnings and errors


# ----------------------------------------------------------------------------------------------
# Listing and decoding files
# ----------------------------------------------------------------------------------------------


def list_image_files(root: str | Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted by their POSIX path relative to ``root``.

    Follows symlinked folders but visits each real folder once (so symlink loops end); ignores
    hidden files and folders (names starting with '.') and files whose extension, in any case,
    is not in :data:`IMAGE_EXTENSIONS`. Symlinks with an image extension that lead nowhere
    (missing target, a loop of links, a target that cannot be looked at) are kept so the scan
    reports them. A subfolder that cannot be listed is logged and ignored. Raises
    :class:`DataError` if ``root`` is missing, not a folder or cannot be listed.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory")
    visited: set[str] = set()
    files: list[Path] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as err:
            if folder == root:
                raise DataError(f"cannot list image folder {root}: {err.strerror or err}") from err
            logger.warning("cannot list folder %s (%s); its images are ignored", folder, err.strerror or err)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                if entry.is_dir():
                    pending.append(path)
                    continue
                # regular files, and symlinks whose target is missing: the scan reports those
                keep = entry.is_file() or (entry.is_symlink() and not path.exists())
            except OSError:  # a symlink loop or a target that cannot be looked at: the scan reports it
                keep = True
            if keep and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(path)
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


@contextlib.contextmanager
def _bomb_warnings_as_errors() -> Iterator[None]:
    """Turn Pillow's DecompressionBombWarning into an exception inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def load_rgb(path: str | Path, verify_only: bool = False, draft_size: int | None = None) -> Image.Image:
    """Open an image as RGB: EXIF orientation applied, first frame of animations, alpha dropped.

    Grayscale, palette (with or without transparency), alpha, CMYK, 16-bit ('I;16*', 'I') and
    float ('F') images are converted; 16-bit values 0..65535 are scaled to 0..255, not clipped.
    Decompression bombs (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels) raise
    ``Image.DecompressionBombError``; undecodable files raise Pillow's or the OS's exception.

    Args:
        path: the image file.
        verify_only: only read the header and check the format and pixel count; the returned
            image is closed and not decoded (only ``size``, ``mode`` and ``format`` are valid).
        draft_size: if set, JPEGs may be decoded at a reduced scale (DCT scaling) as long as both
            sides stay at least this many pixels; much faster for large photos.
    """
    with _bomb_warnings_as_errors():
        return _read_image(Path(path), verify_only, draft_size)


def _read_image(path: Path, verify_only: bool, draft_size: int | None) -> Image.Image:
    """``load_rgb`` without the warning filter, which is process-wide and so not thread-safe."""
    with Image.open(path) as img:
        if img.format in _UNDECODABLE_FORMATS:
            raise OSError(f"Pillow cannot decode {img.format} files")
        width, height = img.size
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; reject it here for certain.
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(
                f"image size ({width * height} pixels) exceeds limit of {Image.MAX_IMAGE_PIXELS} pixels"
            )
        if verify_only:
            return img
        if draft_size is not None:
            img.draft(None, (draft_size, draft_size))
        upright = ImageOps.exif_transpose(img)  # a loaded copy of the first frame
    return _to_rgb(upright)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling high-bit-depth values instead of clipping."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        return Image.fromarray(_scale_to_uint8(values, img.mode), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when such a palette goes straight to RGB
    return img.convert("RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit, 32-bit integer or float pixel values to 0..255.

    16-bit values (and 'I' values within 0..65535) are divided by 257 so 65535 -> 255; floats
    within 0..1 are multiplied by 255; any other range is stretched from its min..max.
    """
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and 0.0 <= low and high <= 1.0:
        scaled = values * 255.0
    elif mode != "F" and 0.0 <= low and high <= 65535.0:
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop a square.

    Returns:
        ``uint8`` tensor of shape ``(3, size, size)``.
    """
    img = _to_rgb(img)
    width, height = img.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != img.size:
        # reducing_gap: shrink by an integer factor first when shrinking > 3x (faster, same look)
        img = img.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img).transpose(2, 0, 1).copy()  # (H, W, 3) -> (3, H, W); a writable copy
    return torch.from_numpy(pixels)


def _describe(err: BaseException) -> str:
    """A short reason for a file that could not be read."""
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "file not found (broken symlink?)"
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a recognised image"
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {err}"
    text = str(err).replace("\n", " ").replace("\t", " ")
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """Unlabeled images found recursively in a folder, each decoded to ``(3, S, S)`` uint8.

    The constructor checks every file (see ``verify``); unreadable ones are listed in
    ``skipped`` as ``(path, reason)``, logged once, or raise :class:`DataError` when ``strict``.

    Args:
        root: the image folder.
        image_size: side ``S`` of the returned square images.
        strict: raise instead of skipping unreadable files.
        verify: "full" decodes every file (catches truncated files); "header" only opens it
            (much faster; a file that fails later raises :class:`DataError` naming it).
        num_threads: threads decoding files during the scan.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        strict: bool = False,
        verify: Literal["full", "header"] = "full",
        num_threads: int = 2,
    ) -> None:
        if verify not in ("full", "header"):
            raise ValueError(f"verify={verify!r} is invalid; allowed values: full, header")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.verify = verify
        candidates = list_image_files(self.root)
        if not candidates:
            shown = ", ".join(_COMMON_EXTENSIONS)
            raise DataError(
                f"no image files found in {self.root} (searched recursively, hidden files and folders "
                f"ignored; extensions such as {shown} and {len(IMAGE_EXTENSIONS) - len(_COMMON_EXTENSIONS)} "
                "more, in any case)"
            )
        logger.info("checking %d image files in %s (data.verify=%s)", len(candidates), self.root, verify)
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere: truncated "
                           "images will pass the scan with their missing part filled in gray")
        reasons = self._scan(candidates, num_threads)
        self.files: list[Path] = []
        self.skipped: list[tuple[str, str]] = []
        for path, reason in zip(candidates, reasons, strict=True):
            if reason is None:
                self.files.append(path)
            else:
                self.skipped.append((str(path), reason))
        self._report_skipped(len(candidates), strict)

    def _scan(self, files: list[Path], num_threads: int) -> list[str | None]:
        """For each file, None if it is readable, else the reason it is not."""
        verify_only = self.verify == "header"

        def check(path: Path) -> str | None:
            try:
                if path.is_file() and path.stat().st_size == 0:
                    return "empty file (0 bytes)"
                img = _read_image(path, verify_only, self.image_size)
                if not verify_only:
                    img.load()
            except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
                return _describe(err)
            return None

        # The bomb-warning filter is process-wide: set it here, once, not in each thread.
        with _bomb_warnings_as_errors(), concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            progress = tqdm(
                pool.map(check, files), total=len(files), desc="checking images", unit="file",
                disable=len(files) < 1000,
            )
            return list(progress)

    def _report_skipped(self, num_found: int, strict: bool) -> None:
        """Raise or warn (once) about the files the scan skipped."""
        if not self.skipped:
            return
        count = len(self.skipped)
        listed = "\n  ".join(f"{path}: {reason}" for path, reason in self.skipped[:_MAX_LISTED])
        more = f"\n  ... and {count - _MAX_LISTED} more" if count > _MAX_LISTED else ""
        if not self.files:
            raise DataError(
                f"none of the {num_found} image files in {self.root} could be read:\n  {listed}{more}"
            )
        if strict:
            raise DataError(
                f"{count} of {num_found} image files in {self.root} could not be read:\n  {listed}{more}\n"
                "fix or remove them, or set data.strict=false to skip them"
            )
        first = ", ".join(path for path, _ in self.skipped[:_MAX_LISTED])
        logger.warning(
            "skipped %d unreadable of %d image files in %s (first: %s%s); "
            "set data.strict=true to stop on them instead",
            count, num_found, self.root, first, ", ..." if count > _MAX_LISTED else "",
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        """The image as a ``uint8`` tensor of shape ``(3, image_size, image_size)``."""
        path = self.files[index]
        try:
            img = load_rgb(path, draft_size=self.image_size)
        except Exception as err:  # any failure here is a file that changed or passed a header-only scan
            raise DataError(
                f"{path} could not be read ({_describe(err)}) although it passed the start-up scan "
                f"(data.verify={self.verify}); fix or remove it"
            ) from err
        return resize_center_crop(img, self.image_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, images={len(self.files)}, "
            f"skipped={len(self.skipped)}, image_size={self.image_size})"
        )
