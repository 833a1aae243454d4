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
from torch.utils.data import DataLoader, Dataset

from unsupdistill.config import DataConfig
from unsupdistill.data import load_rgb, num_workers, resize_center_crop
from unsupdistill.devices import resolve_device
from unsupdistill.evaluate.features import NormalizedBackbone, to_unit_range
from unsupdistill.models.load import FeatureModel, load_model

ImageInput = str | Path | Image.Image | Tensor


def preprocess_image(image: ImageInput, input_size: int) -> Tensor:
    """One image as float ``(3, S, S)`` in [0, 1]: decoded, shorter side resized to ``S``, centre-cropped."""
    if isinstance(image, (str, Path)):
        image = load_rgb(image, draft_size=input_size)
    if isinstance(image, Image.Image):
        return resize_center_crop(image, input_size).float() / 255
    if isinstance(image, Tensor) and image.dim() == 3 and image.shape[0] == 3:
        return to_unit_range(image.unsqueeze(0), input_size)[0]
    raise TypeError(f"cannot embed {type(image).__name__}: give a path, a PIL image or a (3, H, W) tensor")


class ImageList(Dataset):
    """A list of paths, PIL images and ``(3, H, W)`` tensors, each preprocessed by :func:`preprocess_image`.

    Holds no network, so DataLoader workers get only the images to decode.
    """

    def __init__(self, images: Sequence[ImageInput], input_size: int) -> None:
        self.images = images
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return preprocess_image(self.images[index], self.input_size)


class FeatureExtractor:
    """Embeds images with a frozen backbone, preprocessed the way it was trained.

    Paths and PIL images are decoded to RGB (EXIF orientation applied), their shorter side resized
    to the input size and centre-cropped, as in training. Tensors are ``(3, H, W)`` or
    ``(B, 3, H, W)``, uint8 in 0..255 or float in [0, 1], and get the same resize and crop. Lists
    longer than one batch are decoded by DataLoader worker processes.

    Args:
        model: the loaded backbone and its preprocessing.
        device: where the network runs: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N.
        precision: autocast dtype (e.g. ``torch.bfloat16``); None for float32.
        workers: DataLoader processes decoding a list of images; None: none for a list that fits in
            one batch or holds no file paths, else one per CPU core up to 8.
    """

    def __init__(self, model: FeatureModel, device: str | torch.device = "auto",
                 precision: torch.dtype | None = None, workers: int | None = None) -> None:
        self.model = model
        self.device = resolve_device(device, option="device")
        self.precision = precision
        self.workers = workers
        self.network = NormalizedBackbone(model.backbone, model.mean, model.std).eval().to(self.device)

    @property
    def input_size(self) -> int:
        return self.model.input_size

    @property
    def name(self) -> str:
        return self.model.name

    def preprocess(self, image: ImageInput) -> Tensor:
        """One image as float ``(3, S, S)`` in [0, 1]."""
        return preprocess_image(image, self.input_size)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64) -> Tensor:
        """Features ``(N, D)`` (float32, on the CPU) of one image, a batch tensor or a list of images."""
        if isinstance(images, Tensor) and images.dim() == 4:
            if images.shape[1] != 3:
                raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
            return torch.cat([self._forward(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])
        items = [images] if isinstance(images, (str, Path, Image.Image, Tensor)) else list(images)
        if not items:
            raise ValueError("no images to embed")
        loader = DataLoader(ImageList(items, self.input_size), batch_size=batch_size,
                            num_workers=self._workers(items, batch_size), pin_memory=self.device.type == "cuda")
        return torch.cat([self._forward(batch) for batch in loader])

    def _workers(self, items: list[ImageInput], batch_size: int) -> int:
        """Decoding processes for ``items``: as configured, else the data module's policy for long lists."""
        if self.workers is not None:
            return self.workers
        if len(items) <= batch_size:
            return 0  # starting processes costs more than decoding one batch
        files = [item for item in items if isinstance(item, (str, Path))]
        return num_workers(DataConfig(path=str(files[0]) if files else None))  # none for in-memory images

    def _forward(self, batch: Tensor) -> Tensor:
        """Features of a batch ``(B, 3, H, W)`` (uint8, or float in [0, 1]), resized on the device."""
        x = to_unit_range(batch.to(self.device, non_blocking=True), self.input_size)  # (B, 3, S, S)
        autocast = (torch.autocast(self.device.type, dtype=self.precision) if self.precision is not None
                    else contextlib.nullcontext())
        with autocast:
            return self.network(x).float().cpu()


def load_feature_extractor(model: str | Path, device: str | torch.device = "auto", student: bool = False,
                           precision: torch.dtype | None = None, workers: int | None = None) -> FeatureExtractor:
    """Load a frozen feature extractor.

    Args:
        model: an exported ``backbone.safetensors`` (with its JSON sidecar beside it; nothing else is
            needed), a run directory or a checkpoint (read with ``weights_only=True``).
        device: where the network runs: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        student: use the student's backbone (checkpoints and run directories only).
        precision: autocast dtype, or None for float32.
        workers: DataLoader processes decoding a list of images; None: none for a list that fits in
            one batch or holds no file paths, else one per CPU core up to 8.

    Raises:
        DeviceError: ``device`` is malformed or names CUDA where there is none.
    """
    return FeatureExtractor(load_model(str(model), student=student), device, precision, workers)
