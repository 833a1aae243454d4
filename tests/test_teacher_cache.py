"""Distillation's teacher cache (stored views replay pixel for pixel; a changed teacher, view recipe or image
invalidates it; distill.cache_max_gb limits the views stored; torchrun; resume after SIGKILL is in test_resume.py),
and distillation's automatic settings on a folder of photos."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_teacher, read_metrics, write_images

from unsupdistill.augment.distill import VIEW_PARAMS
from unsupdistill.cli import main
from unsupdistill.config import load_config
from unsupdistill.data import build_dataset
from unsupdistill.methods import build_trainer
from unsupdistill.methods.distill.method import Distillation
from unsupdistill.models.backbone import create_backbone, pooled_and_spatial
from unsupdistill.models.teacher_cache import TeacherCache, cache_bytes
from unsupdistill.storage import DiskSpaceError
from unsupdistill.train.method import Batch, Runtime
from unsupdistill.train.schedules import schedule_at

STUDENT = ["model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}", "model.input_size=12",
           "train.batch_size=16", "data.num_workers=0", "train.log_every_steps=1", "eval.summary=false",
           "distill.targets=views"]  # the teacher on the views: the cache of stored views applies
CACHED = ["distill.cache=on", "distill.cache_views=1"]
"""One stored view per image: every epoch after the first replays it."""
DINO_ONLY = ("loss.", "dino.", "\ndino:", "head_", "teacher_momentum", "teacher_temp", "num_local_crops", "global_2",
             "local.", "freeze_last_layer", "norm_last_layer", "low_res")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("cache") / "images", 48, 20, 20)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return export_teacher(tmp_path_factory.mktemp("teacher"), 16, seed=0)


def build(teacher: Path, images: Path, run_dir: Path, *overrides: str) -> tuple[Distillation, object]:
    """The distillation method on ``images`` with its dataset, set up (the cache opened) in ``run_dir``."""
    config = load_config(None, ["method=distill", f"distill.teacher={teacher}", f"data.path={images}", *STUDENT,
                                *CACHED, *overrides])
    method = Distillation(config, Runtime(torch.device("cpu"), None, 1, run_dir))
    dataset = build_dataset(config.data, method.image_size)
    method.setup(dataset)
    return method, dataset


def step_values(method: Distillation):
    return schedule_at(0, 10, 3, 16, method.config.optim)


def record(method: Distillation, dataset, count: int = 8):
    """A recording epoch's step on the first ``count`` images; returns the views it made."""
    batch = Batch(torch.stack([dataset[i] for i in range(count)]), torch.arange(count))
    method.start_epoch(0)
    views = method.views(batch, step_values(method))
    method.loss(views, step_values(method))  # runs the teacher and stores its features
    return batch, views


def test_a_replayed_view_is_the_view_the_teacher_saw(teacher, images, tmp_path):
    torch.manual_seed(0)
    method, dataset = build(teacher, images, tmp_path)
    batch, seen = record(method, dataset)
    assert seen.teacher is not None and seen.run_teacher.all()
    method.start_epoch(1)  # a replay epoch: the teacher does not run
    replayed = method.views(batch, step_values(method))
    assert replayed.teacher is None and not replayed.run_teacher.any()
    assert torch.equal(replayed.params, seen.params)
    assert torch.equal(replayed.student, seen.student)  # pixel for pixel
    # the stored targets are the teacher's features of the views it saw, as fp16
    with torch.no_grad():
        expected, _ = pooled_and_spatial(method.teacher.backbone, seen.teacher)
    assert torch.equal(replayed.stored.stored, expected.to(torch.float16))
    # and the student's view shows the teacher's crop: the teacher's view, shrunk, is the student's
    t_mean, t_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (method.teacher.mean, method.teacher.std))
    s_mean, s_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (method.config.model.mean, method.config.model.std))
    shrunk = torch.nn.functional.interpolate(seen.teacher * t_std + t_mean, size=(12, 12), mode="bilinear",
                                             align_corners=False, antialias=True)
    torch.testing.assert_close(shrunk, replayed.student * s_std + s_mean, atol=1e-5, rtol=0)
    # a fresh view of the same image, drawn where nothing is stored, differs: replaying is not drawing it again
    fresh, _ = build(teacher, images, tmp_path / "fresh")
    fresh.start_epoch(0)
    assert not torch.equal(fresh.views(batch, step_values(fresh)).student, seen.student)


def test_a_complete_cache_reused_by_a_new_run_replays_from_its_first_epoch(teacher, images, tmp_path):
    """A recording epoch over slots a reused cache already holds replays them: the teacher does not run again."""
    torch.manual_seed(0)
    first, dataset = build(teacher, images, tmp_path / "run")
    _, seen = record(first, dataset)
    again, again_data = build(teacher, images, tmp_path / "run")  # a new run over the same cache folder
    batch = Batch(torch.stack([again_data[i] for i in range(10)]), torch.arange(10))  # 8 stored, 2 not
    again.start_epoch(0)
    views = again.views(batch, step_values(again))
    assert views.run_teacher.tolist() == [False] * 8 + [True] * 2
    assert torch.equal(views.params[:8], seen.params) and torch.equal(views.student[:8], seen.student)
    assert views.teacher is not None and len(views.teacher) == 2  # only the new images' views go to the teacher
    again.loss(views, step_values(again))
    assert int(again.store.cache.filled.sum()) == 10


def test_a_changed_teacher_view_recipe_or_image_invalidates_the_cache(teacher, images, tmp_path):
    method, dataset = build(teacher, images, tmp_path / "run")
    record(method, dataset)
    assert method.store.cache.filled.sum() == 8

    def stored_after(*overrides: str, teacher_path: Path = teacher, folder: Path = images) -> int:
        again, again_data = build(teacher_path, folder, tmp_path / "run", *overrides)
        count = int(again.store.cache.filled.sum())
        record(again, again_data)  # refill, so the next case starts from a full cache of its own key
        return count

    assert stored_after() == 8  # the same teacher, views and images: reused
    other = export_teacher(tmp_path / "other", 16, seed=1)  # the same architecture, other weights
    assert stored_after(teacher_path=other) == 0
    assert stored_after() == 0  # and back: that cache was the other teacher's
    assert stored_after("distill.view.scale=[0.5, 1.0]") == 0
    assert stored_after("distill.view.scale=[0.5, 1.0]") == 8
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in images.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert stored_after("distill.view.scale=[0.5, 1.0]", folder=copy) == 0  # other files (paths, times)
    assert stored_after("distill.view.scale=[0.5, 1.0]", folder=copy) == 8
    write_images(tmp_path / "changed", 1, 20, 20, seed=9)
    os.replace(tmp_path / "changed" / "000.png", copy / "005.png")  # one image replaced
    assert stored_after("distill.view.scale=[0.5, 1.0]", folder=copy) == 0


def test_cache_max_gb_stores_fewer_views_and_the_teacher_runs_fewer_epochs(teacher, images, tmp_path, caplog):
    """distill.cache_views=3 in a limit that holds 2 views per image: 2 are stored (a warning says so), so the teacher
    runs in epochs 1-2 and epoch 3 replays; a limit under one view per image turns the cache off, saying why."""
    per_view = cache_bytes(48, 1, 32, len(VIEW_PARAMS))  # 48 images, the teacher's 32-d features

    def run(name: str, views_that_fit: float) -> Path:
        config = load_config(None, ["method=distill", f"distill.teacher={teacher}", f"data.path={images}", *STUDENT,
                                    *CACHED, "distill.cache_views=3", "train.max_steps=9",
                                    f"distill.cache_max_gb={views_that_fit * per_view / 1e9}"])
        with caplog.at_level(logging.INFO):
            build_trainer(config, tmp_path / name).fit()
        return tmp_path / name

    two = run("two", 2.5)
    assert "teacher cache: 3 views per image would take" in caplog.text and "storing 2" in caplog.text
    assert [m["teacher_cache_hits"] for m in read_metrics(two)] == [0.0] * 6 + [1.0] * 3  # 3 steps an epoch
    filled = np.load(two / "teacher_cache" / "filled.npy")
    assert filled.shape == (48, 2) and filled.all()
    caplog.clear()
    off = run("off", 0.5)
    assert "teacher cache off: one view per image takes" in caplog.text and "> distill.cache_max_gb" in caplog.text
    assert not (off / "teacher_cache").exists()


@pytest.mark.slow
def test_two_process_torchrun_with_the_cache(teacher, images, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "unsupdistill",
         "distill", str(images), "--out", str(out), "--teacher", str(teacher), *STUDENT, *CACHED,
         "train.max_steps=9"], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 10))
    # 48 images over 2 processes, 8 a step each: 3 steps an epoch; each process's second epoch replays views
    # that either process stored in the first (the sampler shuffles across processes)
    assert [m["teacher_cache_hits"] for m in metrics] == [0.0] * 3 + [1.0] * 6
    assert int(np.load(out / "teacher_cache" / "filled.npy").sum()) == 48


def test_a_photo_folder_gets_distillation_settings_and_no_dino_keys(tmp_path, caplog):
    photos = write_images(tmp_path / "photos", 8, 300, 200, fmt="JPEG")
    teacher = export_teacher(tmp_path / "teacher", 224, seed=0)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["distill", str(photos), "--teacher", str(teacher), "--out", str(out), "train.max_steps=2",
                     "data.num_workers=0", "train.log_every_steps=1"]) == 0
    config = load_config(str(out / "config.yaml"))
    assert config.distill.teacher_size == 192  # 224 px, no larger than the photos' 200 px (to 32)
    assert config.data.image_size == 128  # stored teacher maps: the images kept at 4/3 of the student's 96 px
    table = caplog.text.split("settings chosen for 8 images")[1].split("\n\n")[0]
    text = (out / "config.yaml").read_text()
    for key in DINO_ONLY:
        assert key not in table and key not in text, key
    assert "distill.teacher_size" in table and "# Settings chosen automatically" in text
    metrics = read_metrics(out)
    assert metrics and not any(key in record for record in metrics for key in ("teacher_momentum", "teacher_temp"))
    assert "teacher_agreement" in metrics[-1]
    # overrides win, and what follows from them follows
    with caplog.at_level(logging.INFO):
        assert main(["distill", str(photos), "--teacher", str(teacher), "--out", str(tmp_path / "mine"),
                     "train.max_steps=1", "data.num_workers=0", "distill.teacher_size=64",
                     "model.input_size=48"]) == 0
    mine = load_config(str(tmp_path / "mine" / "config.yaml"))
    assert (mine.distill.teacher_size, mine.model.input_size, mine.data.image_size) == (64, 48, 64)
    assert json.loads((tmp_path / "mine" / "backbone.json").read_text())["input_size"] == 48


@pytest.mark.slow
def test_a_time_budget_warms_up_and_decays_within_its_planned_steps(images, teacher, tmp_path):
    """The automatic warm-up is a share of the planned steps: a 6-s budget of a folder planned for 100+ epochs
    still reaches the peak lr early and ends near the minimum (it rose until the last step before)."""
    out = tmp_path / "run"
    assert main(["distill", str(images), "--teacher", str(teacher), "--out", str(out), "train.time_budget_s=6",
                 "data.num_workers=0", "train.log_every_steps=1", "distill.cache=off"]) == 0
    metrics = read_metrics(out)
    lrs = [m["lr"] for m in metrics]
    planned = metrics[-1]["planned_steps"]
    assert len(lrs) == planned > 10
    peak = lrs.index(max(lrs)) + 1
    assert peak <= 0.25 * planned, (peak, planned)  # the warm-up ended early in the run
    assert lrs[-1] < 0.1 * max(lrs)  # and the cosine decayed by its end


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnet10t"])
def test_a_mobile_student_reports_its_pooled_width(name):
    """MobileNetV3 pools, then widens through a conv head to 1,024: the spec's feature_dim, which sizes
    distillation's projection, is the width the backbone returns (it was timm's num_features, before the head)."""
    from unsupdistill.config import ModelConfig

    backbone, spec = create_backbone(ModelConfig(backbone=name, backbone_kwargs={}, small_image_stem=False))
    with torch.no_grad():
        pooled, _ = pooled_and_spatial(backbone.eval(), torch.zeros(1, 3, 64, 64))
    assert spec.feature_dim == pooled.shape[1]


def open_cache(folder: Path, images: int = 6) -> TeacherCache:
    return TeacherCache.open(folder, "key", images, 2, 4, 3)


def test_a_truncated_or_missing_cache_file_is_made_anew_with_a_warning_naming_it(tmp_path, caplog):
    """A cache is derived data: a damaged one is rebuilt, with the reason logged, not a traceback; a short file
    is not zero-filled to length and read as stored views (numpy does that to a file opened read-write)."""
    cache = open_cache(tmp_path / "cache")
    cache.store(torch.arange(6), torch.zeros(6, dtype=torch.long), torch.ones(6, 3), torch.ones(6, 4))
    cache.flush()
    del cache
    features = tmp_path / "cache" / "features.npy"
    with open(features, "r+b") as file:
        file.truncate(features.stat().st_size - 10)  # a disk that filled up, a copy cut short
    with caplog.at_level(logging.WARNING, logger="unsupdistill"):
        again = open_cache(tmp_path / "cache")
    assert int(again.filled.sum()) == 0
    assert f"{features} cannot be read, truncated or damaged" in caplog.text and "made anew" in caplog.text
    del again
    caplog.clear()
    (tmp_path / "cache" / "params.npy").unlink()
    with caplog.at_level(logging.WARNING, logger="unsupdistill"):
        open_cache(tmp_path / "cache")
    assert f"{tmp_path / 'cache' / 'params.npy'} is missing" in caplog.text


def test_an_unreadable_cache_meta_json_is_named_in_the_warning(tmp_path, caplog):
    open_cache(tmp_path / "cache")
    (tmp_path / "cache" / "meta.json").write_text('{"format": "unsupdistill.teacher_cache/1", "key"')
    with caplog.at_level(logging.WARNING, logger="unsupdistill"):
        open_cache(tmp_path / "cache")
    assert f"{tmp_path / 'cache' / 'meta.json'} cannot be read (JSONDecodeError" in caplog.text
    assert "made anew, empty" in caplog.text


def test_a_cache_larger_than_the_free_disk_fails_before_training_naming_folder_bytes_and_setting(
        teacher, images, tmp_path, monkeypatch, caplog):
    """Sparse memory maps written past a full disk end in SIGBUS with status.json at running: the space is checked
    first. The teacher cache fails the run (exit 2, status failed) naming the fix; the decoded images, an option,
    are not kept, with a warning."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(DiskSpaceError, match=r"cache needs 2,016 bytes \(0\.00 GB\) more disk space, but only "
                                             r"1,000 bytes"):
        open_cache(tmp_path / "cache", images=48)
    assert not (tmp_path / "cache").exists()

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main(["distill", str(images), "--teacher", str(teacher), "--out", str(out), *STUDENT, *CACHED,
                     "train.max_steps=2"]) == 2
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 2
    assert f"{out / 'teacher_cache'} needs" in status["reason"] and "lower distill.cache_max_gb" in status["reason"]
    assert "decoded images not kept" in caplog.text and "data.keep_decoded_max_gb" in caplog.text
    assert not (out / "teacher_cache").exists() and not (out / "decoded_images").exists()
