"""Distillation on a folder of sounds, no recipe: from a teacher of sounds (its front end checked), from an image
network (the log-mel as a picture), with labels (kd), and born-again generations; stored maps and the teacher cache
are off for sounds, and refused when asked for."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PITCHES, TINY, tone, write_tones
from conftest import SOUND_RATE as RATE

from unsupdistill.augment.audio import LogMel
from unsupdistill.augment.distill import SoundDistillAugmentation
from unsupdistill.cli import main
from unsupdistill.config import SoundViewSpec

SOUND = [item for item in TINY if not item.startswith("eval.summary")] + ["train.batch_size=8", "data.verify=header"]
IMAGE_TEACHER = "timm:resnet10t,channels=[8,16,32,64],stem_width=8"
"""A tiny random ImageNet-shaped network (3 input channels)."""


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ folders of class subfolders of tones of three pitches, 8 kHz WAV."""
    return write_tones(tmp_path_factory.mktemp("sounds"), {"train": 6, "test": 3}, 0.4)


@pytest.fixture(scope="module")
def teacher(sounds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher of sounds: two DINO steps on the train folder."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["pretrain", str(sounds / "train"), "--out", str(out), *SOUND, "train.max_steps=2",
                 "eval.summary=false"]) == 0
    return out


def distill(sounds: Path, out: Path, teacher: str, *args: str) -> int:
    return main(["distill", str(sounds / "train"), "--out", str(out), "--teacher", teacher, *SOUND, *args])


@pytest.mark.slow
def test_distillation_from_a_teacher_of_sounds_ends_with_the_teacher_in_its_summary(
        sounds: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unsupdistill.evaluate import summary as summary_module

    # the speed columns' timings at their minimum passes (2 s each by default)
    monkeypatch.setattr(summary_module, "run_summary", functools.partial(summary_module.run_summary, speed_seconds=0))
    out = tmp_path / "run"
    assert distill(sounds, out, str(teacher), "train.max_steps=2", "--eval-train", str(sounds / "train"),
                   "--eval-test", str(sounds / "test")) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "distill" and config["data"]["kind"] == "audio"
    assert config["distill"]["targets"] == "views" and config["distill"]["cache"] is False
    assert config["distill"]["teacher_size"] == json.loads((teacher / "backbone.json").read_text())["input_size"]
    notes = (out / "config.yaml").read_text()
    assert "off for sounds" in notes and "the sound teacher's own columns" in notes  # the reasons, kept
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["knn_top1"]) == {"this run", "same network, random init", "log-mel statistics", "teacher"}
    assert summary["models"]["teacher"] == str(teacher)
    assert json.loads((out / "backbone.json").read_text())["frontend"]["sample_rate"] == RATE


def test_distillation_from_an_image_network_sees_the_log_mel_as_a_picture(sounds: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert distill(sounds, out, IMAGE_TEACHER, "distill.teacher_size=32", "train.max_steps=2",
                   "eval.summary=false") == 0
    losses = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert losses[-1]["step"] == 2 and all(np.isfinite(m["loss"]) for m in losses)
    assert "the log-mel view as a picture" not in (out / "config.yaml").read_text()  # teacher_size was given


VIT_TEACHER = "timm:vit_tiny_patch16_224,img_size=224,dynamic_img_size=true,depth=1,embed_dim=32,num_heads=2"
"""A tiny random image ViT of 224 px."""


def test_an_image_teacher_sees_two_pixels_per_mel_band_on_a_cpu(sounds: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    assert distill(sounds, tmp_path / "run", VIT_TEACHER, "audio.n_mels=40", "--dry-run") == 0
    # 2 x 40 bands, up to a multiple of 32
    assert re.search(r"distill\.teacher_size +96 +the log-mel view as a picture of 2 px per mel band \(40\), at most "
                     r"the image teacher's 224 px", caplog.text), caplog.text


def test_a_teacher_of_another_front_end_is_refused_with_the_settings_that_match_it(
        sounds: Path, teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    assert distill(sounds, out, str(teacher), "audio.n_mels=32", "audio.hop_ms=20", "train.max_steps=1",
                   "eval.summary=false") == 2
    assert "hears through another front end" in caplog.text
    assert "hop_length 160 (the teacher's 80)" in caplog.text and "n_mels 32 (the teacher's 64)" in caplog.text
    assert "audio.hop_ms=10 audio.n_mels=64 (the teacher's)" in caplog.text
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("setting", ["distill.targets=map", "distill.cache=true", "distill.mixup_alpha=0.2"])
def test_what_needs_an_images_view_is_refused_for_sounds(sounds: Path, tmp_path: Path, setting: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    assert distill(sounds, tmp_path / "run", IMAGE_TEACHER, "distill.teacher_size=32", setting,
                   "train.max_steps=1", "eval.summary=false") == 2
    assert "for sounds" in caplog.text and setting.split("=")[0] in caplog.text


def test_a_sound_teacher_sees_the_students_view_in_its_own_normalisation_and_columns() -> None:
    student = LogMel(RATE, 25, 10, 16, mean=-5.0, std=3.0)
    other = LogMel(RATE, 25, 10, 16, mean=-2.0, std=1.5)
    no_masks = SoundViewSpec(freq_masks=0, time_masks=0)
    waves = torch.from_numpy(np.stack([tone(p, 0.3, np.random.default_rng(1)) for p in PITCHES.values()]))[:, None]
    same = SoundDistillAugmentation(student, no_masks, 24, 24, other)
    params = same.sample(3)
    view, seen = same.render(waves, params)
    assert view.shape == seen.shape == (3, 1, 16, 24)
    torch.testing.assert_close(seen, (view * 3.0 - 5.0 + 2.0) / 1.5, atol=1e-4, rtol=1e-4)  # renormalised
    wider = SoundDistillAugmentation(student, SoundViewSpec(freq_masks=0, time_masks=1), 24, 48, other)
    params = dataclasses.replace(wider.sample(3), time_masks=torch.tensor([[[5, 3]]] * 3))  # columns 5-7 of 24
    _, seen = wider.render(waves, params)
    assert seen.shape == (3, 1, 16, 48)
    masked = (seen == 0).all(dim=2)[:, 0]  # (3, 48): the time mask moved with the columns, to 10-15 of 48
    assert masked[:, 10:16].all() and not masked[:, :10].any() and not masked[:, 16:].any()
    picture = SoundDistillAugmentation(student, no_masks, 24, 32, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    _, seen = picture.render(waves, picture.sample(3))
    assert seen.shape == (3, 3, 32, 32)
    assert -2.0 - 1e-5 <= seen.amin() < -1.5 and 1.5 < seen.amax() <= 2.0 + 1e-5  # in [0, 1], normalised


@pytest.fixture(scope="module")
def labels(sounds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV labeling five of the six clips of each class of the train folder."""
    csv = tmp_path_factory.mktemp("labels") / "labels.csv"
    rows = [f"{sounds / 'train' / name / f'{i}.wav'},{name}" for name in PITCHES for i in range(5)]
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    return csv


def test_kd_with_labels_of_sounds_trains_and_exports_a_classifier(sounds: Path, teacher: Path, labels: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert distill(sounds, out, str(teacher), "--labels", str(labels), "train.max_steps=2", "eval.summary=false") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "kd"
    assert json.loads((out / "classifier.json").read_text())["classes"] == sorted(PITCHES)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [m for m in metrics if "kd_loss" in m]
    assert kd and all(np.isfinite(m["kd_loss"]) for m in kd) and 0 < kd[-1]["labeled_share"] < 1


def test_born_again_generations_of_sounds_learn_from_the_one_before(sounds: Path, teacher: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "born_again"
    assert distill(sounds, out, str(teacher), "--generations", "2", "train.max_steps=1", "eval.summary=false") == 0
    gen2 = yaml.safe_load((out / "gen_2" / "config.yaml").read_text())
    assert gen2["distill"]["teacher"] == str(out / "gen_1") and gen2["data"]["kind"] == "audio"
    assert json.loads((out / "gen_2" / "backbone.json").read_text())["frontend"]["sample_rate"] == RATE
