"""Tests for the sound side of unsupdistill.data: listing, which kind a folder holds, the scan of sound files
(skipped files and why), reading mono at one rate, clips, the sound dataset and labeled sounds."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from unsupdistill.data import (
    AUDIO_EXTENSIONS,
    AudioFolderDataset,
    DataError,
    FolderScan,
    ImageFolderDataset,
    fit_clip,
    folder_kind,
    list_audio_files,
    read_sound,
    scan_folder,
    sound_summary,
)
from unsupdistill.data.labeled import labeled_kind, load_labeled_sounds, training_labels

RATE = 8000
CLIP = 4000  # half a second at RATE


def _tone(freq: float = 440.0, seconds: float = 0.5, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _noise(seconds: float = 0.3, rate: int = RATE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, round(seconds * rate)).astype(np.float32)


def _chirp(seconds: float = 0.4, rate: int = RATE) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * (200 * t + 1000 * t * t))).astype(np.float32)


def _write(path: Path, wave: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> Path:
    """Write ``wave`` ((frames,) mono or (frames, channels)) as the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, rate, subtype=subtype)
    return path


def _truncated(path: Path) -> Path:
    """A WAV whose second half is cut off: its header promises twice the data there is."""
    _write(path, _tone(seconds=1.0))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _peak_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def _sound_folder(root: Path) -> dict[str, Path]:
    """Three good sounds (a tone, noise in FLAC, a stereo chirp) and four bad ones."""
    return {
        "tone": _write(root / "tone.wav", _tone()),
        "noise": _write(root / "sub" / "noise.flac", _noise()),
        "chirp": _write(root / "sub" / "deeper" / "chirp.wav", np.stack([_chirp(), _chirp() * 0.5], axis=1)),
        "empty": _empty(root / "empty.wav"),
        "garbage": _garbage(root / "garbage.wav"),
        "truncated": _truncated(root / "truncated.wav"),
        "silent": _write(root / "silent.flac", np.full(RATE // 4, 1e-5, np.float32), subtype="PCM_24"),
    }


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return path


# ----------------------------------------------------------------------------------------------
# Listing and the kind of a folder
# ----------------------------------------------------------------------------------------------


def test_audio_extensions_are_the_formats_libsndfile_reads() -> None:
    expected = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64"}
    assert AUDIO_EXTENSIONS == expected  # libsndfile >= 1.1 reads all of them (MP3, Opus)


def test_list_audio_files_recursive_sorted_hidden_ignored(tmp_path: Path) -> None:
    for name in ("b.wav", "a/z.FLAC", "a/b/c.ogg", ".hidden.wav", ".secret/d.wav", "notes.txt", "img.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    files = list_audio_files(tmp_path)

    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a/b/c.ogg", "a/z.FLAC", "b.wav"]


def test_folder_kind(tmp_path: Path) -> None:
    _write(tmp_path / "sounds" / "a.wav", _tone())
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")

    assert folder_kind(tmp_path / "sounds") == "audio"
    assert folder_kind(tmp_path / "images") == "image"


def test_a_mixed_folder_is_refused_with_both_counts(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / f"s{i}.wav", _tone())
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"i{i}.png")

    with pytest.raises(DataError, match="2 images and 3 sound files") as err:
        scan_folder(tmp_path)

    assert "move the 3 sound files (or the 2 images) into a folder of their own" in str(err.value)


def test_a_folder_of_neither_names_both_kinds(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing to hear or see")

    with pytest.raises(DataError, match="no image files and no sound files") as err:
        folder_kind(tmp_path)

    assert ".png" in str(err.value) and ".flac" in str(err.value)


# ----------------------------------------------------------------------------------------------
# The scan and the dataset
# ----------------------------------------------------------------------------------------------


def test_bad_sounds_are_skipped_with_their_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _sound_folder(tmp_path)

    with caplog.at_level(logging.WARNING, logger="unsupdistill.data"):
        dataset = AudioFolderDataset(tmp_path, RATE, CLIP)

    assert [p.relative_to(tmp_path).as_posix() for p in dataset.files] == [
        "sub/deeper/chirp.wav", "sub/noise.flac", "tone.wav"]
    reasons = {Path(path).name: reason for path, reason in dataset.skipped}
    assert reasons == {
        "empty.wav": "empty file (0 bytes)",
        "garbage.wav": reasons["garbage.wav"],
        "truncated.wav": reasons["truncated.wav"],
        "silent.flac": "silent (peak below -80 dBFS)",
    }
    assert reasons["garbage.wav"].startswith("not a readable sound file")
    assert reasons["truncated.wav"].startswith("truncated")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "skipped 4 unreadable of 7 sound files" in warned[0]
    assert all(str(files[name]) in warned[0] for name in ("empty", "garbage", "truncated", "silent"))


def test_header_verify_misses_silence(tmp_path: Path) -> None:
    _write(tmp_path / "tone.wav", _tone())
    _write(tmp_path / "silent.wav", np.zeros(RATE // 4, np.float32))

    assert [Path(p).name for p, _ in scan_folder(tmp_path, "full").skipped] == ["silent.wav"]
    assert scan_folder(tmp_path, "header").skipped == []


def test_a_flac_cut_short_passes_a_header_scan_and_fails_a_full_one(tmp_path: Path) -> None:
    _write(tmp_path / "tone.wav", _tone())
    cut = _write(tmp_path / "cut.flac", _noise(seconds=1.0))
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])

    assert scan_folder(tmp_path, "header").skipped == []
    (path, reason), = scan_folder(tmp_path, "full").skipped
    assert path == str(cut) and reason.startswith("corrupt or truncated")


def test_strict_raises_naming_the_bad_sounds(tmp_path: Path) -> None:
    files = _sound_folder(tmp_path)

    with pytest.raises(DataError, match="4 of 7 sound files .* could not be read") as err:
        AudioFolderDataset(tmp_path, RATE, CLIP, strict=True)

    assert all(str(files[name]) in str(err.value) for name in ("empty", "garbage", "truncated", "silent"))
    assert "data.strict=false" in str(err.value)


def test_a_folder_of_only_bad_sounds_raises(tmp_path: Path) -> None:
    _empty(tmp_path / "a.wav")
    _garbage(tmp_path / "b.flac")

    with pytest.raises(DataError, match="none of the 2 sound files"):
        scan_folder(tmp_path)


def test_dataset_items_are_mono_clips_at_the_rate(tmp_path: Path) -> None:
    _write(tmp_path / "long.wav", _tone(seconds=0.8))
    _write(tmp_path / "short.flac", _noise(seconds=0.2, rate=16000), rate=16000)

    dataset = AudioFolderDataset(tmp_path, RATE, CLIP)

    for item in (dataset[0], dataset[1]):
        assert item.dtype == torch.float32 and item.shape == (1, CLIP)
    assert dataset.durations == pytest.approx([0.8, 0.2])
    assert dataset.sizes == [(6400, RATE), (3200, 16000)]
    short = dataset[1][0].numpy()
    assert np.all(short[:1200] == 0) and np.all(short[-1200:] == 0)  # 0.2 s = 1,600 samples, centred
    assert np.count_nonzero(short[1200:2800]) > 1500


def test_a_sound_folder_is_not_an_image_dataset(tmp_path: Path) -> None:
    _write(tmp_path / "a.wav", _tone())

    with pytest.raises(DataError, match="holds sound files, not images"):
        ImageFolderDataset(tmp_path, 8)


def test_substitution_when_a_sound_breaks_after_the_scan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        _write(tmp_path / name, _tone(220.0 * (i + 1)))
    dataset = AudioFolderDataset(tmp_path, RATE, CLIP, substitute=True)
    plain = AudioFolderDataset(tmp_path, RATE, CLIP, scan=scan_folder(tmp_path))
    expected_c = dataset[2][0]
    _garbage(tmp_path / "b.wav")

    with caplog.at_level(logging.WARNING, logger="unsupdistill.data"):
        clip, failed = dataset[1]

    assert failed == 1 and torch.equal(clip, expected_c)
    assert dataset[0][1] == -1
    assert "b.wav could not be read" in caplog.text
    with pytest.raises(DataError, match="b.wav could not be read .*passed the start-up scan"):
        plain[1]


# ----------------------------------------------------------------------------------------------
# Reading, resampling, clips
# ----------------------------------------------------------------------------------------------


def test_stereo_is_read_as_the_mean_of_its_channels(tmp_path: Path) -> None:
    left, right = _tone(440.0), _noise(seconds=0.5)
    path = _write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")

    wave = read_sound(path, RATE)

    assert wave.dtype == np.float32 and wave.shape == (len(left),)
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-6)


def test_resampling_keeps_the_frequency_and_the_duration(tmp_path: Path) -> None:
    path = _write(tmp_path / "tone16k.flac", _tone(440.0, seconds=1.0, rate=16000), rate=16000)

    wave = read_sound(path, 8000)

    assert abs(len(wave) - 8000) <= 1
    assert _peak_frequency(wave, 8000) == pytest.approx(440.0, abs=2.0)


def test_reading_only_the_middle_matches_reading_all(tmp_path: Path) -> None:
    path = _write(tmp_path / "chirp.wav", _chirp(seconds=1.0), subtype="FLOAT")
    assert np.array_equal(read_sound(path, RATE, 1001), fit_clip(read_sound(path, RATE), 1001))
    for rate, target in ((16000, 8000), (8000, 16000)):  # resampled: the same samples, up to rounding
        path = _write(tmp_path / f"chirp{rate}.wav", _chirp(seconds=1.0, rate=rate), rate=rate, subtype="FLOAT")

        middle = read_sound(path, target, 1001)

        assert middle.shape == (1001,)
        np.testing.assert_allclose(middle, fit_clip(read_sound(path, target), 1001), atol=2e-3)


def test_fit_clip_crops_the_centre_and_pads_both_sides() -> None:
    wave = np.arange(1, 11, dtype=np.float32)

    assert fit_clip(wave, 4).tolist() == [4, 5, 6, 7]
    assert fit_clip(wave, 15).tolist() == [0, 0] + list(range(1, 11)) + [0, 0, 0]
    assert fit_clip(wave, 10).tolist() == list(range(1, 11))
    with pytest.raises(ValueError, match="samples must be >= 1"):
        fit_clip(wave, 0)


# ----------------------------------------------------------------------------------------------
# Scans saved and loaded, the summary
# ----------------------------------------------------------------------------------------------


def test_scan_round_trip_keeps_the_kind(tmp_path: Path) -> None:
    _write(tmp_path / "sounds" / "a.wav", _tone())
    _write(tmp_path / "sounds" / "b.flac", _noise(rate=16000), rate=16000)
    scan = scan_folder(tmp_path / "sounds")

    scan.save(tmp_path / "scan.json.gz")
    loaded = FolderScan.load(tmp_path / "scan.json.gz")

    assert loaded == scan and loaded.kind == "audio"
    assert loaded.sizes == [(4000, RATE), (4800, 16000)]


def test_an_old_scan_without_a_kind_loads_as_images(tmp_path: Path) -> None:
    old = {"format": "unsupdistill.scan/1", "root": str(tmp_path), "verify": "full", "files": ["a.png"],
           "sizes": [[20, 16]], "skipped": []}
    (tmp_path / "scan.json.gz").write_bytes(gzip.compress(json.dumps(old).encode()))

    scan = FolderScan.load(tmp_path / "scan.json.gz")

    assert scan.kind == "image" and scan.sizes == [(20, 16)]


def test_sound_summary(tmp_path: Path) -> None:
    _write(tmp_path / "a.wav", _tone(seconds=0.5), rate=16000)
    _write(tmp_path / "b.wav", _tone(seconds=0.25), rate=16000)
    _write(tmp_path / "c.wav", _tone(seconds=1.0))

    rate, durations = sound_summary(scan_folder(tmp_path))

    assert rate == 16000
    assert durations == pytest.approx([0.25, 0.125, 1.0])
    with pytest.raises(ValueError, match="not sounds"):
        sound_summary(FolderScan(str(tmp_path), "full", ["a.png"], [(8, 8)]))


# ----------------------------------------------------------------------------------------------
# Labeled sounds
# ----------------------------------------------------------------------------------------------


def _labeled_folder(root: Path) -> Path:
    for i in range(2):
        _write(root / "dog" / f"bark{i}.wav", _noise(seed=i))
        _write(root / "bird" / f"song{i}.flac", _chirp(), rate=16000)
    return root


def test_labeled_sound_class_folders(tmp_path: Path) -> None:
    root = _labeled_folder(tmp_path / "set")

    dataset = load_labeled_sounds(root, RATE, CLIP, "train")

    assert dataset.classes == ["bird", "dog"]
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert [Path(p).name for p in dataset.paths] == ["song0.flac", "song1.flac", "bark0.wav", "bark1.wav"]
    assert dataset[0].shape == (1, CLIP) and dataset[0].dtype == torch.float32
    assert labeled_kind(root) == "audio"


def test_labeled_sound_csv_and_an_unreadable_file_named(tmp_path: Path) -> None:
    _labeled_folder(tmp_path)
    rows = ["path,label", "dog/bark0.wav,dog", "bird/song0.flac,bird", "dog/bark1.wav,dog"]
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")

    dataset = load_labeled_sounds(tmp_path / "set.csv", RATE, CLIP, "test")

    assert dataset.classes == ["bird", "dog"] and dataset.labels.tolist() == [1, 0, 1]
    assert labeled_kind(tmp_path / "set.csv") == "audio"
    _garbage(tmp_path / "dog" / "bark1.wav")
    with pytest.raises(DataError, match="1 of 3 labeled sounds cannot be read") as err:
        load_labeled_sounds(tmp_path / "set.csv", RATE, CLIP, "test")
    assert str(tmp_path / "dog" / "bark1.wav") in str(err.value)


def test_labeled_kind_of_a_mixed_set_counts_both(tmp_path: Path) -> None:
    _labeled_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "photo.png")

    with pytest.raises(DataError, match="1 images and 4 sound files"):
        labeled_kind(tmp_path)


def test_training_labels_of_a_sound_folder(tmp_path: Path) -> None:
    labeled = _labeled_folder(tmp_path / "train" / "labeled")
    _write(tmp_path / "train" / "unlabeled" / "x.wav", _tone())
    dataset = AudioFolderDataset(tmp_path / "train", RATE, CLIP)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(f"path,label\n{labeled / 'dog' / 'bark0.wav'},dog\n{labeled / 'bird' / 'song1.flac'},bird\n")

    by_folder = training_labels(str(labeled), dataset)
    by_csv = training_labels(str(labels_csv), dataset)

    names = [p.relative_to(tmp_path / "train").as_posix() for p in dataset.files]
    assert by_folder.classes == by_csv.classes == ["bird", "dog"]
    assert dict(zip(names, by_folder.labels.tolist())) == {
        "labeled/bird/song0.flac": 0, "labeled/bird/song1.flac": 0, "labeled/dog/bark0.wav": 1,
        "labeled/dog/bark1.wav": 1, "unlabeled/x.wav": -1}
    assert by_csv.labels.tolist() == [-1, 0, 1, -1, -1]
