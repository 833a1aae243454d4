"""Sound files: recursive listing, which kind of data a folder holds, checking and reading a file as mono at one rate.

Files are read with soundfile (libsndfile) and resampled with soxr. The start-up scan that checks every file is in
``scan.py``, the dataset built on it in ``sounds.py``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import soxr

from unsupdistill.data.folder import _COMMON_EXTENSIONS, IMAGE_EXTENSIONS, DataError, _describe, list_files

# The container each extension names, as ``soundfile.available_formats()`` calls it; .opus is Opus in an OGG.
_SOUND_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".opus": "OGG", ".mp3": "MP3",
                  ".aiff": "AIFF", ".aif": "AIFF", ".au": "AU", ".caf": "CAF", ".w64": "W64"}


def _readable_extensions() -> frozenset[str]:
    """The extensions of :data:`_SOUND_FORMATS` whose format the installed libsndfile reads."""
    formats = soundfile.available_formats()
    opus = "OGG" in formats and "OPUS" in soundfile.available_subtypes("OGG")
    return frozenset(ext for ext, fmt in _SOUND_FORMATS.items() if fmt in formats and (ext != ".opus" or opus))


AUDIO_EXTENSIONS: frozenset[str] = _readable_extensions()
"""File extensions (lower-case, with the dot) of the sound formats libsndfile reads; matched in any case."""

SILENCE_PEAK = 1e-4
"""A file whose largest absolute sample is below this (-80 dBFS) is silent, and skipped by a full scan."""

_BLOCK_FRAMES = 1 << 16  # frames decoded at a time when a scan reads a whole file
_RESAMPLE_MARGIN = 64  # samples read beyond either end of a clip, where resampling a cut-out span differs
# libsndfile's log of a container whose header promises more data than the file holds: "data : 16000 (should be 7978)"
_SIZE_IN_LOG = re.compile(r"^\s*([^:\n]+?)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_SIZED_CHUNKS = frozenset({"riff", "data", "form", "ssnd", "data size"})  # WAV, W64, AIFF, AU
_UNKNOWN_LENGTH = 0xFFFFFFFF  # written by programs that stream a file of unknown length


def list_audio_files(root: str | Path) -> list[Path]:
    """Sound files under ``root`` (extension in :data:`AUDIO_EXTENSIONS`), as
    :func:`unsupdistill.data.folder.list_files` lists them (same order, hidden files and folders ignored)."""
    return list_files(root, AUDIO_EXTENSIONS, "sound folder")


def folder_files(root: str | Path) -> tuple[Literal["image", "audio"], list[Path]]:
    """The kind of data under ``root`` and its files, found in one walk of the folder; see :func:`folder_kind`."""
    root = Path(root).expanduser()
    files = list_files(root, IMAGE_EXTENSIONS | AUDIO_EXTENSIONS)
    images = [path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS]
    sounds = [path for path in files if path.suffix.lower() in AUDIO_EXTENSIONS]
    if images and sounds:
        raise DataError(f"{root} holds {len(images)} images and {len(sounds)} sound files; a run trains on one kind "
                        f"of data: move the {len(sounds)} sound files (or the {len(images)} images) into a folder "
                        "of their own")
    if not files:
        shown = ", ".join(_COMMON_EXTENSIONS)
        raise DataError(
            f"no image files and no sound files found in {root} (searched recursively, hidden files and folders "
            f"ignored; images: {shown} and {len(IMAGE_EXTENSIONS) - len(_COMMON_EXTENSIONS)} more; sounds: "
            f"{', '.join(sorted(AUDIO_EXTENSIONS))}; extensions in any case)"
        )
    return ("audio", sounds) if sounds else ("image", images)


def folder_kind(root: str | Path) -> Literal["image", "audio"]:
    """Whether ``root`` holds images or sounds (searched recursively, hidden files and folders ignored).

    Raises:
        DataError: the folder is missing, holds both kinds (the message counts each), or neither.
    """
    return folder_files(root)[0]


def check_sound(path: Path, verify: Literal["full", "header"]) -> tuple[str | None, tuple[int, int] | None]:
    """Check one sound file for the start-up scan: ``(None, (frames, sample_rate))``, or ``(reason, None)``.

    Args:
        path: the file.
        verify: "full" decodes every sample (a corrupt stream fails; a file whose peak is below -80 dBFS is
            silent); "header" only reads the header (silence and most corrupt streams are not caught). Both
            catch a container whose header promises more data than the file holds (a WAV cut short).
    """
    try:
        with open(path, "rb") as file:  # permission denied, broken symlinks and loops: the OS says which
            if os.fstat(file.fileno()).st_size == 0:
                return "empty file (0 bytes)", None
    except OSError as err:
        return _describe(err), None
    try:
        info = soundfile.info(str(path))
    except Exception as err:  # noqa: BLE001 - libsndfile raises on anything it cannot parse
        return f"not a readable sound file: {describe_sound_error(err)}", None
    if info.frames <= 0:
        return "no samples", None
    short = _shorter_than_header(info.extra_info)
    if short is not None:
        return f"truncated: {short}", None
    if verify == "full":
        try:
            frames, peak = _decode_all(path)
        except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt data
            return f"corrupt or truncated: {describe_sound_error(err)}", None
        if frames < info.frames:
            return f"truncated: {frames} of {info.frames} frames decode", None
        if peak < SILENCE_PEAK:
            return "silent (peak below -80 dBFS)", None
    return None, (int(info.frames), int(info.samplerate))


def _shorter_than_header(log: str) -> str | None:
    """What libsndfile's log of opening a file says is missing, if its header promises more bytes than there are."""
    for chunk, promised, present in _SIZE_IN_LOG.findall(log):
        if chunk.lower() in _SIZED_CHUNKS and 0 < int(promised) < _UNKNOWN_LENGTH and int(present) < int(promised):
            return f"the header's {chunk} chunk promises {promised} bytes, the file holds {present}"
    return None


def _decode_all(path: Path) -> tuple[int, float]:
    """Decode every sample of ``path``, a block at a time: the frames decoded and the largest absolute sample."""
    frames, peak = 0, 0.0
    for block in soundfile.blocks(str(path), blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):
        frames += len(block)
        if block.size:
            peak = max(peak, float(np.abs(block).max()))
    return frames, peak


def describe_sound_error(err: BaseException) -> str:
    """A short reason for a sound file that could not be read."""
    if isinstance(err, soundfile.LibsndfileError):
        return err.error_string
    return _describe(err)


def read_sound(path: str | Path, sample_rate: int, max_samples: int | None = None) -> np.ndarray:
    """Read a sound file as float32 mono (the mean of its channels) at ``sample_rate``, resampled with soxr if the
    file's rate differs.

    Args:
        path: the file.
        sample_rate: the rate of the returned samples, in Hz.
        max_samples: if set, a file longer than this (at ``sample_rate``) is read only around its middle and these
            samples returned: what :func:`fit_clip` would cut from the whole file (up to the resampler's rounding
            near the cut), without decoding a long file whole.

    Returns:
        ``(samples,)`` float32.

    Raises:
        Whatever soundfile or the OS raises for a file that cannot be read (see :func:`describe_sound_error`).
    """
    with soundfile.SoundFile(str(path)) as file:
        rate, start, stop, keep = file.samplerate, 0, file.frames, slice(None)
        if max_samples is not None:
            start, stop, keep = _centre_span(file.frames, rate, sample_rate, max_samples)
        if start:
            file.seek(start)
        frames = file.read(stop - start, dtype="float32", always_2d=True)  # (frames, channels)
    wave = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate)
    return np.ascontiguousarray(wave[keep], dtype=np.float32)


def _centre_span(frames: int, rate: int, sample_rate: int, samples: int) -> tuple[int, int, slice]:
    """The frames ``[start, stop)`` of a file to read for the middle ``samples`` of it at ``sample_rate``, and which
    of the (resampled) samples read those are."""
    if rate == sample_rate:
        start = max(0, frames - samples) // 2
        return start, min(frames, start + samples), slice(None)
    length = (2 * frames * sample_rate + rate) // (2 * rate)  # soxr's output: frames * sample_rate / rate, rounded
    if length <= samples:
        return 0, frames, slice(None)
    clip_start = (length - samples) // 2
    # start on a frame that falls on an output sample, so the samples are those of resampling the whole file
    common = math.gcd(rate, sample_rate)
    frame_step, sample_step = rate // common, sample_rate // common
    first = max(0, clip_start - _RESAMPLE_MARGIN) // sample_step
    end = clip_start + samples + _RESAMPLE_MARGIN
    stop = min(frames, -(-end * rate // sample_rate) + 1)
    offset = clip_start - first * sample_step
    return first * frame_step, stop, slice(offset, offset + samples)


def fit_clip(wave: np.ndarray, samples: int) -> np.ndarray:
    """``wave`` made ``samples`` long: its centre when longer, zero-padded equally on both sides when shorter (the
    odd sample on the right).

    Args:
        wave: ``(length,)`` samples.
        samples: the length wanted.

    Returns:
        ``(samples,)``, of ``wave``'s dtype.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    length = len(wave)
    if length >= samples:
        start = (length - samples) // 2
        return wave[start:start + samples]
    left = (samples - length) // 2
    return np.pad(wave, (left, samples - length - left))
