"""k-NN of a backbone on a labeled set during training, handed to the engine as a callback."""

from __future__ import annotations

import torch
from torch import nn

from unsupdistill.config import Config
from unsupdistill.data.labeled import align_labels, load_labeled
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.knn import knn_accuracy


class KNNProbe:
    """k-NN top-1 on ``eval.test`` with ``eval.train`` as memory, at the run's crop size and normalisation.

    The labeled sets are read when it is built, so a bad ``eval.train``/``eval.test`` fails before training.

    Args:
        config: the run's config (its ``eval`` and ``model`` sections).
        device: where the backbone runs.
    """

    def __init__(self, config: Config, device: torch.device) -> None:
        self.eval, self.model, self.device = config.eval, config.model, device
        size = config.model.input_size
        self.train_set = load_labeled(config.eval.train, size, "train")
        self.test_set = load_labeled(config.eval.test, size, "test")
        self.test_labels = align_labels(self.train_set, self.test_set)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        m, e = self.model, self.eval
        was_training = backbone.training
        # fp32, as `unsupdistill eval` (bf16 features moved results by more than 0.2 points)
        features = [extract_features(backbone, ds, m.input_size, m.mean, m.std, device=self.device,
                                     progress=False) for ds in (self.train_set, self.test_set)]
        backbone.train(was_training)  # DINO's teacher runs in train mode during pretraining
        top1 = knn_accuracy(features[0], self.train_set.labels, features[1], self.test_labels, e.k, e.temperature)
        return {"knn_top1": top1, "knn_k": e.k}
