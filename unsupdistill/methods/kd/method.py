"""Distillation with labels: a frozen teacher and the user's labels teach a small student together.

The student's classifier learns from the labels of the labeled images and from the teacher's softened class
probabilities on every image (Hinton et al. 2015, :class:`~unsupdistill.losses.KDLoss`; ``kd.soft_images``); on
every image its features also keep matching the teacher's as in
:class:`~unsupdistill.methods.distill.Distillation` (the feature term, weight ``kd.feature_weight``), so the
unlabeled majority teaches twice. The teacher's class probabilities come from its own classifier when it has one
over the labels' classes (a model of ours distilled with labels: a born-again generation), else from a linear head
fitted before training on the frozen teacher's features of the labeled images (the probe grid of
``unsupdistill eval``). The student exports its backbone and its classifier.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from unsupdistill import distributed
from unsupdistill.config import Config, ConfigError
from unsupdistill.data.labeled import TrainingLabels
from unsupdistill.evaluate.linear_grid import linear_probe_grid
from unsupdistill.losses import KDLoss
from unsupdistill.methods.distill.method import Distillation, DistillViews
from unsupdistill.methods.kd.settings import SECTIONS
from unsupdistill.models.classifier import Classifier
from unsupdistill.train.method import Batch, Export, Runtime
from unsupdistill.train.schedules import ScheduleValues

logger = logging.getLogger(__name__)


class KnowledgeDistillation(Distillation):
    """Distillation from the frozen ``distill.teacher`` with the labels of ``data.labels``."""

    name = "kd"
    command = "distill"
    uses_labels = True
    settings: ClassVar[dict[str, type]] = SECTIONS

    def __init__(self, config: Config, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        self.kd_loss = KDLoss(config.kd.alpha, config.kd.temperature)
        self.teacher_classifier: Classifier | None = None
        self.teacher_head_source = ""
        self.labels: TrainingLabels | None = None

    def setup(self, dataset: Dataset, labels: TrainingLabels | None = None) -> None:
        if labels is None or labels.labeled == 0:
            raise ConfigError("method kd learns from labels, but no training image has one: set data.labels (the "
                              "distill command's --labels) to a folder of class subfolders or a path,label CSV "
                              "whose images are in data.path")
        super().setup(dataset, labels)
        self.labels = labels
        self.teacher_classifier = self._teacher_classifier(dataset, labels).to(self.runtime.device)
        classifier = Classifier(self.spec.feature_dim, labels.classes)
        self.student.classifier = classifier.to(self.runtime.device)
        if self.ema is not None:
            self.ema.classifier = copy.deepcopy(classifier).requires_grad_(False)

    def _teacher_classifier(self, dataset: Dataset, labels: TrainingLabels) -> Classifier:
        """The teacher's own classifier mapped onto the labels' classes, or a linear head fitted on its features."""
        own = self.teacher.classifier
        if own is not None:
            missing = [name for name in labels.classes if name not in own.classes]
            if missing:
                raise ConfigError(f"{labels.source} has classes the teacher's classifier does not know "
                                  f"({', '.join(repr(m) for m in missing[:5])}); its classes: "
                                  f"{', '.join(own.classes[:20])}. Label with those classes, or distill from a teacher "
                                  "without a classifier (a head is then fitted to your labels)")
            rows = torch.tensor([own.classes.index(name) for name in labels.classes])
            mapped = Classifier(own.in_features, labels.classes)
            mapped.load_state_dict({"weight": own.weight[rows], "bias": own.bias[rows]})
            self.teacher_head_source = f"the teacher's own classifier ({len(own.classes)} classes)"
            return mapped.requires_grad_(False).eval()
        fitted = self._fit_teacher_head(dataset, labels) if distributed.is_main_process() else None
        weight, bias, held_out = distributed.broadcast_object(fitted)  # fitted once, the same head in every process
        head = Classifier(weight.shape[1], labels.classes)
        head.load_state_dict({"weight": weight, "bias": bias})
        self.teacher_head_source = (f"a linear head fitted on the teacher's features of the {labels.labeled} labeled "
                                    f"images ({held_out:.1f} % on a held-out fifth)")
        logger.info("teacher head: %s", self.teacher_head_source)
        return head.requires_grad_(False).eval()

    def _fit_teacher_head(self, dataset: Dataset, labels: TrainingLabels) -> tuple[Tensor, Tensor, float]:
        """A linear head (C, Dt), (C,) on the frozen teacher's features of the labeled images, by the probe grid,
        and its top-1 (%) on the grid's held-out fifth."""
        features, targets = self._teacher_features(dataset, labels)
        result = linear_probe_grid(features, targets, features, targets, device="cpu", seed=self.config.train.seed,
                                   classifier=True)
        weight, bias = result["linear"]
        return weight, bias, max(point["top1"] for point in result["val_top1"])

    def _teacher_features(self, dataset: Dataset, labels: TrainingLabels) -> tuple[Tensor, Tensor]:
        """The frozen teacher's features (N, Dt) of the whole labeled images, as the student's targets hold them, and
        their classes (N,): the labeled images only, as the training set holds them."""
        rows = (labels.labels >= 0).nonzero().squeeze(1)
        return self.whole_image_targets(dataset, rows), labels.labels[rows]

    def describe(self) -> str:
        labels = self.labels
        told = f"; labels: {labels.labeled} of {len(labels.labels)} images, {len(labels.classes)} classes" \
            if labels is not None else ""
        return f"{super().describe()}{told}; teacher's class probabilities from {self.teacher_head_source}"

    def views(self, batch: Batch, sched: ScheduleValues) -> DistillViews:
        views = super().views(batch, sched)
        views.labels = batch.labels
        return views

    def loss(self, views: DistillViews, sched: ScheduleValues) -> Tensor:
        out = self.forward_views(views)
        feature = self.feature_loss(out, sched)
        labeled = views.labels >= 0  # (B,)
        student_logits = out.student_logits.float()  # (B, C)
        with torch.no_grad():
            teacher_logits = self.teacher_classifier(out.teacher_pooled.float())  # (B, C)
        if self.config.kd.soft_images == "all":  # the soft term on every image, the hard term on the labeled ones
            kd = self.kd_loss(student_logits, teacher_logits, views.labels)
        elif labeled.any():
            kd = self.kd_loss(student_logits[labeled], teacher_logits[labeled], views.labels[labeled])
        else:  # no labeled image in this batch: the classifier still joins the graph (DDP expects its gradients)
            kd = 0.0 * student_logits.sum()
        self._last |= {"kd": kd.detach(), "labeled": labeled.float().mean(),
                       "student_hits": (student_logits.argmax(1) == views.labels)[labeled].float().sum(),
                       "teacher_hits": (teacher_logits.argmax(1) == views.labels)[labeled].float().sum(),
                       "labeled_count": labeled.sum()}
        return self.config.kd.feature_weight * feature + kd

    @torch.no_grad()
    def signals(self, sched: ScheduleValues) -> dict[str, float]:
        last, out = self._last, super().signals(sched)
        count = max(int(last["labeled_count"]), 1)
        out |= {"kd_loss": last["kd"].item(), "labeled_share": last["labeled"].item(),
                "student_label_accuracy": last["student_hits"].item() / count,
                "teacher_label_accuracy": last["teacher_hits"].item() / count}
        return out

    def checkpoint_state(self) -> dict[str, Any]:
        return super().checkpoint_state() | {"teacher_classifier": self.teacher_classifier.state_dict(),
                                             "classes": list(self.labels.classes)}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if state.get("classes") != list(self.labels.classes):
            raise ConfigError(f"the checkpoint was trained on classes {state.get('classes')}, but {self.labels.source} "
                              f"gives {self.labels.classes}; resume with the run's own data.labels")
        super().load_checkpoint_state(state)
        self.teacher_classifier.load_state_dict(state["teacher_classifier"])  # the head the run started with

    def export(self) -> Export:
        export = super().export()
        classifier = (self.ema or self.student).classifier
        export.classifier = (classifier.weight.detach(), classifier.bias.detach(), list(self.labels.classes))
        export.extra |= {"classes": list(self.labels.classes)}
        return export
