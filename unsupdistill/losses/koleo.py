"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; DINOv2 Sec. 4)."""

from __future__ import annotations

from lightly.loss import KoLeoLoss
from torch import Tensor, nn


class KoLeo(nn.Module):
    """``L = -1/n sum_i log(min_{j != i} ||x_i - x_j||)`` over the L2-normalised features x of one crop's
    batch, summed over the global crops (DINOv2 adds it with weight 0.1 on the student's class tokens): it
    pushes each feature away from its nearest neighbour, spreading the batch over the sphere.

    lightly's ``KoLeoLoss`` computes one crop's term (with DINOv2's eps of 1e-8 inside the log).
    """

    def __init__(self) -> None:
        super().__init__()
        self.per_crop = KoLeoLoss()

    def forward(self, features: Tensor, num_crops: int) -> Tensor:
        """Args: features (num_crops * B, D): crop 1 of all B images, then crop 2, ... Returns the scalar sum."""
        return sum(self.per_crop(f) for f in features.float().chunk(num_crops))
