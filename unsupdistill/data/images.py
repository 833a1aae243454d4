"""The files of a scanned folder as a dataset (skipped files reported, late failures replaced), and the images,
each decoded to a ``(3, S, S)`` uint8 square."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch.utils.data import Dataset

from unsupdistill.data.folder import (
    _MAX_LISTED,
    DataError,
    _describe,
    list_skipped,
    load_rgb,
    printable,
    resize_center_crop,
)
from unsupdistill.data.scan import NOUNS, FolderScan, scan_folder

logger = logging.getLogger(__name__)

_MAX_SUBSTITUTES = 16  # files tried in a row before giving up on a batch slot


class ScannedFolderDataset(Dataset):
    """The readable files of a scanned folder of one kind of data; a subclass reads one file in :meth:`_read`.

    The folder is scanned when the dataset is made (see ``verify``), unless a scan is given; unreadable
    files are listed in ``skipped`` as ``(path, reason)``, logged once, or raise :class:`DataError` when
    ``strict``.

    Args:
        root: the folder.
        strict: raise instead of skipping unreadable files.
        verify: "full" decodes every file (catches truncated files); "header" only opens it
            (much faster; a file that fails later raises :class:`DataError` naming it, or is replaced,
            see ``substitute``).
        num_threads: threads checking files during the scan.
        scan: a scan of ``root`` made earlier (e.g. read from the run directory); not scanned again.
        substitute: a file that fails after the scan (changed since, or passed a header-only check) is
            replaced by the next readable file, and ``__getitem__`` returns ``(item, failed_index)``
            (-1 when nothing failed) so that training can count and list it. Not with ``strict``.
    """

    kind: ClassVar[Literal["image", "audio"]]

    def __init__(
        self,
        root: str | Path,
        strict: bool = False,
        verify: Literal["full", "header"] = "full",
        num_threads: int = 2,
        scan: FolderScan | None = None,
        substitute: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        self.verify = scan.verify if scan is not None else verify
        self.substitute = substitute and not strict
        scan = scan if scan is not None else scan_folder(self.root, verify, num_threads)
        if scan.kind != self.kind:
            raise DataError(f"{self.root} holds {scan.noun} files, not {self.noun}s: use "
                            f"{'AudioFolderDataset' if scan.kind == 'audio' else 'ImageFolderDataset'} for it")
        self.files: list[Path] = scan.paths
        self.sizes: list[tuple[int, int]] = list(scan.sizes)  # see FolderScan.sizes
        self.skipped: list[tuple[str, str]] = list(scan.skipped)
        self._report_skipped(len(self.files) + len(self.skipped), strict)

    @property
    def noun(self) -> str:
        """What a file is called in messages: "image" or "sound"."""
        return NOUNS[self.kind]

    def _report_skipped(self, num_found: int, strict: bool) -> None:
        """Raise or warn (once) about the files the scan skipped."""
        if not self.skipped:
            return
        count = len(self.skipped)
        if strict:
            raise DataError(
                f"{count} of {num_found} {self.noun} files in {self.root} could not be read:\n"
                f"{list_skipped(self.skipped)}\nfix or remove them, or set data.strict=false to skip them"
            )
        first = ", ".join(printable(path) for path, _ in self.skipped[:_MAX_LISTED])
        logger.warning(
            "skipped %d unreadable of %d %s files in %s (first: %s%s); set data.strict=true to stop on them instead",
            count, num_found, self.noun, self.root, first, ", ..." if count > _MAX_LISTED else "",
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        """File ``index`` read (see :meth:`_read`); with ``substitute``, ``(item, index of the file that failed
        or -1)``."""
        try:
            item = self._load(index)
        except DataError as err:
            if not self.substitute:
                raise
            logger.warning("%s; a substitute takes its place in this batch", err)
            return self._next_readable(index), index
        return (item, -1) if self.substitute else item

    def _read(self, path: Path) -> torch.Tensor:
        """One file as the dataset's item."""
        raise NotImplementedError

    def _reason(self, err: BaseException) -> str:
        """A short reason for a file that could not be read."""
        return _describe(err)

    def _load(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            return self._read(path)
        except Exception as err:  # any failure here is a file that changed or passed a header-only scan
            raise DataError(
                f"{path} could not be read ({self._reason(err)}) although it passed the start-up scan "
                f"(data.verify={self.verify}); fix or remove it"
            ) from err

    def _next_readable(self, index: int) -> torch.Tensor:
        for offset in range(1, min(_MAX_SUBSTITUTES, len(self.files))):
            try:
                return self._load((index + offset) % len(self.files))
            except DataError:
                continue
        raise DataError(f"{_MAX_SUBSTITUTES} files in a row from {self.files[index]} on could not be read "
                        f"although they passed the start-up scan (data.verify={self.verify}): has {self.root} "
                        "changed or gone away since the run started?")


class ImageFolderDataset(ScannedFolderDataset):
    """Unlabeled images found recursively in a folder, each decoded to ``(3, S, S)`` uint8.

    Args:
        root: the image folder.
        image_size: side ``S`` of the returned square images.
        strict, verify, num_threads, scan, substitute: see :class:`ScannedFolderDataset`.
    """

    kind = "image"

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        strict: bool = False,
        verify: Literal["full", "header"] = "full",
        num_threads: int = 2,
        scan: FolderScan | None = None,
        substitute: bool = False,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        super().__init__(root, strict, verify, num_threads, scan, substitute)

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        """The image as a ``uint8`` tensor of shape ``(3, image_size, image_size)``; with ``substitute``,
        ``(image, index of the file that failed or -1)``."""
        return super().__getitem__(index)

    def _read(self, path: Path) -> torch.Tensor:
        return resize_center_crop(load_rgb(path, draft_size=self.image_size), self.image_size)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, images={len(self.files)}, "
            f"skipped={len(self.skipped)}, image_size={self.image_size})"
        )
