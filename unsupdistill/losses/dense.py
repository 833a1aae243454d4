"""KL divergence between the teacher's and the student's patch-to-patch similarity distributions.

The local ("intra-image") term of LightlyTrain's distillation: ``DistillationV3Loss`` in
``lightly_train/_methods/distillationv3/`` (LightlyTrain's released ``distillation`` v2 has no such term;
it regresses projected student patches onto the teacher's with an MSE). Like relational distillation
(Park et al. 2019, "Relational Knowledge Distillation", https://arxiv.org/abs/1904.05068) it transfers
the structure of the teacher's feature map rather than the features, so the two widths may differ and
no projection head is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DensePatchKLLoss(nn.Module):
    """Per image, KL(teacher || student) of each patch's softmaxed cosine similarities to the other patches.

    Both maps are average-pooled to the smaller grid (per axis), each patch is L2-normalised, and row i
    of the (N, N) similarity matrix, without its diagonal (a patch's similarity to itself is always 1),
    becomes ``softmax(sim / temperature)`` over the other N - 1 patches. The loss is the KL divergence
    summed over each row and averaged over the N rows of the B images. The teacher gets no gradient.

    Differences from LightlyTrain's ``DistillationV3Loss`` local term: here the diagonal is excluded,
    LightlyTrain keeps it; both maps are brought to the smaller grid with average pooling, where LightlyTrain projects
    the student to the teacher's width and resizes it bilinearly to the teacher's grid; the default
    temperature is 0.1 (LightlyTrain: 0.07).

    Args:
        temperature: Softmax temperature of both distributions.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """KL divergence of the student's patch similarity rows from the teacher's.

        Args:
            student: Student feature map, channels last, shape (B, h, w, Cs).
            teacher: Teacher feature map (CNN map or ViT patch tokens as a grid), shape (B, H, W, Ct).

        Returns:
            The scalar loss; 0 when both maps have the same patch similarities.
        """
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0]:
            raise ValueError(f"expected student (B, h, w, Cs) and teacher (B, H, W, Ct), got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        grid = (min(student.shape[1], teacher.shape[1]), min(student.shape[2], teacher.shape[2]))
        num_patches = grid[0] * grid[1]
        if num_patches < 2:
            raise ValueError(f"need at least 2 patches on the common grid {grid}")
        off_diagonal = ~torch.eye(num_patches, dtype=torch.bool, device=student.device)  # (N, N)

        def similarity_logits(features: Tensor) -> Tensor:
            features = features.float().permute(0, 3, 1, 2)  # (B, C, h, w)
            features = F.adaptive_avg_pool2d(features, grid)  # (B, C, h', w')
            features = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)  # (B, N, C)
            similarity = features @ features.transpose(1, 2)  # (B, N, N)
            # (B, N * (N - 1)) in row-major order -> (B * N, N - 1): each patch against the others
            return similarity[:, off_diagonal].view(-1, num_patches - 1) / self.temperature

        with torch.no_grad():
            teacher_log_probs = F.log_softmax(similarity_logits(teacher), dim=-1)  # (B * N, N - 1)
        student_log_probs = F.log_softmax(similarity_logits(student), dim=-1)  # (B * N, N - 1)
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
