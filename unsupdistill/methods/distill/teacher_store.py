"""The teacher's stored views (FKD, Shen & Xing 2022) as distillation uses them with ``distill.targets=views``.

The first ``distill.cache_views`` epochs store each image's view (crop box, flip, colour jitter) with the teacher's
features for it in RUN/teacher_cache; later epochs replay one of the stored views without running the teacher.
:class:`TeacherStore` owns the decision (whether the cache pays, and why), the files, which stored view each image
replays (lookup), the features of a step through it (store), the seconds it saves later (a time budget's forecast)
and the flush at each epoch's start.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unsupdistill import distributed
from unsupdistill.augment.distill import VIEW_PARAMS
from unsupdistill.data.fingerprint import data_fingerprint
from unsupdistill.methods.distill.settings import DistillConfig
from unsupdistill.models.backbone import forward_gflops
from unsupdistill.models.teacher_cache import CACHE_DIR, TeacherCache, cache_bytes, cache_key
from unsupdistill.models.teachers import Teacher

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StoredViews:
    """One step's views as the store chose them.

    Attributes:
        params: (B, P) the views' parameters: a stored view's where the image replays one, else the new draw.
        run_teacher: (B,) bool, the images whose teacher features are computed (and stored) this step.
        stored: (B, D) float16 features of the replayed views (rows where ``run_teacher`` is False count).
        slots: (B,) the cache slots of the views.
    """

    params: Tensor
    run_teacher: Tensor
    stored: Tensor
    slots: Tensor


class TeacherStore:
    """The teacher cache of a distillation run: decided at construction, opened by :meth:`open` (None in a dry run
    or when it does not pay; :attr:`active` says whether it is in use).

    Args:
        d: the ``distill`` section.
        epochs: ``train.epochs`` (a cache pays only with epochs left to replay its views).
        teacher: the frozen teacher.
        student: the student's backbone and input size, whose training step the teacher's forward is weighed
            against (about 3 forwards).
        use_maps: the run stores the teacher's maps instead (``distill.targets=map``): no cache.
        device: the run's device (the forecast times CPU runs only: CUDA runs asynchronously).
        unavailable: why the cache cannot serve this run's data (sounds), or None where it can.
    """

    def __init__(self, d: DistillConfig, epochs: int, teacher: Teacher, student: tuple[nn.Module, int],
                 use_maps: bool, device: torch.device, unavailable: str | None = None) -> None:
        self.d, self.teacher, self.device = d, teacher, device
        self.cache: TeacherCache | None = None
        self.wanted = False
        self.reason = unavailable or self._decide(epochs, student, use_maps)
        self.epoch = 0
        self._view_seconds = 0.0
        # the teacher's seconds (views and forward) over this process's steps, for a time budget's plan
        self._timing = {"steps": 0, "teacher_s": 0.0, "recording_steps": 0, "recording_s": 0.0}

    @property
    def active(self) -> bool:
        return self.cache is not None

    @torch.no_grad()
    def _decide(self, epochs: int, student: tuple[nn.Module, int], use_maps: bool) -> str:
        """Whether the cache is wanted (``self.wanted``) and why, from ``distill.cache`` and the cost of the
        teacher's forward against the student's training step (about 3 forwards), in FLOPs per image."""
        d = self.d
        if use_maps:
            return "not needed: the teacher's maps are stored once per image (distill.targets=map)"
        if d.cache is False:
            return "off (distill.cache=false)"
        if d.mixup_alpha > 0 or d.dense_weight > 0:
            return "off: a mixed view's or a patch map's teacher output cannot be stored"
        teacher = forward_gflops(self.teacher.backbone, self.teacher.input_size)
        step = 3 * forward_gflops(*student)
        cost = f"teacher {teacher:.3g} GFLOPs per image, student step {step:.3g}"
        if d.cache == "auto" and teacher <= step:
            return f"off: the teacher costs no more than the student's step ({cost}); distill.cache=true forces it"
        if d.cache == "auto" and epochs <= d.cache_views:
            return f"off: {epochs} epochs leave none to replay {d.cache_views} stored views (distill.cache_views)"
        self.wanted = True
        return f"on ({cost})" if d.cache == "auto" else "on (distill.cache=true)"

    def open(self, dataset: Dataset, run_dir: Path | None, student_size: int) -> None:
        """Open (or reuse) RUN/teacher_cache for ``dataset``, as many views per image as ``distill.cache_max_gb``
        holds; nothing in a dry run (``run_dir`` None) or when the cache is not wanted."""
        d, num_images = self.d, len(dataset)
        if not self.wanted or run_dir is None:
            return
        views, per_view = d.cache_views, cache_bytes(num_images, 1, self.teacher.feature_dim, len(VIEW_PARAMS))
        if views * per_view > d.cache_max_gb * 1e9:
            views = int(d.cache_max_gb * 1e9 // per_view)
            logger.warning("teacher cache: %d views per image would take %.2f GB, more than distill.cache_max_gb=%g; "
                           "storing %d", d.cache_views, d.cache_views * per_view / 1e9, d.cache_max_gb, views)
        if views < 1:
            self.reason = f"off: one view per image takes {per_view / 1e9:.2f} GB > distill.cache_max_gb"
            return
        folder = run_dir / CACHE_DIR
        logger.info("teacher cache: %d images x %d views x %d-d fp16 features = %.2f GB in %s (limit "
                    "distill.cache_max_gb=%g); the teacher runs in the first %d epochs, later epochs replay its views",
                    num_images, views, self.teacher.feature_dim, views * per_view / 1e9, folder, d.cache_max_gb, views)
        key = cache_key(teacher=self.teacher.cache_key, teacher_size=self.teacher.input_size,
                        student_size=student_size, images=data_fingerprint(dataset),
                        views=dataclasses.asdict(d.view), view_params=VIEW_PARAMS)
        self.cache = TeacherCache.open(folder, key, num_images, views, self.teacher.feature_dim, len(VIEW_PARAMS))
        self.reason = f"on: {views} views per image in {folder}"

    def start_epoch(self, epoch: int) -> None:
        """Flush what the last epoch stored; every process's views are on disk before any replays them."""
        self.epoch = epoch
        if self.cache is not None:
            self.cache.flush()
            distributed.barrier()

    def lookup(self, indices: Tensor, params: Tensor) -> StoredViews:
        """The views of a step's images: in a recording epoch a new view per image, in slot ``epoch``; in a replay
        epoch one of the stored ones. A slot already filled (a reused cache, or steps stored before a resume) replays
        its view; an empty one (a recording epoch, or a dropped last batch's image) runs the teacher and is stored."""
        assert self.cache is not None
        if self.epoch < self.cache.views:
            slots = torch.full_like(indices, self.epoch)
        else:
            slots = torch.randint(self.cache.views, indices.shape)
        stored_params, stored, filled = self.cache.lookup(indices, slots)
        return StoredViews(torch.where(filled[:, None], stored_params, params), ~filled, stored, slots)

    def timed_views(self, seconds: float) -> None:
        """The seconds this step spent rendering the teacher's views (its forward is counted in :meth:`features`)."""
        self._view_seconds = seconds

    def features(self, views: StoredViews, indices: Tensor, computed: Tensor | None, forward_seconds: float) -> Tensor:
        """The step's teacher features (B, D), fp16-rounded as stored: from the store, or ``computed`` now for the
        images that ran the teacher (stored for later epochs); the teacher's seconds are counted for the forecast."""
        assert self.cache is not None
        run = views.run_teacher
        features = torch.empty(len(run), self.teacher.feature_dim, device=self.device)
        if computed is not None:
            computed = computed.detach().to(torch.float16)
            features[run.to(features.device)] = computed.float()
            self.cache.store(indices[run], views.slots[run], views.params[run], computed)
        if not run.all():
            features[~run.to(features.device)] = views.stored[~run].to(features.device).float()
        self._count(forward_seconds)
        return features

    def _count(self, forward_seconds: float) -> None:
        seconds = forward_seconds + self._view_seconds
        t = self._timing
        t["steps"] += 1
        t["teacher_s"] += seconds
        if self.cache is not None and self.epoch < self.cache.views:
            t["recording_steps"] += 1
            t["recording_s"] += seconds

    def forecast_seconds(self, epoch: int) -> float:
        """With the cache on a CPU: a replay epoch's steps save the teacher's seconds of a recording epoch's."""
        t = self._timing
        if self.cache is None or not t["steps"] or self.device.type != "cpu":  # CUDA: not timed (async)
            return 0.0
        recording = t["recording_s"] / t["recording_steps"] if t["recording_steps"] else 0.0
        expected = recording if epoch < self.cache.views else 0.0
        return expected - t["teacher_s"] / t["steps"]
