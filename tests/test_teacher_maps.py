"""Distillation from stored teacher maps: a crop's target, the store, the kept decoded images, the budget's plan."""

import numpy as np
import pytest
import torch
from conftest import export_teacher, read_metrics, write_images

from unsupdistill.data import ImageFolderDataset
from unsupdistill.data.decoded import DecodedImages
from unsupdistill.methods.distill.teacher_pass import plan_budget, teacher_sizes
from unsupdistill.models.teacher_maps import TeacherMaps, fitting_grid, pool_regions


def test_a_crops_target_is_the_teacher_map_pooled_over_the_region_it_covers():
    torch.manual_seed(0)
    maps = torch.randn(3, 7, 7, 5)  # (B, h, w, C)
    # boxes on cell borders: (left, top, width, height) as shares of the side
    boxes = torch.tensor([[2 / 7, 1 / 7, 3 / 7, 4 / 7], [0.0, 0.0, 1.0, 1.0], [6 / 7, 0.0, 1 / 7, 2 / 7]])
    got = pool_regions(maps, boxes)
    expected = torch.stack([maps[0, 1:5, 2:5].mean((0, 1)), maps[1].mean((0, 1)), maps[2, 0:2, 6:7].mean((0, 1))])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a box inside one cell gives that cell (bilinear samples between cell centres would mix its neighbours)
    torch.testing.assert_close(pool_regions(maps[:1], torch.tensor([[3 / 7, 3 / 7, 1 / 7, 1 / 7]])), maps[:1, 3, 3])


def test_the_store_returns_each_images_map_in_batch_order_and_a_new_key_replaces_it(tmp_path):
    torch.manual_seed(0)
    maps = torch.randn(6, 2, 2, 4)
    store = TeacherMaps.open(tmp_path / "maps", "key-a", 6, (2, 2), 4)
    assert store.missing().tolist() == list(range(6))
    store.store(torch.tensor([4, 1, 0]), maps[[4, 1, 0]])
    assert store.missing().tolist() == [2, 3, 5]
    store.store(torch.tensor([5, 3, 2]), maps[[5, 3, 2]])
    store.flush()
    again = TeacherMaps.open(tmp_path / "maps", "key-a", 6, (2, 2), 4)  # reused: a resume passes over nothing
    assert again.missing().size == 0
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, -1)
    order = torch.tensor([5, 0, 3])
    torch.testing.assert_close(again.targets(order, whole), maps[order].half().float().mean((1, 2)))
    other = TeacherMaps.open(tmp_path / "maps", "key-b", 6, (2, 2), 4)  # another teacher or image set
    assert other.missing().size == 6


def test_maps_too_large_for_the_cap_are_pooled_to_a_coarser_grid():
    assert fitting_grid(1000, (7, 7), 1280, 1e12) == (7, 7)
    grid = fitting_grid(1000, (7, 7), 1280, 1000 * 3 * 3 * 1280 * 2 + 1000)
    assert grid == (3, 3)
    assert fitting_grid(1000, (7, 7), 1280, 1.0) == (1, 1)


def test_kept_decoded_images_are_the_pixels_decoding_gives(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "images", 6, 50, 40, fmt="JPEG")
    base = ImageFolderDataset(folder, 24, substitute=True)
    kept = DecodedImages.open(base, tmp_path / "decoded", "key")
    decoded = [base[i][0] for i in range(6)]
    assert [kept[i][1] for i in range(6)] == [-1] * 6  # the first pass decodes, and keeps
    assert kept.kept() == 6
    kept.flush()
    reopened = DecodedImages.open(base, tmp_path / "decoded", "key")  # a resume, or another epoch's worker
    monkeypatch.setattr(base, "_load", lambda index: pytest.fail("decoded a file that was kept"))
    for i in range(6):
        image, failed = reopened[i]
        assert failed == -1 and image.dtype == torch.uint8 and torch.equal(image, decoded[i])
    assert len(reopened) == 6 and reopened.files == base.files  # the base's attributes


def test_the_plan_gives_the_teacher_a_bounded_share_and_the_student_the_rest():
    sizes = teacher_sizes(224)
    assert sizes == [224, 192, 160, 128, 96]
    # 3,000 images: decoding 150/s, the teacher 100/s at 224 px -> 50 s at 224 px
    roomy = plan_budget(900, 3000, sizes, teacher_rate=100, rate_size=224, decode_rate=150, student_rate=400,
                        student_size=96, share=0.2)
    assert roomy.teacher_size == 224 and roomy.teacher_s == pytest.approx(50)
    assert roomy.student_epochs == pytest.approx((900 - 50) * 400 / 3000)
    assert "3,000 images at 224 px, ~0.8 min; student: ~113 epochs at 96 px" in roomy.line()
    # a fifth of 200 s is 40 s: 224 px (50 s) and 192 px (20 + 30 * (192/224)^2 = 42 s) do not fit, 160 px does
    tight = plan_budget(200, 3000, sizes, teacher_rate=100, rate_size=224, decode_rate=150, student_rate=400,
                        student_size=96, share=0.2)
    assert tight.teacher_size == 160 and tight.teacher_s == pytest.approx(20 + 30 * (160 / 224) ** 2)
    assert "at 224 px it would take ~50 s" in tight.why
    hopeless = plan_budget(20, 3000, sizes, teacher_rate=100, rate_size=224, decode_rate=150, student_rate=400,
                           student_size=96, share=0.2)
    assert hopeless.teacher_size == 96 and hopeless.student_epochs == 0 and "more than 20%" in hopeless.why


def test_region_pooling_matches_a_brute_force_bilinear_mean():
    """Any box: the mean of a grid of bilinear samples, one per cell spanned, at the centres of equal sub-boxes."""
    torch.manual_seed(1)
    maps = torch.randn(1, 5, 5, 3)
    left, top, width, height = 0.13, 0.27, 0.61, 0.44
    got = pool_regions(maps, torch.tensor([[left, top, width, height]]))
    nx, ny = int(np.ceil(width * 5)), int(np.ceil(height * 5))
    xs = (left + (np.arange(nx) + 0.5) * width / nx) * 5 - 0.5  # sample positions in cell-index coordinates
    ys = (top + (np.arange(ny) + 0.5) * height / ny) * 5 - 0.5
    m = maps[0].numpy()

    def bilinear(y: float, x: float) -> np.ndarray:
        y, x = min(max(y, 0), 4), min(max(x, 0), 4)
        y0, x0 = min(int(y), 3), min(int(x), 3)
        dy, dx = y - y0, x - x0
        return ((1 - dy) * (1 - dx) * m[y0, x0] + (1 - dy) * dx * m[y0, x0 + 1] + dy * (1 - dx) * m[y0 + 1, x0]
                + dy * dx * m[y0 + 1, x0 + 1])

    expected = np.mean([bilinear(y, x) for y in ys for x in xs], axis=0)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_photo_folder_distils_from_one_teacher_pass_inside_its_budget(tmp_path, monkeypatch):
    """The teacher passes over the folder once (its maps and the decoded images stored), its seconds count against
    the time budget, later epochs decode no file, and the last record says where the time went."""
    import time

    from unsupdistill.config import load_config
    from unsupdistill.methods import build_trainer
    from unsupdistill.methods.distill.method import Distillation

    folder = write_images(tmp_path / "photos", 40, 72, 56, fmt="JPEG")
    teacher = export_teacher(tmp_path / "teacher", 48, seed=0)
    config = load_config(None, [f"data.path={folder}", "method=distill", f"distill.teacher={teacher}",
                                "model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}",
                                "model.input_size=24", "model.input_size=24", "dino.local.size=16",
                                "train.batch_size=8", "data.num_workers=0", "train.log_every_steps=1",
                                "eval.summary=false", "train.epochs=3", "distill.teacher_runtime=eager fp32",
                                "train.time_budget_s=60"])
    setup = Distillation._setup_maps

    def slow_setup(self, dataset):  # a teacher pass that takes a second longer
        time.sleep(1.0)
        setup(self, dataset)

    monkeypatch.setattr(Distillation, "_setup_maps", slow_setup)
    run = tmp_path / "run"
    trainer = build_trainer(config, run)
    assert trainer.method.maps is not None and trainer.method.maps.missing().size == 0  # one pass, before training
    assert trainer.dataset.kept() == 40  # the pass kept the images decoded at the student's working size
    assert trainer.dataset.image_size == 32 and trainer.method.image_size == 32  # 4/3 of the 24-px input
    monkeypatch.setattr(type(trainer.dataset.base), "_load", lambda *_: pytest.fail("an epoch decoded a file"))
    trainer.fit()
    records = read_metrics(run)
    assert records[0]["budget_left_s"] < 59.0  # the pass (and its second of sleep) was spent before the first step
    last = records[-1]
    shares = [last[f"time_{part}_share"] for part in ("decode", "views", "teacher", "student", "rest")]
    assert sum(shares) == pytest.approx(1.0, abs=0.01) and last["time_teacher_s"] > 0 and last["time_student_s"] > 0
    assert (run / "teacher_maps" / "meta.json").is_file() and (run / "decoded_images" / "meta.json").is_file()
