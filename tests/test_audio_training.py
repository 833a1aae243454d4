"""Sound through the command line: a folder of generated sounds is scanned, gets its front end chosen (with the
reasons), trains (DINO), and ends with the summary against its baselines, log-mel statistics and random init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from conftest import SOUND_RATE as RATE
from conftest import TINY, write_tones

from unsupdistill.cli import main

# the tiny network of the image tests, one step of the digits' size, and the clip's own columns
SOUND = [item for item in TINY if not item.startswith("eval.summary")]


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ folders of class subfolders of tones of three pitches (each clip a little off its pitch, of
    its own length), 8 kHz WAV."""
    return write_tones(tmp_path_factory.mktemp("sounds"), {"train": 10, "test": 4}, 0.5)


@pytest.fixture(scope="module")
def run(sounds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few DINO steps on the train folder, no recipe, with the end-of-run summary on train/test."""
    out = tmp_path_factory.mktemp("runs") / "sound"
    code = main(["pretrain", str(sounds / "train"), "--out", str(out), "--eval-train", str(sounds / "train"),
                 "--eval-test", str(sounds / "test"), *SOUND, "train.batch_size=8", "train.max_steps=4"])
    assert code == 0
    return out


def test_the_front_end_is_chosen_from_the_folder_and_kept_with_the_model(run: Path) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["kind"] == "audio" and config["model"]["in_chans"] == 1
    audio = config["audio"]
    assert audio["sample_rate"] == RATE
    assert 0.2 <= audio["clip_seconds"] <= 0.5  # the 90th percentile of the lengths drawn, 0.2-0.5 s
    assert audio["std"] > 0 and audio["mean"] is not None
    notes = (run / "config.yaml").read_text()
    assert "the folder's most common rate" in notes and "90 % of the files last" in notes  # the reasons, kept

    sidecar = json.loads((run / "backbone.json").read_text())
    frontend = sidecar["frontend"]
    assert frontend["sample_rate"] == RATE and frontend["n_mels"] == audio["n_mels"]
    assert frontend["frames"] == config["model"]["input_size"] == sidecar["input_size"]
    assert frontend["clip_samples"] == round(audio["clip_seconds"] * RATE)
    assert frontend["mean"] == audio["mean"] and frontend["std"] == audio["std"]
    assert sidecar["timm_kwargs"]["in_chans"] == 1


def test_the_summary_scores_the_run_against_log_mel_statistics_and_random_init(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    scores = summary["knn_top1"]
    assert set(scores) == {"this run", "same network, random init", "log-mel statistics"}
    assert summary["models"]["log-mel statistics"] == "logmel"
    assert scores["log-mel statistics"] == 100.0  # three pitches far apart: each band's mean tells them apart
    assert "log-mel statistics" in summary["reading"]


def test_eval_of_a_sound_model_reads_the_labeled_sounds_through_its_front_end(run: Path, sounds: Path, tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "eval"
    caplog.set_level("INFO")
    assert main(["eval", str(run), "--eval-train", str(sounds / "train"), "--eval-test", str(sounds / "test"),
                 "--no-linear", "--no-clustering", "--no-plots", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_train"] == 30 and result["num_test"] == 12 and result["num_classes"] == 3
    assert "on 30 sounds:" in caplog.text and "on 12 sounds:" in caplog.text
    assert result["input_size"] == json.loads((run / "backbone.json").read_text())["input_size"]


def test_a_folder_of_images_and_sounds_is_refused_with_both_counts(sounds: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, wav in enumerate(sorted((sounds / "train" / "low").glob("*.wav"))[:3]):
        (mixed / f"{i}.wav").write_bytes(wav.read_bytes())
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (8, 8)).save(mixed / f"{i}.png")
    assert main(["pretrain", str(mixed), "--out", str(tmp_path / "run"), *SOUND, "train.max_steps=1"]) == 2
    assert "holds 2 images and 3 sound files" in caplog.text and "into a folder of their own" in caplog.text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unreadable_and_silent_sounds_are_skipped_counted_and_listed(sounds: Path, tmp_path: Path) -> None:
    folder = tmp_path / "some bad"
    folder.mkdir()
    for i, wav in enumerate(sorted((sounds / "train" / "mid").glob("*.wav"))):
        (folder / f"{i}.wav").write_bytes(wav.read_bytes())
    (folder / "empty.wav").write_bytes(b"")
    (folder / "noise.flac").write_bytes(b"not a sound at all")
    sf.write(folder / "silent.wav", np.zeros(RATE // 4, dtype=np.float32), RATE)
    out = tmp_path / "run"
    assert main(["pretrain", str(folder), "--out", str(out), *SOUND, "train.batch_size=4", "train.max_steps=1",
                 "eval.summary=false"]) == 0
    skipped = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert {Path(p).name for p in skipped} == {"empty.wav", "noise.flac", "silent.wav"}
    assert "silent" in skipped[str(folder / "silent.wav")]


def test_a_vit_sees_the_spectrogram_in_square_patches_chosen_from_its_shape(sounds: Path, tmp_path: Path) -> None:
    """AST's layout: ``model.backbone`` a ViT and nothing else set; the patches tile the mel bands, the global and the
    local views' columns; the run trains and exports (TorchScript parity on the test clips, through the front end;
    ONNX takes 20 s to export a 12-block ViT, and test_export.py exports a 2-block one)."""
    out = tmp_path / "vit"
    args = [item for item in SOUND if not item.startswith("model.backbone_kwargs")]
    assert main(["pretrain", str(sounds / "train"), "--out", str(out), *args, "model.backbone=vit_tiny_patch16_224",
                 "train.batch_size=6", "train.max_steps=2", "eval.summary=false"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    kwargs, audio, frames = config["model"]["backbone_kwargs"], config["audio"], config["model"]["input_size"]
    patch = kwargs["patch_size"]
    assert kwargs["img_size"] == [audio["n_mels"], frames] and patch in (4, 8, 16)
    assert audio["n_mels"] % patch == frames % patch == audio["local_frames"] % patch == 0
    assert audio["local_frames"] < frames
    assert main(["export", str(out), "--format", "torchscript", "--out", str(tmp_path / "export"),
                 "--data", str(sounds / "test")]) == 0
    sidecar = json.loads(next((tmp_path / "export").glob("*.json")).read_text())
    assert sidecar["frontend"]["frames"] == frames
