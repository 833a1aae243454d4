"""Linear probe grid: many linear classifiers trained together on cached features, the best kept.

DINO (Caron et al. 2021, ``eval_linear.py``) trains one linear layer, with no BatchNorm in front of it, on the
concatenated (layer-normed) class tokens of the last blocks, by SGD with momentum 0.9 and a cosine schedule.
DINOv2 (Oquab et al. 2023, ``dinov2/eval/linear.py``) trains a whole grid of such layers on the same
mini-batches, one per (learning rate, last 1 or 4 blocks, with or without average-pooled patch tokens), with no
extra feature normalisation, and keeps the best on held-out data.

Here the grid is (feature variant, learning rate, weight decay) over precomputed features: a variant is a set of
columns of the cached tensor (e.g. ``cls_last1``, ``cls_last4``, ``cls_last4+avgpool``), and all classifiers of
a variant are one weight (D_v, G * C), so a mini-batch costs one matmul per variant. Unlike DINO and DINOv2,
features are standardised per column with the statistics of the rows being fitted: their layer-normed ViT tokens
have a known scale, arbitrary backbones (or raw pixels) do not, and a common scale is what lets one
learning-rate grid serve them all. The protocol is that of :func:`~unsupdistill.evaluate.linear.linear_probe`:
the setting is chosen on a stratified held-out part of the train split, refitted on the whole train split and
scored once on the test split, which never influences a choice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightly.utils.scheduler import cosine_schedule
from sklearn.model_selection import train_test_split
from torch import Tensor

from unsupdistill.config import ConfigError
from unsupdistill.data.folder import DataError

MOMENTUM = 0.9
"""SGD momentum of every classifier (DINO and DINOv2 use 0.9)."""

# On standardised features the largest stable step shrinks as the features correlate (the curvature follows the
# top eigenvalue of their correlation matrix): near 1 for a backbone's fairly decorrelated features, near 1e-2
# for raw pixels. A half-decade grid over 1e-3..1 brackets both (DINOv2's 1e-5..0.1 is for unnormalised tokens).
DEFAULT_LRS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""Peak learning rates tried, for the mean cross-entropy of a mini-batch on standardised features."""

# DINO and DINOv2 use none, and on large splits a few epochs rarely need any; on small ones it matters: decay wd
# is linear.py's C = 1 / (wd * N), so 1e-2 is its C = 0.1 on 1,000 samples. Strongest first: ties go to the most
# regularised classifier, as linear.py's go to the smallest C.
DEFAULT_WDS: tuple[float, ...] = (1e-2, 1e-3, 0.0)
"""L2 weight decays tried (coupled, as torch's SGD; on the weights, not the bias)."""

# Small splits: 20 epochs of batches of 256 (digits' 1,000 fitted rows get 80 steps). From LARGE rows on: 10 epochs
# of 1,024, ~400 steps on CIFAR-10's 40,000 fitted rows, enough for a convex problem; on its 30-minute DINO features
# that scored 50.93 % in 2.0 s against 50.80 % in 5.0 s for 20 epochs of 256 (BENCHMARKS.md, "Linear probe").
DEFAULT_EPOCHS, DEFAULT_BATCH_SIZE = 20, 256
VAL_FRACTION = 0.2
"""Share of the train split held out (stratified) to choose the setting."""
LARGE, LARGE_EPOCHS, LARGE_BATCH_SIZE = 20_000, 10, 1024

Columns = slice | Sequence[int] | Tensor


def linear_probe_grid(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WDS, variants: Mapping[str, Columns] | None = None,
    epochs: int | None = None, batch_size: int | None = None, val_fraction: float = VAL_FRACTION, seed: int = 0,
    device: str | torch.device | None = None, classifier: bool = False,
) -> dict[str, Any]:
    """Linear-probe accuracy of frozen features with a grid of SGD-trained linear classifiers.

    One classifier per (variant, lr, weight decay) is trained on the same mini-batches (SGD, momentum 0.9,
    cosine schedule to 0 over all steps, cross-entropy, zero init) on the fit part of the train split; the best
    on the held-out part (ties: the first in the order variants x lrs x weight_decays as given) is retrained on
    the whole train split and scored once on the test split.

    Args:
        train_x: train features (N, D), on any device and in any float dtype; moved per mini-batch.
        train_y: train class indices (N,), 0..C-1.
        test_x: test features (M, D).
        test_y: test class indices (M,), into the classes of ``train_y``.
        lrs: peak learning rates.
        weight_decays: L2 weight decays.
        variants: name -> columns of the features (a slice, or a list or LongTensor of indices) that name's
            classifiers see; None: one variant ``all`` of every column.
        epochs: passes over the rows being fitted; None: 20, or 10 from 20,000 training rows on.
        batch_size: rows per mini-batch; None: 256, or 1,024 from 20,000 training rows on.
        val_fraction: share of the train split held out (stratified, by ``seed``) to choose the setting.
        seed: seed of the held-out split and of the mini-batch order.
        device: where the classifiers train; None: cuda if available, else cpu.
        classifier: also return the retrained classifier (``linear``).

    Returns:
        ``top1`` (%), ``top5`` (%, only with more than 5 classes), ``best`` (``variant``, ``lr``,
        ``weight_decay``), ``val_top1`` (one dict per grid point with its setting and held-out ``top1`` %, 0 for
        a classifier that diverged), ``predictions`` (M,) int64 on CPU, ``seconds`` (wall time), and with
        ``classifier`` ``linear``: the retrained classifier as ``(weight (C, D), bias (C,))`` of the raw features
        (standardisation folded in).
    """
    start = time.perf_counter()
    num_classes = _check_data(train_x, train_y, test_x, test_y)
    columns = _variant_columns(variants, train_x.shape[1])
    large = len(train_x) >= LARGE
    epochs = (LARGE_EPOCHS if large else DEFAULT_EPOCHS) if epochs is None else epochs
    batch_size = (LARGE_BATCH_SIZE if large else DEFAULT_BATCH_SIZE) if batch_size is None else batch_size
    _check_grid(lrs, weight_decays, epochs, batch_size)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    train_y, test_y = train_y.detach().cpu().long(), test_y.detach().cpu().long()
    fit_rows, val_rows = _held_out_split(train_y, val_fraction, seed)
    train = dict(epochs=epochs, batch_size=batch_size, seed=seed, device=device)

    # ---- choose (variant, lr, weight decay) on the held-out part of the train split
    settings = [(float(a), float(b)) for a in lrs for b in weight_decays]  # G of them
    lr, wd = torch.tensor(settings, dtype=torch.float32).unbind(dim=1)  # (G,) each
    mean, std = _standardisation(train_x, fit_rows, device)
    weights = _train(train_x, train_y, fit_rows, mean, std, list(columns.values()), lr, wd, num_classes, **train)
    val_top1 = []
    for (name, cols), (w, b) in zip(columns.items(), weights):
        logits = _logits(train_x, val_rows, mean, std, cols, w, b, num_classes, device)  # (R, G, C)
        top1 = (logits.argmax(dim=2) == train_y[val_rows, None]).double().mean(dim=0) * 100  # (G,)
        finite = w.isfinite().all(dim=0).view(-1, num_classes).all(dim=1).cpu()  # (G,)
        val_top1 += [{"variant": name, "lr": a, "weight_decay": b, "top1": float(t) if ok else 0.0}
                     for (a, b), t, ok in zip(settings, top1, finite)]
    best = max(val_top1, key=lambda point: point["top1"])  # max keeps the first of equal values

    # ---- retrain the chosen setting on the whole train split, score it once on the test split
    rows = torch.arange(len(train_y))
    mean, std = _standardisation(train_x, rows, device)
    cols = columns[best["variant"]]
    lr, wd = torch.tensor([best["lr"]]), torch.tensor([best["weight_decay"]])
    [(w, b)] = _train(train_x, train_y, rows, mean, std, [cols], lr, wd, num_classes, **train)
    logits = _logits(test_x, torch.arange(len(test_y)), mean, std, cols, w, b, num_classes, device)[:, 0]  # (M, C)
    predictions = logits.argmax(dim=1)
    result: dict[str, Any] = {"top1": float((predictions == test_y).double().mean() * 100)}
    if num_classes > 5:  # the top-1 class counts too, so top5 >= top1 even when logits tie
        hits = (logits.topk(5, dim=1).indices == test_y[:, None]).any(dim=1) | (predictions == test_y)
        result["top5"] = float(hits.double().mean() * 100)
    best = {key: best[key] for key in ("variant", "lr", "weight_decay")}
    result.update(best=best, val_top1=val_top1, predictions=predictions, seconds=time.perf_counter() - start)
    if classifier:
        result["linear"] = _folded(w, b, mean, std, cols, train_x.shape[1])
    return result


def _folded(weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor, cols: slice | Tensor,
            dim: int) -> tuple[Tensor, Tensor]:
    """The chosen classifier as one linear map of the raw features: weight (C, D) and bias (C,) on CPU, with the
    standardisation folded in: ``((x - mean) / std)[cols] @ w + b == x @ weight.T + bias``."""
    full = torch.zeros(dim, weight.shape[1], device=weight.device)  # (D, C), zero for columns the variant skips
    full[cols] = weight / std[cols, None]
    return full.T.contiguous().cpu(), (bias - (mean[cols] / std[cols]) @ weight).cpu()


def _train(
    features: Tensor, labels: Tensor, rows: Tensor, mean: Tensor, std: Tensor, columns: list[slice | Tensor],
    lr: Tensor, weight_decay: Tensor, num_classes: int, *, epochs: int, batch_size: int, seed: int,
    device: torch.device,
) -> list[tuple[Tensor, Tensor]]:
    """Train G = len(lr) classifiers per variant on ``features[rows]``, classifier g with lr[g] and weight_decay[g].

    Returns:
        Per variant, the weight (D_v, G * C) and bias (G * C,): column g * C + c holds class c of classifier g.
    """
    G, C = len(lr), num_classes
    columns = [cols if isinstance(cols, slice) else cols.to(device) for cols in columns]
    lr_col, wd_col = lr.repeat_interleave(C).to(device), weight_decay.repeat_interleave(C).to(device)  # (G * C,)
    params = [(torch.zeros(_width(cols), G * C, device=device, requires_grad=True),
               torch.zeros(G * C, device=device, requires_grad=True)) for cols in columns]
    velocity = [(torch.zeros_like(w), torch.zeros_like(b)) for w, b in params]
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(rows) / batch_size)
    step = 0
    for _ in range(epochs):
        for batch in rows[torch.randperm(len(rows), generator=generator)].split(batch_size):
            x = _standardised(features, batch, mean, std, device)  # (B, D)
            y = labels[batch].to(device)  # (B,)
            scale = cosine_schedule(step, steps + 1, 1.0, 0.0)  # + 1: the last step still moves
            for (w, b), (w_velocity, b_velocity), cols in zip(params, velocity, columns):
                logits = (x[:, cols] @ w + b).view(len(batch), G, C)  # (B, G, C)
                # the sum over classifiers of each one's mean cross-entropy: classifier g's gradient is its own
                loss = F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, G), reduction="sum") / len(y)
                w_grad, b_grad = torch.autograd.grad(loss, (w, b))
                with torch.no_grad():  # torch.optim.SGD's update (dampening 0), with a learning rate per column
                    w_velocity.mul_(MOMENTUM).add_(w_grad).addcmul_(wd_col, w)
                    b_velocity.mul_(MOMENTUM).add_(b_grad)
                    w.addcmul_(lr_col, w_velocity, value=-scale)
                    b.addcmul_(lr_col, b_velocity, value=-scale)
            step += 1
    return [(w.detach(), b.detach()) for w, b in params]


@torch.no_grad()
def _logits(
    features: Tensor, rows: Tensor, mean: Tensor, std: Tensor, cols: slice | Tensor, weight: Tensor, bias: Tensor,
    num_classes: int, device: torch.device, batch_size: int = 4096,
) -> Tensor:
    """Logits (R, G, C) on CPU of the classifiers (D_v, G * C) for the R ``rows`` of the features."""
    out = [(_standardised(features, batch, mean, std, device)[:, cols] @ weight + bias).cpu()  # (B, G * C)
           for batch in rows.split(batch_size)]
    return torch.cat(out).view(len(rows), -1, num_classes)


def _standardised(features: Tensor, rows: Tensor, mean: Tensor, std: Tensor, device: torch.device) -> Tensor:
    """``features[rows]`` (B, D) as float32 on ``device``, standardised with ``mean`` and ``std`` (D,)."""
    x = features[rows.to(features.device)].to(device, torch.float32, non_blocking=True)
    return (x - mean) / std


def _standardisation(features: Tensor, rows: Tensor, device: torch.device, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Per-column mean and std (D,) on ``device`` of ``features[rows]``: two float64 passes over chunks of rows
    (no copy of the whole); a constant column gets std 1, so it standardises to 0."""
    def chunks() -> Iterator[Tensor]:  # (chunk, D) float64 on CPU
        return (features[c.to(features.device)].double().cpu() for c in rows.split(chunk))

    mean = sum(x.sum(dim=0) for x in chunks()) / len(rows)
    std = (sum((x - mean).square().sum(dim=0) for x in chunks()) / len(rows)).sqrt()
    return mean.float().to(device), torch.where(std > 0, std, 1.0).float().to(device)


def held_out_size(samples: int, val_fraction: float) -> int:
    """How many of ``samples`` the stratified split holds out (``train_test_split`` rounds up)."""
    return math.ceil(val_fraction * samples)


def split_holds_every_class(samples: int, num_classes: int, val_fraction: float) -> bool:
    """Whether both parts of the held-out split of ``samples`` can hold one sample of each of ``num_classes``."""
    held_out = held_out_size(samples, val_fraction)
    return min(held_out, samples - held_out) >= num_classes


def _held_out_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Row indices of the fit and held-out parts, stratified by class (scikit-learn's ``train_test_split``).

    Raises:
        DataError: a class with a single sample (``evaluate.run.check_probe_split`` names it for a labeled set).
        ConfigError: ``val_fraction`` out of range, or too small or large for both parts to hold every class.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} is invalid; allowed values: 0 < val_fraction < 1")
    classes, counts = labels.unique(return_counts=True)
    if counts.min() < 2:
        rare = classes[counts < 2].tolist()
        raise DataError(f"train_y has classes {rare} with a single sample; stratifying the held-out split needs "
                         f"at least 2 samples of every class: add samples or drop those classes")
    if not split_holds_every_class(len(labels), len(classes), val_fraction):
        num_val = held_out_size(len(labels), val_fraction)
        raise ConfigError(f"val_fraction={val_fraction} holds out {num_val} of {len(labels)} train samples; both "
                          f"parts need at least one sample of each of the {len(classes)} classes: move "
                          f"val_fraction towards 0.5 or add samples")
    fit, val = train_test_split(torch.arange(len(labels)).numpy(), test_size=val_fraction, random_state=seed,
                                stratify=labels.numpy())
    return torch.from_numpy(fit), torch.from_numpy(val)


def _check_data(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> int:
    """Raise ValueError naming the argument for inconsistent shapes or labels (DataError, a ValueError, for labels of a
    single class: a user's data, not a caller's mistake); return the number of classes C."""
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x {tuple(train_x.shape)} and test_x {tuple(test_x.shape)} are invalid; allowed: "
                         f"2-D features (N, D) and (M, D) with the same D")
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if y.ndim != 1 or len(y) != len(x) or len(y) == 0:
            raise ValueError(f"{name}_y {tuple(y.shape)} does not match {name}_x {tuple(x.shape)}; allowed: one "
                             f"class index per row, at least one row")
        if y.is_floating_point() or y.is_complex() or y.min() < 0:
            raise ValueError(f"{name}_y is invalid; allowed: integer class indices >= 0")
    num_classes = int(train_y.max()) + 1
    if len(train_y.unique()) < 2:
        raise DataError(f"train_y holds a single class ({int(train_y[0])}); allowed: at least 2 classes")
    if test_y.max() >= num_classes:
        raise ValueError(f"test_y holds class {int(test_y.max())}, absent from train_y; allowed: 0..{num_classes - 1}")
    return num_classes


def _check_grid(lrs: Sequence[float], weight_decays: Sequence[float], epochs: int, batch_size: int) -> None:
    """Raise ConfigError naming the argument for an empty grid or a bad value."""
    if len(lrs) == 0 or not all(math.isfinite(a) and a > 0 for a in lrs):
        raise ConfigError(f"lrs={list(lrs)} is invalid; allowed values: a non-empty list of finite numbers > 0")
    if len(weight_decays) == 0 or not all(math.isfinite(b) and b >= 0 for b in weight_decays):
        raise ConfigError(f"weight_decays={list(weight_decays)} is invalid; allowed values: a non-empty list of "
                          f"finite numbers >= 0")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name}={value} is invalid; allowed values: integers >= 1")


def _variant_columns(variants: Mapping[str, Columns] | None, dim: int) -> dict[str, slice | Tensor]:
    """Each variant's columns: a slice(start, stop) where they are a contiguous run (a view, no copy), else a
    LongTensor of indices."""
    if variants is None:
        return {"all": slice(0, dim)}
    if not variants:
        raise ConfigError("variants is empty; allowed: None (every column) or a mapping name -> columns")
    resolved: dict[str, slice | Tensor] = {}
    for name, columns in variants.items():
        if isinstance(columns, slice):
            if columns.step not in (None, 1):
                raise ConfigError(f"variants[{name!r}] = {columns} is invalid; allowed: slices with step 1")
            columns = range(columns.start or 0, dim if columns.stop is None else columns.stop)
        index = torch.as_tensor(columns, dtype=torch.long).flatten()
        if len(index) == 0 or index.min() < 0 or index.max() >= dim:
            raise ConfigError(f"variants[{name!r}] selects columns {columns} of {dim}; allowed: a non-empty set of "
                              f"columns in 0..{dim - 1}")
        contiguous = torch.equal(index, torch.arange(int(index[0]), int(index[0]) + len(index)))
        resolved[name] = slice(int(index[0]), int(index[0]) + len(index)) if contiguous else index
    return resolved


def _width(columns: slice | Tensor) -> int:
    """How many columns a variant sees (D_v)."""
    return columns.stop - columns.start if isinstance(columns, slice) else len(columns)
