"""Augmentation for knowledge distillation from a frozen teacher, batched on any device with kornia.

The "consistent teacher" recipe (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent", Sec. 3): teacher and student see exactly the same view of each image. One view is drawn per
image (random resized crop, horizontal flip, colour jitter, grayscale, then optionally mixup within the
batch) and resized to each network's input size and normalised with each network's statistics. Every
sample draws its own parameters from torch's global RNG, so ``torch.manual_seed`` makes a run reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.augmentation import Normalize
from torch import Tensor, nn

from unsupdistill.augment.multicrop import build_view_transform
from unsupdistill.config import CropSpec, DistillConfig


def resize_view(views: Tensor, size: int) -> Tensor:
    """Resize square views (B, 3, S, S) to (B, 3, size, size): bilinear, antialiased when downscaling."""
    if views.shape[-1] == size:
        return views
    return F.interpolate(
        views, size=(size, size), mode="bilinear", align_corners=False, antialias=size < views.shape[-1]
    )


def mixup(views: Tensor, alpha: float) -> Tensor:
    """Mix each view with a random partner of the batch (mixup, Zhang et al. 2018).

    One weight ``lam ~ Beta(alpha, alpha)`` per batch and a random permutation of the batch as partners,
    both drawn from torch's global RNG: ``lam * views + (1 - lam) * views[perm]``.

    Args:
        views: (B, C, H, W) float views.
        alpha: concentration of the Beta distribution; must be positive.

    Returns:
        The mixed views, (B, C, H, W).
    """
    concentration = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(concentration, concentration).sample())
    perm = torch.randperm(views.shape[0]).to(views.device)
    return views.mul(lam).add_(views[perm], alpha=1 - lam)


class DistillAugmentation(nn.Module):
    """One view per image, shared by teacher and student, at each network's size and normalisation.

    The crop is taken once at the larger of the two sizes, so both views show the same pixels of the
    image; the smaller one is an antialiased downscale of it.

    Args:
        cfg: the distillation section of the config (crop scale, flip, jitter, grayscale, mixup).
        student_size: side of the student's input in pixels.
        student_mean: per-channel mean of the student's normalisation.
        student_std: per-channel standard deviation of the student's normalisation.
        teacher_size: side of the teacher's input in pixels.
        teacher_mean: per-channel mean of the teacher's normalisation.
        teacher_std: per-channel standard deviation of the teacher's normalisation.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        student_size: int,
        student_mean: tuple[float, float, float],
        student_std: tuple[float, float, float],
        teacher_size: int,
        teacher_mean: tuple[float, float, float],
        teacher_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.student_size = student_size
        self.teacher_size = teacher_size
        self.mixup_alpha = cfg.mixup_alpha
        spec = CropSpec(
            size=max(student_size, teacher_size),
            scale=cfg.crop_scale,
            flip_p=cfg.flip_p,
            color_jitter=cfg.color_jitter,
            color_jitter_p=cfg.color_jitter_p,
            grayscale_p=cfg.grayscale_p,
            blur_p=0.0,
            solarize_p=0.0,
        )
        # DINO's view pipeline without blur and solarization; its last stage, the normalisation, is
        # dropped because each network normalises the shared view with its own statistics.
        self.shared_view = build_view_transform(spec, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[:-1]
        self.student_normalize = Normalize(mean=torch.tensor(student_mean), std=torch.tensor(student_std))
        self.teacher_normalize = Normalize(mean=torch.tensor(teacher_mean), std=torch.tensor(teacher_std))

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Draw one view per image and render it for the student and for the teacher.

        Args:
            images: (B, 3, H, W), uint8 in 0..255 or float in [0, 1], on any device.

        Returns:
            student_views: (B, 3, S, S), normalised with the student's mean and std.
            teacher_views: (B, 3, T, T), the same views, normalised with the teacher's mean and std.
        """
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        views = self.shared_view(images)  # (B, 3, max(S, T), max(S, T))
        if self.mixup_alpha > 0:
            views = mixup(views, self.mixup_alpha)
        student_views = self.student_normalize(resize_view(views, self.student_size))  # (B, 3, S, S)
        teacher_views = self.teacher_normalize(resize_view(views, self.teacher_size))  # (B, 3, T, T)
        return student_views.contiguous(), teacher_views.contiguous()
