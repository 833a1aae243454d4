"""``unsupdistill eval``, ``export``, ``embed`` and ``show``: what is done with a trained backbone."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from unsupdistill import run_dir
from unsupdistill.cli.options import RETRIEVAL_K, SHOW_KINDS, deprecated, looks_like_file
from unsupdistill.export.names import EMBED_SUFFIXES

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from unsupdistill.models.frozen import FeatureModel


def eval_command(args: argparse.Namespace) -> int:
    from unsupdistill.config import ConfigError
    from unsupdistill.evaluate.report import format_table
    from unsupdistill.evaluate.run import EvalOptions, evaluate, summary_row
    from unsupdistill.evaluate.speed import describe_speed

    if args.speed_seconds < 0:  # checked before the features, not after them (--speed-batch: by argparse)
        raise ConfigError(f"--speed-seconds {args.speed_seconds}: allowed values are a time limit of 0 s or more")
    if args.avgpool and args.vit_blocks is None:  # it would change nothing
        raise ConfigError("--avgpool appends the average-pooled patch tokens to the class tokens --vit-blocks N "
                          "concatenates: give --vit-blocks N with it (DINO: --vit-blocks 1 --avgpool for ViT-B)")
    options = EvalOptions(
        image_size=args.image_size, batch_size=args.batch_size, precision=args.precision,
        linear=not args.no_linear, linear_backend=args.linear, clustering=not args.no_clustering,
        vit_blocks=args.vit_blocks, avgpool=args.avgpool, student=args.student, cache=not args.no_cache,
        cache_dir=args.cache_dir, plots=not args.no_plots, device=args.device, workers=args.workers,
        speed=args.speed, speed_batch_size=args.speed_batch, speed_seconds=args.speed_seconds, ks=tuple(args.k),
        frontend=frontend_of(args.frontend_of) if args.frontend_of else None,
    )
    out = args.out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    if args.suite or len(args.model) > 1:
        from unsupdistill.evaluate.suite import LabeledPair, load_suite, run_suite

        pairs = load_suite(args.suite) if args.suite else [LabeledPair(Path(args.eval_test).name, args.eval_train,
                                                                       args.eval_test, args.image_size)]
        rows, _ = run_suite(args.model, pairs, options, out)
        print()
        print(format_table(rows, list(rows[0])))
        print(f"\ntable:   {out / 'suite.md'}\nresults: {out / 'suite.json'} (each report under {out}/<dataset>/)")
        return 0
    results = evaluate(args.model[0], args.eval_train, args.eval_test, options, out)
    row = summary_row(results)
    print()
    print(format_table([row], list(row)))
    knn = "  ".join(f"k={k}: {r['top1']:.1f}" for k, r in results["knn"].items())
    print(f"\nk-NN top-1 by k (T={options.temperature}): {knn}")
    if "speed" in results:
        print(describe_speed(results["speed"]))
    pictures = sorted(out.glob("*.png"))
    print(f"\nreport: {out / 'eval.json'}"
          + (f"\nplots:  {out}/{{{','.join(p.name for p in pictures)}}}" if pictures and not args.no_plots else ""))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from unsupdistill.export import export_model

    out_file = looks_like_file(args.out)
    if out_file:
        deprecated(f"--out {args.out} (the export file)", f"--out {args.out.parent} (a folder; the file is named "
                   "after the network it holds)")
    result = export_model(args.model, args.format, args.out if out_file else None,
                          out_dir=None if out_file else args.out, student=args.student, data=args.data,
                          atol=args.atol, rtol=args.rtol)
    checked = [("features", result.parity)] + ([("logits", result.logits_parity)] if result.logits_parity else [])
    print(f"\n{args.format} parity against PyTorch on {result.parity.batch_sizes[0]} real {result.inputs} from "
          f"{result.parity.images} (and a batch of 1):\n"
          + "".join(f"  {name + ':':<10}max abs error {p.max_abs_error:.3g}, max rel error {p.max_rel_error:.3g}, "
                    f"tolerance {p.tolerance:.3g}: passed\n" for name, p in checked)
          + f"export:  {result.path}\nsidecar: {result.sidecar}"
          + (f"\nclassifier: {result.classifier}" if result.classifier else "")
          + ("\nlogits:  class scores over the sidecar's 'classes' (its 'logits' says where)"
             if result.logits_parity else ""))
    return 0


def embed_command(args: argparse.Namespace) -> int:
    from unsupdistill.export import ExportError, embed_folder

    out = args.out or Path("runs") / time.strftime("embed-%Y%m%d-%H%M%S")
    if looks_like_file(out):
        if out.suffix.lower() not in EMBED_SUFFIXES:
            raise ExportError(f"--out {out}: --out is a folder (default runs/embed-<timestamp>); a name with a file "
                              "extension is read as the old spelling, a file ending in .npy (features, plus a .csv "
                              "of paths) or .npz (features and paths in one file): give a folder name without an "
                              "extension")
        deprecated(f"--out {out} (a .npy/.npz file)", f"--out {out.parent / out.stem} (a folder) with "
                   f"--format {out.suffix.lower()[1:]}")
    result = embed_folder(args.model, args.data, out, fmt=args.format, student=args.student,
                          image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                          device=args.device, precision=args.precision, top_k=args.top_k)
    noun = "images" if result.kind == "image" else "sound files"
    print(f"\nembedded {result.count} {noun} ({result.feature_dim} features each) at "
          f"{result.images_per_s:.0f} {noun}/s on {result.device} in {result.precision} ({result.workers} decoding "
          f"workers); {result.skipped} unreadable files skipped\n"
          f"features: {result.features}\npaths:    {result.paths}\nsummary:  {result.summary}"
          + (f"\nskipped:  {result.skipped_list}" if result.skipped_list else "")
          + (f"\nclasses:  {result.predictions} (top {result.classes_per_image} per image)"
             if result.predictions else ""))
    return 0




def show_command(args: argparse.Namespace) -> int:
    """Pictures of what a backbone sees; the kinds not asked for by ``--kind`` are drawn where they fit."""
    from unsupdistill import show
    from unsupdistill.config import ConfigError
    from unsupdistill.data import list_audio_files, list_image_files
    from unsupdistill.models.load import load_model

    model = load_model(args.model, image_size=args.image_size, student=args.student)
    sound = model.frontend is not None  # a model of sounds: its inputs are sound files, drawn as spectrograms
    list_files, what = (list_audio_files, "sound") if sound else (list_image_files, "image")
    queries: list[Path] = []
    for item in args.images:  # files as given, folders in sorted order
        queries += list_files(item) if Path(item).is_dir() else [Path(item)]
    queries = queries[:args.max_images]
    if not queries:
        raise ConfigError(f"no {what} files in {' '.join(args.images)}; give {what} files or a folder holding some")
    inputs = show.load_clips(queries, model) if sound else show.load_pixels(queries, model.input_size)
    out = args.out or Path("runs") / time.strftime("show-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for kind in args.kind or SHOW_KINDS:
        path = out / f"{kind}.png"
        try:
            if kind == "curves":
                if not (Path(args.model) / run_dir.METRICS).is_file():
                    raise ValueError(f"it needs a run directory with a metrics.jsonl; {args.model} has none")
                written.append(show.plot_training_curves(args.model, path, method_curves(Path(args.model))))
            elif kind == "retrieval" and args.gallery is None:
                raise ValueError(f"it needs --gallery FOLDER, the {what}s to search")
            elif sound:
                written.append(show.save_png(_sound_picture(kind, model, args, queries, inputs), path,
                                             palette=True))
            elif kind == "attention":
                written.append(show.save_png(show.show_attention(model, inputs, args.threshold), path))
            elif kind == "pca":
                written.append(show.save_png(show.show_pca(model, inputs), path))
            elif kind == "retrieval":
                k = RETRIEVAL_K if args.k is None else args.k
                found = show.show_retrieval(model, queries, list_image_files(args.gallery), k,
                                            batch_size=args.batch_size)
                written.append(show.save_png(found.picture, path))
            else:
                raise show.PictureDoesNotFit("the views are drawn for runs of sounds (DINO's multi-crop in time); "
                                             "those of images are not drawn yet")
        except ValueError as err:
            if args.kind:  # asked for by name: an error
                raise ConfigError(f"show --kind {kind}: {err}") from err
            skipped.append(f"{kind} ({err})")
    if not written:
        raise ConfigError(f"no picture fits this model and these {what}s: " + "; ".join(skipped))
    print(f"\n{len(queries)} {what}s from {' '.join(args.images)} through {model.name}:")
    for path in written:
        print(f"  {path.stem + ':':<11}{path}")
    for note in skipped:
        print(f"  not drawn: {note}")
    return 0


def _sound_picture(kind: str, model: FeatureModel, args: argparse.Namespace, queries: list[Path],
                   waves: Tensor) -> np.ndarray:
    """The picture ``kind`` of a model of sounds, of the clips ``waves`` (N, 1, S) read from ``queries``."""
    from unsupdistill import show
    from unsupdistill.data import list_audio_files

    if kind == "views":
        clips = slice(0, show.VIEW_CLIPS)
        return show.show_sound_views(show.run_multi_crop(args.model), model, waves[clips],
                                     _sound_names(queries[clips], args.images))
    if kind == "attention":
        return show.show_sound_attention(model, waves, args.threshold)
    if kind == "pca":
        return show.show_sound_pca(model, waves)
    gallery = list_audio_files(args.gallery)
    found = show.show_sound_retrieval(model, queries, gallery, RETRIEVAL_K if args.k is None else args.k,
                                      args.batch_size, _sound_names(queries, args.images),
                                      _sound_names(gallery, [args.gallery]))
    return found.picture


def _sound_names(files: list[Path], given: list[str]) -> list[str]:
    """A short caption for each sound file: its path below the folder it was found in, without the extension
    (``low/3`` in a folder of class folders), or its name without the extension for a file given itself."""
    folders = [Path(item) for item in given if Path(item).is_dir()]
    names = []
    for file in files:
        folder = next((f for f in folders if file.is_relative_to(f)), None)
        names.append(str(file.relative_to(folder).with_suffix("")) if folder is not None else file.stem)
    return names


def method_curves(run: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The curves panels of the method a run directory trained (its ``config.yaml``); none where it names no known
    method."""
    import yaml

    from unsupdistill import registry

    try:
        name = (yaml.safe_load((run / run_dir.CONFIG).read_text()) or {}).get("method")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return ()
    return registry.method_class(name).curves if name in registry.names() else ()


def frontend_of(spec: str) -> dict:
    """The sound front end of the model ``spec`` names (``eval --frontend-of``)."""
    from unsupdistill.models.load import ModelSpecError, load_model

    frontend = load_model(spec).frontend
    if frontend is None:
        raise ModelSpecError(f"--frontend-of {spec}: a model of images has no sound front end; give a run, export or "
                             "checkpoint trained on sounds")
    return frontend
