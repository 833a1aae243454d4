"""Sinkhorn-Knopp centring of the teacher (DINOv2, Oquab et al. 2023, Sec. 4; from SwAV, Caron et al. 2020)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, iterations: int = 3) -> Tensor:
    """The teacher's targets as a balanced assignment of the batch to the K prototypes.

    ``Q = exp(t / T)`` (B x K), then alternately each prototype's column and each sample's row is normalised,
    ``iterations`` times, so that every sample's target is a distribution and every prototype receives about
    the same mass, B / K: ``Q <- Q diag(1 / (K 1^T Q))``, ``Q <- diag(1 / (B Q 1)) Q``; the result is ``B Q``.
    Computed in log space (the sums as log-sum-exps), so that neither ``exp(t / T)`` overflowing nor a whole
    prototype underflowing at small temperatures can make it NaN; the sums over the batch run over the global
    batch when distributed.

    Args:
        teacher_logits: the teacher's head outputs (B, K), from this process.
        teacher_temp: the teacher temperature T.
        iterations: Sinkhorn-Knopp iterations (DINOv2: 3).

    Returns:
        (B, K) float32 targets: each row sums to 1, each column to about B / K (exactly after enough iterations).
    """
    log_q = teacher_logits.float() / teacher_temp  # (B, K); the first normalisation makes Q sum to 1 anyway
    batch = torch.tensor(float(log_q.shape[0]), device=log_q.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch)
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp_over_batch(log_q)  # each prototype: mass 1 (then 1/K of the total)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # each sample: mass 1 (then 1/B)
    return log_q.exp()  # rows sum to 1: B Q


def _global_logsumexp_over_batch(log_q: Tensor) -> Tensor:
    """``log sum_b exp(log_q[b, k])`` over the batches of all processes: (B, K) -> (1, K)."""
    top = log_q.max(dim=0, keepdim=True).values  # (1, K)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (log_q - top).exp().sum(dim=0, keepdim=True)  # (1, K)
    if distributed:
        dist.all_reduce(total)
    return top + total.log()
