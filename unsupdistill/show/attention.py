"""Self-attention of a ViT's class token to the patches in its last block, per head (DINO, Caron et al. 2021,
Fig. 1 and 3), and DINO's threshold: the smallest set of patches holding a share of the attention mass.

timm's ``Attention`` calls the fused ``scaled_dot_product_attention``, which never materialises the
weights, so they are recomputed here from the last block's attention input (``norm1`` of its tokens) with
that module's own ``qkv`` projection, ``q_norm``/``k_norm``, ``num_heads`` and ``scale``.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import Attention
from torch import Tensor, nn

from unsupdistill.models.backbone import patch_grid
from unsupdistill.models.frozen import FeatureModel
from unsupdistill.show.canvas import Colour, PictureDoesNotFit, join, normalise, tint, to_uint8

DINO_THRESHOLD = 0.6
"""Share of the attention mass DINO's masks keep (Caron et al. 2021, Fig. 3)."""


def last_attention(backbone: nn.Module) -> Attention:
    """The attention module of a timm VisionTransformer's last block.

    Raises:
        PictureDoesNotFit: the backbone is not a ViT with a class token, or its last block's attention is not timm's
            standard ``Attention`` (a fused ``qkv`` projection, no rotary embedding), whose weights this recomputes.
    """
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0 \
            or getattr(backbone, "cls_token", None) is None:
        raise PictureDoesNotFit(f"attention maps need a timm VisionTransformer with a class token; "
                         f"'{type(backbone).__name__}' is not one. Use a ViT backbone (e.g. vit_small_patch16_224, "
                         "class_token=True), or show the PCA of its spatial features instead (show/pca.py)")
    attention = getattr(blocks[-1], "attn", None)
    if not isinstance(attention, Attention):
        raise PictureDoesNotFit(f"the last block of '{type(backbone).__name__}' uses '{type(attention).__name__}', not "
                         "timm's standard Attention (qkv projection without rotary embedding), so its weights "
                         "cannot be recomputed here; use a plain VisionTransformer, or the PCA picture instead")
    return attention


@torch.no_grad()
def cls_attention(backbone: nn.Module, x: Tensor) -> Tensor:
    """Attention weights of the class token's query to every patch in the last block, per head.

    The softmax runs over all tokens (class token, registers and patches), as in the network; the weights of
    the prefix tokens are then dropped, so each map sums to at most 1.

    Args:
        backbone: a timm VisionTransformer with a class token (registers allowed: ``num_prefix_tokens``).
        x: a normalised batch (B, 3, H, W).

    Returns:
        Maps (B, heads, h, w) on the patch grid.
    """
    attention = last_attention(backbone)
    captured: list[Tensor] = []
    handle = attention.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        backbone.forward_features(x)
    finally:
        handle.remove()
    tokens = captured[-1]  # (B, N, C), the last block's norm1 output
    batch, num_tokens, _ = tokens.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    qkv = attention.qkv(tokens).reshape(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])  # (B, heads, N, head_dim) each
    logits = (q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)  # (B, heads, 1, N): the class token's row
    weights = logits.softmax(dim=-1)[:, :, 0, int(getattr(backbone, "num_prefix_tokens", 1)):]  # (B, heads, h*w)
    grid = patch_grid(backbone, x.shape[-2:])
    if grid is None or grid[0] * grid[1] != weights.shape[-1]:
        raise ValueError(f"{weights.shape[-1]} patch tokens do not fill the patch grid {grid} of a "
                         f"{tuple(x.shape[-2:])} input; give images of the model's input size")
    return weights.reshape(batch, heads, grid[0], grid[1])  # (B, heads, h, w)


def threshold_attention(attention: Tensor, threshold: float = DINO_THRESHOLD) -> Tensor:
    """DINO's mask: the smallest set of patches, taken by decreasing weight, holding ``threshold`` of the map's mass.

    Args:
        attention: maps (..., h, w) of non-negative weights.
        threshold: share of the mass to keep, in (0, 1].

    Returns:
        A boolean mask (..., h, w).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} is invalid; allowed values: a share of the mass in (0, 1]")
    flat = attention.flatten(-2)  # (..., h*w)
    weights, order = flat.sort(dim=-1, descending=True)
    share = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    keep = share.cumsum(dim=-1) - share < threshold  # the patches ranked above hold less than the threshold
    return torch.zeros_like(keep).scatter(-1, order, keep).reshape(attention.shape)


def attention_picture(image: np.ndarray, attention: Tensor, threshold: float = DINO_THRESHOLD,
                      mean_of_heads: bool = False, colour: Colour = (255, 40, 0), gap: int = 2) -> np.ndarray:
    """One row of panels: the image, then the image tinted where the thresholded attention is on.

    Args:
        image: the picture (H, W, 3) uint8.
        attention: its maps (heads, h, w) from :func:`cls_attention`.
        threshold: share of the attention mass each mask keeps.
        mean_of_heads: one panel of the heads' mean map instead of one panel per head.
        colour: the tint.
        gap: white pixels between panels.

    Returns:
        (H, P * W + (P - 1) * gap, 3) uint8 with P = 1 + heads (2 with ``mean_of_heads``).
    """
    maps = attention.mean(dim=0, keepdim=True) if mean_of_heads else attention  # (heads or 1, h, w)
    masks = threshold_attention(maps, threshold).cpu().numpy()
    return join([image, *(tint(image, mask, colour) for mask in masks)], axis=1, gap=gap)


def show_attention(model: FeatureModel, pixels: Tensor, threshold: float = DINO_THRESHOLD,
                   mean_of_heads: bool = False) -> np.ndarray:
    """The attention picture of each image, one row per image.

    Args:
        model: a loaded ViT (``unsupdistill.models.load.load_model``).
        pixels: images (B, 3, S, S) in [0, 1] at the model's input size (``canvas.load_pixels``).
        threshold: share of the attention mass each mask keeps.
        mean_of_heads: one panel of the heads' mean instead of one per head.

    Returns:
        The rows of :func:`attention_picture` stacked with 2-pixel gaps, uint8 (rows, columns, 3).
    """
    attention = cls_attention(model.backbone, normalise(pixels, model.mean, model.std))  # (B, heads, h, w)
    images = to_uint8(pixels)  # (B, S, S, 3)
    rows = [attention_picture(image, maps, threshold, mean_of_heads) for image, maps in zip(images, attention)]
    return join(rows, axis=0, gap=2)
