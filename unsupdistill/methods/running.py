"""Running a registered method through the engine: :func:`build_trainer` and :func:`train`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from unsupdistill import distributed, registry
from unsupdistill.config import Config, ConfigError
from unsupdistill.data import FolderScan
from unsupdistill.devices import training_device
from unsupdistill.train.loop import Probe, Trainer
from unsupdistill.train.method import Method


class _Methods(Mapping):
    """The registered methods' classes by name, each imported on first use."""

    def __getitem__(self, name: str) -> type[Method]:
        return registry.method_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.names())

    def __len__(self) -> int:
        return len(registry.names())


METHODS: Mapping[str, type[Method]] = _Methods()
"""The ``method`` values of the config and the classes that implement them."""


def with_method(config: Config) -> Config:
    """``config`` with its method named: ``method: null`` is the first registered method (dino) in the Python API
    (the CLI's verbs give their own first).

    Raises:
        ConfigError: an unknown method.
    """
    name = config.method or registry.names()[0]
    if name not in registry.names():
        raise ConfigError(f"method={name}: allowed values are {', '.join(registry.names())}")
    return config if name == config.method else dataclasses.replace(config, method=name)


def build_trainer(config: Config, run_dir: Path, checkpoint: dict | None = None, dry_run: bool = False,
                  scan: FolderScan | None = None, config_notes: str = "", probe: Probe | None = None,
                  device: torch.device | None = None) -> Trainer:
    """The engine set up for ``config.method`` (see :class:`~unsupdistill.train.loop.Trainer` for the arguments);
    ``device``: None resolves ``train.device`` (torchrun's LOCAL_RANK picks the GPU)."""
    device = device or training_device(config.train.device)
    config = with_method(config)
    method = registry.method_class(config.method)
    return Trainer(config, run_dir, method, device, checkpoint, dry_run, scan, config_notes, probe)


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
