"""The DINO student and teacher networks: iBOT's mask token in the student's ViT, no drop-path in the teacher, the
head's last layer in float32 under autocast."""

import pytest
import torch
from conftest import randn

from unsupdistill.config import ConfigError, ModelConfig
from unsupdistill.losses import MaskedPatchLoss
from unsupdistill.methods.dino.settings import DINOConfig
from unsupdistill.models import build_student_teacher
from unsupdistill.models.dino import vit_tokens

VIT = ModelConfig(backbone="vit_tiny_patch16_224", small_image_stem=False,
                  backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2,
                                   "drop_path_rate": 0.2})
"""A two-block ViT on 16-px crops: a 4x4 patch grid."""
HEAD = DINOConfig(head_batch_norm=False, head_hidden_dim=32, head_bottleneck_dim=16, head_output_dim=64)
"""Its small DINO head."""


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
