"""Augmentation, by the data's way through a method: multicrop for DINO, distill for one shared view.

- ``multicrop``: DINO's global and local views, each with its own random parameters.
- ``masking``: iBOT's block masks over the patch grid of the global crops (ViTs).
- ``audio``: sound as images: the log-mel front end, and DINO's views of a sound (spans in time, mixing, gain,
  SpecAugment's masks), the deterministic whole-clip view, and a view as an image teacher's input.
- ``distill``: knowledge distillation from a frozen teacher; one view per image, seen by teacher and
  student alike, each at its own size and normalisation.
"""

from unsupdistill.augment.audio import (
    LOG_FLOOR,
    LogMel,
    SoundMultiCrop,
    SoundViewParams,
    SoundViews,
    full_clip,
    mel_filterbank,
    time_resize_weights,
    to_image_teacher,
)
from unsupdistill.augment.distill import DistillAugmentation
from unsupdistill.augment.masking import ibot_masks
from unsupdistill.augment.multicrop import (
    MIN_BLUR_SIGMA,
    REFERENCE_SIZE,
    MultiCropAugmentation,
    blur_kernel_size,
    blur_sigma,
    build_view_transform,
    sized,
)

__all__ = [
    "LOG_FLOOR",
    "MIN_BLUR_SIGMA",
    "REFERENCE_SIZE",
    "DistillAugmentation",
    "LogMel",
    "MultiCropAugmentation",
    "SoundMultiCrop",
    "SoundViewParams",
    "SoundViews",
    "blur_kernel_size",
    "blur_sigma",
    "build_view_transform",
    "full_clip",
    "ibot_masks",
    "mel_filterbank",
    "sized",
    "time_resize_weights",
    "to_image_teacher",
]
