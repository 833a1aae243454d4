"""``unsupdistill embed``: the features of every image (or, for a model of sounds, every sound file) in a folder, in a
file any tool reads."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unsupdistill.config import DataConfig
from unsupdistill.data import AudioFolderDataset, ImageFolderDataset, num_workers, write_skipped
from unsupdistill.devices import resolve_device
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.run import extraction_precision
from unsupdistill.export.formats import ExportError
from unsupdistill.export.names import EMBED_FORMATS, EMBED_SUFFIXES
from unsupdistill.models.classifier import top_k as top_k_classes
from unsupdistill.models.load import load_model
from unsupdistill.storage import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

SUMMARY_FILE = "embed.json"


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
    precision: str
    """fp32 or bf16: the extraction's precision, auto resolved."""
    kind: str = "image"
    """What was embedded: image, or audio (``count`` sound files at ``images_per_s`` files per second)."""


@dataclass
class EmbedFiles:
    """Where one embedding goes: in a folder (``features.npy``, ``features.csv``, ``embed.json``, ...) or, the old
    layout, beside a ``.npy``/``.npz`` file named by the user (``f.npy``, ``f.csv``, ``f.json``, ...)."""

    features: Path
    paths: Path
    """``features.csv`` of the image paths, or the ``.npz`` itself."""
    summary: Path
    skipped: Path
    predictions: Path

    @classmethod
    def of(cls, out: Path, fmt: str | None) -> EmbedFiles:
        """The files for ``out``: a ``.npy``/``.npz`` file (its suffix is the format) or a folder (``fmt``, default
        npy).

        Raises:
            ExportError: ``fmt`` is unknown, or disagrees with the file's suffix.
        """
        if fmt is not None and fmt not in EMBED_FORMATS:
            raise ExportError(f"embed format {fmt!r} is unknown; allowed formats: {', '.join(EMBED_FORMATS)}")
        suffix = out.suffix.lower()
        if suffix in EMBED_SUFFIXES:
            if fmt is not None and suffix != f".{fmt}":
                raise ExportError(f"--out {out} is a {suffix} file but --format is {fmt}; give a folder as --out")
            return cls(out, out if suffix == ".npz" else out.with_suffix(".csv"), out.with_suffix(".json"),
                       out.with_suffix(".skipped.txt"), out.with_suffix(".predictions.csv"))
        features = out / f"features.{fmt or 'npy'}"
        return cls(features, features if fmt == "npz" else out / "features.csv", out / SUMMARY_FILE,
                   out / "skipped.txt", out / "predictions.csv")


def embed_folder(model: str, data: str | Path, out: str | Path, *, fmt: str | None = None, student: bool = False,
                 image_size: int | None = None, batch_size: int = 256, precision: str = "auto",
                 workers: int | None = None, device: str | torch.device = "auto", top_k: int = 5) -> EmbedResult:
    """Embed every readable image under ``data`` (recursively) with a frozen backbone.

    A model of sounds (:attr:`~unsupdistill.models.load.FeatureModel.frontend`) embeds every readable sound file
    instead, as evaluation reads it: mono at the front end's rate (resampled if the file's differs), its centre cut
    out or zero-padded to the clip, then the front end's log-mel of the whole clip; unreadable and silent files are
    skipped and counted as unreadable images are, and the files written are the same.

    Writes, in the folder ``out``: ``features.npy`` (features ``(N, D)`` float32) with ``features.csv`` of the
    image paths in the same row order, or (``fmt`` npz) one ``features.npz`` holding ``features`` and ``paths``;
    ``embed.json``, what was embedded and how fast; ``skipped.txt``, the unreadable files (skipped and counted); and
    for a model with a classifier (distilled with labels) ``predictions.csv``, each image's ``top_k`` classes and
    their probabilities. ``out`` may also be a ``.npy`` or ``.npz`` file, the old layout: the other files are then
    named after it (``f.csv``, ``f.json``, ``f.skipped.txt``, ``f.predictions.csv``).

    Args:
        model: anything ``unsupdistill eval`` takes as MODEL (run, checkpoint, export, ``timm:``, ``pixels``).
        data: an image folder (a sound folder for a model of sounds).
        out: the folder to write into (created), or a ``.npy``/``.npz`` file.
        fmt: npy or npz for a folder (default npy); for a file, its suffix (a different ``fmt`` is an error).
        student: embed with the student's backbone (and its classifier, with a checkpoint of a model distilled
            with labels).
        image_size: input size for models that do not record one.
        batch_size: images per forward pass.
        precision: auto, fp32 or bf16 (autocast); auto as ``unsupdistill eval`` resolves it
            (:func:`~unsupdistill.evaluate.run.extraction_precision`), for the folder's images.
        workers: DataLoader processes decoding images; None: one per core, up to 8.
        device: where the network runs: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.
        top_k: classes per image in the predictions (a model with a classifier); 0 writes none.

    Raises:
        ExportError: an unknown ``fmt``, or one that disagrees with a file's suffix.
        DeviceError: ``device`` is malformed or names CUDA where there is none.
    """
    out = Path(out)
    files = EmbedFiles.of(out, fmt)
    device = resolve_device(device)
    if precision not in ("auto", "fp32", "bf16"):
        raise ExportError(f"precision {precision!r} is unknown; allowed values: auto, fp32, bf16")
    loaded = load_model(model, image_size=image_size, student=student)
    workers = num_workers(DataConfig(path=str(data), num_workers=workers))
    frontend = loaded.frontend
    if frontend is None:
        dataset = ImageFolderDataset(data, loaded.input_size, num_threads=max(1, workers))
    else:  # read as evaluation reads labeled sounds (evaluate/run.py: labeled_inputs)
        dataset = AudioFolderDataset(data, int(frontend["sample_rate"]), int(frontend["clip_samples"]),
                                     num_threads=max(1, workers))
    noun = "images" if frontend is None else "sound files"
    precision = extraction_precision(precision, device, len(dataset))
    logger.info("embedding %d %s with %s: %s, %s, %d decoding workers", len(dataset), noun, loaded.name, device,
                precision, workers)
    tic = time.perf_counter()
    features = extract_features(loaded.backbone, dataset, loaded.input_size, loaded.mean, loaded.std,
                                batch_size=batch_size, precision=torch.bfloat16 if precision == "bf16" else None,
                                device=device, num_workers=workers, frontend=frontend)
    seconds = time.perf_counter() - tic
    array = features.numpy().astype(np.float32)  # (N, D)
    paths = [str(path) for path in dataset.files]

    files.features.parent.mkdir(parents=True, exist_ok=True)
    if files.features.suffix.lower() == ".npz":
        atomic_write(files.features, lambda tmp: _save_npz(tmp, array, paths))
    else:
        atomic_write(files.features, lambda tmp: _save_npy(tmp, array))
        atomic_write(files.paths, lambda tmp: _save_csv(tmp, paths))
    classifier = loaded.classifier if top_k >= 1 else None  # the one trained with these weights
    predictions = files.predictions if classifier is not None else None
    if classifier is not None:
        indices, probs = top_k_classes(classifier, features, top_k)  # (N, k) each
        atomic_write(predictions, lambda tmp: _save_predictions(tmp, paths, classifier.classes, indices, probs))
    skipped = write_skipped(dataset, files.skipped)
    if not skipped:
        files.skipped.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    per_image = min(top_k, len(classifier.classes)) if classifier is not None else 0
    result = EmbedResult(files.features, files.paths, files.summary, files.skipped if skipped else None,
                         predictions, per_image, len(paths), int(array.shape[1]), skipped, len(paths) / seconds,
                         str(device), workers, precision, dataset.kind)
    summary = {"model": loaded.name, "model_spec": str(model), "data": str(data), "kind": dataset.kind,
               "images": result.count, "feature_dim": result.feature_dim, "skipped": skipped,
               "input_size": loaded.input_size, "precision": precision, "device": result.device, "workers": workers,
               "seconds": seconds, "images_per_s": result.images_per_s,
               "features": str(files.features), "paths": str(files.paths),
               "predictions": str(predictions) if predictions else None}
    if frontend is not None:  # "images" counts the sound files; the front end says how they were read
        summary["frontend"] = frontend
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
