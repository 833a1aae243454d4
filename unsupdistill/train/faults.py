"""What can stop a training run early: stop signals (cluster preemption) and non-finite values.

Both end the run at a step boundary with the last good checkpoint on disk.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from torch import Tensor

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient, a checkpoint that cannot be written); the last
    good checkpoint is kept."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary, after a checkpoint of that step was written.

    Args:
        message: what happened and the resume command.
        step: the step the checkpoint holds.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class StopRequest:
    """While entered, SIGTERM and SIGINT ask training to stop at the next step boundary (cluster preemption).

    Handlers are installed only in the main thread (Python allows no other) and the previous ones are
    restored on exit. A SIGINT after the first signal raises KeyboardInterrupt at once, for a user who
    will not wait for the step to end.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        """Name of the first signal received (``SIGTERM``, ``SIGINT``); None until one arrives."""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name
            logger.warning("%s received: stopping after this step, with a checkpoint (a second Ctrl-C stops "
                           "at once, without one)", self.received)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM and SIGINT to the training process, which stops at a step
    boundary; a Ctrl-C or a scheduler's SIGTERM to the whole process group would kill workers mid-epoch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def first_non_finite(state_dict: dict[str, Tensor]) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an Inf; None when all are finite."""
    return next((name for name, t in state_dict.items() if t.is_floating_point() and not t.isfinite().all()), None)
