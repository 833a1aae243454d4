"""The start-up scan of a folder of images or sounds: which files decode, and how large (or long) they are.

A run scans its folder once, in process 0, and keeps the result in ``scan.json.gz`` in the run
directory. The other torchrun processes receive it from process 0, and a resume reads the file
instead of opening every file again, so a folder of a million files is decoded once per run, not
once per process and start. The image sizes (sound durations) feed the automatic settings (``unsupdistill.auto``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import ImageFile
from tqdm import tqdm

from unsupdistill import distributed
from unsupdistill.data.audio import check_sound, folder_files
from unsupdistill.data.folder import DataError, _bomb_warnings_as_errors, _describe, _read_image, list_skipped
from unsupdistill.storage import atomic_write

logger = logging.getLogger(__name__)

SCAN_FORMAT = "unsupdistill.scan/1"
SCAN_FILE = "scan.json.gz"
NOUNS = {"image": "image", "audio": "sound"}
"""What a file of each kind of data is called in messages."""
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
    """Of each readable file: images, (width, height) as stored (before EXIF rotation); sounds, (frames,
    sample_rate) as the header gives them (a frame: one sample of every channel)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(absolute path, reason) of every file that could not be read."""
    kind: Literal["image", "audio"] = "image"
    """What the folder holds (see :func:`unsupdistill.data.audio.folder_kind`)."""

    @property
    def noun(self) -> str:
        """What a file is called in messages: "image" or "sound"."""
        return NOUNS[self.kind]

    @property
    def paths(self) -> list[Path]:
        return [Path(self.root) / name for name in self.files]

    def save(self, path: Path) -> None:
        """Write the scan as gzipped JSON, atomically."""
        data = {"format": SCAN_FORMAT, "root": self.root, "verify": self.verify, "kind": self.kind,
                "files": self.files, "sizes": self.sizes, "skipped": self.skipped}
        payload = gzip.compress(json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape"), 6)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))

    @classmethod
    def load(cls, path: Path) -> FolderScan:
        """Read a scan written by :meth:`save` (one written before sounds holds images); ValueError if the file is
        not one."""
        try:
            data = json.loads(gzip.decompress(Path(path).read_bytes()).decode("utf-8", "surrogateescape"))
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(f"{path} is not a readable scan: {err}") from err
        if not isinstance(data, dict) or data.get("format") != SCAN_FORMAT:
            raise ValueError(f"{path} is not a scan (format {SCAN_FORMAT} expected)")
        kind = data.get("kind", "image")
        if kind not in NOUNS:
            raise ValueError(f"{path} is not a readable scan: kind {kind!r} is neither image nor audio")
        return cls(data["root"], data["verify"], list(data["files"]), [tuple(s) for s in data["sizes"]],
                   [tuple(s) for s in data["skipped"]], kind)


def scan_folder(root: str | Path, verify: Literal["full", "header"] = "full", num_threads: int = 2) -> FolderScan:
    """Check every image or sound file under ``root`` and record its size (an image's) or length (a sound's).

    Args:
        root: the folder of images or of sounds (searched recursively, see
            :func:`unsupdistill.data.folder.list_files`; which kind it holds: :func:`unsupdistill.data.folder_kind`).
        verify: "full" decodes every file (catches truncated files, and silent sounds); "header" only opens it
            (a silent sound is not caught then, see :func:`unsupdistill.data.audio.check_sound`).
        num_threads: threads checking files.

    Raises:
        DataError: the folder is missing, holds both images and sounds or neither, or none of its files can be read.
    """
    if verify not in ("full", "header"):
        raise ValueError(f"verify={verify!r} is invalid; allowed values: full, header")
    root = Path(root).expanduser()
    kind, candidates = folder_files(root)
    noun = NOUNS[kind]
    logger.info("checking %d %s files in %s (data.verify=%s)", len(candidates), noun, root, verify)
    if kind == "audio":
        check, guard = functools.partial(check_sound, verify=verify), contextlib.nullcontext()
    else:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere: truncated "
                           "images will pass the scan with their missing part filled in gray")
        # The bomb-warning filter is process-wide: set it here, once, not in each thread.
        check, guard = functools.partial(_check_image, verify=verify), _bomb_warnings_as_errors()
    with guard, concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(tqdm(pool.map(check, candidates), total=len(candidates), desc=f"checking {noun}s",
                            unit="file", disable=len(candidates) < 1000))
    scan = FolderScan(str(root), verify, kind=kind)
    for path, (reason, size) in zip(candidates, results, strict=True):
        if reason is None:
            scan.files.append(path.relative_to(root).as_posix())
            scan.sizes.append(size)
        else:
            scan.skipped.append((str(path), reason))
    if not scan.files:
        raise DataError(f"none of the {len(candidates)} {noun} files in {root} could be read:\n"
                        + list_skipped(scan.skipped))
    return scan


def _check_image(path: Path, verify: Literal["full", "header"]) -> tuple[str | None, tuple[int, int] | None]:
    """Check one image file for the scan: ``(None, (width, height))``, or ``(reason, None)``."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            return "empty file (0 bytes)", None
        size = _read_image(path, True, None).size  # the header: cheap, and the size before any draft
        if verify == "full":
            _read_image(path, False, SCAN_DRAFT_SIZE).load()
    except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
        return _describe(err), None
    return None, size


def scan_for_run(root: str, verify: Literal["full", "header"], run_dir: Path | None, num_threads: int) -> FolderScan:
    """The run's scan of ``root``: read from ``run_dir/scan.json.gz`` when it describes the same folder and
    check, else made by process 0 and saved there; every torchrun process gets process 0's scan.

    Args:
        root: the folder of images or sounds (absolute).
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
                logger.info("%d %ss in %s, from this run's scan %s (%d skipped); delete it to scan again",
                            len(scan.files), scan.noun, root, cache, len(scan.skipped))
                return scan
            logger.info("%s describes %s (data.verify=%s), not %s (data.verify=%s): scanning again",
                        cache, scan.root, scan.verify, root, verify)
    scan = scan_folder(root, verify, num_threads)
    if cache is not None:
        scan.save(cache)
    return scan
