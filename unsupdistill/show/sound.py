"""Pictures of a model of sounds: its inputs are log-mel spectrograms (:mod:`unsupdistill.augment.audio`), drawn in
matplotlib's ``magma`` colours with the low frequencies at the bottom, as spectrograms are read.

DINO's views of a few clips as training draws them (the run's multi-crop in time), each clip's nearest gallery clips
as spectrograms of the whole clip (:func:`~unsupdistill.augment.audio.full_clip`, what evaluation embeds), and the
image pictures that carry over to a spectrogram: a ViT's class-token attention and the PCA colours of spatial
features, over mel bands and frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from torch import Tensor

from unsupdistill.models.frozen import FeatureModel, SoundFeatures
from unsupdistill.show.attention import DINO_THRESHOLD, attention_picture, cls_attention
from unsupdistill.show.canvas import PictureDoesNotFit, join, upsample_nearest
from unsupdistill.show.pca import pca_colours, pca_picture, spatial_features
from unsupdistill.show.retrieval import Retrieval, caption, nearest_neighbours, retrieval_grid

COLOURMAP = "magma"
COLOUR_LEVELS = 64
"""Colours of the spectrogram scale: few enough that a picture of spectrograms is a palette PNG (``save_png``'s
``palette``, a third of the bytes), more than the eye tells apart on a smooth scale."""
SCALE = 2
"""Pixels per mel band and per frame: a 64-band spectrogram is 128 pixels high."""
VIEW_CLIPS = 4
"""Clips in the views picture: one row each, its whole clip and then its DINO views."""
MIN_GRID = 4
"""The PCA picture of a sound needs a grid of at least this many cells in mel bands and in frames: a ResNet's 2 x 2
map of a 64-band spectrogram (stride 32) colours four squares that say nothing about where in time or pitch."""
VIEWS_SEED = 0
"""The views picture draws its random views from this seed (torch's global RNG is left as it was)."""


def spectrogram_rgb(log_mel: Tensor, low: float, high: float, scale: int = SCALE) -> np.ndarray:
    """A log-mel spectrogram as a picture: :data:`COLOUR_LEVELS` ``magma`` colours of the values from ``low``
    (black) to ``high`` (light yellow), the first mel band (lowest frequency) in the bottom row, each band and frame
    ``scale`` pixels.

    Args:
        log_mel: (1, M, T) or (M, T) a spectrogram, mel bands as rows.
        low: the value drawn darkest; lower values are clipped to it.
        high: the value drawn lightest.
        scale: pixels per band and per frame.

    Returns:
        (M * scale, T * scale, 3) uint8.
    """
    values = log_mel.detach().float().cpu().reshape(log_mel.shape[-2:]).numpy()  # (M, T)
    share = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    rgb = colormaps[COLOURMAP].resampled(COLOUR_LEVELS)(share[::-1], bytes=True)[..., :3]  # (M, T, 3), low at bottom
    return upsample_nearest(np.ascontiguousarray(rgb), rgb.shape[0] * scale, rgb.shape[1] * scale)


def spectrogram_pictures(log_mels: Tensor, scale: int = SCALE) -> np.ndarray:
    """Pictures (B, M * scale, T * scale, 3) uint8 of spectrograms (B, 1, M, T), on one colour scale (the batch's
    smallest to largest value), so that they compare."""
    low, high = float(log_mels.min()), float(log_mels.max())
    return np.stack([spectrogram_rgb(x, low, high, scale) for x in log_mels])


def sound_features(model: FeatureModel) -> SoundFeatures:
    """The model fed with waves: its front end's whole-clip view, then its network.

    Raises:
        PictureDoesNotFit: the model takes images (it has no front end).
    """
    if model.frontend is None:
        raise PictureDoesNotFit(f"{model.name} takes images, not sounds (it has no front end); give a model trained "
                                "on sounds, or images")
    return SoundFeatures(model.backbone, model.frontend).eval()


def load_clips(paths: Sequence[str | Path], model: FeatureModel) -> Tensor:
    """Sound files read as the model reads them: mono at its front end's rate, cut (centred) or padded to its clip.

    Returns:
        Waves (N, 1, clip_samples) float32.
    """
    from unsupdistill.data.audio import fit_clip, read_sound

    if not paths:
        raise ValueError("no sound files given: pass at least one sound file")
    if model.frontend is None:
        raise PictureDoesNotFit(f"{model.name} takes images, not sounds; give image files")
    rate, samples = int(model.frontend["sample_rate"]), int(model.frontend["clip_samples"])
    return torch.stack([torch.from_numpy(fit_clip(read_sound(path, rate, samples), samples).copy())[None]
                        for path in paths])  # (N, 1, S)


@torch.no_grad()
def whole_clips(model: FeatureModel, waves: Tensor) -> Tensor:
    """The network's input for waves (B, 1, S): their whole-clip log-mel (B, 1, M, frames) (``full_clip``)."""
    from unsupdistill.augment.audio import full_clip

    features = sound_features(model)
    return full_clip(features.frontend, waves, features.frames)


def _labelled(picture: np.ndarray, text: str) -> np.ndarray:
    return join([picture, caption(text, picture.shape[1])], axis=0)


def show_sound_views(multi_crop: torch.nn.Module, model: FeatureModel, waves: Tensor,
                     names: Sequence[str] | None = None) -> np.ndarray:
    """DINO's views of each clip as training draws them, one row per clip: the whole clip as the model sees it in
    evaluation, then the two global views and the local ones, each captioned, all on one colour scale.

    Args:
        multi_crop: the run's :class:`~unsupdistill.augment.audio.SoundMultiCrop`.
        model: the model the clips are read for (its whole-clip view heads each row).
        waves: clips (B, 1, S).
        names: a caption for each clip's whole-clip picture; default "clip".

    Returns:
        uint8 (rows, columns, 3); the views are drawn from :data:`VIEWS_SEED`, the same every time.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VIEWS_SEED)
        global_views, local_views = multi_crop(waves)  # (2B, 1, M, G), (N*B, 1, M, L) or None
    whole = whole_clips(model, waves)  # (B, 1, M, frames)
    batch = len(waves)
    parts = [whole, global_views] + ([local_views] if local_views is not None else [])
    low = min(float(part.min()) for part in parts)
    high = max(float(part.max()) for part in parts)
    rows = []
    for clip in range(batch):
        cells = [_labelled(spectrogram_rgb(whole[clip], low, high), names[clip] if names else "clip")]
        cells += [_labelled(spectrogram_rgb(global_views[view * batch + clip], low, high), f"global {view + 1}")
                  for view in range(2)]
        if local_views is not None:
            cells += [_labelled(spectrogram_rgb(local_views[view * batch + clip], low, high), f"local {view + 1}")
                      for view in range(len(local_views) // batch)]
        rows.append(join(cells, axis=1, gap=4))
    return join(rows, axis=0, gap=6)


@torch.no_grad()
def sound_embeddings(model: FeatureModel, waves: Tensor, batch_size: int = 64) -> Tensor:
    """Pooled features (N, D), float32 on the CPU, of waves (N, 1, S), ``batch_size`` at a time."""
    features = sound_features(model)
    return torch.cat([features(waves[i:i + batch_size]).float().cpu() for i in range(0, len(waves), batch_size)])


def show_sound_retrieval(model: FeatureModel, queries: Sequence[str | Path], gallery: Sequence[str | Path],
                         k: int = 5, batch_size: int = 64, query_names: Sequence[str] | None = None,
                         gallery_names: Sequence[str] | None = None) -> Retrieval:
    """Embed the query and gallery clips and picture each query's k nearest gallery clips as spectrograms.

    Gallery clips are read ``batch_size`` at a time and only the neighbours are kept for the picture. Each cell is
    captioned with its name (the query) or its cosine similarity and name (a neighbour) where names are given.

    Args:
        model: a loaded model of sounds (``unsupdistill.models.load.load_model``).
        queries: query sound files.
        gallery: the sound files to search.
        k: neighbours per query.
        batch_size: clips read and embedded at a time.
        query_names: a caption for each query.
        gallery_names: a caption for each gallery clip.
    """
    def embed(paths: Sequence[str | Path]) -> Tensor:  # (N, D)
        return torch.cat([sound_embeddings(model, load_clips(paths[i:i + batch_size], model), batch_size)
                          for i in range(0, len(paths), batch_size)])

    scores, indices = nearest_neighbours(embed(queries), embed(gallery), k)
    shown = sorted(set(indices.flatten().tolist()))
    query_specs = whole_clips(model, load_clips(queries, model))  # (Q, 1, M, frames)
    gallery_specs = whole_clips(model, load_clips([gallery[i] for i in shown], model))
    picture = sound_retrieval_picture(query_specs, dict(zip(shown, gallery_specs)), indices, scores, query_names,
                                      None if gallery_names is None else {i: gallery_names[i] for i in shown})
    return Retrieval(picture, scores, indices)


def sound_retrieval_picture(query_specs: Tensor, gallery_specs: Mapping[int, Tensor], indices: Tensor, scores: Tensor,
                            query_names: Sequence[str] | None = None,
                            gallery_names: Mapping[int, str] | None = None) -> np.ndarray:
    """The retrieval grid (:func:`~unsupdistill.show.retrieval.retrieval_grid`) of spectrograms (1, M, T), all on
    one colour scale, captioned with the scores and, where given, the names."""
    everything = torch.stack([*query_specs, *gallery_specs.values()])
    low, high = float(everything.min()), float(everything.max())
    queries = np.stack([spectrogram_rgb(x, low, high) for x in query_specs])
    gallery = {i: spectrogram_rgb(x, low, high) for i, x in gallery_specs.items()}
    return retrieval_grid(queries, gallery, indices, scores, query_names=query_names, gallery_names=gallery_names)


def _network(model: FeatureModel, picture: str) -> None:
    """Raise PictureDoesNotFit unless the model is a network (timm's ``forward_features``), not a statistic."""
    if not hasattr(model.backbone, "forward_features"):
        raise PictureDoesNotFit(f"{model.name} ('{type(model.backbone).__name__}') is not a network of spectrograms, "
                                f"so it has no {picture}; give a trained model")


def show_sound_attention(model: FeatureModel, waves: Tensor, threshold: float = DINO_THRESHOLD) -> np.ndarray:
    """The class-token attention of a ViT of spectrograms over its patches of mel bands and frames: one row per
    clip, its spectrogram, then the spectrogram tinted where each head's thresholded attention is on."""
    _network(model, "attention")
    x = whole_clips(model, waves)  # (B, 1, M, frames)
    attention = cls_attention(model.backbone, x).flip(-2)  # (B, heads, h, w), the first band's patches at the bottom
    rows = [attention_picture(picture, maps, threshold) for picture, maps in zip(spectrogram_pictures(x), attention)]
    return join(rows, axis=0, gap=2)


def show_sound_pca(model: FeatureModel, waves: Tensor) -> np.ndarray:
    """The PCA colours of the spatial features of spectrograms (one PCA for all clips): one row per clip, its
    spectrogram beside the colours of its grid of mel bands and frames.

    Raises:
        PictureDoesNotFit: the model is not a network with spatial features, or its grid is coarser than
            :data:`MIN_GRID`.
    """
    _network(model, "spatial features")
    x = whole_clips(model, waves)  # (B, 1, M, frames)
    grid = spatial_features(model.backbone, x)  # (B, h, w, C)
    if min(grid.shape[1:3]) < MIN_GRID:
        raise PictureDoesNotFit(f"{model.name} makes a {grid.shape[1]} x {grid.shape[2]} grid of its {x.shape[-2]} x "
                                f"{x.shape[-1]} spectrograms, too coarse to show where in pitch and time its features "
                                f"differ (at least {MIN_GRID} x {MIN_GRID}); a stride-1 stem (model.small_image_stem) "
                                "or a ViT of small patches has one")
    colours = pca_colours(grid.cpu())[:, ::-1]  # (B, h, w, 3), the lowest bands at the bottom
    return join([pca_picture(picture, cells) for picture, cells in zip(spectrogram_pictures(x), colours)],
                axis=0, gap=2)


def run_multi_crop(model_spec: str | Path) -> torch.nn.Module:
    """The multi-crop in time a DINO run of sounds trained with, built from its ``config.yaml`` (``audio`` section,
    ``model.input_size``, ``audio.local_frames``, ``dino.num_local_crops``).

    Args:
        model_spec: the run directory, or a checkpoint in its ``checkpoints/`` folder.

    Raises:
        PictureDoesNotFit: no run's config.yaml is found (an export, a timm: model), or the run is not DINO on sounds.
    """
    import yaml

    from unsupdistill import run_dir
    from unsupdistill.config.loading import config_from_dict
    from unsupdistill.methods.dino.method import multi_crop

    run = run_dir.run_of(model_spec)
    path = None if run is None else run / run_dir.CONFIG
    if path is None or not path.is_file():
        raise PictureDoesNotFit(f"the views are drawn from a run's {run_dir.CONFIG}, and {model_spec} has none; give "
                                "the run directory")
    config = config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))
    if config.data.kind != "audio" or config.method != "dino":
        raise PictureDoesNotFit(f"the views picture shows DINO's multi-crop of sounds; {path} trained "
                                f"{config.method} on {config.data.kind or 'images'}")
    return multi_crop(config, 1.0)
