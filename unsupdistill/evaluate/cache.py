"""A feature cache on disk: features of a (model, dataset) pair are computed once and reused.

Entries are safetensors files (plain tensors, never pickle) named by a hash of the model's
``cache_key``, the dataset's :func:`data_fingerprint` and any extra settings; they are written
atomically, and an unreadable entry is recomputed rather than reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unsupdistill.data.fingerprint import data_fingerprint
from unsupdistill.storage import atomic_write

__all__ = ["cache_path", "cached_features", "data_fingerprint", "default_cache_dir"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$UNSUPDISTILL_CACHE`` if set, else ``~/.cache/unsupdistill/features``."""
    env = os.environ.get("UNSUPDISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unsupdistill" / "features"


def cache_path(model_key: str, data_key: str, extra: str, cache_dir: Path) -> Path:
    """The cache file of one (model, dataset, settings) triple."""
    name = hashlib.sha256(f"{model_key}|{data_key}|{extra}".encode()).hexdigest()[:32]
    return Path(cache_dir) / f"{name}.safetensors"


def cached_features(
    model_key: str, data_key: str, extra: str, cache_dir: Path | None, compute: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, bool]:
    """Features from the cache, or from ``compute()`` (then stored).

    Args:
        model_key: the model's ``cache_key``.
        data_key: the dataset's :func:`data_fingerprint`.
        extra: anything else the features depend on (e.g. the split, the feature layer).
        cache_dir: where entries live; None computes without caching.
        compute: returns the features ``(N, D)``.

    Returns:
        The features and whether they came from the cache.
    """
    if cache_dir is None:
        return compute(), False
    path = cache_path(model_key, data_key, extra, cache_dir)
    if path.is_file():
        try:
            return load_file(path)["features"], True
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file raises many types; recompute
            logger.warning("feature cache %s is unreadable (%s: %s); recomputing", path, type(err).__name__, err)
    features = compute()
    tensors = {"features": features.detach().cpu().contiguous()}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
    except OSError as err:  # a full disk or read-only cache costs the reuse, not the evaluation
        logger.warning("cannot write feature cache %s (%s); continuing without it", path, err)
    return features, False
