"""DINO's loss: lightly's multi-view version, and the same-view version for a frozen teacher."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import DINOLoss
from torch import Tensor, nn

from unsupdistill.losses.sinkhorn import sinkhorn_knopp


def build_dino_loss(cfg: Any, output_dim: int) -> nn.Module:
    """DINO's loss over views: cross-entropy over all pairs but same views, the teacher temperature passed per
    call (a schedule). ``cfg``: DINO's settings (the ``dino`` section). ``dino.centering=ema``: lightly's
    ``DINOLoss`` (centre all-reduced across processes);
    ``sinkhorn``: :class:`SinkhornDINOLoss`."""
    if cfg.centering == "sinkhorn":
        return SinkhornDINOLoss(output_dim, cfg.student_temp, cfg.sinkhorn_iterations)
    return DINOLoss(output_dim=output_dim, teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                    center_momentum=cfg.center_momentum)


def teacher_temperature(step: int, steps_per_epoch: int, cfg: Any) -> float:
    """The teacher temperature at ``step``: linear warm-up from ``cfg.warmup_teacher_temp`` to ``cfg.teacher_temp``
    over ``cfg.warmup_teacher_temp_epochs`` epochs, then constant (DINO, App. B); ``cfg``: the ``dino`` section."""
    warmup_steps = cfg.warmup_teacher_temp_epochs * steps_per_epoch
    if step >= warmup_steps:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup_steps


class SinkhornDINOLoss(nn.Module):
    """DINO's multi-view cross-entropy with the teacher's targets from Sinkhorn-Knopp (DINOv2) instead of a centre.

    ``L = 1/(n_pairs B) sum_{t != s} sum_b H(Q_t(b), softmax(s_s(b) / T_s))``, where ``Q`` is
    :func:`~unsupdistill.losses.sinkhorn.sinkhorn_knopp` of the teacher's outputs of all global views together.

    Args:
        output_dim: number K of prototypes.
        student_temp: student temperature T_s.
        iterations: Sinkhorn-Knopp iterations.
    """

    center: Tensor

    def __init__(self, output_dim: int, student_temp: float = 0.1, iterations: int = 3) -> None:
        super().__init__()
        self.student_temp, self.iterations = student_temp, iterations
        # kept at zero: health signals and checkpoints read the same key as with the EMA centre
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.last_targets: Tensor | None = None

    def forward(self, teacher_out: list[Tensor], student_out: list[Tensor], teacher_temp: float) -> Tensor:
        """Args: teacher_out: per global view (B, K); student_out: per view (B, K), global views first.
        Returns the scalar loss; keeps the targets (V_t * B, K) in ``last_targets`` for health signals."""
        views = len(teacher_out)
        targets = sinkhorn_knopp(torch.cat(teacher_out), teacher_temp, self.iterations)  # (V_t * B, K)
        self.last_targets = targets
        log_probs = F.log_softmax(torch.stack(student_out).float() / self.student_temp, dim=-1)  # (V_s, B, K)
        pairs = -torch.einsum("tbk,sbk->ts", targets.reshape(views, -1, targets.shape[-1]), log_probs)
        pairs.fill_diagonal_(0)  # a teacher view against the same student view
        n_terms = pairs.numel() - min(pairs.shape)
        return pairs.sum() / (n_terms * log_probs.shape[1])


class FrozenTeacherDINOLoss(nn.Module):
    """DINO's cross-entropy when the teacher is frozen and sees the same view as the student.

    Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"
    (https://arxiv.org/abs/2104.14294), Algorithm 1: ``H(t, s) = -sum softmax((t - C) / T_t) *
    log_softmax(s / T_s)``, then ``C <- m C + (1 - m) mean(t)``. DINOv2 (Oquab et al. 2023,
    https://arxiv.org/abs/2304.07193) distils its small models from a frozen ViT-g with this
    loss. lightly's ``DINOLoss`` skips same-view pairs (teacher view i vs student view i), so with one
    view it has no terms; here the single pair is the whole loss.

    The centre is updated after the loss is computed (the loss uses the previous centre), with the mean
    teacher output over the global batch (all-reduced when distributed). The teacher gets no gradient.

    Args:
        output_dim: Number K of prototypes (head outputs).
        student_temp: Student softmax temperature (DINO: 0.1).
        center_momentum: Momentum m of the centre's moving average (DINO: 0.9).
    """

    center: Tensor

    def __init__(self, output_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, output_dim))  # (1, K)

    def forward(self, teacher_logits: Tensor, student_logits: Tensor, teacher_temp: float) -> Tensor:
        """Cross-entropy from the centred, sharpened teacher to the student; then update the centre.

        Args:
            teacher_logits: Frozen teacher's head outputs, shape (B, K).
            student_logits: Student's head outputs for the same images and view, shape (B, K).
            teacher_temp: Teacher softmax temperature at this step (a schedule).

        Returns:
            The scalar loss, averaged over the batch.
        """
        if teacher_logits.shape != student_logits.shape or teacher_logits.shape[-1] != self.center.shape[-1]:
            raise ValueError(f"expected teacher and student logits of shape (B, {self.center.shape[-1]}), got "
                             f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}")
        teacher_logits = teacher_logits.detach().float()  # (B, K)
        teacher_probs = F.softmax((teacher_logits - self.center) / teacher_temp, dim=-1)  # (B, K)
        student_log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (B, K)
        loss = -(teacher_probs * student_log_probs).sum(dim=-1).mean()
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """``center <- m * center + (1 - m) * mean(teacher_logits)`` over the global batch.

        Args:
            teacher_logits: Teacher's head outputs on this process, shape (B, K).
        """
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)  # (1, K)
        count = teacher_logits.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1.0 - self.center_momentum)
