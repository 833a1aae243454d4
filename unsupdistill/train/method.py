"""What a training method is to the engine: its networks, its step's loss, what it logs and what it exports.

The engine (:class:`unsupdistill.train.loop.Trainer`) owns the run: data, precision, schedules, time budget,
checkpoints, resume, stop signals, torchrun, metrics. It calls a method only through the hooks below, in
this order every step::

    method.start_epoch(epoch)                     # before an epoch's first step
    views = method.views(batch, sched)           # device augmentation of the batch's images
    loss = method.loss(views, sched)              # forward passes and the loss (autocast inside)
    signals = method.signals(sched)               # health, on logging steps only
    backward, clip, method.before_optimizer_step(sched), optimizer step
    method.after_optimizer_step(sched)            # EMA updates, queue pushes
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unsupdistill.config import Config
from unsupdistill.data.labeled import TrainingLabels
from unsupdistill.models.backbone import BackboneSpec
from unsupdistill.train.schedules import ScheduleValues
from unsupdistill.train.timing import TimeShares


@dataclass(frozen=True)
class Runtime:
    """Where and how the engine runs a method's networks.

    Attributes:
        device: the device of this process.
        autocast_dtype: bf16 or fp16 autocast, None for float32.
        world_size: processes in the run (torchrun), 1 without.
        run_dir: the run directory, where a method may keep files of its own (a teacher cache); None in a dry run.
        timer: the run's time shares; a method adds the seconds of its teacher's forwards (``timer.add("teacher",
            s)``) and, in a pass over the images before training, of decoding them.
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    world_size: int
    run_dir: Path | None = None
    timer: TimeShares = field(default_factory=TimeShares)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to the run's precision, or nothing for float32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@dataclass
class Batch:
    """One step's share of the data in this process.

    Attributes:
        images: (B, 3, H, W) uint8 images on the device.
        indices: (B,) int64 positions of the images in the dataset (CPU), to key per-image state (a teacher cache).
        labels: (B,) int64 class indices on the device, -1 for an unlabeled image; None when the run has no labels
            (``data.labels``).
    """

    images: Tensor
    indices: Tensor
    labels: Tensor | None = None


@dataclass
class Export:
    """The backbone a user gets from a method: its weights, how to rebuild it, and where it came from.

    Attributes:
        state_dict: the backbone's tensors.
        spec: timm name and arguments.
        source: ``teacher`` (DINO's EMA teacher), ``student`` or ``student_ema``.
        extra: more fields for the JSON sidecar (e.g. the teacher a student was distilled from).
        classifier: a classifier over the backbone's pooled features, ``(weight (C, D), bias (C,), class names)``,
            written beside it (``classifier.safetensors``); None for a method without labels.
    """

    state_dict: dict[str, Tensor]
    spec: BackboneSpec
    source: str
    extra: dict[str, Any]
    classifier: tuple[Tensor, Tensor, list[str]] | None = None


class Method(nn.Module):
    """A training method. Subclasses build their networks in ``__init__`` and set:

    Attributes:
        student: the module the optimizer trains (DDP wraps it under torchrun).
        spec: the student backbone's spec.
        image_size: the side images are decoded to before the device augmentation (``data.image_size``
            overrides it).
    """

    name: ClassVar[str]
    """The ``method`` value in the config."""
    command: ClassVar[str]
    """The CLI verb that runs it (and its resume commands)."""
    settings: ClassVar[dict[str, type]] = {}
    """The method's own config sections by name (dataclasses; a ``checks(self, config)`` method checks their values)."""
    uses_labels: ClassVar[bool] = False
    """Whether the method learns from ``data.labels``: its verb runs it when labels are given."""
    automatic_keys: ClassVar[frozenset[str]] = frozenset()
    """The config keys :meth:`auto_settings` may set."""
    crop_headroom: ClassVar[float] = 1.15
    """Automatic settings: the student's input is the images' shorter side / this (DINO: random crops from a decode
    somewhat larger than the crop, as ImageNet's 224 from 256)."""
    auto_batch: ClassVar[dict[str, int]] = {}
    """Automatic global batch per device type (``cpu``, ``cuda``); the shared default where absent."""

    def __init__(self, config: Config, runtime: Runtime) -> None:
        super().__init__()
        self.config, self.runtime = config, runtime
        self.student: nn.Module
        self.spec: BackboneSpec
        self.image_size: int
        self.run_student: nn.Module | None = None

    @classmethod
    def auto_settings(cls, chooser: Any, config: Config, facts: Any) -> None:
        """The method's part of the automatic settings of a folder without a recipe (``unsupdistill.auto``):
        ``chooser.set(key, value, why)`` for keys in :attr:`automatic_keys`; ``config`` holds the shared choices
        (crop size, network) and ``facts`` the folder's (images, shorter side, device)."""

    def setup(self, dataset: Dataset, labels: TrainingLabels | None = None) -> None:
        """Size what depends on the dataset, or keyed by its images, or on its labels (``data.labels``; None without):
        called once, before a checkpoint is restored."""

    def sync_batch_norm(self) -> None:
        """Replace the BatchNorm layers of the networks that see batches by SyncBatchNorm (CUDA under
        torchrun); the engine calls it before wrapping the student in DDP."""
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)

    def wrap_student(self, wrapped: nn.Module) -> None:
        """Use ``wrapped`` (the student inside DistributedDataParallel) for the student's forward passes."""
        self.run_student = wrapped

    def student_forward(self, *args: Any) -> Any:
        """The student's forward, through DDP when the run has several processes."""
        return (self.run_student or self.student)(*args)

    def start_epoch(self, epoch: int) -> None:
        """Called before the first step of every epoch (0-based), a resumed partial epoch included."""

    def views(self, batch: Batch, sched: ScheduleValues) -> Any:
        """The augmented views of a batch (``batch.images``: (B, 3, H, W) uint8 on the device), at step ``sched``."""
        raise NotImplementedError

    def loss(self, views: Any, sched: ScheduleValues) -> Tensor:
        """The step's loss (a float32 scalar) from the views; keeps what :meth:`signals` needs."""
        raise NotImplementedError

    def signals(self, sched: ScheduleValues) -> dict[str, float]:
        """Health signals of the last :meth:`loss` call."""
        return {}

    def forecast_seconds(self, epoch: int) -> float:
        """Seconds a step of ``epoch`` is expected to take more (negative: less) than this process's average step
        so far, for a time budget's plan (a teacher that stops running after the first epochs); 0 by default."""
        return 0.0

    def scheduled(self, sched: ScheduleValues) -> dict[str, float]:
        """The method's own scheduled values at ``sched``, logged beside lr and weight decay."""
        return {}

    @classmethod
    def unused_keys(cls, config: Config) -> set[str]:
        """Dotted config keys (sections or fields) this method does not read with ``config``; left out of the
        run's ``config.yaml`` so that it shows only what the run used. By default the other methods' sections."""
        return {name for name in config.sections if name not in cls.settings}

    @classmethod
    def teacher_of(cls, config: Config) -> tuple[str, int | None] | None:
        """The frozen teacher a run learns from (its spec and input size, for the end-of-run table); None: none."""
        return None

    curves: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()
    """The method's own panels of ``training_curves.png``: (title, the ``metrics.jsonl`` keys drawn), after the
    shared ones (loss, k-NN, learning rate)."""

    def exported_network(self) -> str:
        """The key of :meth:`checkpoint_state` that holds the network :meth:`export` gives: a checkpoint records it
        (``exported``), so evaluating or exporting a checkpoint takes the same network as the run's export."""
        return "student"

    def warnings(self, signals: dict[str, float]) -> dict[str, str]:
        """Plain-words diagnoses of failure modes by kind (e.g. collapse); empty when healthy."""
        return {}

    def before_optimizer_step(self, sched: ScheduleValues) -> None:
        """Change gradients before the step (e.g. freeze DINO's last layer)."""

    def after_optimizer_step(self, sched: ScheduleValues) -> None:
        """Updates that follow the student (EMA networks, queues)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything of the method a resumed run needs: state_dicts of its networks and buffers."""
        raise NotImplementedError

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state`."""
        raise NotImplementedError

    def probe_backbone(self) -> nn.Module:
        """The backbone the k-NN probe during training measures (the one that will be exported)."""
        raise NotImplementedError

    def export(self) -> Export:
        """The backbone to export at the end of the run."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the start-of-run log."""
        return f"{self.name}: {self.spec.name}"
