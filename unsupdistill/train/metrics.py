"""Metrics to JSON lines and TensorBoard, written by the main process only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from unsupdistill.storage import atomic_write

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Append one JSON object per log step to ``metrics.jsonl`` and mirror scalars to TensorBoard.

    On a resume from step S, records after S (logged by a run killed after its checkpoint) are dropped
    from both: ``metrics.jsonl`` is rewritten atomically, and TensorBoard purges events from step S + 1.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._keep_until(resume_step)
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def _keep_until(self, step: int) -> None:
        """Rewrite ``metrics.jsonl`` with the records of steps up to ``step``; drop damaged lines with a warning."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept, damaged, later = [], [], 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_step = int(record.get("step", 0))
            except (ValueError, TypeError, AttributeError):
                damaged.append(number)
                continue
            if record_step <= step:
                kept.append(line)
            else:
                later += 1
        if damaged:
            where = "its last line" if damaged == [len(lines)] else f"line(s) {', '.join(map(str, damaged[:5]))}"
            logger.warning("%s: dropped %s, which is not a complete JSON record (a writer killed mid-line)",
                           self.path, where)
        if later:
            logger.info("%s: dropped %d record(s) logged after step %d, which the resumed run logs again",
                        self.path, later, step)
        if damaged or later:
            text = "".join(line + "\n" for line in kept)
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
