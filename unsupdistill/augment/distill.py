"""Augmentation for knowledge distillation from a frozen teacher, batched on any device.

The "consistent teacher" recipe (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent", Sec. 3): teacher and student see exactly the same view of each image. One view is drawn per
image (random resized crop, horizontal flip, colour jitter, grayscale, then optionally mixup within the
batch) and resized to each network's input size and normalised with each network's statistics.

A view is a row of numbers (:data:`VIEW_PARAMS`), drawn by :meth:`DistillAugmentation.sample` and drawn on
the image by :meth:`DistillAugmentation.render`, so a view the teacher saw can be stored and rendered again,
pixel for pixel, for the student in a later epoch (the teacher cache, FKD: Shen & Xing, ECCV 2022). Every
sample draws its parameters from torch's global RNG, so ``torch.manual_seed`` makes a run reproducible.

A sound's shared view is a view in time of its log-mel (:class:`SoundDistillAugmentation`), seen by a teacher of
sounds through its own normalisation and columns, or by an image network as a grey picture.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from kornia.augmentation import Normalize
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_hue, adjust_saturation
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from unsupdistill.augment.audio import LogMel, SoundViewParams, SoundViews, full_clip, to_image_teacher
from unsupdistill.config import SoundViewSpec, ViewSpec

VIEW_PARAMS = ("left", "top", "width", "height", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
               "grayscale")
"""The columns of a view's parameters: the crop box as shares of the image side, then 0/1 flags and the colour
jitter's factors (applied in this order: brightness, contrast, saturation, hue)."""
CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratios of the random resized crop (torchvision's and DINO's)."""
CROP_TRIES = 10


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

    The crop is rendered once, at the larger of the two input sizes (no larger than the decoded images where
    the teacher's size exceeds them: a small image is upsampled once, for the teacher, not rendered large and
    shrunk again for the student), so both views show the same pixels of the image; each network's view is a
    bilinear resize of it (antialiased when shrinking).

    Args:
        view: the view's random augmentation (crop scale, flip, jitter, grayscale; no blur or solarization).
        mixup_alpha: mix each view with another image of the batch, weight ~ Beta(alpha, alpha); 0: no mixup.
        student_size: side of the student's input in pixels.
        student_mean: per-channel mean of the student's normalisation.
        student_std: per-channel standard deviation of the student's normalisation.
        teacher_size: side of the teacher's input in pixels.
        teacher_mean: per-channel mean of the teacher's normalisation.
        teacher_std: per-channel standard deviation of the teacher's normalisation.
    """

    def __init__(
        self,
        view: ViewSpec,
        mixup_alpha: float,
        student_size: int,
        student_mean: tuple[float, float, float],
        student_std: tuple[float, float, float],
        teacher_size: int,
        teacher_mean: tuple[float, float, float],
        teacher_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.view = view
        self.student_size = student_size
        self.teacher_size = teacher_size
        self.mixup_alpha = mixup_alpha
        self.student_normalize = Normalize(mean=torch.tensor(student_mean), std=torch.tensor(student_std))
        self.teacher_normalize = Normalize(mean=torch.tensor(teacher_mean), std=torch.tensor(teacher_std))

    def render_size(self, image_size: int) -> int:
        """Side of the shared crop for images decoded to ``image_size``."""
        return max(self.student_size, min(self.teacher_size, image_size))

    @torch.no_grad()
    def sample(self, batch: int) -> Tensor:
        """Draw one view per image from torch's global RNG: (batch, len(VIEW_PARAMS)) float32 on the CPU."""
        c = self.view
        # random resized crop of a square image: area share and log aspect ratio, the first of 10 tries that fits
        area = torch.empty(batch, CROP_TRIES).uniform_(*c.scale)
        log_ratio = torch.empty(batch, CROP_TRIES).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
        width, height = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
        fits = (width <= 1) & (height <= 1)
        first = fits.float().argmax(dim=1, keepdim=True)
        width = torch.where(fits.any(1), width.gather(1, first).squeeze(1), torch.ones(batch))  # else the whole image
        height = torch.where(fits.any(1), height.gather(1, first).squeeze(1), torch.ones(batch))
        left, top = torch.rand(batch) * (1 - width), torch.rand(batch) * (1 - height)
        flip = (torch.rand(batch) < c.flip_p).float()
        jitter = (torch.rand(batch) < c.color_jitter_p).float() if any(c.color_jitter) else torch.zeros(batch)
        b, k, s, h = c.color_jitter
        factors = [torch.empty(batch).uniform_(max(0.0, 1 - v), 1 + v) for v in (b, k, s)]
        hue = torch.empty(batch).uniform_(-h, h)
        gray = (torch.rand(batch) < c.grayscale_p).float()
        return torch.stack([left, top, width, height, flip, jitter, *factors, hue, gray], dim=1)

    @staticmethod
    def whole(batch: int) -> Tensor:
        """The identity view of each image (the whole image, no flip, jitter or grayscale): (batch, P)."""
        return torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]).expand(batch, -1).clone()

    @torch.no_grad()
    def render(self, images: Tensor, params: Tensor, teacher: bool = True) -> tuple[Tensor, Tensor | None]:
        """Draw the views ``params`` describes on ``images``; the same parameters give the same pixels.

        Args:
            images: (B, 3, H, H), uint8 in 0..255 or float in [0, 1], on any device.
            params: (B, len(VIEW_PARAMS)) from :meth:`sample`.
            teacher: also render the teacher's view (a student replaying a stored view needs only its own).

        Returns:
            student_views: (B, 3, S, S), normalised with the student's mean and std.
            teacher_views: (B, 3, T, T), the same views normalised with the teacher's statistics, or None.
        """
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        side = images.shape[-1]
        size = self.render_size(side)
        p = params.to(images.device, torch.float32)
        # crop box corners in pixels (top-left, top-right, bottom-right, bottom-left), kornia's convention
        x0, y0 = p[:, 0] * side, p[:, 1] * side
        x1, y1 = x0 + p[:, 2] * side - 1, y0 + p[:, 3] * side - 1
        boxes = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y0], 1), torch.stack([x1, y1], 1),
                             torch.stack([x0, y1], 1)], dim=1)  # (B, 4, 2)
        views = crop_and_resize(images, boxes, (size, size))  # (B, 3, R, R)
        views = torch.where(p[:, 4, None, None, None] > 0, views.flip(-1), views)
        views = torch.where(p[:, 5, None, None, None] > 0, self._jitter(views, p[:, 6:10]), views)
        gray = rgb_to_grayscale(views).expand_as(views)
        views = torch.where(p[:, 10, None, None, None] > 0, gray, views)
        if self.mixup_alpha > 0:
            views = mixup(views, self.mixup_alpha)
        student_views = self.student_normalize(resize_view(views, self.student_size)).contiguous()
        if not teacher:
            return student_views, None
        return student_views, self.teacher_normalize(resize_view(views, self.teacher_size)).contiguous()

    @staticmethod
    def _jitter(views: Tensor, factors: Tensor) -> Tensor:
        """torchvision's brightness and contrast, kornia's saturation and hue, in that order, per image."""
        brightness, contrast, saturation, hue = (factors[:, i] for i in range(4))
        views = (views * brightness[:, None, None, None]).clamp_(0, 1)
        mean = rgb_to_grayscale(views).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        views = ((views - mean) * contrast[:, None, None, None] + mean).clamp_(0, 1)
        views = adjust_saturation(views, saturation).clamp_(0, 1)
        return adjust_hue(views, hue * 2 * math.pi).clamp_(0, 1)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Draw one view per image and render it for the student and for the teacher.

        Args:
            images: (B, 3, H, W), uint8 in 0..255 or float in [0, 1], on any device.

        Returns:
            student_views: (B, 3, S, S), normalised with the student's mean and std.
            teacher_views: (B, 3, T, T), the same views, normalised with the teacher's mean and std.
        """
        student_views, teacher_views = self.render(images, self.sample(images.shape[0]))
        return student_views, teacher_views


class SoundDistillAugmentation(nn.Module):
    """The one shared view of a sound (:class:`~unsupdistill.augment.audio.SoundViews`: a span of the clip resized
    in time, gain, mixing, SpecAugment's masks), seen by the student as it is and by the teacher in its own form.

    The teacher is either a network of sounds, whose front end computes the same mel power (checked by the caller:
    same rate, STFT and mel bands): it gets the same view drawn again through its own front end, i.e. renormalised
    to its ``mean``/``std`` and resized in time to its own columns (the time masks moved with them); or an image
    network (an ImageNet CNN), which gets the student's view as a grey picture at its size and normalisation
    (:func:`~unsupdistill.augment.audio.to_image_teacher`).

    Args:
        frontend: the student's front end (waves to mel power, and the student's normalisation).
        view: the shared view's random augmentation (``audio.global_view``).
        frames: the student's columns (``model.input_size``).
        teacher_size: a sound teacher's columns, or an image teacher's side in pixels.
        teacher_frontend: a sound teacher's front end (its normalisation); None for an image teacher.
        teacher_mean: an image teacher's per-channel mean (unused for a sound teacher).
        teacher_std: an image teacher's per-channel standard deviation (unused for a sound teacher).
    """

    def __init__(self, frontend: LogMel, view: SoundViewSpec, frames: int, teacher_size: int,
                 teacher_frontend: LogMel | None, teacher_mean: tuple[float, ...] = (0.0, 0.0, 0.0),
                 teacher_std: tuple[float, ...] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.frontend = frontend
        self.student_views = SoundViews(frontend, view, frames)
        self.teacher_views = SoundViews(teacher_frontend, view, teacher_size) if teacher_frontend is not None else None
        self.student_size = frames
        self.teacher_size = teacher_size
        self.teacher_mean, self.teacher_std = tuple(teacher_mean), tuple(teacher_std)

    @torch.no_grad()
    def sample(self, batch: int, device: torch.device | str = "cpu") -> SoundViewParams:
        """Draw one view per clip from torch's global RNG, on ``device``."""
        return self.student_views.sample(batch, 1, device)

    def _teacher_params(self, params: SoundViewParams) -> SoundViewParams:
        """The same view at the teacher's columns: the time masks' first column and width scaled to them."""
        if self.teacher_size == self.student_size:
            return params
        ratio = self.teacher_size / self.student_size
        return dataclasses.replace(params, time_masks=(params.time_masks.float() * ratio).round().long())

    @torch.no_grad()
    def render(self, waves: Tensor, params: SoundViewParams, teacher: bool = True) -> tuple[Tensor, Tensor | None]:
        """Draw the views ``params`` describes of a batch of clips.

        Args:
            waves: (B, 1, S) float waves, on any device.
            params: from :meth:`sample`.
            teacher: also render the teacher's view.

        Returns:
            student_views: (B, 1, M, F) normalised log-mel views (the student's normalisation).
            teacher_views: a sound teacher's (B, 1, M, T) (its normalisation, its T columns) or an image teacher's
                (B, 3, T, T); None when ``teacher`` is False.
        """
        power = self.frontend.power(waves)  # (B, M, columns), once for both views
        student = self.student_views.render(power, params)  # (B, 1, M, F)
        if not teacher:
            return student, None
        if self.teacher_views is not None:
            return student, self.teacher_views.render(power, self._teacher_params(params))  # (B, 1, M, T)
        return student, to_image_teacher(student, self.teacher_size, self.teacher_mean, self.teacher_std)

    @torch.no_grad()
    def whole(self, waves: Tensor) -> Tensor:
        """The teacher's input for whole clips (B, 1, S), as evaluation feeds a network
        (:func:`~unsupdistill.augment.audio.full_clip`): (B, 1, M, T) or an image teacher's (B, 3, T, T)."""
        if self.teacher_views is not None:
            return full_clip(self.teacher_views.frontend, waves, self.teacher_size)
        views = full_clip(self.frontend, waves, self.student_size)  # (B, 1, M, F)
        return to_image_teacher(views, self.teacher_size, self.teacher_mean, self.teacher_std)

    @torch.no_grad()
    def forward(self, waves: Tensor) -> tuple[Tensor, Tensor]:
        """One view per clip (B, 1, S), for the student and for the teacher (see :meth:`render`)."""
        return self.render(waves, self.sample(waves.shape[0], waves.device))
