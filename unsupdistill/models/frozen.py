"""A frozen feature extractor and the preprocessing it expects, as loaded from a MODEL argument.

Shared by :mod:`unsupdistill.models.load` (runs, checkpoints, exports, pixels) and
:mod:`unsupdistill.models.timm_spec` (``timm:`` networks), which build :class:`FeatureModel` values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0
"""Seed of the random-init baseline's weights, so every evaluation compares against the same network."""

ACCEPTED = (
    "a run directory (backbone.safetensors + backbone.json, or checkpoints/last.pt), "
    "a checkpoint file (.pt), an exported backbone (.safetensors with its .json beside it), "
    "'timm:<name>[,key=value...]' for a randomly initialised timm backbone "
    "(e.g. timm:resnet18,small_image_stem=true or timm:vit_tiny_patch16_224,img_size=32,patch_size=4), "
    "'timm:<name>,pretrained=true[,key=value...]' for timm's pretrained weights, 'pixels', or 'logmel' (the log-mel "
    "statistics of sounds)"
)


class ModelSpecError(ValueError):
    """A MODEL argument that names no loadable model."""


@dataclass
class FeatureModel:
    """A frozen backbone and the preprocessing it expects.

    Attributes:
        name: short label for tables, e.g. ``"run:myrun"``, ``"timm:resnet18"``, ``"pixels"``.
        backbone: in eval mode; maps a normalised float batch ``(B, 3, S, S)`` to features ``(B, D)``.
        input_size: the side ``S`` images are resized to.
        mean: per-channel mean subtracted from pixel values in [0, 1].
        std: per-channel standard deviation they are divided by.
        cache_key: sha256 hex identity of the weights and preprocessing, for feature caching.
        architecture: the timm model name, or ``"pixels"``.
        description: for trained models, the exported backbone's JSON sidecar (timm name and
            arguments, resize policy, normalisation, step); for timm pretrained weights, a summary of
            timm's pretrained config; None for the random-init and pixel baselines.
        classifier: the network's own classifier over its pooled features, frozen (a
            :class:`~unsupdistill.models.classifier.Classifier`, for a model distilled with labels): the one exported
            beside the backbone, or the one a checkpoint holds; None without one.
        frontend: for a model of sounds, its front end (:meth:`~unsupdistill.augment.audio.LogMel.describe`, plus
            ``frames``, the columns the network sees, and ``clip_samples``, the length files are cut or padded to):
            its inputs are then waves ``(B, 1, clip_samples)`` and ``input_size`` is ``frames``; None for images.
    """

    name: str
    backbone: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cache_key: str
    architecture: str
    description: dict[str, Any] | None = None
    classifier: nn.Module | None = None
    frontend: dict[str, Any] | None = None


def hears_as_picture(backbone: nn.Module) -> bool:
    """Whether a network given sounds is an image network (its first convolution takes 3 channels): it then sees
    a clip's log-mel as a grey picture (:func:`~unsupdistill.augment.audio.to_image_teacher`)."""
    return next((m.in_channels for m in backbone.modules() if isinstance(m, nn.Conv2d)), None) == 3


class SoundFeatures(nn.Module):
    """A network of spectrograms fed with waves: the front end's log-mel of the whole clip, resized in time to the
    network's ``frames`` columns (:func:`~unsupdistill.augment.audio.full_clip`, what evaluation, ``embed`` and the
    exports give it), then the network. An image network (:func:`hears_as_picture`, e.g. an ImageNet teacher of a
    distillation on sounds) gets that log-mel as a picture of ``picture``'s size and normalisation.

    Args:
        backbone: maps normalised log-mel images ``(B, 1, M, frames)`` (or pictures ``(B, 3, S, S)``) to ``(B, D)``.
        frontend: the description of the front end (:attr:`FeatureModel.frontend`).
        picture: an image network's input side, mean and std; None for a network of spectrograms.
    """

    def __init__(self, backbone: nn.Module, frontend: dict[str, Any],
                 picture: tuple[int, tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        super().__init__()
        from unsupdistill.augment.audio import LogMel

        self.backbone = backbone
        self.frontend = LogMel.from_description(frontend)
        self.frames = int(frontend["frames"])
        self.picture = picture

    def forward(self, waves: Tensor) -> Tensor:
        """Args: waves (B, 1, S). Returns features (B, D)."""
        from unsupdistill.augment.audio import full_clip, to_image_teacher

        views = full_clip(self.frontend, waves, self.frames)  # (B, 1, M, frames)
        if self.picture is not None:
            views = to_image_teacher(views, *self.picture)  # (B, 3, S, S)
        return self.backbone(views)


class LogMelStatistics(nn.Module):
    """The "raw pixels" of sound: the mean and standard deviation of each mel band over the clip's frames (2 x M
    features of the normalised log-mel, centred per clip like :class:`PixelFeatures`)."""

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, 1, M, T) log-mel images. Returns (B, 2M), every row with zero mean."""
        bands = x.flatten(1, 2)  # (B, M, T)
        stats = torch.cat([bands.mean(dim=2), bands.std(dim=2)], dim=1)  # (B, 2M)
        return stats - stats.mean(dim=1, keepdim=True)


class PixelFeatures(nn.Module):
    """Raw pixels as features: each image flattened and centred on its own mean.

    Cosine k-NN on these equals k-NN on images that are each centred and L2-normalised.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, 3, S, S). Returns (B, 3*S*S), every row with zero mean."""
        flat = x.flatten(1)  # (B, 3*S*S)
        return flat - flat.mean(dim=1, keepdim=True)


def frozen(backbone: nn.Module) -> nn.Module:
    """``backbone`` with no parameter requiring gradients, in eval mode."""
    backbone.requires_grad_(False)
    return backbone.eval()


def triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """sha256 hex of a module's state: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().flatten()  # (numel,)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())  # raw bytes, whatever the dtype (bf16 too)
    return digest.hexdigest()


def cache_digest(weights: str, architecture: dict[str, Any] | None, input_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], student: bool) -> str:
    """sha256 hex of the weights' identity and everything that changes the features they give."""
    parts = {"weights": weights, "architecture": architecture, "input_size": input_size, "mean": list(mean),
             "std": list(std), "student": student}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
