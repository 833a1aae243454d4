"""The ``unsupdistill`` command line: one verb per user task (pretrain, distill, eval, show, export, embed)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from unsupdistill.cli.options import (
    EXIT_STOPPED,
    RETRIEVAL_K,
    SHOW_KINDS,
    TRAINING_EPILOG,
    OldSpelling,
    add_batch_options,
    add_labeled_sets,
    add_out,
    add_training_arguments,
    apply_old_spellings,
    count,
    positive,
)
from unsupdistill.config.sections import CSV_FORMAT
from unsupdistill.evaluate.options import HEADLINE_K, EvalOptions
from unsupdistill.export.names import ATOL, EMBED_FORMATS, EXPORT_FORMATS, RTOL

__all__ = ["EXIT_STOPPED", "build_parser", "main"]

logger = logging.getLogger("unsupdistill")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb; each follows the rules of :mod:`unsupdistill.cli.options`."""
    parser = argparse.ArgumentParser(prog="unsupdistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "pretrain", help="DINO pretraining on a folder of unlabeled images (default: built-in digits)",
        description="Train a DINO student/teacher on unlabeled images and export the teacher backbone. "
                    "Arguments with '=' override the config, e.g. train.epochs=5 optim.lr=1e-3.",
        epilog=TRAINING_EPILOG,
    )
    add_training_arguments(p, "pretrain")
    d = commands.add_parser(
        "distill", help="distill a frozen teacher (a run of ours, an export, timm:NAME,pretrained=true) into a "
                        "small student on unlabeled images",
        description="Train the model section's backbone to match a frozen teacher's features on one shared view "
                    "of each image, and export it. Arguments with '=' override the config, e.g. "
                    "distill.loss=cosine model.backbone=resnet18.",
        epilog=TRAINING_EPILOG,
    )
    add_training_arguments(d, "distill")
    d.add_argument("--generations", type=positive, metavar="N",
                   help="born-again generations: generation k+1 is distilled from generation k's export (same "
                        "student network), each in RUN/gen_k; 1 (default) trains one student in RUN. With --resume "
                        "ROOT of generations, a larger N trains more of them")

    e = commands.add_parser(
        "eval", help="k-NN, linear probe and clustering of frozen features on a labeled train/test pair",
        description="Evaluate frozen features. MODEL is a run directory, a checkpoint (.pt), an exported "
                    "backbone (.safetensors with its .json), timm:<name>[,key=value...] (random init), pixels, or "
                    "logmel (sounds: each mel band's mean and spread, with --frontend-of). "
                    f"The labeled sets are folders with one subfolder per class, .csv files ({CSV_FORMAT}), or "
                    "digits.",
    )
    e.add_argument("model", metavar="MODEL", nargs="+", help="one or more models (several: compared side by side)")
    add_labeled_sets(e, "labeled training set (k-NN memory, probe training)", "labeled test set, scored",
                     old=("--train", "--test"))
    e.add_argument("--suite", type=Path, help="YAML file of labeled sets (datasets: [{name, train, test, "
                                               "image_size}]) to evaluate every MODEL on, instead of "
                                               "--eval-train/--eval-test")
    add_out(e, "the report (eval.json, plots; with several models or --suite, the table and one folder per set)",
            "runs/eval-<timestamp>")
    e.add_argument("--k", type=positive, nargs="+", metavar="K", default=list(EvalOptions.ks),
                   help=f"numbers of neighbours of the k-NN classifier (default {' '.join(map(str, EvalOptions.ks))}; "
                        f"the table shows k={HEADLINE_K}, or the smallest k without it)")
    e.add_argument("--image-size", type=positive, metavar="PX", help="input size for pixels and timm: models")
    e.add_argument("--frontend-of", metavar="MODEL",
                   help="sounds: the front end of MODEL (a run, export or checkpoint of sounds) for the models without "
                        "one of their own: timm: networks of sounds and logmel (the log-mel statistics of each band)")
    add_batch_options(e, training=False, batch_default=256, images="the test set holds",
                      workers_help="image-decoding processes (default: one per core, up to 8; none for the "
                                   "in-memory digits)")
    e.add_argument("--vit-blocks", type=positive, metavar="N",
                   help="ViTs: concatenate class tokens of the last N blocks (DINO: 4); a classifier (a model "
                        "distilled with labels) is still scored on the pooled features it was trained on")
    e.add_argument("--avgpool", action="store_true",
                   help="with --vit-blocks: add average-pooled patch tokens (DINO: --vit-blocks 1 --avgpool for ViT-B)")
    e.add_argument("--student", action="store_true", help="evaluate the student instead of the teacher")
    e.add_argument("--linear", choices=["torch", "sklearn"], default="torch",
                   help="linear probe: torch, a grid of learning rates and weight decays trained at once (default); "
                        "sklearn, logistic regression (slower, for comparison)")
    e.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    e.add_argument("--no-clustering", action="store_true", help="skip k-means clustering")
    e.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    e.add_argument("--no-cache", action="store_true", help="recompute features even if cached")
    e.add_argument("--cache-dir", type=Path, help="feature cache (default $UNSUPDISTILL_CACHE or "
                                                    "~/.cache/unsupdistill/features)")
    e.add_argument("--speed", action="store_true",
                   help="also measure inference speed at each model's input size, on --device at the extraction "
                        "precision: images/s, latency of one image, parameters and GFLOPs (eval.json 'speed')")
    e.add_argument("--speed-batch", type=positive, default=64, metavar="N",
                   help="images per pass of the --speed throughput timing (default 64)")
    e.add_argument("--speed-seconds", type=float, default=2.0,
                   help="time limit of each --speed timing, throughput and latency (default 2; longer is steadier)")

    x = commands.add_parser(
        "export", help="export a trained backbone as safetensors, TorchScript or ONNX, checked for parity",
        description="Export the teacher (or student) backbone of a trained model. After writing, the export is "
                    "reloaded (plain timm, torch.jit.load, onnxruntime) and run next to the PyTorch model on 16 "
                    "real images on the CPU in fp32; it is kept only if the features agree within the tolerance. "
                    "TorchScript and ONNX graphs take float RGB batches in [0, 1] and include the normalisation; "
                    "those of a model of sounds take waves (N, 1, clip_samples) at its rate and include its front "
                    "end (log-mel), checked on real clips. "
                    "A model distilled with labels keeps its classifier, checked too: ONNX output 'logits' after "
                    "'features', TorchScript method logits(), safetensors <name>.classifier.safetensors; the sidecar "
                    "lists the classes. "
                    "No --precision/--device/--workers/--batch-size: the parity check is one small CPU batch.",
    )
    x.add_argument("model", metavar="MODEL",
                   help="a run directory (backbone.safetensors + backbone.json, or checkpoints/last.pt), a checkpoint "
                        "file (.pt), or an exported backbone (.safetensors with its .json beside it, or its path "
                        "without .safetensors); not timm: or pixels, which have no trained weights")
    x.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    add_out(x, "the export and its .json sidecar (teacher.onnx + teacher.onnx.json, ...; named after the network it "
               "holds)", "<run>/export")
    x.add_argument("--student", action="store_true", help="export the student instead of the teacher")
    x.add_argument("--data", help="real images for the parity check: an image folder or digits "
                                  "(default: the run's training folder if it still exists, else digits); for a model "
                                  "of sounds a sound folder (default: the run's training folder if it still exists, "
                                  "else generated clips)")
    x.add_argument("--atol", type=float, default=ATOL, help=f"absolute parity tolerance (default {ATOL})")
    x.add_argument("--rtol", type=float, default=RTOL,
                   help=f"parity tolerance relative to the largest feature magnitude (default {RTOL})")

    m = commands.add_parser(
        "embed", help="features of every image in a folder, to features.npy + features.csv of paths (or one .npz)",
        description="Embed every readable image under DATA (recursively) with a frozen backbone; a model of sounds "
                    "embeds every sound file instead, read as evaluation reads it (mono at its rate, cut or padded "
                    "to its clip). Unreadable files are skipped, counted and listed in skipped.txt.",
    )
    m.add_argument("model", metavar="MODEL", help="run directory, checkpoint, exported .safetensors, "
                                                  "timm:<name>[,key=value...] or pixels")
    m.add_argument("data", metavar="DATA", help="image folder (a sound folder for a model of sounds)")
    add_out(m, "features.npy + features.csv (row, path) or features.npz, embed.json (what and how fast), "
               "predictions.csv (a model with a classifier) and skipped.txt", "runs/embed-<timestamp>")
    m.add_argument("--format", choices=EMBED_FORMATS,
                   help="npy (default): features.npy (N, D) float32 + features.csv of paths; npz: one features.npz "
                        "holding features and paths")
    m.add_argument("--student", action="store_true", help="embed with the student's backbone")
    m.add_argument("--image-size", type=positive, metavar="PX", help="input size for pixels and timm: models")
    add_batch_options(m, training=False, batch_default=256, images="DATA holds",
                      workers_help="image-decoding processes (default: one per core, up to 8)")
    m.add_argument("--top-k", type=count, default=5, metavar="K",
                   help="a model distilled with labels (it has a classifier): also write predictions.csv, each "
                        "image's K most probable classes and their probabilities (default 5; 0: none)")

    s = commands.add_parser(
        "show", help="pictures of what a backbone sees: ViT attention, PCA of patch features, nearest neighbours, "
                     "a run's training curves, and for sounds its views as spectrograms",
        description="Draw pictures of MODEL (a run directory, checkpoint, exported .safetensors or timm:<name>) on "
                    "IMAGE files or folders: the last block's class-token attention per head for ViTs (DINO), the "
                    "first PCA components of patch or feature-map features as RGB with the background removed "
                    "(DINOv2), each image's nearest neighbours in --gallery, and a run's training curves. Without "
                    "--kind every picture that fits is drawn and the others are named. It runs on the CPU in fp32, "
                    "decoding in the main process (no --precision/--device/--workers); --batch-size sets the "
                    "gallery's batches. A model of sounds takes sound files and folders instead, drawn as log-mel "
                    "spectrograms (low frequencies at the bottom), and a DINO run of sounds draws its views: a few "
                    "clips, each whole and as its global and local views in time.",
    )
    s.add_argument("model", metavar="MODEL")
    s.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files or folders (their first --max-images); sound files for a model of sounds")
    s.add_argument("--kind", action="append", choices=SHOW_KINDS, help="a picture to draw (repeat for several; "
                                                                       "default: every one that fits)")
    add_out(s, "the PNGs", "runs/show-<timestamp>")
    s.add_argument("--gallery", help="image folder searched for the nearest neighbours (retrieval)")
    s.add_argument("--k", type=positive, metavar="K",
                   help=f"retrieval: neighbours per image (default {RETRIEVAL_K}; was -k)")
    s.add_argument("-k", action=OldSpelling, new="--k", dest="k", type=positive)
    s.add_argument("--batch-size", type=positive, default=64, metavar="N",
                   help="gallery images decoded and embedded at a time for the retrieval (default 64)")
    s.add_argument("--threshold", type=float, default=0.6,
                   help="share of the attention mass each attention mask keeps (DINO: 0.6)")
    s.add_argument("--max-images", type=positive, default=8, metavar="N", help="images drawn at most (default 8)")
    s.add_argument("--student", action="store_true", help="the student's backbone instead of the teacher's")
    s.add_argument("--image-size", type=positive, metavar="PX", help="input size for timm: models")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # paths and key=value may follow options
    if extra and (args.command not in ("pretrain", "distill") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # torchrun's RANK: logging is set up before any process group (and before torch is imported)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from unsupdistill.cli.tools import embed_command, eval_command, export_command, show_command  # heavy: after
    from unsupdistill.cli.training import USER_ERRORS, train_command  # parsing, so --help answers at once

    try:
        apply_old_spellings(args)
        if args.command == "eval":
            pair = args.eval_train is not None and args.eval_test is not None
            if (args.suite is None and not pair) or (args.suite is not None and (args.eval_train or args.eval_test)):
                parser.error("eval needs --eval-train and --eval-test, or --suite FILE (not both)")
            return eval_command(args)
        if args.command == "export":
            return export_command(args)
        if args.command == "embed":
            return embed_command(args)
        if args.command == "show":
            return show_command(args)
        args.args += extra
        return train_command(args)
    except USER_ERRORS as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
