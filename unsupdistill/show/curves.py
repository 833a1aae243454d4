"""Training curves of a run from its ``metrics.jsonl``: loss, teacher entropy against its maximum log K
(DINO's collapse signal, Caron et al. 2021, Sec. 5.3), a distilled student's agreement with its teacher, k-NN
top-1 during training, the optimiser's schedules (learning rate, weight decay) and DINO's teacher momentum, in
one PNG; a method logs only its own keys, so a panel without data is left out.

Plots use matplotlib's object-oriented API on an Agg canvas, as ``evaluate/report.py`` does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unsupdistill.run_dir import METRICS, read_metrics
from unsupdistill.storage import atomic_write

logger = logging.getLogger(__name__)

PANEL_INCHES = (5.0, 3.0)
DPI = 100
"""Each panel is 500 x 300 pixels; the PNG is exactly (columns * 500) x (rows * 300)."""
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("k-NN top-1 (%)", ("knn_top1",)),
    ("learning rate and weight decay", ("lr", "weight_decay")),
)
"""The panels of every run: titles and the ``metrics.jsonl`` keys each draws (against ``step``); a method adds its
own (``Method.curves``), and a panel without data is left out."""
FEW_POINTS = 50
"""Series with at most this many points get markers."""
MARGINS = {"left": 0.85, "right": 0.2, "second_axis": 1.2, "top": 0.4, "bottom": 0.5, "figure_title": 0.3}
"""Inches inside each panel's 5 x 3 box around its plot: room for the tick labels and the y label on the left, on the
right for a second y axis's (weight decay beside the learning rate) where the panel has one, above for its title, below
for the x axis; the top row also leaves room for the figure's title. Fixed margins draw the PNG in about half the time
of matplotlib's constrained layout (0.5 s against 0.9 s, at the end of every run)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the records holding a number under ``key``."""
    points = [(float(r["step"]), float(r[key])) for r in records if _is_number(r.get(key))]
    return [step for step, _ in points], [value for _, value in points]


def _max_entropy(records: list[dict[str, Any]]) -> float | None:
    """log K of a head's K outputs: entropy + KL to uniform of the last record holding both; None without them."""
    for record in reversed(records):
        if _is_number(record.get("teacher_entropy")) and _is_number(record.get("teacher_kl_uniform")):
            return float(record["teacher_entropy"]) + float(record["teacher_kl_uniform"])
    return None


def _draw(axes: Axes, records: list[dict[str, Any]], keys: tuple[str, ...], max_entropy: float | None) -> None:
    """Draw ``keys`` on ``axes``; a second key gets its own y axis on the right (weight decay beside lr)."""
    for number, key in enumerate(keys):
        steps, values = series(records, key)
        if not steps:
            continue
        target = axes if number == 0 else axes.twinx()
        colour = f"C{number}"
        marker = "o" if len(steps) <= FEW_POINTS else None  # a single k-NN probe is a point, not a line
        target.plot(steps, values, color=colour, label=key, marker=marker, markersize=4)
        target.set_ylabel(key, color=colour)
    if keys == ("teacher_entropy",) and max_entropy is not None:
        axes.axhline(max_entropy, color="C3", linestyle="--", label=f"max log K = {max_entropy:.2f}")
        axes.legend(loc="best", fontsize="small")
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)


def _panel_box(number: int, columns: int, rows: int, second_axis: bool) -> tuple[float, float, float, float]:
    """Where panel ``number`` (0-based, row by row) plots, as (left, bottom, width, height) fractions of the figure:
    its 5 x 3 box less :data:`MARGINS`."""
    width, height = PANEL_INCHES
    m = MARGINS
    row, column = divmod(number, columns)
    top = m["top"] + (m["figure_title"] if row == 0 else 0.0)
    right = m["second_axis"] if second_axis else m["right"]
    left_in, bottom_in = column * width + m["left"], (rows - 1 - row) * height + m["bottom"]
    figure_width, figure_height = width * columns, height * rows
    return (left_in / figure_width, bottom_in / figure_height, (width - m["left"] - right) / figure_width,
            (height - m["bottom"] - top) / figure_height)


def plot_training_curves(run_dir_or_metrics_path: str | Path, out_png: str | Path,
                         panels: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> Path:
    """One PNG of a run's training curves, a panel per series found; absent series are left out.

    Args:
        run_dir_or_metrics_path: a run directory (its ``metrics.jsonl`` is read) or the file itself.
        out_png: the PNG to write (atomically).
        panels: the method's own panels (``Method.curves``), drawn after :data:`PANELS`. An entropy panel gets its
            maximum log K where ``teacher_entropy + teacher_kl_uniform`` is logged.

    Returns:
        ``out_png`` as a path. Skipped (non-JSON, half-written) lines are counted in a warning and the title.

    Raises:
        FileNotFoundError: there is no metrics file.
        ValueError: the file holds none of the series drawn.
    """
    path = Path(run_dir_or_metrics_path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run directory holding metrics.jsonl, or the file")
    records, skipped = read_metrics(path)
    if skipped:
        logger.warning("%s: skipped %d line(s) that are not complete JSON records", path, skipped)
    wanted = (*PANELS, *panels)
    panels = [(title, keys) for title, keys in wanted if any(series(records, key)[0] for key in keys)]
    if not panels:
        wanted = ", ".join(key for _, keys in wanted for key in keys)
        raise ValueError(f"{path} holds none of the series {wanted} in {len(records)} record(s); "
                         "give the metrics.jsonl of an unsupdistill training run")
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI)
    max_entropy = _max_entropy(records)
    for number, (title, keys) in enumerate(panels):
        second_axis = sum(1 for key in keys if series(records, key)[0]) > 1
        axes = figure.add_axes(_panel_box(number, columns, rows, second_axis))
        _draw(axes, records, keys, max_entropy)
        axes.set_title(title)
    note = f", {skipped} damaged line(s) skipped" if skipped else ""
    figure.suptitle(f"{path.parent.name or path.name}: {len(records)} records{note}")
    FigureCanvasAgg(figure)
    out = Path(out_png)
    atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    return out
