"""One evaluation: frozen features of a model on a labeled train/test pair, scored three ways.

k-NN (weighted votes, Wu et al. 2018, as in DINO), a linear probe whose regularisation is chosen on
a held-out part of the training split, and k-means clustering (NMI, ARI, Hungarian accuracy).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unsupdistill.config import DataConfig
from unsupdistill.data import DataError, DigitsDataset, num_workers
from unsupdistill.data.labeled import LabeledDataset, align_labels, load_labeled, load_labeled_sounds
from unsupdistill.devices import cpu_has_native_bf16, resolve_device
from unsupdistill.evaluate.cache import cached_features, data_fingerprint, default_cache_dir
from unsupdistill.evaluate.clustering import cluster
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.knn import knn_evaluate
from unsupdistill.evaluate.linear import DINOViTFeatures, linear_probe
from unsupdistill.evaluate.linear_grid import VAL_FRACTION, held_out_size, linear_probe_grid, split_holds_every_class
from unsupdistill.evaluate.options import AUTO_BF16_MIN_IMAGES, HEADLINE_K, EvalOptions
from unsupdistill.evaluate.speed import measure_speed, speed_cells
from unsupdistill.models.classifier import Classifier
from unsupdistill.models.load import FeatureModel, load_model

logger = logging.getLogger(__name__)

def extraction_precision(name: str, device: torch.device, test_images: int) -> str:
    """``fp32`` or ``bf16``: ``name`` with ``auto`` resolved (see :attr:`EvalOptions.precision`) for a test split
    of ``test_images`` images on ``device``."""
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {name!r}")
    if name != "auto":
        return name
    fast = device.type == "cpu" and cpu_has_native_bf16() and test_images >= AUTO_BF16_MIN_IMAGES
    return "bf16" if fast else "fp32"


def model_features(model: FeatureModel, dataset, options: EvalOptions, device: torch.device) -> torch.Tensor:
    """Features of every image of ``dataset``, from the cache when the model and data are unchanged."""
    backbone: nn.Module = model.backbone
    if options.vit_blocks:
        backbone = DINOViTFeatures(backbone, options.vit_blocks, options.avgpool)
    # evaluate() resolves auto from its test split, once for both splits; other callers from ``dataset``
    precision = torch.bfloat16 if extraction_precision(options.precision, device, len(dataset)) == "bf16" else None
    extra = f"{precision}|{options.vit_blocks}|{options.avgpool}"
    cache_dir = (options.cache_dir or default_cache_dir()) if options.cache else None
    # the data module's policy: no workers for images already in memory, else one per core (max 8)
    workers = num_workers(DataConfig(path=None if isinstance(dataset, DigitsDataset) else "labeled images",
                                     num_workers=options.workers))

    items = "images" if model.frontend is None else "sounds"

    def extract() -> torch.Tensor:
        logger.info("features of %s on %d %s: %s, %s, %d decoding workers", model.name, len(dataset), items, device,
                    "bf16" if precision else "fp32", workers)
        return extract_features(backbone, dataset, model.input_size, model.mean, model.std,
                                batch_size=options.batch_size, precision=precision, device=device,
                                num_workers=workers, frontend=model.frontend)

    features, hit = cached_features(model.cache_key, data_fingerprint(dataset), extra, cache_dir, extract)
    if hit:
        logger.info("features of %s on %d %s read from the cache", model.name, len(dataset), items)
    return features


def vit_probe_variants(backbone: nn.Module) -> tuple[int, dict[str, slice], slice] | None:
    """The feature variants DINOv2's linear evaluation tries for a timm ViT whose pooled output is its class
    token: the class token of the last block or of the last 4, each with or without the average-pooled patch
    tokens, as columns of :class:`DINOViTFeatures` (last ``blocks`` class tokens, then the pooled patches).

    Returns:
        (blocks, variant name -> columns, the columns equal to the backbone's pooled output), or None for
        any other backbone (its pooled features are the probe's only variant).
    """
    if not isinstance(backbone, VisionTransformer) or backbone.cls_token is None \
            or getattr(backbone, "global_pool", None) != "token":
        return None
    blocks, dim = min(4, len(backbone.blocks)), backbone.embed_dim
    last = slice((blocks - 1) * dim, blocks * dim)
    variants = {"cls_last1": last, f"cls_last{blocks}": slice(0, blocks * dim),
                "cls_last1+avgpool": slice((blocks - 1) * dim, (blocks + 1) * dim),
                f"cls_last{blocks}+avgpool": slice(0, (blocks + 1) * dim)}
    return blocks, variants, last


def evaluate(model_spec: str, train_spec: str, test_spec: str, options: EvalOptions | None = None,
             out_dir: Path | None = None) -> dict:
    """Evaluate one model; write ``eval.json`` and plots to ``out_dir`` when given. Returns the results.

    With ``options.speed`` the results hold ``speed``: :func:`~unsupdistill.evaluate.speed.measure_speed`'s
    dict at the model's input size, on the eval device and precision (None for raw pixels).
    """
    options = options or EvalOptions()
    device = resolve_device(options.device)
    model = load_model(model_spec, image_size=options.image_size, student=options.student, frontend=options.frontend)
    train_set = labeled_inputs(model, train_spec, "train")
    test_set = labeled_inputs(model, test_spec, "test")
    train_labels, test_labels = train_set.labels, align_labels(train_set, test_set)
    classes = train_set.classes
    if options.linear:  # before the features are extracted
        check_probe_split(train_set, train_spec)
    options = replace(options, precision=extraction_precision(options.precision, device, len(test_set)))

    timings = {}
    tic = time.perf_counter()
    grid = vit_probe_variants(model.backbone) if options.linear and options.linear_backend == "torch" \
        and not options.vit_blocks else None
    if grid is None:
        train_features = model_features(model, train_set, options, device)
        test_features = model_features(model, test_set, options, device)
        probe_train, probe_test, variants = train_features, test_features, None
    else:  # a ViT: the probe's variants are columns of one extraction; k-NN and clustering get the pooled ones
        blocks, variants, pooled = grid
        vit_options = replace(options, vit_blocks=blocks, avgpool=True)
        probe_train = model_features(model, train_set, vit_options, device)  # (N, (blocks + 1) * D)
        probe_test = model_features(model, test_set, vit_options, device)
        train_features, test_features = probe_train[:, pooled], probe_test[:, pooled]  # the last block's class token
    timings["features_s"] = time.perf_counter() - tic

    results: dict = {"model": model.name, "model_spec": model_spec, "train": train_spec, "test": test_spec,
                     "num_train": len(train_set), "num_test": len(test_set), "num_classes": len(classes),
                     "feature_dim": int(train_features.shape[1]), "input_size": model.input_size,
                     "precision": options.precision, "device": str(device)}
    tic = time.perf_counter()
    results["knn"] = knn_evaluate(train_features, train_labels, test_features, test_labels, options.ks,
                                  options.temperature)
    timings["knn_s"] = time.perf_counter() - tic
    if model.classifier is not None:  # a model distilled with labels: its own classifier's test accuracy
        pooled = test_features  # (N, D), what the classifier was trained on; --vit-blocks concatenates other columns
        if options.vit_blocks:
            pooled = model_features(model, test_set, replace(options, vit_blocks=None, avgpool=False), device)
        results["classifier"] = classifier_accuracy(model.classifier, pooled, test_set.classes, test_set.labels)
    linear = None
    if options.linear:
        tic = time.perf_counter()
        if options.linear_backend == "sklearn":
            linear = linear_probe(train_features, train_labels, test_features, test_labels,
                                  val_fraction=VAL_FRACTION)
        elif options.linear_backend == "torch":
            linear = linear_probe_grid(probe_train, train_labels, probe_test, test_labels, variants=variants,
                                       val_fraction=VAL_FRACTION, device=device)
        else:
            raise ValueError(f"linear_backend must be torch or sklearn, got {options.linear_backend!r}")
        results["linear"] = {"backend": options.linear_backend,
                             **{k: v for k, v in linear.items() if k != "predictions"}}
        timings["linear_s"] = time.perf_counter() - tic
    if options.clustering:
        tic = time.perf_counter()
        clusters = cluster(test_features, test_labels, seeds=options.cluster_seeds)
        results["clustering"] = {k: v for k, v in clusters.items() if k != "assignments"}
        timings["clustering_s"] = time.perf_counter() - tic
    if options.speed:  # the plain backbone, whatever vit_blocks concatenates for the probe; None for raw pixels
        tic = time.perf_counter()
        results["speed"] = measure_speed(model, device, options.speed_batch_size, options.precision,
                                         options.speed_seconds)
        timings["speed_s"] = time.perf_counter() - tic
    results["seconds"] = timings

    if out_dir is not None:
        # matplotlib (report, pictures) is imported only to write a report: the command line starts faster
        from unsupdistill.evaluate.pictures import write_pictures
        from unsupdistill.evaluate.report import plot_confusion, plot_feature_map, plot_knn_vs_k, write_json

        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(results, out_dir / "eval.json")
        if options.plots:
            plot_feature_map(test_features, test_labels, classes, out_dir / "feature_map.png",
                             title=f"{model.name}: test features")
            plot_knn_vs_k({model.name: {k: r["top1"] for k, r in results["knn"].items()}}, out_dir / "knn_vs_k.png")
            if linear is not None:
                plot_confusion(test_labels, linear["predictions"], classes, out_dir / "confusion.png",
                               title=f"{model.name}: linear probe")
            write_pictures(model, train_set, test_set, train_features, test_features, out_dir)
    return results


def labeled_inputs(model: FeatureModel, spec: str, split: str) -> LabeledDataset:
    """The labeled set ``spec`` as ``model`` takes it: images at its input size, or for a model of sounds the files
    read at its front end's rate and cut or padded to its clip."""
    if model.frontend is None:
        return load_labeled(spec, model.input_size, split)
    return load_labeled_sounds(spec, int(model.frontend["sample_rate"]), int(model.frontend["clip_samples"]), split)


def check_probe_split(train_set: LabeledDataset, spec: str) -> None:
    """Check that the linear probe can hold out a stratified :data:`VAL_FRACTION` of ``train_set`` (the labeled set
    ``spec``) to choose its settings: two images or more in every class, and enough images that both parts hold one
    of every class.

    Raises:
        DataError: naming the set, the classes short of images (and a single image's file) and the fix.
    """
    counts = torch.bincount(train_set.labels, minlength=len(train_set.classes))  # (C,)
    why = (f"the linear probe holds out {VAL_FRACTION:.0%} of every class of the train set (stratified) to choose "
           "its settings")
    single = [i for i, n in enumerate(counts.tolist()) if n < 2]
    if single:
        paths = getattr(train_set, "paths", None)
        named = []
        for i in single[:5]:
            where = f" ({paths[int((train_set.labels == i).nonzero()[0])]})" if paths and counts[i] else ""
            named.append(f"{train_set.classes[i]!r}{where}")
        more = f" and {len(single) - 5} more" if len(single) > 5 else ""
        raise DataError(f"train set {spec}: class{'es' if len(single) > 1 else ''} {', '.join(named)}{more} "
                        f"{'have' if len(single) > 1 else 'has'} a single image; {why}, so each class needs 2 images "
                        "or more: add images to it, remove the class from both sets, or skip the probe with "
                        "--no-linear")
    total, num_classes = len(train_set.labels), len(counts)
    if not split_holds_every_class(total, num_classes, VAL_FRACTION):
        needed = next(n for n in range(total, 10 * num_classes + 10)
                      if split_holds_every_class(n, num_classes, VAL_FRACTION))
        raise DataError(f"train set {spec} has {total} images in {num_classes} classes; {why}, and both the "
                        f"{held_out_size(total, VAL_FRACTION)} held-out images and the rest need one image of every "
                        f"class: add images ({needed} or more in all) or skip the probe with --no-linear")


def classifier_accuracy(classifier: Classifier, features: torch.Tensor, classes: list[str],
                        labels: torch.Tensor) -> dict:
    """Top-1 (and top-5 with more than 5 classes) in % of an exported classifier on test features (N, D) whose
    labels (N,) index ``classes``, matched to the classifier's classes by name; ``skipped`` (the reason, logged)
    instead when the test set has classes the classifier does not know."""
    unknown = [name for name in classes if name not in classifier.classes]
    if unknown:
        known, missing = ", ".join(classifier.classes[:10]), ", ".join(repr(u) for u in unknown[:5])
        reason = (f"the model's classifier knows {len(classifier.classes)} classes ({known}), not the test set's "
                  f"{missing}: name the test classes as its labels did to score it")
        logger.warning("classifier not scored: %s", reason)
        return {"skipped": reason}
    target = torch.tensor([classifier.classes.index(name) for name in classes])[labels]  # (N,)
    with torch.no_grad():
        logits = classifier(features.float().cpu())  # (N, C)
    hits1 = logits.argmax(1) == target  # (N,)
    out = {"top1": float(hits1.double().mean() * 100), "classes": len(classifier.classes)}
    if logits.shape[1] > 5:  # the top-1 class counts too, so top5 >= top1 even when logits tie
        hits5 = (logits.topk(5, dim=1).indices == target[:, None]).any(1) | hits1
        out["top5"] = float(hits5.double().mean() * 100)
    return out


def summary_row(results: dict) -> dict:
    """The headline numbers of one evaluation, for a table."""
    knn = results["knn"][HEADLINE_K] if HEADLINE_K in results["knn"] else next(iter(results["knn"].values()))
    row = {"model": results["model"], "k-NN top-1": f"{knn['top1']:.1f}"}
    if "top5" in knn:
        row["k-NN top-5"] = f"{knn['top5']:.1f}"
    if "linear" in results:
        row["linear top-1"] = f"{results['linear']['top1']:.1f}"
    if "top1" in results.get("classifier", {}):
        row["classifier top-1"] = f"{results['classifier']['top1']:.1f}"
    if "clustering" in results:
        c = results["clustering"]
        row["NMI"] = f"{c['nmi']:.3f}"
        row["ARI"] = f"{c['ari']:.3f}"
        row["cluster acc"] = f"{c['accuracy']:.1f}"
    row.update(speed_cells(results.get("speed")))
    return row
