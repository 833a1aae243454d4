"""Distillation with labels: its settings (the ``kd`` section, and distillation's), torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from unsupdistill.config.sections import CSV_FORMAT
from unsupdistill.methods.distill.settings import FLAGS as DISTILL_FLAGS
from unsupdistill.methods.distill.settings import DistillConfig
from unsupdistill.registry import Flag

if TYPE_CHECKING:
    from unsupdistill.config import Config


@dataclass
class KDConfig:
    """Distillation with labels (the ``kd`` section; the teacher, its input, the views and the cache are the
    ``distill`` section's)."""

    alpha: float = 0.9
    """Weight ``a`` of the teacher's soft labels against the hard labels: (1 - a) * CE + a * T^2 * KL. 0.9 beat 0.5 by
    6.0 points of the classifier's top-1 in 10-minute CIFAR-10 trials with 10 % of the labels (BENCHMARKS.md)."""
    temperature: float = 4.0
    """Softmax temperature ``T`` of the soft term (Hinton et al.: 2 to 20)."""
    feature_weight: float = 1.0
    """Weight of the feature term (the student's projected features against the teacher's, on every image)."""
    soft_images: Literal["all", "labeled"] = "all"
    """Which images the soft term covers: all (the teacher's class probabilities teach on the unlabeled images too;
    semi-supervised distillation) or labeled (the images with a label only, Hinton et al.'s setting)."""

    def checks(self, config: Config) -> list[tuple[bool, str, str]]:
        """(ok, key, what is allowed) for the values types cannot check."""
        return [
            (0 <= self.alpha <= 1, "kd.alpha", "a weight in [0, 1] (0: labels only, 1: the teacher only)"),
            (self.temperature > 0, "kd.temperature", "a number > 0"),
            (self.feature_weight >= 0, "kd.feature_weight", "a number >= 0 (0: no feature term)"),
            (config.method != "kd" or config.data.labels is not None, "data.labels",
             "labels for method=kd: a folder of class subfolders or a path,label CSV of images in data.path "
             "(the distill command's --labels)"),
        ]


SECTIONS = {"distill": DistillConfig, "kd": KDConfig}
"""The config sections kd reads: distillation's (the teacher, its input, the views and the cache) and its own."""

FLAGS = (*DISTILL_FLAGS, Flag("--labels", "data.labels", metavar="LABELED",
              help="labels of some or all of the images (sets data.labels): a folder of class subfolders or a "
                   f".csv file ({CSV_FORMAT}) of images inside the image folder; the student then learns from the "
                   "labels and the teacher's class probabilities too (method kd), and exports a classifier"),)
"""The flags kd takes: distillation's ``--teacher``, and ``--labels`` (which also makes kd the ``distill`` verb's
method)."""
