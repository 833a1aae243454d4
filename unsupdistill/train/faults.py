"""What can stop a training run early: stop signals (cluster preemption) and non-finite values.

Both end the run at a step boundary with the last good checkpoint on disk.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from unsupdistill.config import OptimConfig

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
    return next((name for name, t in state_dict.items()
                 if isinstance(t, Tensor) and t.is_floating_point() and not t.isfinite().all()), None)


def non_finite_report(what: str, *, step: int, epoch: float, world: int, loss: float, grad_norm: float,
                      values: dict[str, float], setting: str, bad_parameters: list[str], signals: dict[str, float],
                      warnings: list[str], saved_step: int | None, advice: list[str], resume: str) -> TrainingError:
    """The diagnosis of a non-finite loss or gradient: where, the settings and health then, what to try.

    Args:
        what: ``loss`` or ``gradients``.
        step: the 1-based step that failed; ``epoch`` its position in epochs.
        world: processes in the run.
        loss: the step's loss; ``grad_norm`` its total gradient norm.
        values: scheduled values of the step (lr, teacher temperature, ...).
        setting: loss scale, precision and device in words.
        bad_parameters: names of the parameters with non-finite gradients.
        signals: the health signals of the step; ``warnings`` their diagnoses.
        saved_step: the step of the last good checkpoint, None when none was written.
        advice: what to try, most likely first (see :func:`non_finite_advice`); ``resume`` the command that
            continues the run.
    """
    where = f" in at least one of {world} processes" if world > 1 else ""
    scheduled = ", ".join(f"{key} {value:.3g}" for key, value in values.items())
    lines = [f"non-finite {what}{where} at step {step} (epoch {epoch:.2f}): loss {loss:.4g}, total gradient norm "
             f"{grad_norm:.4g}, {scheduled}, {setting}"]
    if what == "gradients":
        lines.append(f"{len(bad_parameters)} parameter(s) with non-finite gradients"
                     + (f", first: {', '.join(bad_parameters[:4])}" if bad_parameters else
                        " (each is finite: their total norm overflowed)"))
    lines.append("health at this step: " + ", ".join(f"{key} {value:.4g}" for key, value in signals.items()))
    lines += warnings
    kept = ("no checkpoint was written yet" if saved_step is None else
            f"the last good checkpoint (step {saved_step}) is kept")
    lines.append(f"nothing of this step was applied (no optimizer step, no teacher update); {kept}")
    lines.append(f"try: {'; '.join(advice)}; then resume with: {resume} KEY=VALUE")
    return TrainingError("\n  ".join(lines))


def non_finite_advice(optim: OptimConfig, autocast_dtype: torch.dtype | None, device: torch.device) -> list[str]:
    """What to try after a non-finite loss or gradient, most likely first."""
    advice = [f"lower optim.lr (now {optim.lr:g})", f"raise optim.warmup_epochs (now {optim.warmup_epochs:g})"]
    if optim.clip_grad <= 0:
        advice.append("clip gradients (optim.clip_grad=3)")
    if autocast_dtype == torch.bfloat16 and device.type == "cpu":
        advice.insert(0, "use train.precision=fp32 (bf16 autocast on CPU can give non-finite gradients in "
                         "oneDNN kernels; unsupdistill.train.precision works around the one known)")
    elif autocast_dtype is not None:
        advice.append("use train.precision=fp32")
    return advice
