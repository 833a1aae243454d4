"""The DINO loss we train with, against an independent transcription of the paper's Algorithm 1."""

import torch
import torch.nn.functional as F

from unsupdistill.losses.dino import build_dino_loss as build_loss
from unsupdistill.methods.dino.settings import DINOConfig


def algorithm1(teacher: list, student: list, center: torch.Tensor, student_temp: float, teacher_temp: float,
               center_momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Caron et al. 2021, Algorithm 1, extended to multi-crop: the mean of H(t_i, s_j) over every
    teacher view i and student view j != i; then C <- m C + (1 - m) mean(teacher outputs)."""

    def H(t, s):  # noqa: N802 (the paper's name)
        t = t.detach()
        s = F.softmax(s / student_temp, dim=1)
        t = F.softmax((t - center) / teacher_temp, dim=1)
        return -(t * torch.log(s)).sum(dim=1).mean()

    terms = [H(t, s) for i, t in enumerate(teacher) for j, s in enumerate(student) if i != j]
    loss = sum(terms) / len(terms)
    new_center = center_momentum * center + (1 - center_momentum) * torch.cat(teacher).mean(dim=0)
    return loss, new_center


def test_loss_and_center_match_algorithm1_over_several_steps():
    torch.manual_seed(0)
    cfg = DINOConfig(student_temp=0.1, teacher_temp=0.07, center_momentum=0.9)
    B, K, n_local = 8, 64, 4
    loss_fn = build_loss(cfg, K)
    center = torch.zeros(K)
    for step, teacher_temp in enumerate([0.04, 0.055, 0.07]):
        teacher = [torch.randn(B, K) * 3 + 1 for _ in range(2)]
        student = [torch.randn(B, K, requires_grad=True) for _ in range(2 + n_local)]
        student_ref = [s.detach().clone().requires_grad_(True) for s in student]

        loss = loss_fn(teacher, student, teacher_temp=teacher_temp)
        ref, center = algorithm1(teacher, student_ref, center, 0.1, teacher_temp, 0.9)

        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6, msg=f"loss differs at step {step}")
        torch.testing.assert_close(loss_fn.center.reshape(-1), center, msg=f"centre differs at step {step}")
        loss.backward()
        ref.backward()
        for s, r in zip(student, student_ref):
            torch.testing.assert_close(s.grad, r.grad, rtol=1e-5, atol=1e-7)
    assert center.abs().sum() > 0  # the centre really moved, so later steps tested centring


def test_same_view_pairs_are_excluded():
    """With identical teacher/student outputs on matching views only the cross terms count."""
    torch.manual_seed(1)
    K = 16
    loss_fn = build_loss(DINOConfig(), K)
    a, b = torch.randn(4, K), torch.randn(4, K)
    with_diag = algorithm1([a, b], [a, b], torch.zeros(K), 0.1, 0.04, 0.9)[0]
    cross_only = (algorithm1([a], [a, b], torch.zeros(K), 0.1, 0.04, 0.9)[0]
                  + algorithm1([b], [b, a], torch.zeros(K), 0.1, 0.04, 0.9)[0]) / 2
    got = loss_fn([a, b], [a, b], teacher_temp=0.04)
    torch.testing.assert_close(got, with_diag)
    torch.testing.assert_close(got, cross_only)
