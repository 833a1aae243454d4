"""The Python API: a frozen feature extractor that brings its own preprocessing.

    from unsupdistill import load_feature_extractor
    extractor = load_feature_extractor("runs/mine/backbone.safetensors")
    features = extractor(["a.jpg", "b.png"])  # (2, D)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from unsupdistill.data import load_rgb, resize_center_crop
from unsupdistill.evaluate.features import NormalizedBackbone, to_unit_range
from unsupdistill.evaluate.models import FeatureModel, load_model

ImageInput = str | Path | Image.Image | Tensor


class FeatureExtractor:
    """Embeds images with a frozen backbone, preprocessed the way it was trained.

    Paths and PIL images are decoded to RGB (EXIF orientation applied), their shorter side resized
    to the input size and centre-cropped, as in training. Tensors are ``(3, H, W)`` or
    ``(B, 3, H, W)``, uint8 in 0..255 or float in [0, 1], and get the same resize and crop.

    Args:
        model: the loaded backbone and its preprocessing.
        device: where the network runs.
        precision: autocast dtype (e.g. ``torch.bfloat16``); None for float32.
    """

    def __init__(self, model: FeatureModel, device: str | torch.device = "cpu",
                 precision: torch.dtype | None = None) -> None:
        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.network = NormalizedBackbone(model.backbone, model.mean, model.std).eval().to(self.device)

    @property
    def input_size(self) -> int:
        return self.model.input_size

    @property
    def name(self) -> str:
        return self.model.name

    def preprocess(self, image: ImageInput) -> Tensor:
        """One image as float ``(3, S, S)`` in [0, 1]."""
        size = self.input_size
        if isinstance(image, (str, Path)):
            image = load_rgb(image, draft_size=size)
        if isinstance(image, Image.Image):
            return resize_center_crop(image, size).float() / 255
        if isinstance(image, Tensor) and image.dim() == 3 and image.shape[0] == 3:
            return self._resize(image.unsqueeze(0))[0]
        raise TypeError(f"cannot embed {type(image).__name__}: give a path, a PIL image or a (3, H, W) tensor")

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64) -> Tensor:
        """Features ``(N, D)`` (float32, on the CPU) of one image, a batch tensor or a list of images."""
        if isinstance(images, Tensor) and images.dim() == 4:
            batch = self._resize(images)  # (B, 3, S, S)
            return torch.cat([self._forward(batch[i: i + batch_size]) for i in range(0, len(batch), batch_size)])
        items = [images] if isinstance(images, (str, Path, Image.Image, Tensor)) else list(images)
        if not items:
            raise ValueError("no images to embed")
        out = []
        for start in range(0, len(items), batch_size):
            batch = torch.stack([self.preprocess(item) for item in items[start: start + batch_size]])
            out.append(self._forward(batch))
        return torch.cat(out)

    def _resize(self, batch: Tensor) -> Tensor:
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(batch.shape)}")
        return to_unit_range(batch, self.input_size)

    def _forward(self, batch: Tensor) -> Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.precision) if self.precision is not None
                    else contextlib.nullcontext())
        with autocast:
            return self.network(batch.to(self.device)).float().cpu()


def load_feature_extractor(model: str | Path, device: str | torch.device = "cpu", student: bool = False,
                           precision: torch.dtype | None = None) -> FeatureExtractor:
    """Load a frozen feature extractor.

    Args:
        model: an exported ``backbone.safetensors`` (with its JSON sidecar beside it; nothing else is
            needed), a run directory or a checkpoint (read with ``weights_only=True``).
        device: where the network runs.
        student: use the student's backbone (checkpoints and run directories only).
        precision: autocast dtype, or None for float32.
    """
    return FeatureExtractor(load_model(str(model), student=student), device, precision)
