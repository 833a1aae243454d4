"""Augmentation, by the data's way through a method: multicrop for DINO, distill for one shared view.

- ``multicrop``: DINO's global and local views, each with its own random parameters.
- ``masking``: iBOT's block masks over the patch grid of the global crops (ViTs).
- ``distill``: knowledge distillation from a frozen teacher; one view per image, seen by teacher and
  student alike, each at its own size and normalisation.
"""

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
    "MIN_BLUR_SIGMA",
    "REFERENCE_SIZE",
    "DistillAugmentation",
    "MultiCropAugmentation",
    "blur_kernel_size",
    "blur_sigma",
    "build_view_transform",
    "ibot_masks",
    "sized",
]
