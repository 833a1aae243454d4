"""unsupdistill.auto: the settings a folder without a recipe gets from its images, the device and the number of
processes (the ViT's crop and patch, blur on small crops, network width, batch), and the user's key=value winning."""

from pathlib import Path

import pytest
import torch
from conftest import export_teacher, write_images

from unsupdistill.auto import auto_settings, explicit_keys
from unsupdistill.config import Config, load_config
from unsupdistill.data.scan import FolderScan
from unsupdistill.methods.distill.method import Distillation

HALF_WIDTH = Config().model.backbone_kwargs
"""The defaults' ResNet-18 (half width: 4x fewer FLOPs on a CPU)."""


def scan_of(shorter_side: int, images: int = 100) -> FolderScan:
    """A folder of ``images`` landscape images of ``shorter_side`` px (3:2)."""
    return FolderScan("/images", "full", [f"{i}.png" for i in range(images)],
                      [(shorter_side * 3 // 2, shorter_side)] * images)


def chosen(overrides: list[str], shorter_side: int = 300, images: int = 100, device: str = "cpu",
           world_size: int = 1) -> Config:
    """The config ``unsupdistill pretrain FOLDER OVERRIDES`` trains with, the automatic settings applied."""
    config = load_config(None, overrides, check=False)
    return auto_settings(config, scan_of(shorter_side, images), device, explicit_keys(overrides), world_size)[0]


# ---- a ViT: crop and patch size from the images ---------------------------------------------------


@pytest.mark.parametrize(("shorter_side", "device", "crop", "patch"), [
    (40, "cpu", 32, 4),  # 40 / 1.15 = 34.8 px: 8 patches of 4
    (100, "cuda", 80, 8),  # 87 px: 10 patches of 8
    (300, "cpu", 96, 8),  # 261 px, capped at 96 on a CPU: 12 patches of 8
    (640, "cuda", 224, 16),  # capped at 224 on a GPU: 14 patches of 16
])
def test_a_vit_gets_a_crop_of_whole_patches_from_its_images(shorter_side, device, crop, patch):
    config = chosen(["model.backbone=vit_small_patch16_224"], shorter_side, device=device)
    assert config.model.input_size == config.model.input_size == crop
    assert config.model.backbone_kwargs == {"img_size": crop, "patch_size": patch}
    assert config.dino.local.size % patch == 0 and config.dino.local.size < crop
    assert not config.model.small_image_stem
    # DINO's ViT recipe: no BatchNorm in the head, an unnormalised last layer, lr 5e-4 per 256 images
    assert (config.dino.head_batch_norm, config.dino.norm_last_layer, config.optim.lr) == (False, False, 5e-4)


def test_a_vit_with_a_crop_of_yours_gets_the_patch_size_that_fits_it():
    config = chosen(["model.backbone=vit_small_patch16_224", "model.input_size=40"], 300)
    assert config.model.input_size == 40 and config.model.backbone_kwargs == {"img_size": 40, "patch_size": 4}


@pytest.mark.parametrize("shorter_side", [50, 60, 70, 100, 140, 175, 200, 257])  # crops of 40 to 224 px on a GPU
def test_a_vit_gets_8_to_14_patches_a_side_as_promised(shorter_side):
    config = chosen(["model.backbone=vit_small_patch16_224"], shorter_side, device="cuda")
    kwargs = config.model.backbone_kwargs
    assert 8 <= kwargs["img_size"] // kwargs["patch_size"] <= 14, kwargs


# ---- Gaussian blur on small crops ------------------------------------------------------------------


@pytest.mark.parametrize(("shorter_side", "crop", "blurred"), [(73, 60, False), (74, 64, True)])
def test_gaussian_blur_is_off_on_crops_under_64_px(shorter_side, crop, blurred):
    config, defaults = chosen([], shorter_side), Config().dino
    assert config.model.input_size == crop
    for view in ("global_1", "global_2", "local"):
        default = getattr(defaults, view).blur_p
        assert default > 0, view  # so that "off" and "kept" differ
        assert getattr(config.dino, view).blur_p == (default if blurred else 0.0), view


def test_a_blur_you_set_stays_on_small_crops():
    config = chosen(["dino.local.blur_p=0.3"], 40)
    assert config.model.input_size < 64
    assert (config.dino.global_1.blur_p, config.dino.local.blur_p) == (0.0, 0.3)


# ---- network width: the device, and the backbone you name ------------------------------------------------


def test_a_resnet18_is_full_width_on_a_gpu_and_narrower_on_a_cpu(tmp_path):
    assert chosen([], device="cpu").model.backbone_kwargs == HALF_WIDTH == {"channels": [32, 64, 128, 256],
                                                                            "stem_width": 32}
    assert chosen([], device="cuda").model.backbone_kwargs == {}  # timm's own: full width
    # distillation's student: a quarter width on a CPU, full width on a GPU too
    teacher = export_teacher(tmp_path / "teacher", 16, seed=0)
    overrides = ["method=distill", f"distill.teacher={teacher}"]
    config = load_config(None, overrides, check=False)
    student = {device: auto_settings(config, scan_of(300), device, explicit_keys(overrides),
                                     method=Distillation)[0].model.backbone_kwargs for device in ("cpu", "cuda")}
    assert student == {"cpu": {"channels": [16, 32, 64, 128], "stem_width": 16}, "cuda": {}}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_backbone_you_name_gets_its_own_arguments_not_the_defaults_resnet18_ones(device):
    config = chosen(["model.backbone=resnet34"], 300, device=device)
    assert config.model.backbone_kwargs == {} and not config.model.small_image_stem  # 96 / 224 px: ImageNet stem
    config = chosen(["model.backbone=resnet34", "model.backbone_kwargs={drop_rate: 0.1}"], 300, device=device)
    assert config.model.backbone_kwargs == {"drop_rate": 0.1}  # yours, kept
    small = chosen(["model.backbone=mobilenetv3_small_100"], 40, device=device)
    assert small.model.backbone_kwargs == {} and not small.model.small_image_stem
    assert small.model.input_size == 64  # no small-image stem: at least a 2x2 last feature map


# ---- the batch over the processes -------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "batch"), [(1, 32), (2, 32), (3, 30), (6, 30), (64, 64)])
def test_the_batch_is_rounded_down_to_a_multiple_of_the_processes(world_size, batch):
    config = chosen([], 300, images=100, world_size=world_size)  # 64 on a CPU, at most half the 100 images: 32
    assert config.train.batch_size == batch and batch % world_size == 0
    steps = 100 // batch
    assert config.train.epochs == max(100, -(-1000 // steps))  # at least 1,000 steps of that batch


def test_a_batch_you_set_is_not_rounded():
    assert chosen(["train.batch_size=10"], 300, world_size=3).train.batch_size == 10  # the trainer names the error


def test_a_run_under_torchrun_splits_the_automatic_batch_over_its_processes(tmp_path, monkeypatch):
    """The CLI hands the automatic settings torchrun's WORLD_SIZE (read before any process group exists)."""
    from unsupdistill.cli import training

    monkeypatch.setattr(training.distributed, "launched_world_size", lambda: 3)
    images = write_images(tmp_path / "images", 24, 20, 20)
    config = load_config(None, [f"data.path={images}"], check=False)
    config, _, notes = training._settings_for_data(config, None, True, [], torch.device("cpu"))
    assert config.train.batch_size == 6  # 8 (half the 24 images) rounded down to 2 per process
    assert "train.batch_size" in notes and Path(config.data.path) == images
