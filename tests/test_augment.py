"""Multi-crop augmentation: shapes, reproducibility and the statistics of each random stage; iBOT's masks; the batched
crop against the sliced one; progressive resizing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY

from unsupdistill.augment import (
    MultiCropAugmentation,
    blur_kernel_size,
    blur_sigma,
    build_view_transform,
    ibot_masks,
    sized,
)
from unsupdistill.config import Config, ConfigError, CropSpec, load_config
from unsupdistill.methods.dino.method import DINO
from unsupdistill.methods.dino.settings import DINOConfig
from unsupdistill.train.method import Batch, Runtime
from unsupdistill.train.schedules import ScheduleValues

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std that leave values unchanged


def plain_spec(size: int, scale: tuple[float, float] = (1.0, 1.0), **overrides: Any) -> CropSpec:
    """A spec with every random stage off except those given."""
    off = {"flip_p": 0.0, "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
    return CropSpec(size=size, scale=scale, **{**off, **overrides})


def small_multicrop(num_local_crops: int = 3) -> MultiCropAugmentation:
    """DINO's views at 32 / 16 px with ImageNet's normalisation."""
    return MultiCropAugmentation(CropSpec(size=32, scale=(0.4, 1.0), blur_p=1.0),
                                 CropSpec(size=32, scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2),
                                 CropSpec(size=16, scale=(0.05, 0.4), blur_p=0.5), num_local_crops,
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def coordinate_images(batch: int, size: int) -> torch.Tensor:
    """(batch, 3, size, size) images whose channel 0 is x / size and channel 1 is y / size."""
    ramp = torch.arange(size, dtype=torch.float32) / size
    image = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.zeros(size, size)])
    return image.expand(batch, -1, -1, -1).contiguous()


# ----------------------------------------------------------------------------------------------
# MultiCropAugmentation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_view_shapes_and_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    if dtype == torch.float32:
        images = images.float() / 255
    augment = small_multicrop(num_local_crops=3)
    global_views, local_views = augment(images)
    assert augment.num_views == 5
    assert global_views.shape == (8, 3, 32, 32)
    assert local_views is not None and local_views.shape == (12, 3, 16, 16)
    for views in (global_views, local_views):
        assert views.dtype == torch.float32 and views.is_contiguous() and torch.isfinite(views).all()
        assert not views.requires_grad


def test_no_local_crops_gives_none() -> None:
    augment = small_multicrop(num_local_crops=0)
    global_views, local_views = augment(torch.rand(2, 3, 32, 32))
    assert global_views.shape == (4, 3, 32, 32) and local_views is None
    assert augment.num_views == 2


def test_uint8_input_is_scaled_to_unit_range() -> None:
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    augment = small_multicrop()
    torch.manual_seed(1)
    from_uint8 = augment(images)
    torch.manual_seed(1)
    from_float = augment(images.float() / 255)
    for a, b in zip(from_uint8, from_float):
        torch.testing.assert_close(a, b)


def test_same_seed_same_views_different_seed_different_views() -> None:
    images = torch.rand(4, 3, 32, 32)
    augment = small_multicrop()

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        torch.manual_seed(seed)
        return augment(images)

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], other[0]) and not torch.allclose(first[1], other[1])


def test_views_are_ordered_by_view_then_image_with_independent_parameters() -> None:
    # A constant-colour image stays that colour through cropping, so each view can be traced to its image;
    # only global view 2 solarizes (0.9 -> 0.1), which shows that each half uses its own spec.
    augment = MultiCropAugmentation(plain_spec(8, (0.4, 1.0)), plain_spec(8, (0.4, 1.0), solarize_p=1.0),
                                    plain_spec(4, (0.05, 0.4)), 3, *IDENTITY)
    colours = torch.tensor([0.1, 0.5, 0.9])[:, None, None, None].expand(3, 3, 16, 16)
    global_views, local_views = augment(colours)
    assert local_views is not None
    torch.testing.assert_close(global_views[:, 0, 0, 0], torch.tensor([0.1, 0.5, 0.9, 0.1, 0.5, 0.1]))
    torch.testing.assert_close(local_views[:, 0, 0, 0], torch.tensor([0.1, 0.5, 0.9] * 3))
    # On a textured image, views of the same image must differ (independent crops per view and sample).
    global_views, local_views = augment(torch.rand(3, 3, 16, 16))
    assert local_views is not None
    assert not torch.allclose(global_views[:3], global_views[3:])
    assert not torch.allclose(local_views[:3], local_views[3:6])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_input_device() -> None:
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, device="cuda")
    global_views, local_views = small_multicrop()(images)
    assert local_views is not None
    assert global_views.device.type == "cuda" and local_views.device.type == "cuda"
    assert torch.isfinite(global_views).all() and torch.isfinite(local_views).all()


# ----------------------------------------------------------------------------------------------
# Statistics of the individual stages
# ----------------------------------------------------------------------------------------------


def test_grayscale_fraction() -> None:
    torch.manual_seed(0)
    transform = build_view_transform(plain_spec(8, grayscale_p=0.2), *IDENTITY)
    out = transform(torch.rand(2000, 3, 8, 8))
    gray = ((out[:, 0] == out[:, 1]) & (out[:, 1] == out[:, 2])).flatten(1).all(1)
    assert abs(gray.float().mean().item() - 0.2) < 0.04


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_area_stays_in_scale_range_and_spans_it(scale: tuple[float, float]) -> None:
    torch.manual_seed(0)
    size = 64  # output size = input size: crops are only upsampled, so coordinate extremes survive
    transform = build_view_transform(plain_spec(size, scale), *IDENTITY)
    out = transform(coordinate_images(300, size))
    # A crop w pixels wide spans w - 1 pixel steps of x / size between its first and last column.
    width = (out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2))) + 1 / size
    height = (out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2))) + 1 / size
    area = width * height
    low, high = scale
    assert area.min() >= low * 0.95 - 1e-3 and area.max() <= high * 1.02 + 1e-3
    spread = 0.1 * (high - low)
    assert area.min() < low + spread and area.max() > high - spread


def test_flip_probability() -> None:
    torch.manual_seed(0)
    transform = build_view_transform(plain_spec(8, flip_p=0.5), *IDENTITY)
    out = transform(coordinate_images(2000, 8))
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    torch.testing.assert_close(out[flipped].flip(-1), coordinate_images(int(flipped.sum()), 8))
    torch.testing.assert_close(out[~flipped], coordinate_images(int((~flipped).sum()), 8))
    assert abs(flipped.float().mean().item() - 0.5) < 0.05


def test_solarize_inverts_at_fixed_threshold_half() -> None:
    torch.manual_seed(0)
    image = torch.full((16, 3, 8, 8), 0.8)
    image[:, :, :, :2] = 0.3
    image[:, :, :, 2:4] = 0.49
    image[:, :, :, 4:6] = 0.51
    expected = torch.where(image >= 0.5, 1 - image, image)
    torch.testing.assert_close(build_view_transform(plain_spec(8, solarize_p=1.0), *IDENTITY)(image), expected)
    torch.testing.assert_close(build_view_transform(plain_spec(8, solarize_p=0.0), *IDENTITY)(image), image)
    assert torch.allclose(expected[..., 6:], torch.tensor(0.2))


def test_normalisation() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.rand(4, 3, 8, 8)
    out = build_view_transform(plain_spec(8), mean, std)(images)
    expected = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(out, expected)


def test_blur_sigma_and_kernel_follow_crop_size() -> None:
    assert blur_sigma(plain_spec(224)) == pytest.approx((0.1, 2.0))
    assert blur_sigma(plain_spec(112)) == pytest.approx((0.1, 1.0))  # 0.05 raised to the 0.1 floor
    assert blur_kernel_size(224, 2.0) == 13
    assert blur_kernel_size(32, 2.0 * 32 / 224) == 3
    assert blur_kernel_size(9, 2.0) == 9 and blur_kernel_size(10, 2.0) == 9


def test_blur_smooths_and_skips_when_probability_zero() -> None:
    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32)
    blurred = build_view_transform(plain_spec(32, blur_p=1.0, blur_sigma=(7.0, 14.0)), *IDENTITY)(images)
    untouched = build_view_transform(plain_spec(32, blur_p=0.0, blur_sigma=(7.0, 14.0)), *IDENTITY)(images)
    torch.testing.assert_close(untouched, images)
    # sigma 1-2 px averages neighbouring pixels, so the per-image variance of white noise drops sharply.
    assert (blurred.flatten(1).var(1) < 0.5 * images.flatten(1).var(1)).all()


def test_local_crops_get_the_global_blur_sigma():
    cfg, size = DINOConfig(), Config().model.input_size
    assert blur_sigma(cfg.local, size) == blur_sigma(sized(cfg.global_1, size))
    assert blur_sigma(cfg.local, 224) == pytest.approx((0.1, 2.0))  # DINO's 96-px local crops


def test_resample_crop_mode_matches_slice_statistics():
    """The batched crop draws the same crops: on a horizontal ramp, every output's mean is the crop's centre."""
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64).repeat(512, 1, 1, 1)
    means = {}
    for mode in ("slice", "resample"):
        cfg = DINOConfig()
        specs = [sized(spec, 16) for spec in (cfg.global_1, cfg.global_2)]
        for spec in specs:
            spec.flip_p = spec.color_jitter_p = spec.grayscale_p = spec.blur_p = spec.solarize_p = 0.0
        torch.manual_seed(0)
        views, _ = MultiCropAugmentation(*specs, cfg.local, 0, (0, 0, 0), (1, 1, 1), crop_mode=mode)(ramp)
        means[mode] = views.mean(dim=(1, 2, 3))
    assert means["slice"].mean().item() == pytest.approx(means["resample"].mean().item(), abs=0.01)
    assert means["slice"].std().item() == pytest.approx(means["resample"].std().item(), rel=0.1)
    assert math.isfinite(means["resample"].sum().item())


def test_progressive_resizing_shrinks_every_crop_then_switches_once():
    """dino.low_res_share=0.5 with low_res_scale=0.75: 12 / 6-px crops for the first half of the planned
    steps, then the configured 16 / 8 px, never back (as after a resume past the switch)."""
    config = load_config(None, [*TINY, "dino.low_res_share=0.5", "dino.low_res_scale=0.75"])
    dino = DINO(config, Runtime(torch.device("cpu"), None, 1))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)

    def sizes(progress: float) -> list[tuple[int, ...]]:
        sched = ScheduleValues(step=round(100 * progress), total_steps=100, steps_per_epoch=10, lr=1e-3,
                               weight_decay=0.04)
        return [tuple(v.shape) for v in dino.views(Batch(images, torch.arange(4)), sched)]

    low, full = [(8, 3, 12, 12), (8, 3, 6, 6)], [(8, 3, 16, 16), (8, 3, 8, 8)]
    assert sizes(0.0) == low and sizes(0.49) == low
    assert sizes(0.5) == full
    assert sizes(0.1) == full
    for bad in ("dino.low_res_share=1", "dino.low_res_scale=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


# ----------------------------------------------------------------------------------------------
# iBOT masks
# ----------------------------------------------------------------------------------------------


def test_ibot_masks_share_and_ratio_bounds():
    torch.manual_seed(0)
    ratios = []
    for _ in range(20):
        masks = ibot_masks(64, (8, 8), mask_p=0.5, ratio=(0.1, 0.5), device=torch.device("cpu"))
        assert masks.shape == (64, 8, 8) and masks.dtype == torch.bool
        per_image = masks.flatten(1).float().mean(1)
        assert (per_image > 0).sum() == 32  # half of the crops are masked
        assert per_image.max() <= 0.5  # no crop above the largest ratio
        ratios += per_image[per_image > 0].tolist()
    assert 0.2 < np.mean(ratios) < 0.35  # spread over 0.1-0.5 (blocks may fall a little short of their target)
    torch.manual_seed(1)
    first = ibot_masks(8, (4, 4), 0.5, (0.1, 0.5), torch.device("cpu"))
    torch.manual_seed(1)
    assert torch.equal(first, ibot_masks(8, (4, 4), 0.5, (0.1, 0.5), torch.device("cpu")))  # follows torch's RNG
