"""What a run directory says about its run: ``config.yaml``, ``skipped.txt`` and ``status.json``.

``status.json`` tells how a run ended, for a scheduler's requeue script.

torchrun reports any worker's non-zero exit as 1, so exit status 75 (preempted, checkpoint written)
cannot be told from a diverged run by the exit status alone. Process 0 writes ``status.json`` in the
run directory when the run starts and at every exit:

- ``running``: training (or a process was killed before it could say otherwise: check ``pid``);
- ``done``: finished and exported; ``backbone`` names the export;
- ``preempted``: stopped by SIGTERM/SIGINT after ``step``, with a checkpoint; ``resume`` is the command;
- ``failed``: ``reason`` says why (non-finite values, bad input, a checkpoint that cannot be written, ...).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from torch.utils.data import Dataset

from unsupdistill import distributed
from unsupdistill import run_dir as layout
from unsupdistill.config import Config
from unsupdistill.data import write_skipped
from unsupdistill.storage import atomic_write, remove_stale_temp_files

logger = logging.getLogger(__name__)

STATUS_FILE = layout.STATUS
State = Literal["running", "done", "preempted", "failed"]


def resume_command(run_dir: Path, verb: str = "pretrain") -> str:
    """The command that continues the run, launched the way this one was (torchrun or not); ``verb`` is the
    command that started it (``pretrain`` or ``distill``)."""
    target = shlex.quote(str(Path(run_dir).absolute()))
    world = distributed.launched_world_size()
    if world > 1:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        launcher = f"torchrun --nnodes {nodes} --nproc_per_node {per_node} -m unsupdistill" if nodes > 1 else \
            f"torchrun --standalone --nproc_per_node {per_node} -m unsupdistill"
    else:
        launcher = "unsupdistill"
    return f"{launcher} {verb} --resume {target}"


def write_status(run_dir: Path, state: State, exit_code: int | None = None, **details: Any) -> None:
    """Write ``run_dir/status.json`` atomically (process 0 only; a no-op elsewhere).

    Args:
        run_dir: the run directory.
        state: running, done, preempted or failed.
        exit_code: the exit status of ``unsupdistill pretrain`` in process 0 (None while running).
        details: e.g. ``step``, ``resume``, ``reason``, ``backbone``.
    """
    if not distributed.is_main_process():
        return
    status = {"state": state, "exit_code": exit_code, **details,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
              "processes": distributed.launched_world_size(), "command": shlex.join(sys.argv)}
    text = json.dumps(status, indent=2, default=str) + "\n"
    atomic_write(Path(run_dir) / STATUS_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's status, or None if it has none (yet)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_run_files(run_dir: Path, config: Config, notes: str, dataset: Dataset,
                    unused: set[str] = frozenset()) -> None:
    """At the start of a run (process 0): remove temporary files of writers killed mid-write, write
    ``config.yaml`` (``notes`` as comment lines on top, without the dotted keys in ``unused``: what the run's
    method does not read) and list the dataset's unreadable files in ``skipped.txt``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, layout.checkpoints_dir(run_dir)):
        for tmp in remove_stale_temp_files(folder):
            logger.info("removed %s, left by a process killed while writing", tmp)
    comments = "".join(f"# {line}\n" for line in notes.splitlines())
    values = config.to_dict()
    for key in unused:
        *parents, last = key.split(".")
        node = values
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    (run_dir / layout.CONFIG).write_text(comments + yaml.safe_dump(values, sort_keys=False, allow_unicode=True),
                                         encoding="utf-8")
    skipped = write_skipped(dataset, run_dir / "skipped.txt")
    if skipped:
        logger.info("%d unreadable files listed in %s", skipped, run_dir / "skipped.txt")
