"""Distillation losses against independent NumPy (float64) transcriptions of their formulas."""

import math

import numpy as np
import pytest
import torch
from lightly.loss import DINOLoss

from unsupdistill.losses import (
    CosineLoss,
    DensePatchKLLoss,
    FrozenTeacherDINOLoss,
    QueueKLLoss,
    build_dino_loss,
    default_queue_size,
)
from unsupdistill.methods.dino.settings import DINOConfig

# ---------------------------------------------------------------- NumPy references


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x**2).sum(axis=-1, keepdims=True))


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) = sum p log(p / q) of two probability vectors."""
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


def queue_kl_reference(student: np.ndarray, teacher: np.ndarray, support: np.ndarray, temperature: float) -> float:
    """Mean over images of KL(softmax(t . support / T) || softmax(s . support / T))."""
    s, t = unit(student), unit(teacher)
    return float(np.mean([kl(softmax(support @ t[b] / temperature), softmax(support @ s[b] / temperature))
                          for b in range(len(s))]))


def adaptive_avg_pool(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, C) -> (out_h, out_w, C); cell i covers [floor(i * H / out_h), ceil((i + 1) * H / out_h))."""
    H, W, C = x.shape
    out = np.zeros((out_h, out_w, C))
    for i in range(out_h):
        for j in range(out_w):
            r0, r1 = (i * H) // out_h, -((-(i + 1) * H) // out_h)
            c0, c1 = (j * W) // out_w, -((-(j + 1) * W) // out_w)
            out[i, j] = x[r0:r1, c0:c1].mean(axis=(0, 1))
    return out


def dense_reference(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """Mean over images and patches i of KL over the other patches j != i of softmaxed cosine similarities."""
    h, w = min(student.shape[1], teacher.shape[1]), min(student.shape[2], teacher.shape[2])
    terms = []
    for s_map, t_map in zip(student, teacher):
        s = unit(adaptive_avg_pool(s_map, h, w).reshape(h * w, -1))
        t = unit(adaptive_avg_pool(t_map, h, w).reshape(h * w, -1))
        for i in range(h * w):
            others = [j for j in range(h * w) if j != i]
            p = softmax(np.array([t[i] @ t[j] for j in others]) / temperature)
            q = softmax(np.array([s[i] @ s[j] for j in others]) / temperature)
            terms.append(kl(p, q))
    return float(np.mean(terms))


def dino_reference(teacher: np.ndarray, student: np.ndarray, center: np.ndarray, teacher_temp: float,
                   student_temp: float) -> float:
    """Caron et al. 2021, Algorithm 1, H(t, s) for one view: mean over images of -sum p_t log p_s."""
    terms = []
    for t, s in zip(teacher, student):
        p_t = softmax((t - center) / teacher_temp)
        z = s / student_temp
        log_p_s = z - (z.max() + math.log(np.exp(z - z.max()).sum()))  # log softmax
        terms.append(-(p_t * log_p_s).sum())
    return float(np.mean(terms))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).float()


# ---------------------------------------------------------------- QueueKLLoss


def test_default_queue_size_follows_lightlytrain_buckets():
    assert default_queue_size(1) == 16
    assert default_queue_size(49) == 16
    assert default_queue_size(50) == 32
    assert default_queue_size(999) == 256
    assert default_queue_size(19_999) == 4096
    assert default_queue_size(20_000) == 8192
    assert default_queue_size(10**8) == 8192
    with pytest.raises(ValueError):
        default_queue_size(0)


def test_queue_is_fifo_and_wraps_around():
    loss_fn = QueueKLLoss(dim=3, queue_size=5)
    rows = randn(8, 3, seed=1)
    for start in (0, 2, 4):  # three pushes of 2 rows: rows 0..5, the 6th wraps to slot 0
        loss_fn.push(rows[start:start + 2] * 7.0)  # stored normalised
    expected = unit(rows.numpy().astype(np.float64))[[5, 1, 2, 3, 4]]
    np.testing.assert_allclose(loss_fn.queue.numpy(), expected, atol=1e-6)
    assert int(loss_fn.queue_ptr) == 1
    assert int(loss_fn.queue_filled) == 5
    loss_fn.push(rows)  # larger than the queue: keeps the last 5 rows, oldest overwritten first
    np.testing.assert_allclose(loss_fn.queue.numpy()[[1, 2, 3, 4, 0]], unit(rows[3:].numpy().astype(np.float64)),
                               atol=1e-6)
    assert int(loss_fn.queue_ptr) == 1 and int(loss_fn.queue_filled) == 5
    assert {"queue", "queue_ptr", "queue_filled"} <= set(loss_fn.state_dict())


def test_empty_queue_uses_the_batch_as_support():
    student, teacher = randn(6, 8, seed=2), randn(6, 8, seed=3)
    loss = QueueKLLoss(dim=8, queue_size=16, temperature=0.2)(student, teacher)
    t = teacher.numpy().astype(np.float64)
    ref = queue_kl_reference(student.numpy().astype(np.float64), t, unit(t), 0.2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert ref > 0.05


def test_partly_filled_queue_uses_batch_plus_filled_rows_only():
    loss_fn = QueueKLLoss(dim=8, queue_size=32, temperature=0.1)
    past = randn(10, 8, seed=4)
    loss_fn.push(past)
    student, teacher = randn(4, 8, seed=5), randn(4, 8, seed=6)
    t = teacher.numpy().astype(np.float64)
    support = np.concatenate([unit(t), unit(past.numpy().astype(np.float64))])  # 14 rows, no empty ones
    ref = queue_kl_reference(student.numpy().astype(np.float64), t, support, 0.1)
    assert loss_fn(student, teacher).item() == pytest.approx(ref, rel=1e-5)


def test_full_queue_matches_lightlytrain_shift_queue():
    """LightlyTrain: queue[B:] = queue[:-B]; queue[:B] = batch; then the loss over the whole queue."""
    B, D, Q, T = 4, 8, 12, 0.07
    loss_fn = QueueKLLoss(dim=D, queue_size=Q, temperature=T)
    lt_queue = np.zeros((Q, D))
    for step in range(6):  # past the point where the queue is full, so LightlyTrain has no zero rows left
        student, teacher = randn(B, D, seed=10 + 2 * step), randn(B, D, seed=11 + 2 * step)
        lt_queue[B:] = lt_queue[:-B].copy()
        lt_queue[:B] = unit(teacher.numpy().astype(np.float64))
        loss = loss_fn(student, teacher)
        loss_fn.push(teacher)
        if step >= Q // B - 1:
            ref = queue_kl_reference(student.numpy().astype(np.float64), teacher.numpy().astype(np.float64),
                                     lt_queue, T)
            assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_queue_kl_gradient_reaches_student_only_and_vanishes_at_teacher():
    loss_fn = QueueKLLoss(dim=8, queue_size=16)
    loss_fn.push(randn(12, 8, seed=7))
    student = randn(4, 8, seed=8).requires_grad_(True)
    teacher = randn(4, 8, seed=9).requires_grad_(True)
    loss_fn(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    same = loss_fn(3.0 * teacher.detach(), teacher.detach())  # same direction: identical distributions
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_queue_kl_bf16_inputs_compute_in_float32_and_state_round_trips():
    loss_fn = QueueKLLoss(dim=8, queue_size=16)
    loss_fn.push(randn(10, 8, seed=12))
    student, teacher = randn(4, 8, seed=13), randn(4, 8, seed=14)
    restored = QueueKLLoss(dim=8, queue_size=16)
    restored.load_state_dict(loss_fn.state_dict())
    reference = loss_fn(student, teacher)
    assert restored(student, teacher).item() == pytest.approx(reference.item(), rel=1e-6)
    low = loss_fn(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference.item(), rel=0.1)


# ---------------------------------------------------------------- CosineLoss


def test_cosine_loss_matches_formula_and_gradients():
    student = randn(5, 6, seed=20).requires_grad_(True)
    teacher = randn(5, 6, seed=21).requires_grad_(True)
    loss = CosineLoss()(student, teacher)
    s, t = student.detach().numpy().astype(np.float64), teacher.detach().numpy().astype(np.float64)
    ref = np.mean([1 - s[b] @ t[b] / (np.linalg.norm(s[b]) * np.linalg.norm(t[b])) for b in range(5)])
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert CosineLoss()(2.0 * teacher.detach(), teacher.detach()).item() == pytest.approx(0.0, abs=1e-6)
    assert CosineLoss()(-teacher.detach(), teacher.detach()).item() == pytest.approx(2.0, abs=1e-6)


# ---------------------------------------------------------------- DensePatchKLLoss


def test_dense_loss_matches_reference_across_grids_and_widths():
    student = randn(2, 6, 3, 5, seed=30)  # rows pooled 6 -> 4 (uneven cells)
    teacher = randn(2, 4, 5, 7, seed=31)  # columns pooled 5 -> 3 (uneven cells)
    loss = DensePatchKLLoss(temperature=0.2)(student, teacher)
    ref = dense_reference(student.numpy().astype(np.float64), teacher.numpy().astype(np.float64), 0.2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert ref > 0.05


def test_dense_loss_same_grid_gradients_and_zero_at_teacher():
    student = randn(2, 3, 3, 4, seed=32).requires_grad_(True)
    teacher = randn(2, 3, 3, 4, seed=33).requires_grad_(True)
    loss = DensePatchKLLoss()(student, teacher)
    ref = dense_reference(student.detach().numpy().astype(np.float64), teacher.detach().numpy().astype(np.float64),
                          0.1)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    t = teacher.detach()
    assert DensePatchKLLoss()(2.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        DensePatchKLLoss()(randn(1, 1, 1, 4), randn(1, 2, 2, 4))


# ---------------------------------------------------------------- DINO


def test_frozen_teacher_dino_loss_and_center_update():
    B, K, m = 6, 16, 0.9
    loss_fn = FrozenTeacherDINOLoss(output_dim=K, student_temp=0.1, center_momentum=m)
    assert loss_fn.state_dict()["center"].shape == (1, K)
    center = np.zeros(K)
    for step, teacher_temp in enumerate([0.04, 0.07]):
        teacher = (randn(B, K, seed=40 + step) * 3 + 1).requires_grad_(True)
        student = randn(B, K, seed=50 + step).requires_grad_(True)
        t, s = teacher.detach().numpy().astype(np.float64), student.detach().numpy().astype(np.float64)
        loss = loss_fn(teacher, student, teacher_temp=teacher_temp)
        assert loss.item() == pytest.approx(dino_reference(t, s, center, teacher_temp, 0.1), rel=1e-5)
        center = m * center + (1 - m) * t.mean(axis=0)
        np.testing.assert_allclose(loss_fn.center.numpy()[0], center, rtol=1e-5, atol=1e-6)
        loss.backward()
        assert teacher.grad is None and student.grad.abs().sum() > 0
    assert np.abs(center).max() > 0.1  # the centre moved, so step 2 checked a non-zero centre


def test_build_dino_loss_uses_the_config():
    loss_fn = build_dino_loss(DINOConfig(student_temp=0.2, teacher_temp=0.05, center_momentum=0.8), 32)
    assert isinstance(loss_fn, DINOLoss)
    assert (loss_fn.student_temp, loss_fn.teacher_temp, loss_fn.center_momentum) == (0.2, 0.05, 0.8)
    assert loss_fn.center.shape[-1] == 32


def test_the_students_dino_head_keeps_its_last_layer_in_float32_under_autocast():
    """distill.loss=dino: the student's head is the DINO head of pretraining, whose logits stay float32 under bf16
    autocast (they are divided by a small temperature), shaped like the teacher run's head."""
    from types import SimpleNamespace

    from unsupdistill.methods.dino.settings import DINOConfig
    from unsupdistill.methods.distill.method import Distillation

    method = Distillation.__new__(Distillation)  # only what _head reads: the loss, the teacher's head, the width
    method.config = SimpleNamespace(distill=SimpleNamespace(loss="dino"))
    method.teacher = SimpleNamespace(head_config=DINOConfig(head_hidden_dim=32, head_bottleneck_dim=16,
                                                            head_output_dim=48))
    method.spec = SimpleNamespace(feature_dim=24)
    head = method._head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(torch.randn(5, 24))
    assert logits.shape == (5, 48) and logits.dtype == torch.float32
