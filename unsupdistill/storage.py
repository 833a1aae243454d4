"""What the package writes and reads back: files written so that a reader sees the old version or the new
one, never half of one; self-describing checkpoints read without unpickling code; plain-tensor exports.

Checkpoints, exports, reports, scans and run status all go through :func:`atomic_write`. ``train/``,
``evaluate/`` and ``export/`` import from here; nothing here imports them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from unsupdistill import distributed
from unsupdistill import run_dir as layout
from unsupdistill.config import ConfigError

CHECKPOINT_FORMAT = "unsupdistill.checkpoint/1"

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A file is not a readable unsupdistill checkpoint."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) atomically."""
    atomic_write(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a file that would run code is refused.

    ``mmap=True`` maps the tensors instead of reading them: a cheap look at a large file's step
    that still checks its structure (a truncated file has no zip directory and is refused).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"{path} is not a safe unsupdistill checkpoint (it may be truncated, from another tool, "
            f"or contain pickled code, which is never loaded): {str(err).splitlines()[0]}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an unsupdistill checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def latest_checkpoint(run_or_file: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from, loaded: the file itself, or a run's newest readable checkpoint.

    In a run directory, ``checkpoints/last.pt`` and ``checkpoints/epoch_*.pt`` are candidates; the
    one with the highest step that loads wins (``last.pt`` on a tie). A candidate that does not load
    (truncated, corrupt, not a checkpoint) is skipped with a warning naming it and the reason.

    Raises:
        CheckpointError: a given file does not load, or no candidate in the run loads.
    """
    path = Path(run_or_file)
    if path.is_file():
        return path, load_checkpoint(path)
    candidates = layout.checkpoint_files(path)
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume in {path}: expected {layout.last_checkpoint(path)} or a .pt "
                              "file")

    # a cheap look at every candidate's step (tensors mapped, not read), then a full load, newest first
    steps = {}
    for candidate in candidates:
        try:
            steps[candidate] = int(load_checkpoint(candidate, mmap=True)["step"])
        except (CheckpointError, KeyError, TypeError, ValueError) as err:
            _warn_skipped(candidate, err)
    for candidate in sorted(steps, key=steps.get, reverse=True):  # a stable sort: last.pt first on a tie
        try:
            return candidate, load_checkpoint(candidate)
        except CheckpointError as err:
            _warn_skipped(candidate, err)
    raise CheckpointError(f"no readable checkpoint in {layout.checkpoints_dir(path)}: {len(candidates)} file(s) "
                          "tried, none loads (see the warnings above)")


def _warn_skipped(path: Path, err: Exception) -> None:
    reason = str(err) if isinstance(err, CheckpointError) else f"{path} has no valid step ({type(err).__name__})"
    logger.warning("resume skips a checkpoint that does not load: %s", reason)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` calls whose process is gone (killed mid-write)."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")  # "", NAME..., PID, HEX, "tmp"
        if len(parts) >= 5 and parts[-3].isdigit() and not _process_exists(int(parts[-3])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_exists(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, file_format: str,
                 check: Callable[[str], Any] | None = None) -> None:
    """Write plain tensors (CPU, contiguous) as safetensors, atomically; ``check`` as in :func:`atomic_write`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": file_format}), check)


def save_backbone(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], out_dir: Path) -> Path:
    """Write ``backbone.safetensors`` (plain tensors) and ``backbone.json`` (how to rebuild and feed it)."""
    weights = out_dir / layout.BACKBONE
    save_weights(state_dict, weights, metadata["format"])
    write_json_atomic(metadata, out_dir / layout.BACKBONE_SIDECAR)
    return weights




CLASSIFIER_FILE = "classifier.safetensors"
"""A classifier over a backbone's pooled features, beside its ``backbone.safetensors`` (with ``classifier.json``)."""


def save_classifier(weight: torch.Tensor, bias: torch.Tensor, classes: list[str], out_dir: Path) -> Path:
    """Write ``classifier.safetensors`` (``weight`` (C, D), ``bias`` (C,)) and ``classifier.json`` (the class names
    in index order) beside the backbone in ``out_dir``; logits = features @ weight.T + bias."""
    if weight.shape[0] != len(classes) or bias.shape != (len(classes),):
        raise ValueError(f"classifier of {tuple(weight.shape)} / {tuple(bias.shape)} for {len(classes)} classes")
    path = out_dir / CLASSIFIER_FILE
    save_weights({"weight": weight, "bias": bias}, path, "pt")
    sidecar = {"classes": list(classes), "feature_dim": int(weight.shape[1]), "backbone": layout.BACKBONE}
    write_json_atomic(sidecar, path.with_suffix(".json"))
    return path


def write_json_atomic(data: Any, path: Path) -> None:
    """Write plain JSON-ready ``data`` as indented JSON at ``path``, atomically (see :func:`atomic_write`)."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


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
        _fsync_folder(path.parent)  # the rename itself survives a machine crash
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Best effort: Windows cannot open a folder, and some network file systems refuse the fsync."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskSpaceError(ConfigError):
    """A store would not fit on its disk: the message names the folder, the bytes needed and free, and the setting
    that caps the store (a :class:`~unsupdistill.config.ConfigError`: the command exits 2 naming the fix)."""


def open_arrays(folder: Path, key: str, form: str, arrays: dict[str, tuple[tuple[int, ...], Any]],
                stale: str, limit: str) -> dict[str, Any]:
    """Memory-mapped ``.npy`` arrays in ``folder`` made under ``key``: reused when its ``meta.json`` says this
    ``form``, key and shapes and every array reads back whole, else made anew, zero-filled, with a warning that says
    why (by process 0; every process of a torchrun calls this together and the others wait). A store of per-image
    state that a resume keeps (a teacher's outputs, decoded images): derived data, so a store cut short, truncated or
    unreadable is made again, never an error; ``meta.json`` is written last.

    The arrays are sparse files that fill as the run writes them, and a write to a memory map on a full disk kills
    the process (SIGBUS); so the bytes still to be written are checked against the disk's free space first.

    Args:
        folder: the store's folder (replaced whole when stale).
        key: the fingerprint of everything the stored values depend on.
        form: the store's format name, e.g. ``unsupdistill.teacher_maps/1``.
        arrays: ``name -> (shape, numpy dtype)``; each is ``folder/name.npy``.
        stale: what the warning says of a store there made under another key or shape ("made for another ...").
        limit: the setting that caps the store's size (``distill.cache_max_gb``), named when it does not fit.

    Returns:
        ``name -> numpy memmap`` opened read-write.

    Raises:
        DiskSpaceError: the store's unwritten bytes exceed the free space of its disk (in every process).
        OSError: an array made anew cannot be read back (the message names the folder and the fix).
    """
    meta = {"format": form, "key": key, "shapes": {name: list(shape) for name, (shape, _) in arrays.items()}}
    short = None
    if distributed.is_main_process():
        reason = _why_not_reused(folder, meta, arrays, stale)
        if reason is not None and folder.exists():
            logger.warning("%s is made anew, empty (derived data: what it held is computed again): %s", folder,
                           reason)
            shutil.rmtree(folder, ignore_errors=True)
        short = _space_shortfall(folder, arrays, limit)
        if reason is not None and short is None:
            folder.mkdir(parents=True)
            for name, (shape, dtype) in arrays.items():
                np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, tuple(shape)).flush()
            atomic_write(folder / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))  # last
    short = distributed.broadcast_object(short)  # every process waits for process 0, then fails alike
    if short is not None:
        raise DiskSpaceError(short)
    opened = {}
    for name, (shape, _) in arrays.items():
        try:
            opened[name] = np.load(folder / f"{name}.npy", mmap_mode="r+")
        except (OSError, ValueError) as err:
            raise OSError(f"{folder / (name + '.npy')} cannot be read ({err}); delete {folder} and resume: it is "
                          "made again") from err
        if tuple(opened[name].shape) != tuple(shape):
            raise OSError(f"{folder / (name + '.npy')} has shape {opened[name].shape}, not {tuple(shape)}; delete "
                          f"{folder} and resume: it is made again")
    return opened


def _why_not_reused(folder: Path, meta: dict[str, Any], arrays: dict[str, tuple[tuple[int, ...], Any]],
                    stale: str) -> str | None:
    """Why the store in ``folder`` cannot be reused (None: it can). Each array is opened read-only first: numpy
    opens a short file read-write by zero-filling it to length, which would pass lost values off as stored."""
    if not folder.exists():
        return "there is none"
    meta_file = folder / "meta.json"
    try:
        found = json.loads(meta_file.read_text())
    except FileNotFoundError:
        return f"{meta_file} is missing (a store cut short before it was complete)"
    except (OSError, ValueError) as err:
        return f"{meta_file} cannot be read ({type(err).__name__}: {err})"
    if found != meta:
        return f"it was {stale}"
    for name, (shape, dtype) in arrays.items():
        path = folder / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return f"{path} is missing"
        except (OSError, ValueError, EOFError) as err:  # a short file: "mmap length is greater than file size"
            return f"{path} cannot be read, truncated or damaged ({type(err).__name__}: {err})"
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            return f"{path} holds {array.dtype} {array.shape}, not {np.dtype(dtype)} {tuple(shape)}"
    return None


def _space_shortfall(folder: Path, arrays: dict[str, tuple[tuple[int, ...], Any]], limit: str) -> str | None:
    """What :class:`DiskSpaceError` says when the bytes of ``arrays`` not yet on disk in ``folder`` (all of them
    for a new store; a sparse one's unwritten pages) exceed the free space there; None when they fit."""
    need = 0
    for name, (shape, dtype) in arrays.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        path = folder / f"{name}.npy"
        stat = path.stat() if path.is_file() else None
        # st_blocks: the 512-byte blocks on disk (absent on Windows, where the files are not sparse)
        written = min(size, getattr(stat, "st_blocks", size // 512 + 1) * 512) if stat is not None else 0
        need += size - written
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need <= free:
        return None
    return (f"{folder} needs {need:,} bytes ({need / 1e9:.2f} GB) more disk space, but only {free:,} bytes "
            f"({free / 1e9:.2f} GB) are free on the disk of {existing}: a memory map written past a full disk kills "
            f"the run. Free space there, put the run on a larger disk (--out), or lower {limit} below "
            f"{free / 1e9:.3g}")
