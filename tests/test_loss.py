"""DINO's losses: the DINO loss we train with against an independent transcription of the paper's Algorithm 1;
DINOv2's Sinkhorn-Knopp centring, KoLeo and iBOT's masked-patch loss against float64 transcriptions or lightly's."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from lightly.loss import IBOTPatchLoss

from unsupdistill.losses import KoLeo, MaskedPatchLoss, SinkhornDINOLoss, sinkhorn_knopp
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


# ---------------------------------------------------------------- NumPy references


def sinkhorn_reference(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """DINOv2's ``sinkhorn_knopp_teacher`` written out in float64 (one process)."""
    q = np.exp(logits / temp).T  # (K, B)
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_sinkhorn_rows_are_distributions_and_columns_balance():
    logits = randn(96, 12, seed=1).double()
    targets = sinkhorn_knopp(logits, teacher_temp=0.5, iterations=3)
    expected = sinkhorn_reference(logits.numpy(), 0.5, 3)
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(targets.sum(1).numpy(), np.ones(96), rtol=1e-5)  # each sample: a distribution
    columns = targets.sum(0).numpy()  # mass per prototype, B / K = 8 when balanced
    softmax_columns = torch.softmax(logits / 0.5, dim=-1).sum(0).numpy()
    assert np.abs(columns - 8).max() < 0.25 * np.abs(softmax_columns - 8).max()  # much closer than a softmax
    balanced = sinkhorn_knopp(logits, teacher_temp=0.1, iterations=300).sum(0).numpy()
    np.testing.assert_allclose(balanced, np.full(12, 8.0), rtol=1e-3)  # exactly balanced in the limit


def test_sinkhorn_does_not_overflow_at_small_temperatures():
    logits = randn(16, 8, seed=2) * 20  # exp(40 / 0.02) overflows float32 without the shift
    targets = sinkhorn_knopp(logits, teacher_temp=0.02)
    assert torch.isfinite(targets).all()
    np.testing.assert_allclose(targets.sum(1).numpy(), np.ones(16), rtol=1e-5)


def test_sinkhorn_dino_loss_matches_transcription():
    B, K, V = 6, 10, 4
    teacher = [randn(B, K, seed=s) for s in (3, 4)]
    student = [randn(B, K, seed=s) for s in range(10, 10 + V)]
    loss = SinkhornDINOLoss(K, student_temp=0.1, iterations=3)(teacher, student, teacher_temp=0.05)
    q = sinkhorn_reference(np.concatenate([t.double().numpy() for t in teacher]), 0.05, 3).reshape(2, B, K)
    terms = [-(q[t] * log_softmax(student[s].double().numpy() / 0.1)).sum(-1).mean()
             for t in range(2) for s in range(V) if s != t]
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)
    assert isinstance(build_loss(DINOConfig(centering="sinkhorn"), K), SinkhornDINOLoss)


# ---------------------------------------------------------------- KoLeo


def test_koleo_matches_formula():
    features = randn(2 * 7, 5, seed=5)
    expected = 0.0
    for crop in features.double().numpy().reshape(2, 7, 5):
        x = crop / np.linalg.norm(crop, axis=1, keepdims=True)
        nearest = [min(np.linalg.norm(x[i] - x[j]) for j in range(7) if j != i) for i in range(7)]
        expected += -np.mean(np.log(nearest))
    assert KoLeo()(features, 2).item() == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- iBOT


def test_masked_patch_loss_matches_lightly_ibot():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[2, 1:, 3] = True  # image 1 unmasked: it still counts in the mean over images
    M = int(masks.sum())
    teacher, student = randn(M, 16, seed=6), randn(M, 16, seed=7)
    ours = MaskedPatchLoss(16, student_temp=0.1, centering="ema", center_momentum=0.9)
    reference = IBOTPatchLoss(output_dim=16, student_temp=0.1, center_momentum=0.9)
    for _ in range(2):  # the second call uses the updated centre
        assert ours(teacher, student, masks, 0.04).item() == pytest.approx(
            reference(teacher, student, masks, teacher_temp=0.04).item(), rel=1e-5)
    sk = MaskedPatchLoss(16, centering="sinkhorn")(teacher, student, masks, 0.04).item()
    q = sinkhorn_reference(teacher.double().numpy(), 0.04, 3)
    per_patch = -(q * log_softmax(student.double().numpy() / 0.1)).sum(-1)
    weights = np.array([1 / 4] * 4 + [1 / 3] * 3)  # 1 / masked patches of the patch's image
    assert sk == pytest.approx((per_patch * weights).sum() / 3, rel=1e-5)
