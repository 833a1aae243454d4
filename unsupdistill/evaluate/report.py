"""Evaluation reports: text and markdown tables, JSON results, and PNG plots (feature map, confusion
matrix, k-NN accuracy against k).

Plots use matplotlib's object-oriented API on an Agg canvas: no display, no pyplot global state, and
nothing to close once the figure is saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix
from threadpoolctl import threadpool_limits
from torch import Tensor

from unsupdistill.storage import atomic_write, write_json_atomic

EMBEDDING_METHODS = ("auto", "pca", "tsne")
MAX_TSNE_POINTS = 2000
"""``method="auto"`` runs t-SNE on at most this many points (about half a minute on 2 CPU cores)."""
TSNE_INPUT_DIM = 50
"""t-SNE runs on this many PCA components of wider features (van der Maaten & Hinton 2008 do the same)."""
MAX_ANNOTATED_CLASSES = 20


# ----------------------------------------------------------------------------------------------
# Tables and JSON
# ----------------------------------------------------------------------------------------------


def _cell(value: Any, precision: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        return f"{value:.{precision}f}" if math.isfinite(value) else str(float(value))
    if isinstance(value, Tensor) and value.numel() == 1:
        return _cell(value.item(), precision)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], markdown: bool = False,
                 precision: int = 2) -> str:
    """A table of ``rows`` with one column per key in ``columns``: numbers right-aligned, floats with
    ``precision`` decimals, missing keys left blank.

    Args:
        rows: one mapping per row.
        columns: the keys to show, in order; also the header.
        markdown: a markdown table (``| a | b |`` with a ``|---|---:|`` separator) instead of plain
            space-aligned text with a dashed rule under the header.
        precision: decimals of floats.
    """
    cells = [[_cell(row.get(column), precision) for column in columns] for row in rows]
    numeric = [bool(rows) and all(_is_number(row.get(column)) or row.get(column) is None for row in rows)
               for column in columns]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]

    def line(values: Sequence[str]) -> list[str]:
        return [value.rjust(width) if right else value.ljust(width)
                for value, width, right in zip(values, widths, numeric)]

    if markdown:
        rule = [("-" * (width - 1) + ":") if right else "-" * width for width, right in zip(widths, numeric)]
        lines = [line(columns), rule, *(line(values) for values in cells)]
        return "\n".join("| " + " | ".join(values) + " |" for values in lines)
    lines = [line(columns), ["-" * width for width in widths], *(line(values) for values in cells)]
    return "\n".join("  ".join(values).rstrip() for values in lines)


def _jsonable(value: Any) -> Any:
    """``value`` with tensors and arrays as (nested) lists, numpy scalars as Python numbers, paths as strings."""
    if isinstance(value, Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {key if isinstance(key, str | int | float | bool) or key is None else str(key): _jsonable(item)
                for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    return value


def write_json(results: Mapping[str, Any], path: Path) -> None:
    """Write ``results`` as indented JSON, atomically (temporary file + ``os.replace``).

    Floats are written exactly (``repr``); tensors and numpy arrays become lists, numpy scalars numbers.
    JSON object keys are strings, so integer keys (``{20: ...}``) read back as ``"20"``.
    """
    write_json_atomic(_jsonable(results), path)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _numpy(values: Tensor | np.ndarray) -> np.ndarray:
    return torch.as_tensor(values).detach().cpu().numpy()


def _save_png(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _class_colours(num_classes: int) -> np.ndarray:
    """Distinct RGBA colours (C, 4): tab10 / tab20 for few classes, evenly spaced hues beyond."""
    if num_classes <= 10:
        return colormaps["tab10"](np.arange(num_classes))
    if num_classes <= 20:
        return colormaps["tab20"](np.arange(num_classes))
    return colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))


def embed_features_2d(
    features: Tensor, method: str = "auto", max_points: int = MAX_TSNE_POINTS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """2-D coordinates of L2-normalised features, for a feature map.

    Args:
        features: features (N, D).
        method: ``pca`` (all points); ``tsne`` (all points; PCA to 50 dimensions first when wider);
            ``auto``: t-SNE as ``tsne`` on at most ``max_points`` points, a fixed-seed random subset
            when there are more.
        max_points: the point budget of ``auto``.
        seed: seed of the subset and of t-SNE.

    Returns:
        ``(coordinates (M, 2), indices (M,) of the points shown, name of the method used)``.
    """
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"method={method!r} is invalid; allowed values: {', '.join(EMBEDDING_METHODS)}")
    x = torch.nn.functional.normalize(torch.as_tensor(features).detach().cpu().float(), dim=1).numpy()  # (N, D)
    indices = np.arange(len(x))
    if method == "auto" and len(x) > max_points:
        indices = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
    x = x[indices]
    if method == "pca" or len(x) < 4:  # t-SNE needs perplexity < N; with 3 points PCA says as much
        return PCA(n_components=2, random_state=seed).fit_transform(x), indices, "PCA"
    if x.shape[1] > TSNE_INPUT_DIM:
        x = PCA(n_components=min(TSNE_INPUT_DIM, len(x)), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed)
    # One OpenMP thread: the Barnes-Hut gradient's many small parallel regions stall when the cores are
    # busy (training beside evaluation): 2,000 points took 41 s with 2 threads, 11 s with 1 on 2 busy cores.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x), indices, "t-SNE"


def plot_feature_map(features: Tensor, labels: Tensor, classes: Sequence[str], path: Path, method: str = "auto",
                     title: str = "") -> None:
    """Scatter plot PNG of features embedded in 2-D (:func:`embed_features_2d`), coloured by class.

    Args:
        features: features (N, D).
        labels: class indices (N,) into ``classes``.
        classes: class names, shown in the legend.
        path: the PNG to write.
        method: ``auto``, ``pca`` or ``tsne``, as in :func:`embed_features_2d`.
        title: the plot's title; the method and the number of points shown are added below it.
    """
    coordinates, indices, method_name = embed_features_2d(features, method)
    labels = _numpy(labels)[indices]
    colours = _class_colours(len(classes))
    figure = Figure(figsize=(8, 7))
    axes = figure.add_subplot()
    for label, name in enumerate(classes):
        mask = labels == label
        if mask.any():
            axes.scatter(coordinates[mask, 0], coordinates[mask, 1], s=6, color=colours[label], label=name,
                         alpha=0.8, linewidths=0)
    shown = f"{len(indices):,} of {len(features):,} points" if len(indices) < len(features) else \
        f"{len(indices):,} points"
    axes.set_title(f"{title}\n{method_name}, {shown}" if title else f"{method_name}, {shown}")
    axes.set_xticks([])
    axes.set_yticks([])
    columns = 1 + len(classes) // 40
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), ncols=columns, markerscale=2, frameon=False,
                fontsize="small" if len(classes) <= 20 else "xx-small")
    _save_png(figure, path)


def plot_confusion(true: Tensor, predicted: Tensor, classes: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix PNG (scikit-learn's ``confusion_matrix``): row i is the share of
    class i's samples predicted as each class; cells are annotated when there are at most 20 classes.

    Args:
        true: class indices (N,) into ``classes``.
        predicted: predicted class indices (N,).
        classes: class names, the axis labels.
        path: the PNG to write.
        title: the plot's title; the accuracy is added below it.
    """
    true_np, predicted_np = _numpy(true), _numpy(predicted)
    matrix = confusion_matrix(true_np, predicted_np, labels=np.arange(len(classes)), normalize="true")  # (C, C)
    accuracy = float((true_np == predicted_np).mean() * 100)
    num_classes = len(classes)
    size = min(4 + 0.4 * num_classes, 20)
    figure = Figure(figsize=(size + 1.5, size))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    if num_classes <= 50:
        axes.set_xticks(np.arange(num_classes), classes, rotation=90 if num_classes > 10 else 45, ha="center")
        axes.set_yticks(np.arange(num_classes), classes)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        for (row, column), share in np.ndenumerate(matrix):
            if share > 0:
                axes.text(column, row, f"{share:.2f}", ha="center", va="center", fontsize="x-small",
                          color="white" if share > 0.5 else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    summary = f"accuracy {accuracy:.1f}% on {len(true_np):,} samples"
    axes.set_title(f"{title}\n{summary}" if title else f"Confusion matrix (rows normalised), {summary}")
    _save_png(figure, path)


def plot_knn_vs_k(results: Mapping[str, Mapping[int, float]], path: Path) -> None:
    """k-NN top-1 accuracy (%) against k (log axis), one line per model, as a PNG.

    Args:
        results: model name -> {k: top-1 %}; keys read back from JSON (``"20"``) work too.
        path: the PNG to write.
    """
    figure = Figure(figsize=(7, 5))
    axes = figure.add_subplot()
    all_ks = set()
    for name, accuracy_by_k in results.items():
        points = sorted((int(k), float(accuracy)) for k, accuracy in accuracy_by_k.items())
        all_ks.update(k for k, _ in points)
        axes.plot([k for k, _ in points], [accuracy for _, accuracy in points], marker="o", label=name)
    axes.set_xscale("log")
    if all_ks:
        axes.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
        axes.minorticks_off()
    axes.set_xlabel("k (neighbours)")
    axes.set_ylabel("k-NN top-1 (%)")
    axes.set_title("Weighted k-NN accuracy against k")
    axes.grid(True, alpha=0.3)
    if results:
        axes.legend()
    _save_png(figure, path)
