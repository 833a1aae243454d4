"""Files written so that a reader sees the old version or the new one, never half of one.

Checkpoints, exports, reports, scans and run status all go through :func:`atomic_write`; both
``train/`` and ``evaluate/`` import it from here.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
