"""Metrics to JSON lines and TensorBoard, written by the main process only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from unsupdistill.run_dir import METRICS, TENSORBOARD, read_metrics
from unsupdistill.storage import atomic_write

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Append one JSON object per log step to ``metrics.jsonl`` and mirror scalars to TensorBoard.

    On a resume from step S, records after S (logged by a run killed after its checkpoint) are dropped
    from both: ``metrics.jsonl`` is rewritten atomically, and TensorBoard purges events from step S + 1.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS
        if resume_step is not None:
            self._keep_until(resume_step)
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def _keep_until(self, step: int) -> None:
        """Rewrite ``metrics.jsonl`` with the records of steps up to ``step``; drop damaged lines with a warning."""
        if not self.path.exists():
            return
        records, damaged = read_metrics(self.path)
        kept = [record for record in records if record["step"] <= step]
        if damaged:
            logger.warning("%s: dropped %d line(s) that are not complete JSON records with a step (a writer killed "
                           "mid-line)", self.path, damaged)
        if len(kept) < len(records):
            logger.info("%s: dropped %d record(s) logged after step %d, which the resumed run logs again",
                        self.path, len(records) - len(kept), step)
        if damaged or len(kept) < len(records):
            text = "".join(json.dumps(record) + "\n" for record in kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        self.writer.close()
