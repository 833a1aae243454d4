"""iBOT's masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", Eq. 2),
as DINOv2 uses it: the student predicts, for each masked patch, the teacher's distribution of that patch
seen unmasked."""

from __future__ import annotations

import torch.nn.functional as F
from lightly.models.modules.center import Center
from torch import Tensor, nn

from unsupdistill.losses.sinkhorn import sinkhorn_knopp


class MaskedPatchLoss(nn.Module):
    """``L = -1/B sum_b 1/|M_b| sum_{i in M_b} sum_k P_t(i)_k log P_s(i)_k`` over the B images (masked or
    not) and the masked patches M_b of each; ``P_t`` centred and sharpened by ``centering`` (``ema``: its own
    moving-average centre, momentum ``center_momentum``; ``sinkhorn``: Sinkhorn-Knopp over the masked patches),
    ``P_s = softmax(s / student_temp)``.

    Args:
        output_dim: number K of prototypes.
        student_temp: student temperature (0.1).
        centering: ``ema`` or ``sinkhorn``.
        center_momentum: momentum of the ``ema`` centre.
        iterations: Sinkhorn-Knopp iterations.
    """

    def __init__(self, output_dim: int, student_temp: float = 0.1, centering: str = "ema",
                 center_momentum: float = 0.9, iterations: int = 3) -> None:
        super().__init__()
        self.student_temp, self.centering, self.iterations = student_temp, centering, iterations
        self.center = Center(size=(1, output_dim), momentum=center_momentum)

    def forward(self, teacher_logits: Tensor, student_logits: Tensor, masks: Tensor, teacher_temp: float) -> Tensor:
        """Args:
            teacher_logits: (M, K) teacher head outputs of the M masked patches (seen unmasked).
            student_logits: (M, K) student head outputs of the same patches (seen masked).
            masks: (B, h, w) bool, M of them True, in the order of the rows above.
            teacher_temp: teacher temperature at this step.

        Returns:
            The scalar loss.
        """
        teacher_logits = teacher_logits.detach().float()
        if self.centering == "sinkhorn":
            targets = sinkhorn_knopp(teacher_logits, teacher_temp, self.iterations)  # (M, K)
        else:
            targets = F.softmax((teacher_logits - self.center.value) / teacher_temp, dim=-1)  # (M, K)
            self.center.update(teacher_logits)
        per_patch = -(targets * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)  # (M,)
        flat = masks.flatten(1)  # (B, h*w)
        weights = (1.0 / flat.sum(1, keepdim=True).clamp(min=1)).expand_as(flat)[flat]  # (M,) 1/|M_b|
        return (per_patch * weights).sum() / masks.shape[0]
