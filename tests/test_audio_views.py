"""Sound front end and views: the filterbank and the log-mel against librosa, the front end's description, autocast
and statistics; the multi-crop of a sound's shapes, order and reproducibility; each random stage (span, mix, gain,
masks) with parameters chosen by the test; the whole-clip view and the image teacher's input."""

from __future__ import annotations

import dataclasses
import json
import math

import librosa
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unsupdistill.augment import (
    LOG_FLOOR,
    LogMel,
    SoundMultiCrop,
    SoundViews,
    full_clip,
    mel_filterbank,
    time_resize_weights,
    to_image_teacher,
)
from unsupdistill.config import SoundViewSpec

RATE = 8000
SAMPLES = 4000  # half a second
N_MELS = 32
PLAIN = SoundViewSpec(scale=(1.0, 1.0), gain_db=0.0, mix_p=0.0, freq_masks=0, time_masks=0)
"""A view with every random stage off: the whole clip."""


def frontend(**overrides: float) -> LogMel:
    """25 ms windows (200 samples, FFT 256), 10 ms hops (80 samples), 32 bands at 8 kHz: 51 columns a clip."""
    return LogMel(**{"sample_rate": RATE, "window_ms": 25.0, "hop_ms": 10.0, "n_mels": N_MELS, **overrides})


def tone(hz: float, samples: int = SAMPLES, amplitude: float = 0.5) -> torch.Tensor:
    """A sine of ``hz``, (samples,)."""
    return amplitude * torch.sin(2 * math.pi * hz * torch.arange(samples) / RATE)


def noise(seed: int, samples: int = SAMPLES, amplitude: float = 0.5) -> torch.Tensor:
    """White noise, (samples,)."""
    return amplitude * torch.randn(samples, generator=torch.Generator().manual_seed(seed))


def chirp(samples: int = SAMPLES) -> torch.Tensor:
    """A linear sweep from 100 Hz to 3.5 kHz, (samples,)."""
    t = torch.arange(samples) / RATE
    duration = samples / RATE
    return 0.5 * torch.sin(2 * math.pi * (100 * t + (3400 / (2 * duration)) * t**2))


def band_of(hz: float, front: LogMel) -> int:
    """The mel band whose centre is nearest ``hz``."""
    centres = librosa.mel_frequencies(front.n_mels + 2, fmin=front.f_min, fmax=front.f_max)[1:-1]
    return int(np.abs(centres - hz).argmin())


def loudest_band(views: torch.Tensor) -> torch.Tensor:
    """(B,) the band with the most energy over time of views (B, 1, M, T)."""
    return views.mean(dim=-1)[:, 0].argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Front end
# ----------------------------------------------------------------------------------------------


def test_filterbank_equals_librosa() -> None:
    bank = mel_filterbank(RATE, 256, N_MELS, 50.0, 3800.0)
    assert bank.shape == (129, N_MELS) and bank.dtype == torch.float32
    expected = librosa.filters.mel(sr=RATE, n_fft=256, n_mels=N_MELS, fmin=50.0, fmax=3800.0).T
    np.testing.assert_allclose(bank.numpy(), expected, rtol=0, atol=1e-7)


def test_log_mel_matches_librosa_melspectrogram() -> None:
    front = frontend()
    assert (front.win_length, front.n_fft, front.hop_length) == (200, 256, 80)
    wave = chirp()
    expected = librosa.feature.melspectrogram(
        y=wave.numpy(), sr=RATE, n_fft=256, hop_length=80, win_length=200, window="hann", center=True,
        pad_mode="constant", power=2.0, n_mels=N_MELS)
    power = front.power(wave[None])[0]
    np.testing.assert_allclose(power.numpy(), expected, rtol=1e-3, atol=1e-5 * expected.max())
    np.testing.assert_allclose(front(wave[None])[0, 0].numpy(), np.log(expected + LOG_FLOOR), atol=1e-3)


def test_a_1khz_tone_peaks_in_the_band_of_1khz() -> None:
    front = frontend()
    views = front(tone(1000.0)[None, None])  # (1, 1, M, T)
    assert views.shape == (1, 1, N_MELS, 51)
    assert loudest_band(views).item() == band_of(1000.0, front)
    assert band_of(1000.0, front) != band_of(2000.0, front)
    assert loudest_band(front(tone(2000.0)[None])).item() == band_of(2000.0, front)


@pytest.mark.parametrize("samples", [1, 79, 80, 81, 4000, 4321])
def test_frames_counts_the_columns(samples: int) -> None:
    front = frontend()
    assert front(torch.randn(2, 1, samples)).shape[-1] == front.frames(samples)


def test_description_rebuilds_the_same_front_end() -> None:
    front = frontend(window_ms=30.0, hop_ms=12.5, f_min=60.0, f_max=3000.0, mean=-3.5, std=2.5)
    description = json.loads(json.dumps(front.describe()))  # as the exported model's sidecar holds it
    rebuilt = LogMel.from_description(description)
    assert rebuilt.describe() == front.describe()
    waves = torch.stack([chirp(), noise(0)])
    assert torch.equal(rebuilt(waves), front(waves))
    assert description["n_fft"] == 256 and description["log_floor"] == LOG_FLOOR
    with pytest.raises(ValueError, match="pad_mode"):
        LogMel.from_description({**description, "pad_mode": "reflect"})


def test_float32_under_bfloat16_autocast() -> None:
    front = frontend()
    waves = torch.stack([chirp(), noise(1)])[:, None]
    with torch.autocast("cpu", torch.bfloat16):
        views = front(waves)
    assert views.dtype == torch.float32
    torch.testing.assert_close(views, front(waves))


def test_statistics_normalise_to_zero_mean_unit_std() -> None:
    waves = torch.stack([chirp(), noise(2), tone(440.0), noise(3, amplitude=0.01)])
    mean, std = frontend().statistics(waves)
    assert std > 1  # the un-normalised values are spread: the test would fail on an identity
    views = frontend(mean=mean, std=std)(waves)
    assert abs(views.mean().item()) < 1e-4 and abs(views.std().item() - 1) < 1e-4


# ----------------------------------------------------------------------------------------------
# Multi-crop of a sound
# ----------------------------------------------------------------------------------------------


def test_multicrop_shapes() -> None:
    crop = SoundMultiCrop(frontend(), SoundViewSpec(), SoundViewSpec(scale=(0.15, 0.4)), 40, 12, 3)
    assert crop.num_views == 5
    global_views, local_views = crop(torch.stack([chirp(), noise(0)])[:, None])
    assert global_views.shape == (4, 1, N_MELS, 40) and global_views.dtype == torch.float32
    assert local_views is not None and local_views.shape == (6, 1, N_MELS, 12)
    crop = SoundMultiCrop(frontend(), SoundViewSpec(), SoundViewSpec(), 40, 12, 0)
    global_views, local_views = crop(torch.stack([chirp(), noise(0)])[:, None])
    assert crop.num_views == 2 and global_views.shape == (4, 1, N_MELS, 40) and local_views is None


def test_views_are_ordered_by_view_then_clip() -> None:
    front = frontend()
    tones = (300.0, 1000.0, 2500.0)
    spec = SoundViewSpec(mix_p=0.0, gain_db=6.0, freq_masks=0)  # masks in time only: a band cannot be hidden
    crop = SoundMultiCrop(front, spec, dataclasses.replace(spec, scale=(0.15, 0.4)), 24, 8, 2)
    global_views, local_views = crop(torch.stack([tone(hz) for hz in tones])[:, None])
    assert local_views is not None
    bands = torch.tensor([band_of(hz, front) for hz in tones])
    assert torch.equal(loudest_band(global_views), bands.repeat(2))
    assert torch.equal(loudest_band(local_views), bands.repeat(2))


def test_same_seed_same_views_and_every_view_its_own() -> None:
    crop = SoundMultiCrop(frontend(), SoundViewSpec(), SoundViewSpec(scale=(0.15, 0.4)), 24, 8, 2)
    waves = torch.stack([chirp(), noise(4)])[:, None]
    torch.manual_seed(0)
    first = crop(waves)
    torch.manual_seed(0)
    second = crop(waves)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    global_views, local_views = first
    assert not torch.allclose(global_views[:2], global_views[2:])  # view 1 and view 2 of the same clips
    assert not torch.allclose(local_views[:2], local_views[2:])
    torch.manual_seed(1)
    assert not torch.allclose(crop(waves)[0], global_views)


def test_span_is_the_resized_columns_of_the_clip() -> None:
    power = frontend().power(chirp()[None])  # (1, M, 51)
    weights = time_resize_weights(torch.tensor([10.0]), torch.tensor([30.0]), 51, 12)  # shrink 30 -> 12 columns
    expected = F.interpolate(power[:, None, :, 10:40], size=(N_MELS, 12), mode="bilinear", antialias=True)[:, 0]
    torch.testing.assert_close(torch.bmm(power, weights), expected)
    weights = time_resize_weights(torch.tensor([5.0]), torch.tensor([8.0]), 51, 20)  # stretch 8 -> 20 columns
    expected = F.interpolate(power[:, None, :, 5:13], size=(N_MELS, 20), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(torch.bmm(power, weights), expected)


def test_spans_are_drawn_within_the_scale() -> None:
    views = SoundViews(frontend(), SoundViewSpec(scale=(0.2, 0.5)), 16)
    params = views.sample(batch=500, device="cpu")
    assert params.length.min() >= 0.2 and params.length.max() <= 0.5
    assert params.start.min() >= 0 and (params.start + params.length).max() <= 1
    assert 0.33 < params.length.mean() < 0.37  # U(0.2, 0.5)


@pytest.mark.parametrize("dim", [2, 3])
def test_masks_zero_whole_rows_or_columns(dim: int) -> None:
    front = frontend(mean=-2.0, std=3.0)
    frames = 20
    if dim == 2:
        spec = dataclasses.replace(PLAIN, freq_masks=1, freq_mask_bands=N_MELS)
    else:
        spec = dataclasses.replace(PLAIN, time_masks=1, time_mask_share=0.5)
    views = SoundViews(front, spec, frames)
    power = front.power(torch.stack([noise(seed) for seed in range(8)]))  # no value is exactly the mean
    params = views.sample(8, num_views=4)
    rendered = views.render(power, params)  # (32, 1, M, frames)
    zero = (rendered[:, 0] == 0).all(dim=2 if dim == 2 else 1)  # (32, M) rows or (32, frames) columns all 0
    masks = params.freq_masks if dim == 2 else params.time_masks  # (32, 1, 2)
    assert torch.equal(zero.sum(dim=1), masks[:, 0, 1])  # as many as the mask is wide
    first = zero.float().argmax(dim=1)
    assert torch.equal(first[masks[:, 0, 1] > 0], masks[masks[:, 0, 1] > 0, 0, 0])  # where it was drawn
    assert (rendered == 0).sum() == (zero.sum() * (frames if dim == 2 else N_MELS))  # and nothing else
    widest = N_MELS if dim == 2 else 10
    assert masks[:, 0, 1].max() <= widest and len(masks[:, 0, 1].unique()) > 5
    assert not (SoundViews(front, PLAIN, frames)(power, 4) == 0).any()  # no masks: no zeros


def test_gain_shifts_the_log_mel_by_its_decibels() -> None:
    front = frontend()  # mean 0, std 1: the un-normalised log-mel
    views = SoundViews(front, PLAIN, 24)
    power = front.power(torch.stack([noise(5), noise(6)]))  # loud everywhere: the floor is negligible
    params = views.sample(2)
    plain = views.render(power, params)
    gain = torch.tensor([6.0, -4.5])
    gained = views.render(power, dataclasses.replace(params, gain_db=gain))
    shift = gain * math.log(10) / 10
    torch.testing.assert_close(gained - plain, shift[:, None, None, None].expand_as(plain), atol=1e-4, rtol=0)
    drawn = SoundViews(front, dataclasses.replace(PLAIN, gain_db=6.0), 24).sample(1000).gain_db
    assert drawn.min() >= -6 and drawn.max() <= 6 and drawn.std() > 3  # U(-6, 6): std 3.46


def test_a_small_mix_leaves_the_view_near_the_unmixed_one() -> None:
    front = frontend()
    power = front.power(torch.stack([noise(seed) for seed in range(4)]))
    spec = SoundViewSpec(mix_p=0.0)
    torch.manual_seed(0)
    unmixed = SoundViews(front, spec, 24)(power)
    torch.manual_seed(0)  # the same draws: only the mix differs
    slightly = SoundViews(front, dataclasses.replace(spec, mix_p=1.0, mix_max=1e-3), 24)(power)
    torch.manual_seed(0)
    strongly = SoundViews(front, dataclasses.replace(spec, mix_p=1.0, mix_max=0.9), 24)(power)
    assert (slightly - unmixed).abs().max() < 0.05
    assert (strongly - unmixed).abs().max() > 0.5


def test_a_silent_clip_mixed_with_a_tone_shows_the_tone() -> None:
    front = frontend()
    power = front.power(torch.stack([torch.zeros(SAMPLES), tone(1000.0)]))
    views = SoundViews(front, dataclasses.replace(PLAIN, mix_p=1.0, mix_max=0.9), 24)
    params = views.sample(2, num_views=8)
    assert torch.equal(params.partner, 1 - params.clip)  # the other clip, never itself
    assert (params.mix > 0).all()
    rendered = views.render(power, params)
    silent = rendered[params.clip == 0]
    assert (loudest_band(silent) == band_of(1000.0, front)).all()
    assert (silent.amax(dim=(1, 2, 3)) > math.log(LOG_FLOOR) + 10).all()
    unmixed = SoundViews(front, PLAIN, 24)(power)
    assert torch.allclose(unmixed[0], torch.full_like(unmixed[0], math.log(LOG_FLOOR)))  # silence alone: the floor


def test_mix_probability() -> None:
    params = SoundViews(frontend(), SoundViewSpec(mix_p=0.3, mix_max=0.4), 16).sample(2000)
    assert 0.25 < (params.mix > 0).float().mean() < 0.35
    assert params.mix.max() <= 0.4


# ----------------------------------------------------------------------------------------------
# The whole clip and the image teacher's view
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [20, 51, 80])
def test_full_clip_is_the_resized_log_mel(frames: int) -> None:
    front = frontend(mean=-1.0, std=2.0)
    waves = torch.stack([chirp(), noise(7)])[:, None]
    view = full_clip(front, waves, frames)
    assert view.shape == (2, 1, N_MELS, frames) and torch.equal(view, full_clip(front, waves, frames))
    power = front.power(waves)[:, None]  # (B, 1, M, T): resized in power, as the views are
    resized = F.interpolate(power, size=(N_MELS, frames), mode="bilinear", align_corners=False, antialias=frames < 51)
    torch.testing.assert_close(view, front.log_mel(resized[:, 0]), atol=1e-4, rtol=1e-4)
    if frames == 51:
        torch.testing.assert_close(view, front(waves))
    torch.manual_seed(0)
    torch.testing.assert_close(SoundViews(front, PLAIN, frames)(power[:, 0]), view)  # the plain view is the clip


def test_image_teacher_input() -> None:
    views = frontend(mean=-3.0, std=4.0)(torch.stack([chirp(), noise(8)]))
    images = to_image_teacher(views, 48, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert images.shape == (2, 3, 48, 48)
    assert torch.equal(images[:, 0], images[:, 2])
    assert images.min() >= 0 and images.max() <= 1 and (images.amax(dim=(1, 2, 3)) > 0.9).all()
    square = 5 * torch.randn(2, 1, 8, 8) - 7  # no resize: the min-max alone
    unit = to_image_teacher(square, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.testing.assert_close(unit.amin(dim=(1, 2, 3)), torch.zeros(2))
    torch.testing.assert_close(unit.amax(dim=(1, 2, 3)), torch.ones(2))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = to_image_teacher(views, 48, mean, std)
    torch.testing.assert_close(normalised[:, 1], (images[:, 1] - mean[1]) / std[1])
    assert to_image_teacher(views, 16, mean, std).shape == (2, 3, 16, 16)  # shrinking too


def test_views_are_float32_under_bfloat16_autocast() -> None:
    crop = SoundMultiCrop(frontend(), SoundViewSpec(), SoundViewSpec(scale=(0.15, 0.4)), 24, 8, 2)
    waves = torch.stack([chirp(), noise(9)])[:, None]
    torch.manual_seed(0)
    with torch.autocast("cpu", torch.bfloat16):
        autocast = crop(waves)
        whole = full_clip(crop.frontend, waves, 24)
    torch.manual_seed(0)
    plain = crop(waves)
    assert autocast[0].dtype == torch.float32 and whole.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)
    torch.testing.assert_close(whole, full_clip(crop.frontend, waves, 24))
