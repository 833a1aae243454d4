"""Where a run's wall time goes: decoding, view rendering, the teacher, the student's step and the rest.

A distillation run on photos can spend its whole budget decoding 224-px JPEGs and running the teacher while the
student trains for a minute (issue 33: 2.8 epochs in 900 s); these shares, logged at the end of every run, say
which part holds a run back. The engine times its phases (waiting for the loader's batch, the method's views,
the loss, backward and optimizer step), and a method adds what it times inside them (its teacher's forwards) or
before the first step (a pass of the teacher over the images). On CUDA the phases are timed on the host
(kernels are asynchronous): the shares are a CPU run's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PARTS = ("decode", "views", "teacher", "student")
"""The named parts; the rest (checkpoints, logging, probes, start-up) is what the wall time leaves over."""


class TimeShares:
    """Seconds spent in each of :data:`PARTS` over a span of wall time that starts at :meth:`start`."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.started: float | None = None
        self.before = 0.0

    def start(self) -> None:
        """Start the wall clock (once; later calls keep the first start)."""
        if self.started is None:
            self.started = time.perf_counter()

    def state_dict(self) -> dict:
        """The seconds so far, for a checkpoint."""
        return {"seconds": dict(self.seconds), "wall": self.wall()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state_dict`: its seconds are added to those of this session."""
        for part, value in state.get("seconds", {}).items():
            if part in self.seconds:
                self.seconds[part] += float(value)
        self.before = float(state.get("wall", 0.0))

    def add(self, part: str, seconds: float) -> None:
        if part not in self.seconds:
            raise KeyError(f"unknown time share {part!r}; one of {', '.join(PARTS)}")
        self.seconds[part] += seconds

    @contextmanager
    def measure(self, part: str) -> Iterator[None]:
        """Add the block's seconds to ``part``."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - tic)

    def wall(self) -> float:
        """Wall seconds since :meth:`start` (with a resumed run's earlier seconds)."""
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def record(self) -> dict[str, float]:
        """``time_<part>_s`` and ``time_<part>_share`` for every part and ``rest``, and ``time_wall_s``."""
        wall = self.wall()
        seconds = dict(self.seconds, rest=max(0.0, wall - sum(self.seconds.values())))
        out = {f"time_{part}_s": round(value, 2) for part, value in seconds.items()}
        out |= {f"time_{part}_share": round(value / wall, 4) if wall > 0 else 0.0 for part, value in seconds.items()}
        return out | {"time_wall_s": round(wall, 2)}

    def line(self) -> str:
        """``decode 3 %, views 5 %, teacher 18 %, student 70 %, rest 4 % of 900 s``."""
        r = self.record()
        parts = ", ".join(f"{part} {100 * r[f'time_{part}_share']:.0f} %" for part in (*PARTS, "rest"))
        return f"{parts} of {r['time_wall_s']:.0f} s"
