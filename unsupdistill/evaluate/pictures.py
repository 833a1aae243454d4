"""The pictures ``unsupdistill eval`` writes beside its plots, where they fit the model: the first test images'
class-token attention (ViTs), the PCA colours of their spatial features, and their nearest training images; for a
model of sounds the same of test clips spread over the set, drawn as spectrograms (``show/sound.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from unsupdistill.data.labeled import LabeledDataset
from unsupdistill.models.load import FeatureModel
from unsupdistill.show import (
    PictureDoesNotFit,
    nearest_neighbours,
    retrieval_grid,
    save_png,
    show_attention,
    show_pca,
    to_uint8,
)
from unsupdistill.show.sound import show_sound_attention, show_sound_pca, sound_retrieval_picture, whole_clips

logger = logging.getLogger(__name__)


def unit_pixels(dataset: LabeledDataset, indices: list[int]) -> Tensor:
    """Images of a labeled set as float pixels (N, 3, S, S) in [0, 1]."""
    return torch.stack([dataset[i] for i in indices]).float() / 255


def write_pictures(model: FeatureModel, train_set: LabeledDataset, test_set: LabeledDataset, train_features: Tensor,
                   test_features: Tensor, out_dir: Path, count: int = 8, k: int = 5) -> dict[str, Path]:
    """Write ``attention.png`` (ViTs with a class token), ``pca.png`` (backbones with spatial features) and
    ``retrieval.png`` (the first ``count`` test images, each with its ``k`` nearest training images by cosine
    similarity of the features already extracted). Returns the pictures written, by kind."""
    if model.frontend is not None:
        return write_sound_pictures(model, train_set, test_set, train_features, test_features, out_dir, count, k)
    model.backbone.cpu()  # eight images: the pictures' code runs on the CPU whatever device extracted the features
    queries = list(range(min(count, len(test_set))))
    pixels = unit_pixels(test_set, queries)  # (n, 3, S, S)
    written = {}
    if hasattr(model.backbone, "forward_features"):  # a timm backbone (not raw pixels)
        for kind, draw in (("attention", show_attention), ("pca", show_pca)):
            try:
                written[kind] = save_png(draw(model, pixels), out_dir / f"{kind}.png")
            except PictureDoesNotFit as err:  # e.g. no class-token attention in a CNN; any other error is a bug
                logger.warning("eval: no %s.png for %s: %s", kind, model.name, err)
    scores, indices = nearest_neighbours(test_features[queries], train_features, k)  # (n, k) each
    shown = sorted(set(indices.flatten().tolist()))
    gallery = dict(zip(shown, to_uint8(unit_pixels(train_set, shown))))
    written["retrieval"] = save_png(retrieval_grid(to_uint8(pixels), gallery, indices, scores),
                                    out_dir / "retrieval.png")
    return written


def write_sound_pictures(model: FeatureModel, train_set: LabeledDataset, test_set: LabeledDataset,
                         train_features: Tensor, test_features: Tensor, out_dir: Path, count: int = 8,
                         k: int = 5) -> dict[str, Path]:
    """:func:`write_pictures` for a model of sounds: ``count`` test clips spread evenly over the test set (a folder
    of classes lists them class by class), their spectrograms as the model sees them, ``attention.png`` and
    ``pca.png`` where they fit, and ``retrieval.png``, each clip's ``k`` nearest training clips captioned with their
    similarity and class. Returns the pictures written, by kind."""
    model.backbone.cpu()
    queries = torch.linspace(0, len(test_set) - 1, min(count, len(test_set))).round().long().unique().tolist()
    waves = torch.stack([test_set[i] for i in queries])  # (n, 1, S)
    written = {}
    for kind, draw in (("attention", show_sound_attention), ("pca", show_sound_pca)):
        try:
            written[kind] = save_png(draw(model, waves), out_dir / f"{kind}.png", palette=True)
        except PictureDoesNotFit as err:
            logger.warning("eval: no %s.png for %s: %s", kind, model.name, err)
    scores, indices = nearest_neighbours(test_features[queries], train_features, k)  # (n, k) each
    shown = sorted(set(indices.flatten().tolist()))
    gallery = dict(zip(shown, whole_clips(model, torch.stack([train_set[i] for i in shown]))))
    names = [test_set.classes[int(test_set.labels[i])] for i in queries]
    gallery_names = {i: train_set.classes[int(train_set.labels[i])] for i in shown}
    picture = sound_retrieval_picture(whole_clips(model, waves), gallery, indices, scores, names, gallery_names)
    written["retrieval"] = save_png(picture, out_dir / "retrieval.png", palette=True)
    return written
