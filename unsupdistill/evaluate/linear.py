"""Linear probe on frozen features: logistic regression with its L2 strength chosen on held-out train data.

DINO (Caron et al. 2021) trains a linear layer with SGD on the frozen features of the last blocks;
here the classifier is scikit-learn's multinomial logistic regression (lbfgs) on precomputed,
standardised features, which needs no learning-rate schedule and fits in seconds on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import top_k_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from unsupdistill.config import ConfigError

DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)
"""Inverse L2 strengths tried by :func:`linear_probe`, log-spaced."""


def _logistic_regression(max_iter: int) -> Pipeline:
    """Standardisation (statistics of the data it is fitted on) then multinomial L2 logistic regression."""
    # warm_start: each C of the grid starts from the previous solution, a few times faster than cold starts
    return make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True))


def select_regularisation(
    train_x: Tensor, train_y: Tensor, *, val_fraction: float = 0.2, Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0, max_iter: int = 1000,
) -> tuple[float, dict[float, float]]:
    """Choose the logistic regression's C on a stratified held-out part of the train split.

    Only train data comes in, so the choice cannot see the test split.

    Args:
        train_x: train features (N, D).
        train_y: train class indices (N,).
        val_fraction: share of the train split held out to score each C.
        Cs: inverse L2 strengths to try.
        seed: seed of the held-out split.
        max_iter: lbfgs iterations per fit.

    Returns:
        The C with the best held-out top-1 (the smallest on ties), and the top-1 (%) of every C.
    """
    x, y = _numpy(train_x, train_y)
    fit_x, val_x, fit_y, val_y = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    model = _logistic_regression(max_iter)
    val_top1 = {}
    for C in sorted(Cs):  # small to large: the warm start moves from a simpler to a less regular solution
        model.set_params(logisticregression__C=C).fit(fit_x, fit_y)
        val_top1[float(C)] = float((model.predict(val_x) == val_y).mean() * 100)
    best = max(val_top1.values())
    return min(C for C, top1 in val_top1.items() if top1 == best), val_top1


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, val_fraction: float = 0.2,
    Cs: Sequence[float] = DEFAULT_CS, seed: int = 0, max_iter: int = 1000,
) -> dict[str, Any]:
    """Linear-probe accuracy of frozen features (the linear evaluation of DINO, Caron et al. 2021).

    C is chosen by :func:`select_regularisation` on the train split alone; the model is then refitted
    on the whole train split (standardised with the train statistics) and scored once on the test split.

    Args:
        train_x: train features (N, D).
        train_y: train class indices (N,).
        test_x: test features (M, D).
        test_y: test class indices (M,), into the same classes as ``train_y``.
        val_fraction: share of the train split held out to choose C.
        Cs: inverse L2 strengths to try.
        seed: seed of the held-out split.
        max_iter: lbfgs iterations per fit.

    Returns:
        ``top1`` (%), ``top5`` (%, only with more than 5 classes), ``best_C``, ``val_top1_by_C``
        (held-out top-1 % of each C) and ``predictions`` (M,) int64 test predictions.
    """
    best_C, val_top1 = select_regularisation(train_x, train_y, val_fraction=val_fraction, Cs=Cs, seed=seed,
                                             max_iter=max_iter)
    x, y = _numpy(train_x, train_y)
    model = _logistic_regression(max_iter).set_params(logisticregression__C=best_C).fit(x, y)
    tx, ty = _numpy(test_x, test_y)
    predictions = model.predict(tx)
    result: dict[str, Any] = {"top1": float((predictions == ty).mean() * 100)}
    classes = model.classes_
    if len(classes) > 5:
        result["top5"] = float(top_k_accuracy_score(ty, model.predict_proba(tx), k=5, labels=classes) * 100)
    result.update(best_C=best_C, val_top1_by_C=val_top1, predictions=torch.from_numpy(predictions).long())
    return result


def _numpy(features: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Features as float64 (what lbfgs computes in) and labels as int64 numpy arrays."""
    return features.detach().cpu().double().numpy(), labels.detach().cpu().long().numpy()


@torch.no_grad()
def dino_vit_features(backbone: nn.Module, images: Tensor, n_last_blocks: int, avgpool: bool) -> Tensor:
    """DINO's linear-evaluation features of a timm ViT (Caron et al. 2021, ``eval_linear.py``).

    The class tokens of the last ``n_last_blocks`` blocks, each after the final norm, concatenated;
    with ``avgpool``, followed by the mean of the last block's (normed) patch tokens.

    Args:
        backbone: a timm ``VisionTransformer`` with a class token.
        images: normalised images (B, 3, H, W).
        n_last_blocks: how many of the last blocks contribute a class token (DINO: 4 for ViT-S, 1 for ViT-B).
        avgpool: also append the average-pooled patch tokens (DINO: true for ViT-B).

    Returns:
        Features (B, n_last_blocks * D), or (B, (n_last_blocks + 1) * D) with ``avgpool``.
    """
    if not isinstance(backbone, VisionTransformer) or backbone.cls_token is None:
        raise ConfigError(f"the DINO linear-evaluation features need a timm VisionTransformer with a class token, "
                          f"got {type(backbone).__name__}; use the pooled backbone output for this model instead")
    if not 1 <= n_last_blocks <= len(backbone.blocks):
        raise ConfigError(f"n_last_blocks={n_last_blocks} is invalid; allowed values: 1..{len(backbone.blocks)}")
    blocks = backbone.forward_intermediates(images, indices=n_last_blocks, return_prefix_tokens=True, norm=True,
                                            output_fmt="NLC", intermediates_only=True)  # [((B, L, D), (B, P, D))]
    features = [prefix[:, 0] for _, prefix in blocks]  # class tokens, (B, D) each
    if avgpool:
        # DINO interleaves the two (B, D) vectors (it only pools with one block); order is irrelevant to a linear map
        features.append(blocks[-1][0].mean(dim=1))
    return torch.cat(features, dim=1)  # (B, n * D) or (B, (n + 1) * D)


class DINOViTFeatures(nn.Module):
    """:func:`dino_vit_features` as a module, so :func:`~unsupdistill.evaluate.extract_features` can use it."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4, avgpool: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool

    def forward(self, images: Tensor) -> Tensor:
        return dino_vit_features(self.backbone, images, self.n_last_blocks, self.avgpool)
