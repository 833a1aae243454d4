"""The sounds of a scanned folder, each read mono at one rate and cut or padded to a ``(1, samples)`` float32 clip."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Literal

import torch

from unsupdistill.data.audio import describe_sound_error, fit_clip, read_sound
from unsupdistill.data.images import ScannedFolderDataset
from unsupdistill.data.scan import FolderScan


class AudioFolderDataset(ScannedFolderDataset):
    """Unlabeled sounds found recursively in a folder, each a float32 clip of shape ``(1, clip_samples)``: the file
    read mono (the mean of its channels) at ``sample_rate``, its centre cut out or zero-padded on both sides
    (:func:`unsupdistill.data.audio.fit_clip`).

    Args:
        root: the sound folder.
        sample_rate: the clips' rate in Hz; files at other rates are resampled.
        clip_samples: the clips' length in samples (at ``sample_rate``).
        strict, verify, num_threads, scan, substitute: see :class:`unsupdistill.data.images.ScannedFolderDataset`;
            a full scan also skips silent files.
    """

    kind = "audio"

    def __init__(
        self,
        root: str | Path,
        sample_rate: int,
        clip_samples: int,
        strict: bool = False,
        verify: Literal["full", "header"] = "full",
        num_threads: int = 2,
        scan: FolderScan | None = None,
        substitute: bool = False,
    ) -> None:
        if sample_rate < 1:
            raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
        if clip_samples < 1:
            raise ValueError(f"clip_samples must be >= 1, got {clip_samples}")
        self.sample_rate = sample_rate
        self.clip_samples = clip_samples
        super().__init__(root, strict, verify, num_threads, scan, substitute)

    @property
    def durations(self) -> list[float]:
        """Each file's length in seconds, from the scan."""
        return [frames / rate for frames, rate in self.sizes]

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        """The clip as a float32 tensor of shape ``(1, clip_samples)``; with ``substitute``, ``(clip, index of
        the file that failed or -1)``."""
        return super().__getitem__(index)

    def _read(self, path: Path) -> torch.Tensor:
        wave = read_sound(path, self.sample_rate, self.clip_samples)
        return torch.from_numpy(fit_clip(wave, self.clip_samples).copy())[None]  # (1, clip_samples)

    def _reason(self, err: BaseException) -> str:
        return describe_sound_error(err)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, sounds={len(self.files)}, "
                f"skipped={len(self.skipped)}, sample_rate={self.sample_rate}, clip_samples={self.clip_samples})")


def sound_summary(scan: FolderScan) -> tuple[int, list[float]]:
    """The sample rate most of a sound folder's files have (the highest of equally common ones), and every file's
    length in seconds; what the automatic settings choose the rate and clip length from.

    Raises:
        ValueError: the scan is of images.
    """
    if scan.kind != "audio":
        raise ValueError(f"the scan of {scan.root} is of {scan.noun}s, not sounds")
    counts = collections.Counter(rate for _, rate in scan.sizes)
    rate = max(counts, key=lambda r: (counts[r], r))
    return rate, [frames / r for frames, r in scan.sizes]
