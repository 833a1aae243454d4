"""Image files: recursive listing of a folder (of any file type), robust decoding to RGB, resizing to a square.

The start-up scan that checks every file is in ``scan.py``, the dataset built on it in ``images.py``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

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
    """Image files under ``root`` (extension in :data:`IMAGE_EXTENSIONS`), as :func:`list_files` lists them."""
    return list_files(root, IMAGE_EXTENSIONS, "image folder")


def list_files(root: str | Path, extensions: Collection[str], what: str = "folder") -> list[Path]:
    """Files under ``root`` with one of ``extensions``, recursively, sorted by their POSIX path relative to ``root``.

    Follows symlinked folders but visits each real folder once (so symlink loops end); ignores
    hidden files and folders (names starting with '.') and files whose extension, in any case,
    is not in ``extensions``. Symlinks with such an extension that lead nowhere
    (missing target, a loop of links, a target that cannot be looked at) are kept so the scan
    reports them. A subfolder that cannot be listed is logged and ignored.

    Args:
        root: the folder.
        extensions: lower-case extensions, with the dot.
        what: how errors name ``root`` ("image folder").

    Raises:
        DataError: ``root`` is missing, not a folder or cannot be listed.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a directory")
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
                raise DataError(f"cannot list {what} {root}: {err.strerror or err}") from err
            logger.warning("cannot list folder %s (%s); its files are ignored", folder, err.strerror or err)
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
            if keep and os.path.splitext(entry.name)[1].lower() in extensions:
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


def list_skipped(skipped: list[tuple[str, str]]) -> str:
    """The first skipped files as "path: reason" lines (indented), and how many more there are; bytes of a name that
    are not UTF-8 are shown as ``\\xNN`` (a message any terminal, log file or test report can carry)."""
    listed = "\n  ".join(f"{printable(path)}: {printable(reason)}" for path, reason in skipped[:_MAX_LISTED])
    more = f"\n  ... and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
    return f"  {listed}{more}"


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (``os.fsdecode``'s surrogates) written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
