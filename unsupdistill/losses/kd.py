"""Knowledge distillation with labels (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class KDLoss(nn.Module):
    """The student matches the labels and the teacher's softened class probabilities:

    ``L = (1 - a) * CE(y, softmax(z_s)) + a * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``,

    the hard term averaged over the images with a label, the soft term over every image given (an image without a
    label, -1, still learns the teacher's class probabilities: semi-supervised distillation); ``T^2`` keeps the soft
    term's gradients at the scale of the hard term's as ``T`` grows (Hinton et al., Sec. 2).

    Args:
        alpha: weight ``a`` of the soft (teacher) term; 0 is plain cross-entropy, 1 the teacher alone.
        temperature: softmax temperature ``T`` of both networks in the soft term.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.temperature = alpha, temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        """Args: student_logits (B, C), teacher_logits (B, C), labels (B,) int64 in 0..C-1, or -1 for an image
        without a label. Returns the scalar loss."""
        t, student_logits = self.temperature, student_logits.float()
        count = (labels >= 0).sum().clamp(min=1)  # no labeled image: the hard term is 0, not 0 / 0
        hard = F.cross_entropy(student_logits, labels, ignore_index=-1, reduction="sum") / count
        soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                        log_target=True, reduction="batchmean")
        return (1 - self.alpha) * hard + self.alpha * t * t * soft
