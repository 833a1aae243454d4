"""The student's optimizer, gradient clipping, and the moving average of networks that follow the student."""

from __future__ import annotations

import torch
from lightly.models.utils import get_weight_decay_parameters
from torch import Tensor, nn

from unsupdistill.config import OptimConfig


def build_optimizer(cfg: OptimConfig, student: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over the student; norms and biases in a second group without weight decay (group 0's
    weight decay follows the schedule)."""
    decay, no_decay = get_weight_decay_parameters([student])
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors instead of a Python loop of small ops per parameter (torch's default
    # on CPU), which a small network's step spends a measurable share of its time in (BENCHMARKS.md, issue 16)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in decay + no_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                           fused=fused)


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], cfg: OptimConfig, total_norm: Tensor) -> None:
    """Clip the gradients in place to ``cfg.clip_grad`` (nothing when it is 0).

    ``total``: all gradients scaled together so that their joint L2 norm ``total_norm`` is at most the limit.
    ``per_param``: each parameter's gradient ``g`` scaled by ``min(1, clip / (||g|| + 1e-6))`` on its own, as
    DINO's ``utils.clip_gradients`` does (Caron et al. 2021, code release).
    """
    if cfg.clip_grad <= 0:
        return
    if cfg.clip_mode == "total":
        torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, total_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)  # one L2 norm per tensor
    scales = [(cfg.clip_grad / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
