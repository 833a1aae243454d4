"""``unsupdistill embed``: the features of every image in a folder, in a file any tool reads."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unsupdistill.config import DataConfig
from unsupdistill.data import ImageFolderDataset, num_workers, write_skipped
from unsupdistill.devices import resolve_device
from unsupdistill.evaluate.features import extract_features
from unsupdistill.export.formats import ExportError
from unsupdistill.models.classifier import load_classifier
from unsupdistill.models.classifier import top_k as top_k_classes
from unsupdistill.models.load import load_model
from unsupdistill.storage import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

EMBED_SUFFIXES = (".npy", ".npz")


@dataclass
class EmbedResult:
    """What ``embed_folder`` wrote and how fast."""

    features: Path
    paths: Path
    summary: Path
    skipped_list: Path | None
    predictions: Path | None
    """Each image's most probable classes (a model with a classifier), or None."""
    classes_per_image: int
    count: int
    feature_dim: int
    skipped: int
    images_per_s: float
    device: str
    workers: int


def embed_folder(model: str, data: str | Path, out: str | Path, *, student: bool = False,
                 image_size: int | None = None, batch_size: int = 256, precision: torch.dtype | None = None,
                 workers: int | None = None, device: str | torch.device = "auto", top_k: int = 5) -> EmbedResult:
    """Embed every readable image under ``data`` (recursively) with a frozen backbone.

    Writes ``out``: either ``.npy`` (features ``(N, D)`` float32) with a ``.csv`` of the image paths
    in the same row order beside it, or one ``.npz`` holding ``features`` and ``paths``. Unreadable
    files are skipped, counted and listed in ``<out stem>.skipped.txt``; a ``.json`` summary says
    what was embedded and how fast. A model with a classifier (distilled with labels) also classifies every
    image: ``<out stem>.predictions.csv`` holds each image's ``top_k`` classes and their probabilities.

    Args:
        model: anything ``unsupdistill eval`` takes as MODEL (run, checkpoint, export, ``timm:``, ``pixels``).
        data: an image folder.
        out: the ``.npy`` or ``.npz`` file to write.
        student: embed with the student's backbone.
        image_size: input size for models that do not record one.
        batch_size: images per forward pass.
        precision: autocast dtype, or None for float32.
        workers: DataLoader processes decoding images; None: one per core, up to 8.
        device: where the network runs: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        top_k: classes per image in the predictions (a model with a classifier); 0 writes none.

    Raises:
        ExportError: ``out`` is neither ``.npy`` nor ``.npz``.
        DeviceError: ``device`` is malformed or names CUDA where there is none.
    """
    out = Path(out)
    if out.suffix.lower() not in EMBED_SUFFIXES:
        raise ExportError(f"--out {out}: expected a file ending in .npy (features, plus a .csv of paths) or .npz "
                          "(features and paths in one file)")
    device = resolve_device(device)
    loaded = load_model(model, image_size=image_size, student=student)
    workers = num_workers(DataConfig(path=str(data), num_workers=workers))
    dataset = ImageFolderDataset(data, loaded.input_size, num_threads=max(1, workers))
    logger.info("embedding %d images with %s: %s, %d decoding workers", len(dataset), loaded.name, device, workers)
    tic = time.perf_counter()
    features = extract_features(loaded.backbone, dataset, loaded.input_size, loaded.mean, loaded.std,
                                batch_size=batch_size, precision=precision, device=device, num_workers=workers)
    seconds = time.perf_counter() - tic
    array = features.numpy().astype(np.float32)  # (N, D)
    paths = [str(path) for path in dataset.files]

    if out.suffix.lower() == ".npz":
        paths_file = out
        atomic_write(out, lambda tmp: _save_npz(tmp, array, paths))
    else:
        paths_file = out.with_suffix(".csv")
        atomic_write(out, lambda tmp: _save_npy(tmp, array))
        atomic_write(paths_file, lambda tmp: _save_csv(tmp, paths))
    classifier = None if student or top_k < 1 else load_classifier(model)
    predictions = out.with_suffix(".predictions.csv") if classifier is not None else None
    if classifier is not None:
        indices, probs = top_k_classes(classifier, features, top_k)  # (N, k) each
        atomic_write(predictions, lambda tmp: _save_predictions(tmp, paths, classifier.classes, indices, probs))
    skipped_list = out.with_suffix(".skipped.txt")
    skipped = write_skipped(dataset, skipped_list)
    if not skipped:
        skipped_list.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    per_image = min(top_k, len(classifier.classes)) if classifier is not None else 0
    result = EmbedResult(out, paths_file, out.with_suffix(".json"), skipped_list if skipped else None, predictions,
                         per_image, len(paths), int(array.shape[1]), skipped, len(paths) / seconds, str(device),
                         workers)
    summary = {"model": loaded.name, "model_spec": str(model), "data": str(data), "images": result.count,
               "feature_dim": result.feature_dim, "skipped": skipped, "input_size": loaded.input_size,
               "precision": str(precision or "fp32"), "device": result.device, "workers": workers,
               "seconds": seconds, "images_per_s": result.images_per_s,
               "features": str(out), "paths": str(paths_file),
               "predictions": str(predictions) if predictions else None}
    write_json_atomic(summary, result.summary)
    return result


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)


def _save_npz(path: str, array: np.ndarray, paths: list[str]) -> None:
    with open(path, "wb") as f:
        np.savez(f, features=array, paths=np.array(paths))


def _save_predictions(path: str, paths: list[str], classes: list[str], indices: torch.Tensor,
                      probs: torch.Tensor) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        k = indices.shape[1]
        writer.writerow(["row", "path", *(f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob"))])
        for row, (path_, top, p) in enumerate(zip(paths, indices.tolist(), probs.tolist())):
            writer.writerow([row, path_, *(v for c, q in zip(top, p) for v in (classes[c], f"{q:.4f}"))])


def _save_csv(path: str, paths: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "path"])
        writer.writerows(enumerate(paths))
