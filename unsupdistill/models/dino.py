"""The DINO network: backbone + projection head, run over views grouped by resolution; for ViTs, optionally
with iBOT's masked patch tokens (Zhou et al. 2022) as DINOv2 trains them."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from unsupdistill.config import ConfigError, ModelConfig
from unsupdistill.models.backbone import BackboneSpec, create_backbone


class DINOHead(DINOProjectionHead):
    """lightly's DINO head, with the last layer and its output in float32 under autocast: logits later divided
    by a teacher temperature of 0.02-0.04 would carry bf16's rounding (8 bits of mantissa) 25-50x magnified.

    (B, input_dim) -> MLP -> L2-normalised bottleneck (B, bottleneck_dim) -> last layer -> (B, output_dim) fp32.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.layers(x).float(), dim=-1, p=2)  # (B, bottleneck_dim)
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x)  # (B, output_dim), float32


class DINONetwork(nn.Module):
    """Backbone followed by the DINO head, applied to a list of view batches.

    Views of one resolution are run through the backbone together and the head runs once on
    all features, so one ``forward`` covers global and local crops (and DDP sees one call).

    With ``ibot=True`` (timm ViTs only) it also holds a mask token (and, with ``patch_head``, a head for
    patch tokens of its own), and ``forward(views, masks)`` returns the logits of the masked patch tokens of
    the first view batch.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot: bool = False,
                 patch_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim)) if ibot else None

    def forward(self, views: list[Tensor], masks: Tensor | None = None,
                mask_input: bool = True) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """Features and head logits of all views; with ``masks``, also patch logits.

        Args:
            views: view batches, each (B_i, 3, S_i, S_i).
            masks: (B_0, h, w) bool over the patch grid of ``views[0]``: the patches iBOT predicts.
            mask_input: replace the masked patches by the mask token before the blocks (the student); False
                runs ``views[0]`` unmasked and only picks the tokens at the masked places (the teacher).

        Returns:
            features (sum B_i, D), logits (sum B_i, K) and, with ``masks``, patch logits (M, K) of the M
            masked patches in ``masks``' row-major order.
        """
        if masks is None:
            features = torch.cat([self.backbone(v) for v in views])  # (sum B_i, D)
            return features, self.head(features)
        tokens = vit_tokens(self.backbone, views[0], masks, self.mask_token if mask_input else None)  # (B_0, P+N, D)
        first = self.backbone.forward_head(tokens, pre_logits=True)  # (B_0, D), as backbone(views[0])
        patches = tokens[:, self.backbone.num_prefix_tokens:][masks.flatten(1)]  # (M, D)
        features = torch.cat([first] + [self.backbone(v) for v in views[1:]])  # (sum B_i, D)
        patch_logits = (self.patch_head or self.head)(patches)  # (M, K)
        return features, self.head(features), patch_logits


def vit_tokens(vit: nn.Module, images: Tensor, masks: Tensor | None = None,
               mask_token: Tensor | None = None) -> Tensor:
    """A timm ViT's ``forward_features`` with the masked patch embeddings replaced by ``mask_token`` (before
    the position embedding, as iBOT): (B, 3, H, W) -> normalised tokens (B, prefix + h*w, D).

    Args:
        masks: (B, h, w) bool; ignored when ``mask_token`` is None.
        mask_token: (1, D).
    """
    x = vit.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, h*w, D)
    if mask_token is not None and masks is not None:
        where = masks.reshape(x.shape[:-1]).unsqueeze(-1)  # (B, h, w, 1) or (B, h*w, 1)
        x = torch.where(where, mask_token.to(x.dtype), x)
    x = vit._pos_embed(x)  # noqa: SLF001 - timm's own position embedding (resampled for dynamic sizes)
    x = vit.norm_pre(vit.patch_drop(x))
    return vit.norm(vit.blocks(x))


def build_student_teacher(cfg: ModelConfig, head: Any, crop_sizes: tuple[int, ...], ibot: bool = False,
                          ibot_separate_head: bool = False) -> tuple[DINONetwork, DINONetwork, BackboneSpec]:
    """Create the student and a teacher with the same weights and no gradients. The teacher has no stochastic
    depth (DINO's teacher is built without ``drop_path_rate``). ``head``: DINO's settings (the head's sizes)."""
    student, spec = build_dino_network(cfg, head, crop_sizes, ibot, ibot_separate_head)
    kwargs = {k: v for k, v in cfg.backbone_kwargs.items() if k != "drop_path_rate"}
    teacher, _ = build_dino_network(dataclasses.replace(cfg, backbone_kwargs=kwargs), head, crop_sizes, ibot,
                                    ibot_separate_head)
    # lightly's head uses torch's old weight_norm, which cannot be deep-copied: copy weights instead.
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher, spec


def build_dino_network(cfg: ModelConfig, head: Any, crop_sizes: tuple[int, ...], ibot: bool = False,
                       ibot_separate_head: bool = False) -> tuple[DINONetwork, BackboneSpec]:
    """One DINO network (timm backbone + DINO head) from the model section, and its backbone spec.

    Args:
        cfg: the model section (the backbone).
        head: DINO's settings (the head's sizes, ``dino.head_*``).
        crop_sizes: the view sizes the network will see (see :func:`create_backbone`).
        ibot: add a mask token for iBOT's masked patches (timm ViTs only).
        ibot_separate_head: patch tokens get a DINO head of their own.
    """
    backbone, spec = create_backbone(cfg, crop_sizes)
    if ibot and not all(hasattr(backbone, a) for a in ("patch_embed", "_pos_embed", "blocks", "num_prefix_tokens")):
        raise ConfigError(f"dino.ibot_weight > 0 needs a timm ViT backbone (e.g. model.backbone=vit_tiny_patch16_224), "
                          f"not model.backbone={cfg.backbone}; set dino.ibot_weight=0 for it")
    patch_head = build_dino_head(head, spec.feature_dim) if ibot and ibot_separate_head else None
    return DINONetwork(backbone, build_dino_head(head, spec.feature_dim), ibot, patch_head), spec


def build_dino_head(cfg: Any, input_dim: int) -> nn.Module:
    """The DINO projection head ``cfg`` (DINO's settings, ``dino.head_*``) describes, on features of ``input_dim``:
    (B, input_dim) -> logits (B, head_output_dim), the last layer in float32."""
    with warnings.catch_warnings():  # lightly's head calls the deprecated nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return DINOHead(
            input_dim=input_dim,
            hidden_dim=cfg.head_hidden_dim,
            bottleneck_dim=cfg.head_bottleneck_dim,
            output_dim=cfg.head_output_dim,
            batch_norm=cfg.head_batch_norm,
            norm_last_layer=cfg.norm_last_layer,
        )
