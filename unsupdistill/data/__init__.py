"""Unlabeled datasets: a recursive folder of images or of sounds, or scikit-learn's built-in digits.

Every dataset returns ``uint8`` tensors of shape ``(3, S, S)``: the image decoded to RGB, its
shorter side resized to ``S`` and centre-cropped. The multi-crop augmentation runs batched on
these tensors afterwards, so decoding is the only per-image work done in DataLoader workers.

An image folder is scanned once at start-up: files that cannot be decoded (empty, truncated,
corrupt, not an image, unreadable, decompression bombs) are skipped and counted, or stop the run
when ``data.strict`` is true.

A folder of sound files (:data:`AUDIO_EXTENSIONS`) is scanned the same way (and silent files skipped too); its
dataset, :class:`AudioFolderDataset`, returns float32 clips of shape ``(1, samples)``, mono at one rate. A folder
holds one kind of data or the other (:func:`folder_kind`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from unsupdistill.config import AudioConfig, DataConfig
from unsupdistill.data.audio import AUDIO_EXTENSIONS, fit_clip, folder_kind, list_audio_files, read_sound
from unsupdistill.data.digits import DigitsDataset, digits_split
from unsupdistill.data.folder import IMAGE_EXTENSIONS, DataError, list_image_files, load_rgb, resize_center_crop
from unsupdistill.data.images import ImageFolderDataset
from unsupdistill.data.scan import FolderScan, scan_folder, scan_for_run
from unsupdistill.data.sounds import AudioFolderDataset, sound_summary

__all__ = ["AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "AudioFolderDataset", "DataError", "DigitsDataset", "FolderScan",
           "ImageFolderDataset", "build_dataset", "clip_samples", "digits_split", "fit_clip", "folder_kind",
           "list_audio_files", "list_image_files", "load_rgb", "num_workers", "read_sound", "resize_center_crop",
           "scan_folder", "scan_for_run", "sound_summary", "list_late_failures", "write_skipped"]

logger = logging.getLogger(__name__)


def build_dataset(cfg: DataConfig, image_size: int, scan: FolderScan | None = None,
                  substitute: bool = False, audio: AudioConfig | None = None) -> Dataset:
    """The dataset ``cfg`` describes.

    Args:
        cfg: the data section of the config.
        image_size: the global crop size, used when ``cfg.image_size`` is null.
        scan: the folder's scan, if made already (see :func:`scan_for_run`).
        substitute: replace (and report) files that fail after the scan, see :class:`ImageFolderDataset`.
        audio: the sound section, whose rate and clip length a folder of sounds is read at (``cfg.kind`` audio).
    """
    size = cfg.image_size or image_size
    if cfg.path is not None and cfg.kind == "audio":
        if audio is None or audio.sample_rate is None or audio.clip_seconds is None:
            raise ValueError("a folder of sounds needs audio.sample_rate and audio.clip_seconds (chosen from the "
                             "folder by the command line, or set in the recipe)")
        dataset = AudioFolderDataset(cfg.path, audio.sample_rate, clip_samples(audio), strict=cfg.strict,
                                     verify=cfg.verify, num_threads=max(1, num_workers(cfg)), scan=scan,
                                     substitute=substitute)
        logger.info("%d sound files in %s (%d skipped), read mono at %d Hz, %g s clips", len(dataset), dataset.root,
                    len(dataset.skipped), audio.sample_rate, audio.clip_seconds)
        return dataset
    if cfg.path is None:
        logger.info("no image folder given: training on scikit-learn's built-in digits (1,797 images)")
        return DigitsDataset(size)
    dataset = ImageFolderDataset(cfg.path, size, strict=cfg.strict, verify=cfg.verify,
                                 num_threads=max(1, num_workers(cfg)), scan=scan, substitute=substitute)
    logger.info("%d images in %s (%d skipped)", len(dataset), dataset.root, len(dataset.skipped))
    return dataset


def clip_samples(audio: AudioConfig) -> int:
    """Samples of one clip: ``audio.clip_seconds`` at ``audio.sample_rate``."""
    return max(1, round(audio.clip_seconds * audio.sample_rate))


def num_workers(cfg: DataConfig) -> int:
    """DataLoader workers: as configured, else none for in-memory digits and one per core (max 8)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 0 if cfg.path is None else min(8, os.cpu_count() or 1)


def write_skipped(dataset: Dataset, path: Path) -> int:
    r"""Write the dataset's skipped files as "path<TAB>reason" lines, if there are any.

    Every file stays on one line whatever its name: backslashes, tabs and line breaks are written
    as ``\\``, ``\t``, ``\n`` and ``\r``, and bytes of a name that are not UTF-8 are written as they are.

    Args:
        dataset: a dataset with a ``skipped`` list of ``(path, reason)``.
        path: the file to write, or an existing folder to write ``skipped.txt`` in.

    Returns:
        The number of skipped files.
    """
    skipped: list[tuple[str, str]] = getattr(dataset, "skipped", [])
    if skipped:
        path = Path(path)
        if path.is_dir():
            path = path / "skipped.txt"
        lines = "".join(f"{_one_line(file)}\t{_one_line(reason)}\n" for file, reason in skipped)
        path.write_text(lines, encoding="utf-8", errors="surrogateescape")
    return len(skipped)


def list_late_failures(dataset: Dataset, failed: Tensor, path: Path) -> int:
    """Append the files of a batch that failed after the start-up scan (and were replaced in the batch) to
    ``path``, one "path<TAB>reason" line each as :func:`write_skipped` writes them; their count.

    Args:
        dataset: an :class:`ImageFolderDataset` or :class:`AudioFolderDataset` with ``substitute=True``.
        failed: per sample of the batch, the index of the file that failed, or -1.
        path: the run's ``skipped.txt``.
    """
    indices = [int(i) for i in failed if i >= 0]
    if indices:
        reason = f"failed after the start-up scan (data.verify={dataset.verify}); replaced by another {dataset.noun}"
        lines = "".join(f"{_one_line(str(dataset.files[i]))}\t{reason}\n" for i in indices)
        with open(path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(lines)
    return len(indices)


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _one_line(text: str) -> str:
    """``text`` with backslashes, tabs and line breaks escaped, so it fits one tab-separated field."""
    return text.translate(_ESCAPES)
