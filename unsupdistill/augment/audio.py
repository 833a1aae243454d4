"""Sound as images: the log-mel front end and DINO's views of a sound, batched on any device.

A clip becomes a one-channel image, its log-mel spectrogram (B, 1, M, T): mel bands as rows, STFT frames as
columns, computed in the batch by :class:`LogMel`. A view of a sound (:class:`SoundViews`) is drawn from the mel
power of the batch, in the order of :class:`~unsupdistill.config.SoundViewSpec`: a random span of the clip resized
in time (a random resized crop along time only), mixing with another clip of the batch in linear power (BYOL-A,
Niizumi et al. 2021, Sec. 3.3), a random gain, the log and normalisation, then SpecAugment's frequency and time
masks (Park et al. 2019). :class:`SoundMultiCrop` is DINO's multi-crop in time (Caron et al. 2021, Sec. 3.1) with
the interface of :class:`~unsupdistill.augment.MultiCropAugmentation`.

A view is a few numbers per sample (:class:`SoundViewParams`), drawn by :meth:`SoundViews.sample` from torch's
global RNG on the batch's device and drawn on the spectrogram by :meth:`SoundViews.render`, so
``torch.manual_seed`` makes a run reproducible and a test can render a view it chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsupdistill.config import AudioConfig, SoundViewSpec

LOG_FLOOR = 1e-6
"""Added to the mel power before the log: digital silence (a clip's padding, a silent file) stays finite, and what
lies below it is one flat value instead of a long tail of ever more negative numbers that would dominate the
normalisation statistics. At the defaults (16 kHz, 25 ms window, 64 bands) it is the mel power of white noise at
about -66 dBFS, some 80 dB below a full-scale tone's band: a 16-bit file's noise floor and below are cut."""
WINDOW = "hann"
PAD_MODE = "constant"
"""The STFT pads half a window of zeros at both ends (``center=True``): clips are padded with silence anyway, and
``reflect`` would mirror an onset at the clip's edge into a pre-echo that was never played; it is also librosa's
default since 0.10, so :func:`librosa.feature.melspectrogram` gives the same numbers (tests/test_audio_views.py)."""


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """librosa's mel filterbank (Slaney's mel scale and area normalisation, librosa's defaults).

    Returns:
        (n_fft // 2 + 1, n_mels) float32 weights: power spectrum (..., F) @ filterbank = mel power (..., M).
    """
    import librosa  # slow to import: only where the filterbank is built

    bank = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max)  # (M, F)
    return torch.from_numpy(bank).float().T.contiguous()  # (F, M)


class LogMel(nn.Module):
    """The sound front end: waves to normalised log-mel spectrograms, in float32 even under autocast.

    Hann-windowed STFT (``center=True``, zero padding: see :data:`PAD_MODE`), power spectrum, mel filterbank,
    ``log(power + LOG_FLOOR)``, then ``(x - mean) / std``. One column per hop: ``frames(S) = 1 + S // hop``.

    Args:
        sample_rate: rate of the waves in Hz.
        window_ms: STFT window length; the FFT size is the next power of two of its samples.
        hop_ms: STFT hop, one column per hop.
        n_mels: mel bands, the rows of the spectrogram.
        f_min: lowest mel band edge in Hz.
        f_max: highest mel band edge in Hz; None: half the sample rate.
        mean: mean the log-mel values are normalised with (see :meth:`statistics`).
        std: standard deviation they are divided by.
    """

    def __init__(self, sample_rate: int, window_ms: float, hop_ms: float, n_mels: int, f_min: float = 0.0,
                 f_max: float | None = None, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.win_length = max(round(window_ms * sample_rate / 1000), 1)
        self.hop_length = max(round(hop_ms * sample_rate / 1000), 1)
        self.n_fft = 1 << (self.win_length - 1).bit_length()  # next power of two >= the window
        self.n_mels = n_mels
        self.f_min = float(f_min)
        self.f_max = float(sample_rate / 2 if f_max is None else f_max)
        self.mean = float(mean)
        self.std = float(std)
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(sample_rate, self.n_fft, n_mels, self.f_min, self.f_max),
                             persistent=False)

    def frames(self, samples: int) -> int:
        """Columns of the spectrogram of ``samples`` samples (``center=True``)."""
        return 1 + samples // self.hop_length

    def power(self, waves: Tensor) -> Tensor:
        """Linear mel power of waves (B, 1, S) or (B, S): (B, n_mels, frames), float32."""
        with torch.autocast(waves.device.type, enabled=False):
            waves = waves.float().reshape(waves.shape[0], -1)  # (B, S)
            spec = torch.stft(waves, self.n_fft, self.hop_length, self.win_length, self.window, center=True,
                              pad_mode=PAD_MODE, return_complex=True)  # (B, F, T)
            power = spec.real.square() + spec.imag.square()  # (B, F, T)
            return torch.matmul(self.filterbank.T, power)  # (M, F) @ (B, F, T) -> (B, M, T)

    def log(self, power: Tensor) -> Tensor:
        """The un-normalised log-mel, ``log(power + LOG_FLOOR)``, float32 and of power's shape."""
        with torch.autocast(power.device.type, enabled=False):
            return power.float().add(LOG_FLOOR).log()

    def log_mel(self, power: Tensor) -> Tensor:
        """Mel power (B, M, T) to the normalised log-mel image (B, 1, M, T)."""
        with torch.autocast(power.device.type, enabled=False):
            return self.log(power).sub(self.mean).div(self.std).unsqueeze(1)  # (B, 1, M, T)

    def forward(self, waves: Tensor) -> Tensor:
        """Waves (B, 1, S) or (B, S) to normalised log-mel spectrograms (B, 1, n_mels, frames(S))."""
        return self.log_mel(self.power(waves))

    @torch.no_grad()
    def statistics(self, waves: Tensor) -> tuple[float, float]:
        """Mean and standard deviation of the un-normalised log-mel of a batch of waves: ``audio.mean`` and
        ``audio.std`` measured on a sample of a folder's clips."""
        values = self.log(self.power(waves))
        return float(values.mean()), float(values.std())

    def describe(self) -> dict[str, Any]:
        """The front end's settings as plain values, for an exported model's JSON sidecar: enough to compute the
        same input with librosa (``melspectrogram(power=2, center=True, pad_mode, window)``) without this package."""
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "win_length": self.win_length,
                "hop_length": self.hop_length, "window": WINDOW, "center": True, "pad_mode": PAD_MODE,
                "power": 2.0, "n_mels": self.n_mels, "f_min": self.f_min, "f_max": self.f_max, "mel_scale": "slaney",
                "mel_norm": "slaney", "log_floor": LOG_FLOOR, "mean": self.mean, "std": self.std}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> LogMel:
        """Rebuild the front end :meth:`describe` gave; a description of another computation is a ValueError. A
        model's description may hold its input's :data:`SHAPE_FIELDS` too: they are not read."""
        frontend = cls(description["sample_rate"], description["win_length"] * 1000 / description["sample_rate"],
                       description["hop_length"] * 1000 / description["sample_rate"], description["n_mels"],
                       description["f_min"], description["f_max"], description["mean"], description["std"])
        differ = sorted(k for k, v in frontend.describe().items() if description.get(k, v) != v)
        if differ:
            raise ValueError(f"the front end cannot compute this description: {', '.join(differ)} differ "
                             f"({frontend.describe()} is what it would compute)")
        return frontend


SHAPE_FIELDS = ("frames", "clip_samples")
"""Fields of a model's front end (``backbone.json``'s ``frontend``) that describe its input's columns and clip, not
the log-mel computation."""


def sound_frontend(audio: AudioConfig) -> LogMel:
    """The front end the ``audio`` section describes (its rate and normalisation chosen already)."""
    if audio.sample_rate is None or audio.mean is None or audio.std is None:
        raise ValueError("the sound front end needs audio.sample_rate, audio.mean and audio.std (chosen from the "
                         "folder by the command line, or set in the recipe)")
    return LogMel(audio.sample_rate, audio.window_ms, audio.hop_ms, audio.n_mels, audio.f_min, audio.f_max,
                  audio.mean, audio.std)


def time_resize_weights(start: Tensor, length: Tensor, columns: int, frames: int) -> Tensor:
    """Weights that take a span of each spectrogram's columns to ``frames`` columns: a linear (triangle) filter,
    widened to the span's columns per output column when shrinking (antialiased), as ``F.interpolate(mode=
    "bilinear", align_corners=False, antialias=True)`` of the span's columns does, but with a span of its own for
    every sample, so the whole batch is one matmul instead of a loop of interpolations (F.interpolate takes one
    size for a whole batch; an unantialiased resize would skip most columns of a long clip's span).

    Args:
        start: (B,) the span's first column, fractional, in [0, columns).
        length: (B,) the span's length in columns, fractional, start + length <= columns.
        columns: columns of the input spectrograms.
        frames: columns of the output.

    Returns:
        (B, columns, frames) weights, each output column's summing to 1: (B, M, columns) @ weights -> (B, M, frames).
    """
    scale = length / frames  # (B,) input columns per output column
    support = scale.clamp(min=1.0)[:, None, None]  # (B, 1, 1)
    centre = start[:, None] + scale[:, None] * (torch.arange(frames, device=start.device) + 0.5)  # (B, frames)
    column = torch.arange(columns, device=start.device, dtype=start.dtype)  # (columns,)
    distance = (column[None, :, None] + 0.5 - centre[:, None, :]).abs()  # (B, columns, frames)
    weights = (1 - distance / support).clamp(min=0)
    # Only the columns the span touches, as if it had been cut out first (each output column's own is among them).
    inside = (column[None, :] >= start.floor()[:, None]) & (column[None, :] < (start + length).ceil()[:, None])
    weights = weights * inside[:, :, None]  # (B, columns, frames)
    return weights / weights.sum(dim=1, keepdim=True)


@dataclass
class SoundViewParams:
    """The random parameters of V views of each of B clips, one row per view: view 1 of all B clips, then view 2.

    Shares are of the clip (``start``, ``length``) or of the mix (``mix``); masks are (first row or column, width)
    pairs in the view's mel bands and frames.
    """

    clip: Tensor
    """(V*B,) the clip each view is of."""
    start: Tensor
    """(V*B,) the span's start as a share of the clip."""
    length: Tensor
    """(V*B,) the span's length as a share of the clip."""
    partner: Tensor
    """(V*B,) the other clip of the batch mixed in (a different clip when B > 1)."""
    mix: Tensor
    """(V*B,) the partner's share of the mix, 0 where the view is not mixed."""
    gain_db: Tensor
    """(V*B,) the gain in decibels."""
    freq_masks: Tensor
    """(V*B, freq_masks, 2) first mel band and width of each frequency mask."""
    time_masks: Tensor
    """(V*B, time_masks, 2) first frame and width of each time mask."""


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _masks(n: int, count: int, widest: int, size: int, device: torch.device) -> Tensor:
    """(n, count, 2) masks of width ~ U{0..widest} at a uniform position inside ``size`` rows or columns."""
    widest = min(widest, size)
    width = (torch.rand(n, count, device=device) * (widest + 1)).long().clamp(max=widest)
    first = (torch.rand(n, count, device=device) * (size - width + 1)).long().clamp(max=size - width)
    return torch.stack([first, width], dim=-1)


def _apply_masks(views: Tensor, masks: Tensor, dim: int) -> Tensor:
    """Zero the masked rows (dim=2) or columns (dim=3) of views (B, 1, M, T), in place."""
    index = torch.arange(views.shape[dim], device=views.device)  # (M,) or (T,)
    for mask in masks.unbind(dim=1):  # a loop over masks, not samples
        first, width = mask.unbind(dim=-1)  # (B,), (B,)
        hit = (index >= first[:, None]) & (index < (first + width)[:, None])  # (B, M) or (B, T)
        views.masked_fill_(hit[:, None, :, None] if dim == 2 else hit[:, None, None, :], 0.0)
    return views


class SoundViews(nn.Module):
    """One kind of view of a sound (:class:`~unsupdistill.config.SoundViewSpec`), drawn from the batch's mel power.

    For every view, with parameters of its own: a span of the clip, its length share ~ U(scale) and its offset
    uniform, resized in time to ``frames`` columns (:func:`time_resize_weights`); with probability ``mix_p`` mixing
    with another clip of the batch, share r ~ U(0, mix_max), in linear power, ``(1 - r) P + r P_other`` (BYOL-A's
    mixup, Niizumi et al. 2021, Sec. 3.3; the same span of the other clip); a gain of g ~ U(-gain_db, gain_db) dB,
    ``P * 10^(g/10)``; the front end's log and normalisation; SpecAugment (Park et al. 2019): ``freq_masks`` masks of
    U{0..freq_mask_bands} mel bands and ``time_masks`` masks of U{0..round(time_mask_share * frames)} columns at
    random positions, set to 0, the normalised mean.

    Args:
        frontend: the log and normalisation of the views.
        spec: the view's random augmentation.
        frames: columns of a view.
    """

    def __init__(self, frontend: LogMel, spec: SoundViewSpec, frames: int) -> None:
        super().__init__()
        self.frontend = frontend
        self.spec = spec
        self.frames = frames

    def sample(self, batch: int, num_views: int = 1, device: torch.device | str = "cpu") -> SoundViewParams:
        """Draw ``num_views`` views of each of ``batch`` clips from torch's global RNG, on ``device``."""
        s, n = self.spec, batch * num_views
        clip = torch.arange(batch, device=device).repeat(num_views)  # (V*B,)
        length = _uniform(n, s.scale[0], s.scale[1], device)
        start = torch.rand(n, device=device) * (1 - length)
        # Another clip: an offset of 1..B-1 places on, so never the clip itself (itself only when B is 1).
        partner = (clip + 1 + (torch.rand(n, device=device) * (batch - 1)).long()) % batch
        mixed = torch.rand(n, device=device) < s.mix_p
        mix = _uniform(n, 0.0, s.mix_max, device) * mixed
        gain_db = _uniform(n, -s.gain_db, s.gain_db, device)
        freq_masks = _masks(n, s.freq_masks, s.freq_mask_bands, self.frontend.n_mels, device)
        time_masks = _masks(n, s.time_masks, round(s.time_mask_share * self.frames), self.frames, device)
        return SoundViewParams(clip, start, length, partner, mix, gain_db, freq_masks, time_masks)

    def render(self, power: Tensor, params: SoundViewParams) -> Tensor:
        """Draw the views ``params`` describe from the mel power (B, M, T) of a batch: (V*B, 1, M, frames), float32
        even under autocast."""
        columns = power.shape[-1]
        with torch.autocast(power.device.type, enabled=False):
            power = power.float()
            mix = params.mix[:, None, None]  # (V*B, 1, 1)
            mixed = power[params.clip] * (1 - mix) + power[params.partner] * mix  # (V*B, M, T)
            weights = time_resize_weights(params.start * columns, params.length * columns, columns, self.frames)
            views = torch.bmm(mixed, weights)  # (V*B, M, T) @ (V*B, T, frames) -> (V*B, M, frames)
            views = views * torch.pow(10.0, params.gain_db / 10)[:, None, None]
            views = self.frontend.log_mel(views)  # (V*B, 1, M, frames)
        views = _apply_masks(views, params.freq_masks, dim=2)
        return _apply_masks(views, params.time_masks, dim=3)

    @torch.no_grad()
    def forward(self, power: Tensor, num_views: int = 1) -> Tensor:
        """``num_views`` random views of each clip of the mel power (B, M, T): (V*B, 1, M, frames), view 1 of all B
        clips, then view 2, ..."""
        return self.render(power, self.sample(power.shape[0], num_views, power.device))


def full_clip(frontend: LogMel, waves: Tensor, frames: int) -> Tensor:
    """The deterministic view for evaluation and export: the whole clip's log-mel resized in time to ``frames``
    columns, by the views' resize (in power, antialiased), without gain, mix or masks; float32 even under autocast.

    Args:
        frontend: the front end.
        waves: (B, 1, S) or (B, S) float waves.
        frames: columns of the view.

    Returns:
        (B, 1, M, frames) normalised log-mel views.
    """
    power = frontend.power(waves)  # (B, M, T)
    batch, columns = power.shape[0], power.shape[-1]
    whole = torch.full((batch,), float(columns), device=power.device)
    weights = time_resize_weights(torch.zeros_like(whole), whole, columns, frames)  # (B, T, frames)
    with torch.autocast(power.device.type, enabled=False):
        return frontend.log_mel(torch.bmm(power, weights))  # (B, 1, M, frames)


class SoundMultiCrop(nn.Module):
    """DINO's multi-crop in time: two global views of ``global_frames`` columns and N local views of
    ``local_frames``, all drawn from one mel power of the batch, each with parameters of its own.

    Args:
        frontend: waves to mel power, and the log and normalisation of the views.
        global_view: the global views' augmentation.
        local_view: the local views' augmentation (short spans).
        global_frames: columns of a global view (the model's input).
        local_frames: columns of a local view.
        num_local_crops: local views per clip (0: none).
    """

    def __init__(self, frontend: LogMel, global_view: SoundViewSpec, local_view: SoundViewSpec, global_frames: int,
                 local_frames: int, num_local_crops: int) -> None:
        super().__init__()
        self.frontend = frontend
        self.num_local_crops = num_local_crops
        self.global_views = SoundViews(frontend, global_view, global_frames)
        self.local_views = SoundViews(frontend, local_view, local_frames) if num_local_crops else None

    @property
    def num_views(self) -> int:
        """Views per clip: two global plus the local ones."""
        return 2 + self.num_local_crops

    @torch.no_grad()
    def forward(self, waves: Tensor) -> tuple[Tensor, Tensor | None]:
        """Augment a batch of clips into global and local views.

        Args:
            waves: (B, 1, S) float waves, on any device.

        Returns:
            global_views: (2B, 1, M, G), view 1 of all B clips, then view 2 in the same order.
            local_views: (N*B, 1, M, L), local view 1 of all B clips, then view 2, ...; None when N is 0.
        """
        power = self.frontend.power(waves)  # (B, M, T), once for every view
        global_views = self.global_views(power, 2)  # (2B, 1, M, G)
        if self.local_views is None:
            return global_views.contiguous(), None
        return global_views.contiguous(), self.local_views(power, self.num_local_crops).contiguous()  # (N*B, 1, M, L)


def to_image_teacher(views: Tensor, size: int, mean: tuple[float, float, float],
                     std: tuple[float, float, float]) -> Tensor:
    """How an image teacher (an ImageNet network) sees a sound: each log-mel view min-max scaled to [0, 1] as a
    grey picture, repeated to three channels, resized bilinearly to ``size`` x ``size`` (antialiased when shrinking)
    and normalised with the teacher's statistics, as a photo would be.

    Args:
        views: (B, 1, M, T) log-mel views (normalised or not: the min-max removes it).
        size: the teacher's input side in pixels.
        mean: the teacher's per-channel mean.
        std: the teacher's per-channel standard deviation.

    Returns:
        (B, 3, size, size) the teacher's input.
    """
    low = views.amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    high = views.amax(dim=(1, 2, 3), keepdim=True)
    images = (views - low) / (high - low).clamp(min=torch.finfo(views.dtype).eps)  # (B, 1, M, T) in [0, 1]
    shrink = size < views.shape[-2] or size < views.shape[-1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    images = images.clamp(0, 1).expand(-1, 3, -1, -1)  # (B, 3, size, size)
    shift = torch.tensor(mean, device=views.device, dtype=images.dtype)[:, None, None]
    scale = torch.tensor(std, device=views.device, dtype=images.dtype)[:, None, None]
    return (images - shift) / scale

