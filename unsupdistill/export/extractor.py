"""The Python API: a frozen feature extractor that brings its own preprocessing.

    from unsupdistill import load_feature_extractor
    extractor = load_feature_extractor("runs/mine/backbone.safetensors")
    features = extractor(["a.jpg", "b.png"])  # (2, D)

A model of sounds takes sound files and waves at its rate instead (``extractor(["a.wav", "b.flac"])``,
``extractor(waves)``), read and cut to its clip as evaluation reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from unsupdistill.config import DataConfig
from unsupdistill.data import fit_clip, load_rgb, num_workers, read_sound, resize_center_crop
from unsupdistill.devices import resolve_device
from unsupdistill.evaluate.features import to_unit_range
from unsupdistill.export.formats import feature_network
from unsupdistill.models.load import FeatureModel, load_model

ImageInput = str | Path | Image.Image | Tensor
SoundInput = str | Path | np.ndarray | Tensor


def preprocess_image(image: ImageInput, input_size: int) -> Tensor:
    """One image as float ``(3, S, S)`` in [0, 1]: decoded, shorter side resized to ``S``, centre-cropped."""
    if isinstance(image, (str, Path)):
        image = load_rgb(image, draft_size=input_size)
    if isinstance(image, Image.Image):
        return resize_center_crop(image, input_size).float() / 255
    if isinstance(image, Tensor) and image.dim() == 3 and image.shape[0] == 3:
        return to_unit_range(image.unsqueeze(0), input_size)[0]
    raise TypeError(f"cannot embed {type(image).__name__}: give a path, a PIL image or a (3, H, W) tensor")


def preprocess_sound(sound: SoundInput, sample_rate: int, clip_samples: int) -> Tensor:
    """One sound as a float32 wave ``(1, clip_samples)``, as evaluation reads a file: a path read mono at
    ``sample_rate`` (resampled if the file's rate differs), a wave ``(S,)`` or ``(1, S)`` (numpy or torch) taken as
    at ``sample_rate`` already; then its centre cut out, or zero-padded equally on both sides, to the clip."""
    if isinstance(sound, (str, Path)):
        wave = read_sound(sound, sample_rate, clip_samples)  # only the clip's span of a long file is decoded
    elif isinstance(sound, (np.ndarray, Tensor)) and (sound.ndim == 1 or (sound.ndim == 2 and sound.shape[0] == 1)):
        wave = (sound.detach().cpu().numpy() if isinstance(sound, Tensor) else sound).reshape(-1).astype(np.float32)
    else:
        shape = f" of shape {tuple(sound.shape)}" if isinstance(sound, (np.ndarray, Tensor)) else ""
        raise TypeError(f"cannot embed {type(sound).__name__}{shape} with a model of sounds: give a path, or a mono "
                        f"wave (S,) or (1, S) at {sample_rate} Hz")
    return torch.from_numpy(np.ascontiguousarray(fit_clip(wave, clip_samples)))[None]  # (1, clip_samples)


class ImageList(Dataset):
    """A list of paths, PIL images and ``(3, H, W)`` tensors, each preprocessed by :func:`preprocess_image`, or for a
    model of sounds (``frontend``) of paths and waves, each preprocessed by :func:`preprocess_sound`.

    Holds no network, so DataLoader workers get only the images to decode.
    """

    def __init__(self, images: Sequence[ImageInput | SoundInput], input_size: int,
                 frontend: dict | None = None) -> None:
        self.images = images
        self.input_size = input_size
        self.frontend = frontend

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        if self.frontend is not None:
            return preprocess_sound(self.images[index], int(self.frontend["sample_rate"]),
                                    int(self.frontend["clip_samples"]))
        return preprocess_image(self.images[index], self.input_size)


class FeatureExtractor:
    """Embeds images with a frozen backbone, preprocessed the way it was trained.

    Paths and PIL images are decoded to RGB (EXIF orientation applied), their shorter side resized
    to the input size and centre-cropped, as in training. Tensors are ``(3, H, W)`` or
    ``(B, 3, H, W)``, uint8 in 0..255 or float in [0, 1], and get the same resize and crop. Lists
    longer than one batch are decoded by DataLoader worker processes.

    A model of sounds (:attr:`~unsupdistill.models.load.FeatureModel.frontend`) takes sound files, read mono at its
    :attr:`sample_rate` (resampled if a file's differs), and waves at that rate: a float tensor ``(B, S)`` or
    ``(B, 1, S)``, one wave ``(S,)``, or a list of paths and 1-D waves (numpy or torch). Each is cut or padded to
    :attr:`clip_samples` (its centre, as evaluation and ``embed`` read files) and goes through the front end's
    log-mel of the whole clip; the features equal evaluation's.

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
        self.network = feature_network(model.backbone, model).to(self.device)

    @property
    def input_size(self) -> int:
        """The side images are resized to; for a model of sounds, the columns of the log-mel its network sees."""
        return self.model.input_size

    @property
    def sample_rate(self) -> int | None:
        """A model of sounds: the rate in Hz its waves are at (files are resampled to it); None for images."""
        return None if self.model.frontend is None else int(self.model.frontend["sample_rate"])

    @property
    def clip_samples(self) -> int | None:
        """A model of sounds: the length in samples sounds are cut or padded to; None for images."""
        return None if self.model.frontend is None else int(self.model.frontend["clip_samples"])

    @property
    def name(self) -> str:
        return self.model.name

    def preprocess(self, image: ImageInput | SoundInput) -> Tensor:
        """One image as float ``(3, S, S)`` in [0, 1]; for a model of sounds, one sound as a wave
        ``(1, clip_samples)``."""
        if self.model.frontend is not None:
            return preprocess_sound(image, self.sample_rate, self.clip_samples)
        return preprocess_image(image, self.input_size)

    @torch.no_grad()
    def __call__(self, images: ImageInput | SoundInput | Sequence[ImageInput | SoundInput],
                 batch_size: int = 64) -> Tensor:
        """Features ``(N, D)`` (float32, on the CPU) of one image, a batch tensor or a list of images; for a model of
        sounds, of one sound, a batch of waves or a list of sounds."""
        if self.model.frontend is not None:
            return self._sounds(images, batch_size)
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

    def _sounds(self, sounds: SoundInput | Sequence[SoundInput], batch_size: int) -> Tensor:
        """Features ``(N, D)`` of sounds: a batch of waves ``(B, S)`` or ``(B, 1, S)``, one sound, or a list."""
        if isinstance(sounds, (np.ndarray, Tensor)) and sounds.ndim in (2, 3):
            waves = torch.as_tensor(sounds)
            if waves.ndim == 3 and waves.shape[1] != 1:
                raise ValueError(f"expected mono waves of shape (B, S) or (B, 1, S), got {tuple(waves.shape)}")
            waves = waves.reshape(len(waves), -1)  # (B, S)
            if waves.shape[1] != self.clip_samples:  # cut or padded as a file would be
                waves = torch.stack([self.preprocess(wave)[0] for wave in waves])
            waves = waves.float()[:, None]  # (B, 1, clip_samples)
            return torch.cat([self._forward(waves[i: i + batch_size]) for i in range(0, len(waves), batch_size)])
        items = [sounds] if isinstance(sounds, (str, Path, np.ndarray, Tensor)) else list(sounds)
        if not items:
            raise ValueError("no sounds to embed")
        loader = DataLoader(ImageList(items, self.input_size, self.model.frontend), batch_size=batch_size,
                            num_workers=self._workers(items, batch_size), pin_memory=self.device.type == "cuda")
        return torch.cat([self._forward(batch) for batch in loader])

    def _workers(self, items: list[ImageInput | SoundInput], batch_size: int) -> int:
        """Decoding processes for ``items``: as configured, else the data module's policy for long lists."""
        if self.workers is not None:
            return self.workers
        if len(items) <= batch_size:
            return 0  # starting processes costs more than decoding one batch
        files = [item for item in items if isinstance(item, (str, Path))]
        return num_workers(DataConfig(path=str(files[0]) if files else None))  # none for in-memory images

    def _forward(self, batch: Tensor) -> Tensor:
        """Features of a batch ``(B, 3, H, W)`` (uint8, or float in [0, 1]), resized on the device; for a model of
        sounds, of waves ``(B, 1, clip_samples)``."""
        x = batch.to(self.device, non_blocking=True)
        if self.model.frontend is None:
            x = to_unit_range(x, self.input_size)  # (B, 3, S, S)
        autocast = (torch.autocast(self.device.type, dtype=self.precision) if self.precision is not None
                    else contextlib.nullcontext())
        with autocast:
            return self.network(x).float().cpu()


def load_feature_extractor(model: str | Path, device: str | torch.device = "auto", student: bool = False,
                           precision: torch.dtype | None = None, workers: int | None = None) -> FeatureExtractor:
    """Load a frozen feature extractor.

    Args:
        model: an exported ``backbone.safetensors`` (with its JSON sidecar beside it; nothing else is
            needed), a run directory or a checkpoint (read with ``weights_only=True``); of images or of sounds.
        device: where the network runs: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        student: use the student's backbone (checkpoints and run directories only).
        precision: autocast dtype, or None for float32.
        workers: DataLoader processes decoding a list of images; None: none for a list that fits in
            one batch or holds no file paths, else one per CPU core up to 8.

    Raises:
        DeviceError: ``device`` is malformed or names CUDA where there is none.
    """
    return FeatureExtractor(load_model(str(model), student=student), device, precision, workers)
