"""iBOT's masks over the patch grid of the global crops (block-wise, as DINOv2's data collation)."""

from __future__ import annotations

import random

import torch
from lightly.models.utils import random_block_mask
from torch import Tensor


def ibot_masks(num_images: int, grid: tuple[int, int], mask_p: float, ratio: tuple[float, float],
               device: torch.device) -> Tensor:
    """Which patches of each crop the student sees as the mask token.

    ``int(num_images * mask_p)`` crops get rectangular blocks of patches masked, with target shares spread
    evenly over ``ratio`` (crop i of n aims at a share drawn from the i-th of n equal slices of the range);
    the others none. lightly's ``random_block_mask`` draws from Python's ``random``, which a checkpoint does
    not hold: it is seeded from torch's generator, so a resumed run draws the same masks. At least one patch
    of the batch is masked, so the loss always has a term.

    Args:
        num_images: crops in the batch (B).
        grid: (h, w) patches per crop.
        mask_p: share of the crops that are masked.
        ratio: (min, max) share of a masked crop's patches.
        device: where the mask goes.

    Returns:
        (B, h, w) bool, True where the patch is masked.
    """
    state = random.getstate()
    random.seed(int(torch.randint(0, 2**31 - 1, (1,))))
    try:
        patches = grid[0] * grid[1]
        masks = random_block_mask((num_images, *grid), batch_mask_ratio=mask_p, min_image_mask_ratio=ratio[0],
                                  max_image_mask_ratio=ratio[1], min_num_masks_per_block=min(4, patches),
                                  max_num_masks_per_block=max(min(4, patches), patches // 2), device=device)
    finally:
        random.setstate(state)
    if not masks.any():
        masks[0, 0, 0] = True
    return masks
