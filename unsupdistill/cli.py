"""The ``unsupdistill`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch

from unsupdistill import distributed
from unsupdistill.auto import AUTOMATIC_KEYS, auto_settings, explicit_keys, format_choices
from unsupdistill.config import (
    Config,
    ConfigError,
    absolute_paths,
    apply_overrides,
    config_from_dict,
    load_config,
    merge,
    recipe_names,
    validate,
)
from unsupdistill.data import DataError, FolderScan, num_workers, scan_for_run
from unsupdistill.devices import training_device
from unsupdistill.export import EXPORT_FORMATS, ExportError, embed_folder, export_model
from unsupdistill.export.formats import ATOL, RTOL
from unsupdistill.models.load import ModelSpecError
from unsupdistill.storage import CheckpointError, latest_checkpoint
from unsupdistill.train.checkpoint import set_aside_later_state
from unsupdistill.train.faults import TrainingError, TrainingStopped
from unsupdistill.train.status import STATUS_FILE, resume_command, write_status

logger = logging.getLogger("unsupdistill")

USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelSpecError, ExportError)
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped by SIGTERM/SIGINT with a checkpoint; --resume continues


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unsupdistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "pretrain", help="DINO pretraining on a folder of unlabeled images (default: built-in digits)",
        description="Train a DINO student/teacher on unlabeled images and export the teacher backbone. "
                    "Arguments with '=' override the config, e.g. train.epochs=5 optim.lr=1e-3.",
        epilog=_TRAINING_EPILOG,
    )
    _add_training_arguments(p)
    d = commands.add_parser(
        "distill", help="distill a frozen teacher (a run of ours, an export, timm:NAME,pretrained=true) into a "
                        "small student on unlabeled images",
        description="Train the model section's backbone to match a frozen teacher's features on one shared view "
                    "of each image, and export it. Arguments with '=' override the config, e.g. "
                    "distill.loss=cosine model.backbone=resnet18.",
        epilog=_TRAINING_EPILOG,
    )
    _add_training_arguments(d)
    d.add_argument("--teacher", metavar="TEACHER",
                   help="the frozen teacher (sets distill.teacher): a run directory, an exported .safetensors (with "
                        "its .json), a checkpoint .pt, or timm:NAME[,pretrained=true][,key=value...], e.g. "
                        "timm:vit_small_patch14_dinov2.lvd142m,pretrained=true,img_size=224")

    e = commands.add_parser(
        "eval", help="k-NN, linear probe and clustering of frozen features on a labeled train/test pair",
        description="Evaluate frozen features. MODEL is a run directory, a checkpoint (.pt), an exported "
                    "backbone (.safetensors with its .json), timm:<name>[,key=value...] (random init) or pixels. "
                    "TRAIN and TEST are folders with one subfolder per class, CSV files of path,label, or digits.",
    )
    e.add_argument("model", metavar="MODEL")
    e.add_argument("--train", required=True, help="labeled training set (k-NN memory, probe training)")
    e.add_argument("--test", required=True, help="labeled test set (scored)")
    e.add_argument("--out", type=Path, help="report directory (default runs/eval-<timestamp>)")
    e.add_argument("--image-size", type=int, help="input size for pixels and timm: models")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: fp32 (bf16 moved results by more than 0.2 points on digits)")
    e.add_argument("--vit-blocks", type=int, help="ViTs: concatenate class tokens of the last N blocks (DINO: 4)")
    e.add_argument("--avgpool", action="store_true", help="with --vit-blocks: add average-pooled patch tokens")
    e.add_argument("--student", action="store_true", help="evaluate the student instead of the teacher")
    e.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    e.add_argument("--no-clustering", action="store_true", help="skip k-means clustering")
    e.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    e.add_argument("--no-cache", action="store_true", help="recompute features even if cached")
    e.add_argument("--cache-dir", type=Path, help="feature cache (default $UNSUPDISTILL_CACHE or "
                                                    "~/.cache/unsupdistill/features)")
    e.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the network runs (default auto: CUDA when available, else the CPU)")
    e.add_argument("--workers", type=_count, help="image-decoding processes (default: one per core, up to 8; "
                                               "none for the in-memory digits)")

    x = commands.add_parser(
        "export", help="export a trained backbone as safetensors, TorchScript or ONNX, checked for parity",
        description="Export the teacher (or student) backbone of a run directory or checkpoint. After writing, "
                    "the export is reloaded (plain timm, torch.jit.load, onnxruntime) and run next to the PyTorch "
                    "model on real images; it is kept only if the features agree within the tolerance. "
                    "TorchScript and ONNX graphs take float RGB batches in [0, 1] and include the normalisation.",
    )
    x.add_argument("model", metavar="MODEL", help="run directory or checkpoint (.pt)")
    x.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    x.add_argument("--out", type=Path, help="file to write (default <run>/export/<teacher|student>.<ext>); "
                                            "a .json sidecar with the same stem describes input and parity")
    x.add_argument("--student", action="store_true", help="export the student instead of the teacher")
    x.add_argument("--data", help="real images for the parity check: an image folder or digits "
                                  "(default: the run's training folder if it still exists, else digits)")
    x.add_argument("--atol", type=float, default=ATOL, help=f"absolute parity tolerance (default {ATOL})")
    x.add_argument("--rtol", type=float, default=RTOL,
                   help=f"parity tolerance relative to the largest feature magnitude (default {RTOL})")

    m = commands.add_parser(
        "embed", help="features of every image in a folder, to .npy + .csv of paths or one .npz",
        description="Embed every readable image under DATA (recursively) with a frozen backbone. Unreadable "
                    "files are skipped, counted and listed in <out>.skipped.txt.",
    )
    m.add_argument("model", metavar="MODEL", help="run directory, checkpoint, exported .safetensors, "
                                                  "timm:<name>[,key=value...] or pixels")
    m.add_argument("data", metavar="DATA", help="image folder")
    m.add_argument("--out", type=Path, required=True, help="features.npy (+ features.csv of paths) or features.npz")
    m.add_argument("--student", action="store_true", help="embed with the student's backbone")
    m.add_argument("--image-size", type=int, help="input size for pixels and timm: models")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    m.add_argument("--workers", type=_count, help="image-decoding processes (default: one per core, up to 8)")
    m.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the network runs (default auto: CUDA when available, else the CPU)")

    args, extra = parser.parse_known_args(argv)  # paths and key=value may follow options
    if extra and (args.command not in ("pretrain", "distill") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if distributed.rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "eval":
            return eval_command(args)
        if args.command == "export":
            return export_command(args)
        if args.command == "embed":
            return embed_command(args)
        args.args += extra
        return train_command(args)
    except USER_ERRORS as err:
        logger.error("%s", err)
        return 2


_TRAINING_EPILOG = (
    f"exit status: 0 done; 1 training error (non-finite loss or gradients, a checkpoint that cannot be written; "
    f"the last good checkpoint is kept); 2 bad input; {EXIT_STOPPED} stopped by SIGTERM or SIGINT after writing a "
    "checkpoint (--resume continues the run). torchrun turns any non-zero status into 1: read RUN/status.json "
    "(state running, done, preempted or failed)."
)


def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``pretrain`` and ``distill`` share."""
    p.add_argument("args", nargs="*", metavar="[PATH] [key=value ...]",
                   help="image folder (omit for scikit-learn's digits; without --recipe, the settings are chosen "
                        "from its images and the device) and section.key=value config overrides")
    p.add_argument("--recipe", help=f"shipped recipe ({', '.join(recipe_names())}) or a YAML file")
    p.add_argument("--out", type=Path, help="run directory (default runs/<timestamp>)")
    p.add_argument("--resume", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its newest checkpoint that loads (checkpoints/last.pt or "
                        "epoch_*.pt; corrupt ones are skipped with a warning), or from the given .pt file")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything and run one step on a batch of 2 per process; write nothing")


def eval_command(args: argparse.Namespace) -> int:
    from unsupdistill.evaluate.report import format_table
    from unsupdistill.evaluate.run import EvalOptions, evaluate, summary_row

    options = EvalOptions(
        image_size=args.image_size, batch_size=args.batch_size, precision=args.precision,
        linear=not args.no_linear, clustering=not args.no_clustering, vit_blocks=args.vit_blocks,
        avgpool=args.avgpool, student=args.student, cache=not args.no_cache, cache_dir=args.cache_dir,
        plots=not args.no_plots, device=args.device, workers=args.workers,
    )
    out = args.out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    results = evaluate(args.model, args.train, args.test, options, out)
    row = summary_row(results)
    print()
    print(format_table([row], list(row)))
    knn = "  ".join(f"k={k}: {r['top1']:.1f}" for k, r in results["knn"].items())
    print(f"\nk-NN top-1 by k (T={options.temperature}): {knn}")
    print(f"\nreport: {out / 'eval.json'}" + ("" if args.no_plots else
          f"\nplots:  {out / 'feature_map.png'}, {out / 'knn_vs_k.png'}"
          + ("" if args.no_linear else f", {out / 'confusion.png'}")))
    return 0


def export_command(args: argparse.Namespace) -> int:
    result = export_model(args.model, args.format, args.out, student=args.student, data=args.data,
                          atol=args.atol, rtol=args.rtol)
    parity = result.parity
    print(f"\n{args.format} parity against PyTorch on {parity.batch_sizes[0]} real images from {parity.images} "
          f"(and a batch of 1):\n  max abs error {parity.max_abs_error:.3g}, max rel error "
          f"{parity.max_rel_error:.3g}, tolerance {parity.tolerance:.3g}: passed\n"
          f"export:  {result.path}\nsidecar: {result.sidecar}")
    return 0


def embed_command(args: argparse.Namespace) -> int:
    import torch

    result = embed_folder(args.model, args.data, args.out, student=args.student, image_size=args.image_size,
                          batch_size=args.batch_size, workers=args.workers, device=args.device,
                          precision=torch.bfloat16 if args.precision == "bf16" else None)
    print(f"\nembedded {result.count} images ({result.feature_dim} features each) at "
          f"{result.images_per_s:.0f} images/s on {result.device} ({result.workers} decoding workers); "
          f"{result.skipped} unreadable files skipped\n"
          f"features: {result.features}\npaths:    {result.paths}\nsummary:  {result.summary}"
          + (f"\nskipped:  {result.skipped_list}" if result.skipped_list else ""))
    return 0


def train_command(args: argparse.Namespace) -> int:
    """``pretrain`` and ``distill``: one training run, its run directory and status."""
    from unsupdistill.methods import train  # heavy imports after checks

    paths, overrides = split_pretrain_args(args.args)
    if args.command == "distill":
        overrides = ["method=distill", *overrides]
    checkpoint, ckpt_path = None, None
    if args.resume:
        if args.recipe:
            raise ConfigError("--resume takes the run's own config; pass changes as key=value, not --recipe")
        ckpt_path, checkpoint = latest_checkpoint(args.resume)
        logger.info("resuming from %s (step %d)", ckpt_path, checkpoint["step"])
        config = config_from_dict(checkpoint["config"], str(ckpt_path))
        config = apply_overrides(config, overrides)
    else:
        config = load_config(args.recipe, overrides, check=False)  # checked below
    if paths:  # a path as written, never parsed as YAML
        config = merge(config, {"data": {"path": paths[0]}}, "command line")
    if getattr(args, "teacher", None):
        config = merge(config, {"distill": {"teacher": args.teacher}}, "--teacher")
    config = absolute_paths(config)
    automatic = args.recipe is None and checkpoint is None and config.data.path is not None
    # before any data is read; what the automatic settings will set is checked once they have
    validate(config, ignore=AUTOMATIC_KEYS - explicit_keys(overrides) if automatic else frozenset())

    # every process joins now: process 0 names the run directory and scans the folder for all
    device = training_device(config.train.device)
    distributed.init_distributed(device)
    default_out = ckpt_path.parent.parent if ckpt_path is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(distributed.broadcast_object(str(args.out or default_out)))
    if args.dry_run:
        return _dry_run(config, run_dir, checkpoint, automatic, overrides, device)

    log_file = None
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = _file_handler(run_dir / "train.log")
        logging.getLogger().addHandler(log_file)
        if ckpt_path is not None and run_dir.resolve() == ckpt_path.parent.parent.resolve():
            set_aside_later_state(run_dir, int(checkpoint["step"]))  # before anything of the run is rewritten
        write_status(run_dir, "running", step=checkpoint["step"] if checkpoint else 0)
    try:
        config, scan, notes = _settings_for_data(config, run_dir, automatic, overrides, device)
        probe = None
        if config.eval.train and distributed.is_main_process():  # read now: a bad set fails before training
            from unsupdistill.evaluate.probe import KNNProbe

            probe = KNNProbe(config, device)
        backbone = train(config, run_dir, checkpoint, scan=scan, config_notes=notes, probe=probe)
    except TrainingStopped as stop:
        verb = "distill" if config.method == "distill" else "pretrain"
        write_status(run_dir, "preempted", EXIT_STOPPED, step=stop.step, resume=resume_command(run_dir, verb))
        if log_file is not None:
            logger.warning("%s", stop)
        return EXIT_STOPPED
    except TrainingError as err:
        write_status(run_dir, "failed", 1, reason=str(err))
        logger.error("%s", err)
        return 1
    except USER_ERRORS as err:
        write_status(run_dir, "failed", 2, reason=str(err))
        raise
    except BaseException as err:  # a crash or a second Ctrl-C: say so, then let it propagate
        write_status(run_dir, "failed", 130 if isinstance(err, KeyboardInterrupt) else 1,
                     reason=f"{type(err).__name__}: {err}")
        raise
    finally:
        distributed.cleanup()
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    if backbone is not None:
        sidecar = json.loads(backbone.with_suffix(".json").read_text())
        write_status(run_dir, "done", 0, step=sidecar["step"], backbone=str(backbone))
        print(f"\nrun directory: {run_dir}\n"
              f"  backbone:    {backbone} (+ backbone.json, input size {sidecar['input_size']} px)\n"
              f"  checkpoint:  {run_dir / 'checkpoints' / 'last.pt'}\n"
              f"  metrics:     {run_dir / 'metrics.jsonl'}  (tensorboard --logdir {run_dir / 'tensorboard'})\n"
              f"  config:      {run_dir / 'config.yaml'}\n"
              f"  status:      {run_dir / STATUS_FILE}")
    return 0


def _settings_for_data(config: Config, run_dir: Path | None, automatic: bool, overrides: list[str],
                       device: torch.device) -> tuple[Config, FolderScan | None, str]:
    """Scan the image folder (once per run, see ``scan_for_run``) and, for a folder without a recipe, choose
    the settings that depend on it. Returns the config, the scan and the choices as config.yaml comments."""
    if config.data.path is None:
        return config, None, ""
    scan = scan_for_run(config.data.path, config.data.verify, run_dir, max(1, num_workers(config.data)))
    if not automatic:
        return config, scan, ""
    config, choices = auto_settings(config, scan, device.type, explicit_keys(overrides),
                                    distributed.launched_world_size())
    table = format_choices(choices)
    logger.info("settings chosen for %d images in %s on %s (a key=value argument or --recipe overrides any):\n%s",
                len(scan.files), config.data.path, device.type.upper(), table)
    notes = (f"Settings chosen automatically for {len(scan.files)} images on {device.type.upper()} (value, why):\n"
             + table)
    return config, scan, notes


def _dry_run(config: Config, run_dir: Path, checkpoint: dict | None, automatic: bool, overrides: list[str],
             device: torch.device) -> int:
    """Build everything and run one step on a tiny batch; write nothing."""
    from unsupdistill.methods import train

    try:
        config, scan, _ = _settings_for_data(config, None, automatic, overrides, device)
        report = train(config, run_dir, checkpoint, dry_run=True, scan=scan)
    finally:
        distributed.cleanup()
    print(json.dumps({"dry_run": "ok", **report}, indent=2))
    return 0


_OVERRIDE = re.compile(r"([A-Za-z_]\w*(\.[A-Za-z_]\w*)+|method)=")  # method: the one top-level key


def split_pretrain_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Tell the image folder from ``section.key=value`` overrides.

    An argument that names an existing file or folder is a path, whatever characters it holds (``a=b``,
    ``run #1``, ``2024``); otherwise one that starts with ``section.key=`` is an override.

    Raises:
        ConfigError: more than one path, or an argument that is neither.
    """
    paths, overrides = [], []
    for item in items:
        if _OVERRIDE.match(item) and not os.path.lexists(item):
            overrides.append(item)
        elif "=" in item and not os.path.lexists(item):
            raise ConfigError(f"'{item}' is neither an existing image folder nor a section.key=value override "
                              "(e.g. train.epochs=5)")
        else:
            paths.append(item)
    if len(paths) > 1:
        raise ConfigError(f"expected at most one image folder, got {paths}; overrides need section.key=value")
    return paths, overrides


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0 decodes in the main process), got {text!r}")
    return value


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler


if __name__ == "__main__":
    sys.exit(main())
