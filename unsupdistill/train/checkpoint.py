"""Resuming a run: every process's random state restored; in the run's own directory, what a later part of
the run left is set aside, never overwritten."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from unsupdistill import distributed
from unsupdistill import run_dir as layout
from unsupdistill.storage import CLASSIFIER_FILE, CheckpointError, load_checkpoint

logger = logging.getLogger(__name__)


def set_aside_later_state(run_dir: Path, step: int) -> Path | None:
    """Before a run is resumed from an older checkpoint (step ``step``) in its own directory, move what the
    later part of the run left (checkpoints of later steps, the final export and its classifier) to
    ``superseded/<time>-step<N>/`` and copy its metrics and TensorBoard logs there, so that nothing of it is
    overwritten or lost.

    Returns:
        The folder things were set aside in, or None when the run holds nothing later than ``step``.
    """
    later: dict[Path, int] = {}
    for candidate in layout.checkpoint_files(run_dir):
        try:
            candidate_step = int(load_checkpoint(candidate, mmap=True)["step"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue
        if candidate_step > step:
            later[candidate] = candidate_step
    if not later:
        return None
    newest = max(later.values())
    target = run_dir / layout.SUPERSEDED / f"{time.strftime('%Y%m%d-%H%M%S')}-step{newest}"
    layout.checkpoints_dir(target).mkdir(parents=True, exist_ok=False)
    for path in later:
        os.replace(path, layout.checkpoints_dir(target) / path.name)
    classifier_sidecar = Path(CLASSIFIER_FILE).with_suffix(".json").name
    for name in (layout.BACKBONE, layout.BACKBONE_SIDECAR, CLASSIFIER_FILE, classifier_sidecar):  # the final export
        if (run_dir / name).is_file():
            os.replace(run_dir / name, target / name)
    for name in (layout.METRICS, layout.CONFIG, layout.STATUS):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, target / name)
    if (run_dir / layout.TENSORBOARD).is_dir():
        shutil.copytree(run_dir / layout.TENSORBOARD, target / layout.TENSORBOARD)
    logger.warning("resuming from step %d of a run that reached step %d: its later checkpoints (%s) and export "
                   "were moved, and its metrics and TensorBoard logs copied, to %s; to branch off without touching "
                   "the run, resume with --out NEW_DIR instead", step, newest,
                   ", ".join(f"{p.name} at step {s}" for p, s in later.items()), target)
    return target


def restore_rng(rngs: list[dict], world: int, device: torch.device, reseed: int) -> None:
    """Restore this process's RNG states from a checkpoint's ``rng`` list (one entry per process).

    With another number of processes than wrote it, augmentation randomness is reseeded with ``reseed`` plus
    the rank instead: the run continues, but not bit for bit.
    """
    if len(rngs) == world:
        rng = rngs[distributed.rank()]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        logger.warning("checkpoint was written by %d process(es), now %d: augmentation randomness is "
                       "reseeded, so the run continues but not bit-for-bit", len(rngs), world)
        torch.manual_seed(reseed + distributed.rank())
