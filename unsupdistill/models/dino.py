"""The DINO network: backbone + projection head, run over views grouped by resolution."""

from __future__ import annotations

import warnings

import torch
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from unsupdistill.config import ModelConfig
from unsupdistill.models.backbone import BackboneSpec, create_backbone


class DINONetwork(nn.Module):
    """Backbone followed by the DINO head, applied to a list of view batches.

    Views of one resolution are run through the backbone together and the head runs once on
    all features, so one ``forward`` covers global and local crops (and DDP sees one call).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Args: views, each (B_i, 3, S_i, S_i). Returns features (sum B_i, D), logits (sum B_i, K)."""
        features = torch.cat([self.backbone(v) for v in views])  # (sum B_i, D)
        return features, self.head(features)


def build_student_teacher(cfg: ModelConfig, crop_sizes: tuple[int, ...]) -> tuple[DINONetwork, DINONetwork,
                                                                                   BackboneSpec]:
    """Create the student and a teacher with the same weights and no gradients."""
    student, spec = _build(cfg, crop_sizes)
    teacher, _ = _build(cfg, crop_sizes)
    # lightly's head uses torch's old weight_norm, which cannot be deep-copied: copy weights instead.
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher, spec


def _build(cfg: ModelConfig, crop_sizes: tuple[int, ...]) -> tuple[DINONetwork, BackboneSpec]:
    backbone, spec = create_backbone(cfg, crop_sizes)
    with warnings.catch_warnings():  # lightly's head calls the deprecated nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        head = DINOProjectionHead(
            input_dim=spec.feature_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim,
            output_dim=cfg.head_output_dim,
            batch_norm=cfg.head_batch_norm,
            norm_last_layer=cfg.norm_last_layer,
        )
    return DINONetwork(backbone, head), spec
