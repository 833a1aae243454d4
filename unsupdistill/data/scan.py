"""The start-up scan of an image folder: which files decode, and how large they are.

A run scans its folder once, in process 0, and keeps the result in ``scan.json.gz`` in the run
directory. The other torchrun processes receive it from process 0, and a resume reads the file
instead of opening every image again, so a folder of a million files is decoded once per run, not
once per process and start. The image sizes feed the automatic settings (``unsupdistill.auto``).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import ImageFile
from tqdm import tqdm

from unsupdistill import distributed
from unsupdistill.data.folder import (
    _COMMON_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DataError,
    _bomb_warnings_as_errors,
    _describe,
    _read_image,
    list_image_files,
    list_skipped,
)
from unsupdistill.storage import atomic_write

logger = logging.getLogger(__name__)

SCAN_FORMAT = "unsupdistill.scan/1"
SCAN_FILE = "scan.json.gz"
SCAN_DRAFT_SIZE = 32
"""Decode JPEGs at reduced scale during a full scan: every byte is still read (a truncated file fails),
at a fraction of the cost of a full-size decode."""


@dataclass
class FolderScan:
    """What a scan of ``root`` found: readable files with their sizes, and skipped files with a reason."""

    root: str
    verify: Literal["full", "header"]
    files: list[str] = field(default_factory=list)
    """Readable files, as paths relative to ``root`` (POSIX), in the dataset's order."""
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each readable file, as stored (before EXIF rotation)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(absolute path, reason) of every file that could not be read."""

    @property
    def paths(self) -> list[Path]:
        return [Path(self.root) / name for name in self.files]

    def save(self, path: Path) -> None:
        """Write the scan as gzipped JSON, atomically."""
        data = {"format": SCAN_FORMAT, "root": self.root, "verify": self.verify, "files": self.files,
                "sizes": self.sizes, "skipped": self.skipped}
        payload = gzip.compress(json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape"), 6)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))

    @classmethod
    def load(cls, path: Path) -> FolderScan:
        """Read a scan written by :meth:`save`; ValueError if the file is not one."""
        try:
            data = json.loads(gzip.decompress(Path(path).read_bytes()).decode("utf-8", "surrogateescape"))
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(f"{path} is not a readable scan: {err}") from err
        if not isinstance(data, dict) or data.get("format") != SCAN_FORMAT:
            raise ValueError(f"{path} is not a scan (format {SCAN_FORMAT} expected)")
        return cls(data["root"], data["verify"], list(data["files"]), [tuple(s) for s in data["sizes"]],
                   [tuple(s) for s in data["skipped"]])


def scan_folder(root: str | Path, verify: Literal["full", "header"] = "full", num_threads: int = 2) -> FolderScan:
    """Check every image file under ``root`` and record its size.

    Args:
        root: the image folder (searched recursively, see :func:`list_image_files`).
        verify: "full" decodes every file (catches truncated files); "header" only opens it.
        num_threads: threads checking files.

    Raises:
        DataError: the folder is missing, holds no image files, or none of them can be read.
    """
    if verify not in ("full", "header"):
        raise ValueError(f"verify={verify!r} is invalid; allowed values: full, header")
    root = Path(root).expanduser()
    candidates = list_image_files(root)
    if not candidates:
        shown = ", ".join(_COMMON_EXTENSIONS)
        raise DataError(
            f"no image files found in {root} (searched recursively, hidden files and folders ignored; "
            f"extensions such as {shown} and {len(IMAGE_EXTENSIONS) - len(_COMMON_EXTENSIONS)} more, in any case)"
        )
    logger.info("checking %d image files in %s (data.verify=%s)", len(candidates), root, verify)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere: truncated "
                       "images will pass the scan with their missing part filled in gray")

    def check(path: Path) -> tuple[str | None, tuple[int, int] | None]:
        try:
            if path.is_file() and path.stat().st_size == 0:
                return "empty file (0 bytes)", None
            size = _read_image(path, True, None).size  # the header: cheap, and the size before any draft
            if verify == "full":
                _read_image(path, False, SCAN_DRAFT_SIZE).load()
        except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
            return _describe(err), None
        return None, size

    # The bomb-warning filter is process-wide: set it here, once, not in each thread.
    with _bomb_warnings_as_errors(), concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(tqdm(pool.map(check, candidates), total=len(candidates), desc="checking images",
                            unit="file", disable=len(candidates) < 1000))
    scan = FolderScan(str(root), verify)
    for path, (reason, size) in zip(candidates, results, strict=True):
        if reason is None:
            scan.files.append(path.relative_to(root).as_posix())
            scan.sizes.append(size)
        else:
            scan.skipped.append((str(path), reason))
    if not scan.files:
        raise DataError(f"none of the {len(candidates)} image files in {root} could be read:\n"
                        + list_skipped(scan.skipped))
    return scan


def scan_for_run(root: str, verify: Literal["full", "header"], run_dir: Path | None, num_threads: int) -> FolderScan:
    """The run's scan of ``root``: read from ``run_dir/scan.json.gz`` when it describes the same folder and
    check, else made by process 0 and saved there; every torchrun process gets process 0's scan.

    Args:
        root: the image folder (absolute).
        verify: the scan's check, ``data.verify``.
        run_dir: the run directory holding the cache; None to neither read nor write one.
        num_threads: threads checking files.
    """
    scan, error = None, None
    if distributed.is_main_process():
        try:
            scan = _cached_or_new(root, verify, run_dir, num_threads)
        except (DataError, OSError) as err:
            error = err
    shared = distributed.broadcast_object((scan, None if error is None else str(error)))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise DataError(f"process 0 could not scan {root}: {shared[1]}")
    return shared[0]


def _cached_or_new(root: str, verify: str, run_dir: Path | None, num_threads: int) -> FolderScan:
    cache = run_dir / SCAN_FILE if run_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            scan = FolderScan.load(cache)
        except ValueError as err:
            logger.warning("%s; scanning the folder again", err)
        else:
            if scan.root == root and scan.verify == verify:
                logger.info("%d images in %s, from this run's scan %s (%d skipped); delete it to scan again",
                            len(scan.files), root, cache, len(scan.skipped))
                return scan
            logger.info("%s describes %s (data.verify=%s), not %s (data.verify=%s): scanning again",
                        cache, scan.root, scan.verify, root, verify)
    scan = scan_folder(root, verify, num_threads)
    if cache is not None:
        scan.save(cache)
    return scan
