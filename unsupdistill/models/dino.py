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
    student, spec = build_dino_network(cfg, crop_sizes)
    teacher, _ = build_dino_network(cfg, crop_sizes)
    # lightly's head uses torch's old weight_norm, which cannot be deep-copied: copy weights instead.
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher, spec


def build_dino_network(cfg: ModelConfig, crop_sizes: tuple[int, ...]) -> tuple[DINONetwork, BackboneSpec]:
    """One DINO network (timm backbone + DINO head) from the model section, and its backbone spec.

    Args:
        cfg: the model section (backbone and head sizes).
        crop_sizes: the view sizes the network will see (see :func:`create_backbone`).
    """
    backbone, spec = create_backbone(cfg, crop_sizes)
    return DINONetwork(backbone, build_dino_head(cfg, spec.feature_dim)), spec


def build_dino_head(cfg: ModelConfig, input_dim: int) -> nn.Module:
    """The DINO projection head the model section describes, on features of ``input_dim``:
    (B, input_dim) -> logits (B, head_output_dim)."""
    with warnings.catch_warnings():  # lightly's head calls the deprecated nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return DINOProjectionHead(
            input_dim=input_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim,
            output_dim=cfg.head_output_dim,
            batch_norm=cfg.head_batch_norm,
            norm_last_layer=cfg.norm_last_layer,
        )
