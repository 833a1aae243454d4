"""Distillation augmentation: one view shared by teacher and student, each at its own size and statistics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from unsupdistill.augment import DistillAugmentation
from unsupdistill.config import ViewSpec
from unsupdistill.methods.distill.settings import DistillConfig

STUDENT_STATS = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
TEACHER_STATS = ((0.45, 0.45, 0.45), (0.3, 0.2, 0.1))


def plain_config(mixup_alpha: float = 0.0, **overrides: Any) -> DistillConfig:
    """A config with every photometric op and mixup off, random crops and flips kept unless overridden."""
    off = {"color_jitter_p": 0.0, "grayscale_p": 0.0}
    return DistillConfig(view=ViewSpec(**{**off, "scale": (0.2, 1.0), **overrides}), mixup_alpha=mixup_alpha)


def make_augment(cfg: DistillConfig, student_size: int, teacher_size: int) -> DistillAugmentation:
    return DistillAugmentation(cfg.view, cfg.mixup_alpha, student_size, *STUDENT_STATS, teacher_size,
                               *TEACHER_STATS)


def unnormalize(views: torch.Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in stats)
    return views * std + mean


def random_images(batch: int = 4, size: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("student_size", "teacher_size"), [(16, 32), (32, 16), (24, 24)])
def test_shapes_dtype_and_no_grad(student_size: int, teacher_size: int) -> None:
    torch.manual_seed(0)
    augment = make_augment(DistillConfig(mixup_alpha=0.4), student_size, teacher_size)
    student, teacher = augment(random_images())
    assert student.shape == (4, 3, student_size, student_size)
    assert teacher.shape == (4, 3, teacher_size, teacher_size)
    for views in (student, teacher):
        assert views.dtype == torch.float32 and views.is_contiguous() and torch.isfinite(views).all()
        assert not views.requires_grad


@pytest.mark.parametrize(("student_size", "teacher_size"), [(16, 32), (32, 16), (24, 24)])
def test_teacher_and_student_see_the_same_crop(student_size: int, teacher_size: int) -> None:
    torch.manual_seed(0)
    augment = make_augment(plain_config(scale=(0.1, 0.5), flip_p=0.5), student_size, teacher_size)
    student, teacher = augment(random_images(batch=8))
    student, teacher = unnormalize(student, STUDENT_STATS), unnormalize(teacher, TEACHER_STATS)
    size = min(student_size, teacher_size)
    antialias = student_size != teacher_size
    student_small, teacher_small = (
        F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        for v in (student, teacher)
    )
    torch.testing.assert_close(student_small, teacher_small, atol=1e-5, rtol=0)
    # The crops differ between images, so matching them pairwise is not trivially true.
    assert (teacher_small[:-1] - teacher_small[1:]).abs().amax() > 0.1


def test_full_crop_without_flip_or_jitter_is_the_resized_input() -> None:
    images = random_images(batch=3, size=32).float() / 255
    augment = make_augment(plain_config(scale=(1.0, 1.0), flip_p=0.0), 16, 32)
    student, teacher = augment(images)
    expected_student = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(unnormalize(teacher, TEACHER_STATS), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(unnormalize(student, STUDENT_STATS), expected_student, atol=1e-5, rtol=0)


def test_same_seed_same_views_different_seed_different_views() -> None:
    augment = make_augment(DistillConfig(mixup_alpha=0.4), 16, 24)
    images = random_images()

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        return augment(images)

    first, again, other = run(3), run(3), run(4)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_uint8_and_float_inputs_give_the_same_views() -> None:
    augment = make_augment(DistillConfig(mixup_alpha=0.4), 16, 24)
    images = random_images()
    torch.manual_seed(5)
    from_uint8 = augment(images)
    torch.manual_seed(5)
    from_float = augment(images.float() / 255)
    for a, b in zip(from_uint8, from_float):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def constant_images(colours: torch.Tensor, size: int = 20) -> torch.Tensor:
    """(B, 3, size, size) images, image i filled with colours[i]; crops and flips leave them unchanged."""
    return colours[:, :, None, None].expand(-1, -1, size, size).contiguous()


def mixing_weights(mixed: torch.Tensor, colours: torch.Tensor) -> list[tuple[int, float]]:
    """For each mixed colour, the partner j and weight lam with mixed[i] = lam * colours[i] + (1 - lam) * colours[j].

    Fails when mixed[i] is not on any segment from colours[i] to another colour of the batch.
    """
    found = []
    for i, value in enumerate(mixed):
        if torch.allclose(value, colours[i], atol=1e-5):
            found.append((i, 1.0))
            continue
        candidates = []
        for j, partner in enumerate(colours):
            direction = colours[i] - partner
            lam = float((value - partner) @ direction / (direction @ direction)) if j != i else 1.0
            if j != i and 0 <= lam <= 1 and torch.allclose(lam * colours[i] + (1 - lam) * partner, value, atol=1e-5):
                candidates.append((j, lam))
        assert len(candidates) == 1, f"view {i} is not a mix of image {i} with one other image: {value}"
        found.extend(candidates)
    return found


def test_mixup_mixes_pairs_of_images_with_one_weight() -> None:
    colours = torch.rand(6, 3, generator=torch.Generator().manual_seed(2))
    augment = make_augment(plain_config(mixup_alpha=1.0), 8, 12)
    torch.manual_seed(0)
    student, teacher = augment(constant_images(colours))
    mixes = []
    for views, stats in ((student, STUDENT_STATS), (teacher, TEACHER_STATS)):
        mixed = unnormalize(views, stats)
        assert (mixed - mixed[:, :, :1, :1]).abs().amax() < 1e-5  # each view is still one colour
        mixes.append(mixing_weights(mixed[:, :, 0, 0], colours))
    (student_mix, teacher_mix) = mixes
    assert [j for j, _ in student_mix] == [j for j, _ in teacher_mix], "both views mix the same partners"
    assert sorted(j for j, _ in student_mix) == list(range(6)), "the partners are a permutation of the batch"
    weights = [lam for i, (j, lam) in enumerate(student_mix + teacher_mix) if j != i % 6]
    assert weights, "at least one image is mixed with another"
    assert 0 < weights[0] < 1 and all(abs(w - weights[0]) < 1e-4 for w in weights), weights


def test_no_mixup_when_alpha_is_zero() -> None:
    colours = torch.rand(6, 3, generator=torch.Generator().manual_seed(2))
    augment = make_augment(plain_config(mixup_alpha=0.0), 8, 12)
    torch.manual_seed(0)
    student, teacher = augment(constant_images(colours))
    torch.testing.assert_close(unnormalize(student, STUDENT_STATS), constant_images(colours, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(unnormalize(teacher, TEACHER_STATS), constant_images(colours, 12), atol=1e-5, rtol=0)
