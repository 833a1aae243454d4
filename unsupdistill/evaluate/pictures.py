"""The pictures ``unsupdistill eval`` writes beside its plots, where they fit the model: the first test images'
class-token attention (ViTs), the PCA colours of their spatial features, and their nearest training images."""

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

logger = logging.getLogger(__name__)


def unit_pixels(dataset: LabeledDataset, indices: list[int]) -> Tensor:
    """Images of a labeled set as float pixels (N, 3, S, S) in [0, 1]."""
    return torch.stack([dataset[i] for i in indices]).float() / 255


def write_pictures(model: FeatureModel, train_set: LabeledDataset, test_set: LabeledDataset, train_features: Tensor,
                   test_features: Tensor, out_dir: Path, count: int = 8, k: int = 5) -> dict[str, Path]:
    """Write ``attention.png`` (ViTs with a class token), ``pca.png`` (backbones with spatial features) and
    ``retrieval.png`` (the first ``count`` test images, each with its ``k`` nearest training images by cosine
    similarity of the features already extracted). Returns the pictures written, by kind."""
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
