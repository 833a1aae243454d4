"""Checkpoints that describe themselves, written atomically and read without unpickling code."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CHECKPOINT_FORMAT = "unsupdistill.checkpoint/1"


class CheckpointError(ValueError):
    """A file is not a readable unsupdistill checkpoint."""


def atomic_write(path: Path, write: Callable[[str], Any], check: Callable[[str], Any] | None = None) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one.

    The file gets the usual umask permissions, whatever ``write`` created it with (safetensors and
    ``tempfile.mkstemp`` make private 0600 files). ``check(tmp_path)``, if given, runs before the
    rename; an exception from it leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) atomically."""
    atomic_write(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"{path} is not a safe unsupdistill checkpoint (it may be truncated, from another tool, "
            f"or contain pickled code, which is never loaded): {str(err).splitlines()[0]}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an unsupdistill checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def find_checkpoint(run_or_file: str | Path) -> Path:
    """The checkpoint to resume from: the file itself, or a run directory's ``checkpoints/last.pt``."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    last = path / "checkpoints" / "last.pt"
    if last.is_file():
        return last
    raise CheckpointError(f"no checkpoint to resume in {path}: expected {last} or a .pt file")


def save_backbone(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], out_dir: Path) -> Path:
    """Write ``backbone.safetensors`` (plain tensors) and ``backbone.json`` (how to rebuild and feed it)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    weights = out_dir / "backbone.safetensors"
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": metadata["format"]}))
    sidecar = out_dir / "backbone.json"
    atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2) + "\n"))
    return weights
