"""Cosine regression of the student's embedding onto the frozen teacher's: the plain baseline."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CosineLoss(nn.Module):
    """``1 - cos(student, teacher)``, averaged over the batch.

    The simplest feature-distillation objective (e.g. Romero et al. 2015, FitNets, with a cosine
    instead of an L2 distance): it matches directions only, so the student needs no knowledge of the
    teacher's feature scale. The teacher gets no gradient.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Mean cosine distance.

        Args:
            student: Student embeddings, already projected to the teacher's width, shape (B, D).
            teacher: Teacher embeddings, shape (B, D).

        Returns:
            The scalar loss, in [0, 2]; 0 when every pair points the same way.
        """
        if student.shape != teacher.shape or student.dim() != 2:
            raise ValueError(f"expected student and teacher of the same shape (B, D), got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        similarity = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)  # (B,)
        return 1.0 - similarity.mean()
