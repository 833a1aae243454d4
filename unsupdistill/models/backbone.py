"""Backbones: any timm model by name, made to accept the crop sizes DINO feeds it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from unsupdistill.config import Config, ConfigError, ModelConfig

BACKBONE_FORMAT = "unsupdistill.backbone/1"


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone without this package: ``timm.create_model(name,
    num_classes=0, **kwargs)``, then the small-image stem if set."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    small_image_stem: bool = False
    feature_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def create_backbone(cfg: ModelConfig, crop_sizes: tuple[int, ...] = ()) -> tuple[nn.Module, BackboneSpec]:
    """Create the timm backbone named in ``cfg`` with its classifier removed.

    Args:
        cfg: the model section.
        crop_sizes: the view sizes the network will see; a ViT given more than one gets
            ``dynamic_img_size=True`` (interpolated position embeddings) unless set already.

    Returns:
        The backbone (forward gives pooled features ``(B, feature_dim)``) and its spec.
    """
    if not timm.is_model(cfg.backbone):
        raise ConfigError(
            f"model.backbone='{cfg.backbone}' is not a timm model; list names with "
            "python -c \"import timm; print(timm.list_models('*vit*'))\""
        )
    kwargs = dict(cfg.backbone_kwargs)
    if cfg.in_chans != 3:  # timm adapts a pretrained first convolution (sums its RGB weights for one channel)
        kwargs.setdefault("in_chans", cfg.in_chans)
    weights = {"pretrained": cfg.pretrained}
    if cfg.pretrained and cfg.small_image_stem:
        raise ConfigError("model.pretrained=true with model.small_image_stem=true: the small-image stem would replace "
                          "the pretrained first convolution by an untrained one; set model.small_image_stem=false")
    if cfg.pretrained and cfg.pretrained_file:
        weights["pretrained_cfg_overlay"] = {"file": str(Path(cfg.pretrained_file).expanduser())}
    try:
        model = timm.create_model(cfg.backbone, num_classes=0, **weights, **kwargs)
        if len(set(crop_sizes)) > 1 and getattr(model, "dynamic_img_size", True) is False:
            kwargs["dynamic_img_size"] = True
            model = timm.create_model(cfg.backbone, num_classes=0, **weights, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.backbone_kwargs={cfg.backbone_kwargs} rejected by timm "
                          f"'{cfg.backbone}': {err}. Give the keyword arguments this model takes, "
                          "or model.backbone_kwargs={} for none") from err
    except (RuntimeError, OSError, ValueError) as err:  # pretrained: no weights, shapes that do not match
        if not cfg.pretrained:
            raise
        raise ConfigError(f"model.pretrained=true: timm could not load weights for '{cfg.backbone}' "
                          f"({str(err).splitlines()[0][:300]}); give model.pretrained_file=PATH (weights under timm's "
                          "names), keep model.backbone_kwargs to what the weights were trained with, or set "
                          "model.pretrained=false") from err
    if cfg.small_image_stem:
        apply_small_image_stem(model)
    check_crops_fit_patches(model, crop_sizes)
    # the pooled width: after a conv head (MobileNetV3, 576 -> 1024) it is head_hidden_size, not num_features
    spec = BackboneSpec(cfg.backbone, kwargs, cfg.small_image_stem,
                        int(getattr(model, "head_hidden_size", None) or model.num_features))
    return model, spec


def check_crops_fit_patches(model: nn.Module, crop_sizes: tuple[int, ...]) -> None:
    """A ConfigError, naming the keys to change, where a token model's patches do not tile a crop size
    (timm would stop at the first forward pass with an assertion)."""
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None or getattr(patch_embed, "dynamic_img_pad", False):
        return
    patch = tuple(int(p) for p in (patch if isinstance(patch, (tuple, list)) else (patch, patch)))
    misfits = sorted({size for size in crop_sizes if size % patch[0] or size % patch[1]})
    if misfits:
        raise ConfigError(
            f"crop sizes {misfits} px are not multiples of the ViT's patch size {patch[0]}: set model.input_size and "
            f"the method's crop sizes to multiples of {patch[0]}, or choose a patch size that divides them "
            "(model.backbone_kwargs.patch_size)")


def pooled_and_spatial(backbone: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """A timm backbone's pooled features and its spatial feature grid, from one forward pass.

    Gradients flow through both (the student is trained through them).

    Args:
        backbone: a timm model created with ``num_classes=0`` (``forward_features``, ``forward_head``).
        x: a normalised batch (B, 3, H, W).

    Returns:
        pooled (B, D), equal to ``backbone(x)``, and the grid channels-last (B, h, w, C): a CNN's
        feature map, or a ViT's patch tokens (prefix tokens dropped) on its patch grid; None when the
        features are neither (no 4-D map, or tokens that do not fill the patch grid).
    """
    features = backbone.forward_features(x)  # (B, C, h, w), (B, h, w, C) or (B, N, C)
    pooled = backbone.forward_head(features, pre_logits=True)  # (B, D)
    if features.ndim == 4:
        channels_last = getattr(backbone, "output_fmt", "NCHW") == "NHWC"
        return pooled, features if channels_last else features.permute(0, 2, 3, 1)  # (B, h, w, C)
    if features.ndim != 3:
        return pooled, None
    tokens = features[:, int(getattr(backbone, "num_prefix_tokens", 0)):]  # (B, h*w, C)
    grid = patch_grid(backbone, x.shape[-2:])
    if grid is None or grid[0] * grid[1] != tokens.shape[1]:
        return pooled, None
    return pooled, tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2])  # (B, h, w, C)


def patch_grid(backbone: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) patch grid a token model makes of an input of ``size``: timm's dynamic grid (which
    follows the input with ``dynamic_img_size``), else the model's fixed grid."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is None:
        patch_embed = getattr(backbone, "stem", None)  # MLP-Mixer
    if hasattr(patch_embed, "dynamic_feat_size"):
        h, w = patch_embed.dynamic_feat_size((int(size[0]), int(size[1])))
        return int(h), int(w)
    grid = getattr(patch_embed, "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def apply_small_image_stem(model: nn.Module) -> None:
    """Replace a ResNet's 7x7/2 convolution and max-pool by a 3x3/1 convolution (CIFAR-style).

    timm has no keyword for this stem, so it is done here; ``BackboneSpec.small_image_stem``
    records it so exports can rebuild the same network.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(
            "model.small_image_stem=true needs a ResNet-style timm model (with conv1 and maxpool), "
            f"got '{type(model).__name__}'; set it to false for this backbone"
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def rebuild_backbone(spec: BackboneSpec) -> nn.Module:
    """Create an uninitialised backbone from a saved spec (for loading weights)."""
    model = timm.create_model(spec.name, pretrained=False, num_classes=0, **spec.kwargs)
    if spec.small_image_stem:
        apply_small_image_stem(model)
    return model


def describe_backbone(spec: BackboneSpec, config: Config, step: int, source: str) -> dict[str, Any]:
    """The JSON sidecar of an exported backbone: how to rebuild it with plain timm and how to feed it.

    Args:
        spec: the backbone's timm name and arguments.
        config: the run's config (input size, resize policy, normalisation, training data).
        step: the training step the weights are from.
        source: ``"teacher"`` or ``"student"``.
    """
    m = config.model
    rebuild = "timm.create_model(timm_name, num_classes=0, **timm_kwargs)"
    if spec.small_image_stem:
        rebuild += ("; then model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, "
                    "bias=False) and model.maxpool = nn.Identity() (small-image stem)")
    return {
        "format": BACKBONE_FORMAT,
        "timm_name": spec.name, "timm_kwargs": spec.kwargs, "small_image_stem": spec.small_image_stem,
        "rebuild": rebuild + "; then load_state_dict(safetensors.torch.load_file(...), strict=True)",
        "feature_dim": spec.feature_dim, "input_size": m.input_size,
        "resize": {"shorter_side": config.data.image_size or m.input_size,
                   "center_crop": m.input_size, "interpolation": "bilinear"},
        "mean": list(m.mean), "std": list(m.std), "step": step, "source": source,
        "trained_on": config.data.path or "digits",
        **({"frontend": sound_frontend_description(config)} if config.data.kind == "audio" else {}),
    }


def sound_frontend_description(config: Config) -> dict[str, Any]:
    """How a sound model's input is made (:attr:`~unsupdistill.models.frozen.FeatureModel.frontend`): the log-mel
    front end of ``config.audio``, the columns the network sees (``model.input_size``) and the clip's samples."""
    from unsupdistill.augment.audio import sound_frontend
    from unsupdistill.data import clip_samples

    return {**sound_frontend(config.audio).describe(), "frames": config.model.input_size,
            "clip_samples": clip_samples(config.audio)}


def input_channels(backbone: nn.Module) -> int:
    """Channels of the backbone's input, from its first convolution: 3 for images, 1 for spectrograms."""
    return next((m.in_channels for m in backbone.modules() if isinstance(m, nn.Conv2d)), 3)


@torch.no_grad()
def forward_gflops(backbone: nn.Module, input_size: int | tuple[int, int]) -> float:
    """Forward GFLOPs of one input through ``backbone`` at ``input_size`` px (a side, or (height, width) for a
    spectrogram), in eval mode, as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`: a multiply-add counts as 2 FLOPs, and only matrix
    products, convolutions and attention are counted (normalisations, activations and pooling are not)."""
    device = next(backbone.parameters(), torch.empty(0)).device
    was_training = backbone.training
    with FlopCounterMode(display=False) as counter:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        backbone.eval()(torch.zeros(1, input_channels(backbone), *size, device=device))  # (1, C, H, W)
    backbone.train(was_training)
    return counter.get_total_flops() / 1e9
