"""Health signals that catch DINO's two collapse modes (Caron et al. 2021, Sec. 5.3).

Centering alone pushes the teacher towards a uniform output; sharpening alone towards a
one-hot output that ignores the input. Both show in the teacher's output distribution.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


@torch.no_grad()
def health_signals(teacher_logits: Tensor, center: Tensor, teacher_temp: float, student_features: Tensor,
                   teacher_probs: Tensor | None = None) -> dict:
    """Collapse metrics of one step.

    Args:
        teacher_logits: (N, K) teacher head outputs before centering.
        center: (1, K) or (1, 1, K) the loss's centre.
        teacher_temp: the teacher temperature of this step.
        student_features: (M, D) student backbone features.
        teacher_probs: (N, K) the teacher's targets when they are not ``softmax((logits - center) / temp)``
            (Sinkhorn-Knopp's).

    Returns:
        teacher_entropy (mean per-sample entropy, nats), teacher_kl_uniform (log K minus that),
        teacher_top_share (fraction of samples whose argmax is the batch's most common one),
        student_feature_std (std over the batch of L2-normalised features, mean over dims;
        about 1/sqrt(D) when features spread, 0 when they collapse to a point).
    """
    logits = teacher_logits.float()
    probs = F.softmax((logits - center.reshape(1, -1).float()) / teacher_temp, dim=-1) if teacher_probs is None \
        else teacher_probs.float()  # (N, K)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean()
    top = probs.argmax(dim=-1)
    top_share = torch.bincount(top).max().float() / top.numel()
    feature_std = feature_spread(student_features)
    log_k = math.log(logits.shape[-1])
    return {
        "teacher_entropy": entropy.item(),
        "teacher_kl_uniform": log_k - entropy.item(),
        "teacher_top_share": top_share.item(),
        "student_feature_std": feature_std.item(),
    }


def feature_spread(features: Tensor) -> Tensor:
    """Std over the batch of L2-normalised features (N, D), mean over dims: about 1/sqrt(D) when they spread,
    0 when they collapse to a point."""
    return F.normalize(features.float(), dim=-1).std(dim=0).mean()


def collapse_warnings(signals: dict, num_outputs: int, feature_dim: int) -> dict[str, str]:
    """Plain-words diagnoses of collapse by kind (uniform, one_hot, features); empty when healthy."""
    log_k = math.log(num_outputs)
    messages = {}
    if signals["teacher_kl_uniform"] < 0.01 * log_k:
        messages["uniform"] = (
            "teacher output is nearly uniform (entropy {:.2f} of max {:.2f} nats): collapse to uniform. "
            "Lower dino.teacher_temp or raise dino.teacher_momentum.".format(signals["teacher_entropy"], log_k)
        )
    if signals["teacher_entropy"] < 0.05 * log_k and signals["teacher_top_share"] > 0.9:
        messages["one_hot"] = (
            "teacher output is one-hot on the same dimension for {:.0%} of images: collapse to one "
            "output. Lower dino.center_momentum (a faster centre) or raise dino.teacher_temp."
            .format(signals["teacher_top_share"])
        )
    messages.update(feature_collapse_warning(signals, feature_dim))
    return messages


def feature_collapse_warning(signals: dict, feature_dim: int) -> dict[str, str]:
    """``{"features": diagnosis}`` when the student's features have collapsed to a point (``student_feature_std``
    under a tenth of the 1/sqrt(D) of spread features), else empty; a signal not logged counts as healthy."""
    healthy = 1 / math.sqrt(feature_dim)
    std = signals.get("student_feature_std", healthy)
    if std >= 0.1 * healthy:
        return {}
    return {"features": f"student features have collapsed to a point (std {std:.2e}, healthy about {healthy:.2e}). "
                        "Lower optim.lr or check the augmentation."}
