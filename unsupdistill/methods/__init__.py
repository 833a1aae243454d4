"""Training methods, each one file and one registry line; :func:`train` runs one through the engine.

- ``dino``: self-distillation with an EMA teacher, from scratch (:class:`~unsupdistill.methods.dino.DINO`);
- ``distill``: knowledge distillation from a frozen teacher (:class:`~unsupdistill.methods.distill.Distillation`).
"""

from __future__ import annotations

from pathlib import Path

from unsupdistill import distributed
from unsupdistill.config import Config
from unsupdistill.data import FolderScan
from unsupdistill.methods.dino import DINO
from unsupdistill.methods.distill import Distillation
from unsupdistill.train.loop import Probe, Trainer
from unsupdistill.train.method import Export, Method, Runtime

METHODS: dict[str, type[Method]] = {"dino": DINO, "distill": Distillation}
"""The ``method`` values of the config and the classes that implement them."""


def build_trainer(config: Config, run_dir: Path, checkpoint: dict | None = None, dry_run: bool = False,
                  scan: FolderScan | None = None, config_notes: str = "", probe: Probe | None = None) -> Trainer:
    """The engine set up for ``config.method`` (see :class:`~unsupdistill.train.loop.Trainer` for the arguments)."""
    return Trainer(config, run_dir, METHODS[config.method], checkpoint, dry_run, scan, config_notes, probe)


def train(config: Config, run_dir: Path, checkpoint: dict | None = None, dry_run: bool = False,
          scan: FolderScan | None = None, config_notes: str = "", probe: Probe | None = None) -> Path | dict | None:
    """Run training (or one dry-run step) and return the exported backbone's path (or the dry-run report).

    Args:
        config: the run's config; ``config.method`` picks the method.
        run_dir: where the run's files go.
        checkpoint: a loaded checkpoint to resume from.
        dry_run: build everything, run one step on a tiny batch, write nothing.
        scan: the image folder's scan, if made already (``scan_for_run``); else the folder is scanned here.
        config_notes: comment lines for the top of ``config.yaml`` (the automatic settings and why).
        probe: k-NN during training (``unsupdistill.evaluate.probe.KNNProbe``), main process only.

    Returns:
        The exported backbone's path in the main process (None in the others), or the dry-run report.
    """
    try:
        trainer = build_trainer(config, run_dir, checkpoint, dry_run, scan, config_notes, probe)
        if dry_run:
            return trainer.dry_run_step()
        return trainer.fit()
    finally:
        distributed.cleanup()


__all__ = ["DINO", "METHODS", "Distillation", "Export", "Method", "Runtime", "build_trainer", "train"]
