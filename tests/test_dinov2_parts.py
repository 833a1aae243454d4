"""DINOv2's parts and the DINO fixes (issue 14), each against an independent float64 transcription or a property
that a wrong implementation breaks."""

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from lightly.loss import IBOTPatchLoss
from lightly.models.utils import update_momentum
from torch import nn

from unsupdistill.augment import MultiCropAugmentation, blur_sigma, ibot_masks, sized
from unsupdistill.config import ConfigError, ModelConfig, OptimConfig
from unsupdistill.losses import KoLeo, MaskedPatchLoss, SinkhornDINOLoss, build_dino_loss, sinkhorn_knopp
from unsupdistill.methods.dino.settings import DINOConfig
from unsupdistill.models import build_student_teacher
from unsupdistill.models.dino import vit_tokens
from unsupdistill.models.ema import update_ema
from unsupdistill.train.optimizer import build_optimizer, clip_gradients

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = ModelConfig(backbone="vit_tiny_patch16_224", small_image_stem=False,
                  backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2,
                                   "drop_path_rate": 0.2})
"""A two-block ViT on 16-px crops: a 4x4 patch grid."""
HEAD = DINOConfig(head_batch_norm=False, head_hidden_dim=32, head_bottleneck_dim=16, head_output_dim=64)
"""Its small DINO head."""


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).float()


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


# ---------------------------------------------------------------- Sinkhorn-Knopp


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
    assert isinstance(build_dino_loss(DINOConfig(centering="sinkhorn"), K), SinkhornDINOLoss)


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


def test_ibot_masks_share_and_ratio_bounds():
    torch.manual_seed(0)
    ratios = []
    for _ in range(20):
        masks = ibot_masks(64, (8, 8), mask_p=0.5, ratio=(0.1, 0.5), device=torch.device("cpu"))
        assert masks.shape == (64, 8, 8) and masks.dtype == torch.bool
        per_image = masks.flatten(1).float().mean(1)
        assert (per_image > 0).sum() == 32  # half of the crops are masked
        assert per_image.max() <= 0.5  # no crop above the largest ratio
        ratios += per_image[per_image > 0].tolist()
    assert 0.2 < np.mean(ratios) < 0.35  # spread over 0.1-0.5 (blocks may fall a little short of their target)
    torch.manual_seed(1)
    first = ibot_masks(8, (4, 4), 0.5, (0.1, 0.5), torch.device("cpu"))
    torch.manual_seed(1)
    assert torch.equal(first, ibot_masks(8, (4, 4), 0.5, (0.1, 0.5), torch.device("cpu")))  # follows torch's RNG


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


def test_masked_tokens_reach_the_loss():
    torch.manual_seed(0)
    student, teacher, _ = build_student_teacher(VIT, HEAD, (16, 8), ibot=True)
    views = [randn(4, 3, 16, 16, seed=8), randn(8, 3, 8, 8, seed=9)]
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[1, :2, 1:3] = True
    masks[3, 3, :] = True
    teacher.eval()
    # unmasked, the token path is timm's own forward
    torch.testing.assert_close(vit_tokens(teacher.backbone, views[0]), teacher.backbone.forward_features(views[0]))
    features, logits, patch_logits = teacher(views, masks, False)
    torch.testing.assert_close(features, torch.cat([teacher.backbone(v) for v in views]))
    assert patch_logits.shape == (8, 64)
    # the student sees the mask token in place of the masked patches; its gradient comes from the iBOT loss
    student.eval()  # no drop-path noise
    _, _, before = student(views, masks)
    with torch.no_grad():
        student.mask_token.add_(1.0)
    _, _, after = student(views, masks)
    assert not torch.allclose(before, after)
    loss = MaskedPatchLoss(64)(patch_logits, after, masks, 0.04)
    loss.backward()
    assert student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0


def test_ibot_needs_a_vit():
    with pytest.raises(ConfigError, match="dino.ibot_weight"):
        build_student_teacher(ModelConfig(), DINOConfig(), (16,), ibot=True)


# ---------------------------------------------------------------- fixes of the review


def test_per_parameter_clipping_bounds_every_gradient():
    layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    grads = [randn(*p.shape, seed=i) * (10.0 if i % 2 else 0.01) for i, p in enumerate(layers.parameters())]
    for p, g in zip(layers.parameters(), grads):
        p.grad = g.clone()
    params = list(layers.parameters())
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    clip_gradients(params, OptimConfig(clip_grad=3.0, clip_mode="per_param"), total)
    for p, g in zip(params, grads):
        norm = g.norm().item()
        assert p.grad.norm().item() == pytest.approx(min(norm, 3.0), rel=1e-4)  # large ones cut, small ones kept
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_gradients(params, OptimConfig(clip_grad=3.0, clip_mode="total"), total)
    assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(3.0, rel=1e-4)


def test_ema_update_matches_lightly_and_the_optimizer_is_fused():
    torch.manual_seed(0)
    student, ours, theirs = (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)) for _ in range(3))
    theirs.load_state_dict(ours.state_dict())
    before = [p.clone() for p in ours.parameters()]
    update_ema(student, ours, 0.9)
    update_momentum(student, theirs, 0.9)  # lightly's, one parameter at a time
    for mine, reference, old, s in zip(ours.parameters(), theirs.parameters(), before, student.parameters()):
        torch.testing.assert_close(mine, reference)
        torch.testing.assert_close(mine, 0.9 * old + 0.1 * s)
    with pytest.raises(ValueError, match="parameters"):
        update_ema(student, nn.Linear(4, 8), 0.9)
    optimizer = build_optimizer(OptimConfig(), student)
    assert optimizer.defaults["fused"]  # one kernel per step, not a Python loop over parameters


def test_teacher_has_no_drop_path():
    student, teacher, _ = build_student_teacher(VIT, HEAD, (16,))
    assert any(type(m).__name__ == "DropPath" for m in student.modules())
    assert not any(type(m).__name__ == "DropPath" for m in teacher.modules())
    torch.testing.assert_close(student.state_dict()["backbone.pos_embed"], teacher.state_dict()["backbone.pos_embed"])


def test_last_layer_logits_are_float32_under_autocast():
    student, _, _ = build_student_teacher(VIT, HEAD, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, logits = student([randn(2, 3, 16, 16, seed=10)])
        hidden = student.head.layers(features)
    assert hidden.dtype == torch.bfloat16  # the MLP runs in bf16 under autocast ...
    assert logits.dtype == torch.float32  # ... the last layer does not


def test_local_crops_get_the_global_blur_sigma():
    cfg, size = DINOConfig(), ModelConfig().input_size
    assert blur_sigma(cfg.local, size) == blur_sigma(sized(cfg.global_1, size))
    assert blur_sigma(cfg.local, 224) == pytest.approx((0.1, 2.0))  # DINO's 96-px local crops


def test_resample_crop_mode_matches_slice_statistics():
    """The batched crop draws the same crops: on a horizontal ramp, every output's mean is the crop's centre."""
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64).repeat(512, 1, 1, 1)
    means = {}
    for mode in ("slice", "resample"):
        cfg = DINOConfig()
        specs = [sized(spec, 16) for spec in (cfg.global_1, cfg.global_2)]
        for spec in specs:
            spec.flip_p = spec.color_jitter_p = spec.grayscale_p = spec.blur_p = spec.solarize_p = 0.0
        torch.manual_seed(0)
        views, _ = MultiCropAugmentation(*specs, cfg.local, 0, (0, 0, 0), (1, 1, 1), crop_mode=mode)(ramp)
        means[mode] = views.mean(dim=(1, 2, 3))
    assert means["slice"].mean().item() == pytest.approx(means["resample"].mean().item(), abs=0.01)
    assert means["slice"].std().item() == pytest.approx(means["resample"].std().item(), rel=0.1)
    assert math.isfinite(means["resample"].sum().item())


def test_progressive_resizing_shrinks_every_crop_then_switches_once():
    """dino.low_res_share=0.5 with low_res_scale=0.75: 12 / 6-px crops for the first half of the planned
    steps, then the configured 16 / 8 px, never back (as after a resume past the switch)."""
    from conftest import TINY

    from unsupdistill.config import load_config
    from unsupdistill.methods.dino.method import DINO
    from unsupdistill.train.method import Batch, Runtime
    from unsupdistill.train.schedules import ScheduleValues

    config = load_config(None, [*TINY, "dino.low_res_share=0.5", "dino.low_res_scale=0.75"])
    dino = DINO(config, Runtime(torch.device("cpu"), None, 1))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)

    def sizes(progress: float) -> list[tuple[int, ...]]:
        sched = ScheduleValues(step=round(100 * progress), total_steps=100, steps_per_epoch=10, lr=1e-3,
                               weight_decay=0.04)
        return [tuple(v.shape) for v in dino.views(Batch(images, torch.arange(4)), sched)]

    low, full = [(8, 3, 12, 12), (8, 3, 6, 6)], [(8, 3, 16, 16), (8, 3, 8, 8)]
    assert sizes(0.0) == low and sizes(0.49) == low
    assert sizes(0.5) == full
    assert sizes(0.1) == full
    for bad in ("dino.low_res_share=1", "dino.low_res_scale=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


# ---------------------------------------------------------------- the ViT recipe, end to end


def test_vit_recipe_trains_exports_evaluates_and_resumes(tmp_path, monkeypatch):
    """recipes/cifar10_vit_cpu.yaml (iBOT, Sinkhorn-Knopp, KoLeo, per-parameter clipping) on the built-in digits,
    shrunk to a two-block ViT: it trains, logs its loss terms, exports and evaluates; stopped by Ctrl-C after
    step 2 and resumed, it gives the same losses (iBOT's masks and centre come back with the checkpoint)."""
    from conftest import read_metrics

    from unsupdistill.cli import EXIT_STOPPED, main
    from unsupdistill.train import loop

    args = ["--recipe", "cifar10_vit_cpu", "train.max_steps=4", "train.time_budget_s=null", "train.log_every_steps=1",
            "model.backbone_kwargs={img_size: 32, patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}",
            "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "dino.head_output_dim=256",
            "train.batch_size=16", "data.num_workers=0"]
    run = tmp_path / "vit"
    assert main(["pretrain", "--out", str(run), *args]) == 0
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and r["ibot_loss"] > 0 and math.isfinite(r["koleo_loss"])
    assert (run / "backbone.safetensors").is_file()
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--train", "digits", "--test", "digits", "--out", str(out), "--no-plots",
                 "--no-clustering", "--no-linear"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert 10 <= report["knn"]["20"]["top1"] <= 100  # a real accuracy over 10 classes

    train_step = loop.Trainer.train_step

    def ctrl_c_during_step_3(self, *step_args, **kwargs):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, *step_args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", ctrl_c_during_step_3)
    stopped = tmp_path / "stopped"
    assert main(["pretrain", "--out", str(stopped), *args]) == EXIT_STOPPED
    monkeypatch.undo()
    assert main(["pretrain", "--resume", str(stopped)]) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(stopped) if "loss" in r}
    assert resumed == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)
