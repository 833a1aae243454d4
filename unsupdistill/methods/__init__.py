"""Training methods, each one file and one registry line; :func:`train` runs one through the engine.

- ``dino``: self-distillation with an EMA teacher, from scratch (:class:`~unsupdistill.methods.dino.DINO`);
- ``distill``: knowledge distillation from a frozen teacher (:class:`~unsupdistill.methods.distill.Distillation`);
- ``kd``: distillation with labels (:class:`~unsupdistill.methods.kd.KnowledgeDistillation`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from unsupdistill import distributed
from unsupdistill.config import Config
from unsupdistill.config.sections import register_method
from unsupdistill.data import FolderScan
from unsupdistill.devices import training_device
from unsupdistill.methods.dino import DINO
from unsupdistill.methods.distill import Distillation
from unsupdistill.methods.kd import KnowledgeDistillation
from unsupdistill.train.loop import Probe, Trainer
from unsupdistill.train.method import Export, Method, Runtime

METHODS: dict[str, type[Method]] = {method.name: method for method in (DINO, Distillation, KnowledgeDistillation)}
"""The ``method`` values of the config and the classes that implement them: a new method is one line here."""
for _method in METHODS.values():
    register_method(_method.name, _method.settings)


def method_for_command(command: str, labeled: bool = False) -> type[Method]:
    """The method a CLI verb runs: ``pretrain``, DINO; ``distill``, distillation, or with labels (``labeled``:
    ``data.labels`` is set) distillation with labels."""
    methods = [method for method in METHODS.values() if method.command == command]
    return next((method for method in methods if method.uses_labels == labeled), methods[0])


def build_trainer(config: Config, run_dir: Path, checkpoint: dict | None = None, dry_run: bool = False,
                  scan: FolderScan | None = None, config_notes: str = "", probe: Probe | None = None,
                  device: torch.device | None = None) -> Trainer:
    """The engine set up for ``config.method`` (see :class:`~unsupdistill.train.loop.Trainer` for the arguments);
    ``device``: None resolves ``train.device`` (torchrun's LOCAL_RANK picks the GPU)."""
    device = device or training_device(config.train.device)
    return Trainer(config, run_dir, METHODS[config.method], device, checkpoint, dry_run, scan, config_notes, probe)


def train(config: Config, run_dir: Path, checkpoint: dict | None = None, dry_run: bool = False,
          scan: FolderScan | None = None, config_notes: str = "", probe: Probe | None = None,
          device: torch.device | None = None) -> Path | dict | None:
    """Run training (or one dry-run step) and return the exported backbone's path (or the dry-run report).

    Args:
        config: the run's config; ``config.method`` picks the method.
        run_dir: where the run's files go.
        checkpoint: a loaded checkpoint to resume from.
        dry_run: build everything, run one step on a tiny batch, write nothing.
        scan: the image folder's scan, if made already (``scan_for_run``); else the folder is scanned here.
        config_notes: comment lines for the top of ``config.yaml`` (the automatic settings and why).
        probe: k-NN during training (``unsupdistill.evaluate.probe.KNNProbe``), main process only.
        device: where to train; None resolves ``train.device``.

    Returns:
        The exported backbone's path in the main process (None in the others), or the dry-run report.
    """
    device = device or training_device(config.train.device)
    with distributed.session(device):  # under torchrun: joins the process group, unless the caller has
        trainer = build_trainer(config, run_dir, checkpoint, dry_run, scan, config_notes, probe, device)
        if dry_run:
            return trainer.dry_run_step()
        return trainer.fit()


__all__ = ["DINO", "METHODS", "Distillation", "Export", "KnowledgeDistillation", "Method", "Runtime", "build_trainer",
           "method_for_command", "train"]
