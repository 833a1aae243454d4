"""A training run's directory: the one place its layout is spelled out, and its metrics read back.

::

    RUN/
      config.yaml  status.json  train.log  metrics.jsonl  tensorboard/
      checkpoints/last.pt  checkpoints/epoch_NNNN.pt
      backbone.safetensors + backbone.json     (the exported backbone, at the end)
      export/                                  (``unsupdistill export``'s default folder)
      superseded/<time>-step<N>/               (what a resume from an older checkpoint set aside)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
STATUS = "status.json"
TENSORBOARD = "tensorboard"
BACKBONE = "backbone.safetensors"
BACKBONE_SIDECAR = "backbone.json"
"""How to rebuild and feed the backbone (architecture, input size, normalisation), beside it."""
EXPORTS = "export"
SUPERSEDED = "superseded"


def checkpoints_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINTS


def last_checkpoint(run: Path) -> Path:
    """``RUN/checkpoints/last.pt``, rewritten every ``train.save_every_steps`` and at every epoch end."""
    return checkpoints_dir(run) / LAST


def epoch_checkpoint(run: Path, epoch: int) -> Path:
    """``RUN/checkpoints/epoch_NNNN.pt``, kept every ``train.keep_every_epochs``."""
    return checkpoints_dir(run) / f"epoch_{epoch:04d}.pt"


def checkpoint_files(run: Path) -> list[Path]:
    """The run's checkpoint files that exist: ``last.pt`` first, then the kept epochs in order."""
    folder = checkpoints_dir(run)
    return [path for path in (folder / LAST, *sorted(folder.glob("epoch_*.pt"))) if path.is_file()]


def run_of(path: str | Path) -> Path | None:
    """The run directory a path belongs to: a directory is its own run, ``RUN/checkpoints/FILE`` is in ``RUN``;
    None for a file outside a run's ``checkpoints/`` folder (a checkpoint copied elsewhere)."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == CHECKPOINTS else None


def read_metrics(run_or_file: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a run's ``metrics.jsonl`` (or of the file given), and how many non-blank lines were not
    JSON objects with a numeric ``step``.

    A run killed mid-write leaves a half line at the end; it is skipped and counted, never an error.

    Raises:
        FileNotFoundError: there is no such file.
    """
    path = Path(run_or_file)
    if path.is_dir():
        path = path / METRICS
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int | float) and not isinstance(step, bool):
            records.append(record)
        else:
            skipped += 1
    return records, skipped
