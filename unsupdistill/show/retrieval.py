"""Nearest neighbours by cosine similarity and their picture: each row a query followed by its k neighbours,
the qualitative retrieval figures of DINO (Caron et al. 2021, Sec. 4.2.2; Wu et al. 2018 for the k-NN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from unsupdistill.models.frozen import FeatureModel
from unsupdistill.show.canvas import Colour, framed, join, load_pixels, normalise, to_uint8

QUERY_FRAME: Colour = (0, 90, 200)
NEIGHBOUR_FRAME: Colour = (190, 190, 190)
CAPTION_HEIGHT = 12


@torch.no_grad()
def image_features(backbone: nn.Module, x: Tensor, batch_size: int = 64) -> Tensor:
    """Pooled features (N, D), float32 on the CPU, of a normalised batch (N, 3, S, S), ``batch_size`` at a time."""
    return torch.cat([backbone(x[start:start + batch_size]).float().cpu() for start in range(0, len(x), batch_size)])


def nearest_neighbours(queries: Tensor, gallery: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """The k gallery features most similar to each query by cosine similarity (exact faiss inner-product search
    on L2-normalised features).

    Args:
        queries: query features (Q, D).
        gallery: gallery features (N, D).
        k: neighbours per query; more than N gives N.

    Returns:
        ``(scores (Q, k) cosine similarities in decreasing order, indices (Q, k) into the gallery)``.
    """
    if k < 1:
        raise ValueError(f"k={k} is invalid; allowed values: >= 1")
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query features {tuple(queries.shape)} and gallery features {tuple(gallery.shape)} must "
                         "be (Q, D) and (N, D) with the same D: embed both with the same model")

    def unit(features: Tensor) -> np.ndarray:  # float32 contiguous, as faiss wants it
        return np.ascontiguousarray(nn.functional.normalize(features.detach().cpu().float(), dim=1).numpy())

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(unit(gallery))
    scores, indices = index.search(unit(queries), min(k, index.ntotal))  # (Q, k) each
    return torch.from_numpy(scores), torch.from_numpy(indices)


def caption(text: str, width: int) -> np.ndarray:
    """A white strip (CAPTION_HEIGHT, width, 3) with ``text`` in black, cut at its end to fit the width."""
    strip = Image.new("RGB", (width, CAPTION_HEIGHT), (255, 255, 255))
    draw, font = ImageDraw.Draw(strip), ImageFont.load_default()
    while text and draw.textlength(text, font=font) > width - 1:
        text = text[:-1]
    draw.text((1, 0), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def retrieval_grid(query_images: np.ndarray, gallery_images: np.ndarray | Mapping[int, np.ndarray], indices: Tensor,
                   scores: Tensor | None = None, border: int = 2, gap: int = 2,
                   query_names: Sequence[str] | None = None,
                   gallery_names: Sequence[str] | Mapping[int, str] | None = None) -> np.ndarray:
    """Each row a query (blue frame) followed by its neighbours (grey frames), optionally captioned with scores
    and names.

    Args:
        query_images: queries (Q, H, W, 3) uint8.
        gallery_images: gallery pictures (N, H, W, 3) uint8, or a mapping from the indices used to them.
        indices: neighbours (Q, k) into the gallery.
        scores: similarities (Q, k); when given, each cell gets a caption strip below it.
        border: frame width in pixels.
        gap: white pixels between cells and rows.
        query_names: with ``scores``, each query's caption (e.g. its class); default none.
        gallery_names: with ``scores``, a name after each neighbour's score ("0.93, low"), by gallery index.

    Returns:
        (Q * R + (Q - 1) * gap, (k + 1) * C + k * gap, 3) uint8 with cells C = W + 2 border wide and rows
        R = H + 2 border (+ the caption) high; the query's pixels start at (border, border) of its cell.
    """
    rows = []
    for row_index, (query, neighbours) in enumerate(zip(query_images, indices.tolist())):
        cells = [framed(query, border, QUERY_FRAME)] + [framed(gallery_images[i], border, NEIGHBOUR_FRAME)
                                                        for i in neighbours]
        if scores is not None:
            texts = [query_names[row_index] if query_names is not None else ""]  # else the query: its blue frame
            texts += [f"{score:.2f}" + (f", {gallery_names[i]}" if gallery_names is not None else "")
                      for score, i in zip(scores[row_index].tolist(), neighbours)]
            cells = [join([cell, caption(text, cell.shape[1])], axis=0) for cell, text in zip(cells, texts)]
        rows.append(join(cells, axis=1, gap=gap))
    return join(rows, axis=0, gap=gap)


@dataclass
class Retrieval:
    """The neighbours of some queries: ``picture`` (rows of :func:`retrieval_grid`, uint8), ``scores`` (Q, k)
    cosine similarities in decreasing order and ``indices`` (Q, k) into the gallery."""

    picture: np.ndarray
    scores: Tensor
    indices: Tensor


def show_retrieval(model: FeatureModel, queries: Sequence[str | Path], gallery: Sequence[str | Path], k: int = 5,
                   batch_size: int = 64) -> Retrieval:
    """Embed the query and gallery images and picture each query's k nearest gallery images.

    Gallery images are decoded ``batch_size`` at a time and only the neighbours are kept for the picture, so a
    large folder fits in memory. A query that is also in the gallery finds itself first (similarity 1).

    Args:
        model: a loaded backbone (``unsupdistill.models.load.load_model``).
        queries: query image files.
        gallery: the image files to search (e.g. ``unsupdistill.data.list_image_files(folder)``).
        k: neighbours per query.
        batch_size: images decoded and embedded at a time.
    """
    size = model.input_size

    def embed(paths: Sequence[str | Path]) -> Tensor:  # (N, D)
        return torch.cat([image_features(model.backbone, normalise(load_pixels(paths[i:i + batch_size], size),
                                                                   model.mean, model.std), batch_size)
                          for i in range(0, len(paths), batch_size)])

    scores, indices = nearest_neighbours(embed(queries), embed(gallery), k)
    shown = sorted(set(indices.flatten().tolist()))
    pictures = dict(zip(shown, to_uint8(load_pixels([gallery[i] for i in shown], size))))
    picture = retrieval_grid(to_uint8(load_pixels(queries, size)), pictures, indices, scores)
    return Retrieval(picture, scores, indices)
