"""The one rule every verb's options follow (docs/command-line.md), and the old spellings read for one release.

- ``--out DIR``: a folder for the command's outputs, optional, with a default.
- ``--eval-train LABELED`` / ``--eval-test LABELED``: the labeled pair (config keys ``eval.train`` / ``eval.test``).
- ``--precision``, ``--device``, ``--workers``, ``--batch-size`` on every verb that runs a network in batches; the
  training verbs set ``train.precision``, ``train.device``, ``data.num_workers`` and ``train.batch_size``.

An old spelling (``--probe-train``, eval's ``--train``, an export or embed ``--out`` naming a file) does what it
did, and :func:`deprecated` says so with a logged warning, which a command-line user sees on stderr by default.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from unsupdistill import registry
from unsupdistill.config import ConfigError
from unsupdistill.config.loading import parse_override, recipe_names
from unsupdistill.config.sections import CSV_FORMAT
from unsupdistill.evaluate.options import AUTO_BF16_MIN_IMAGES

logger = logging.getLogger("unsupdistill")

TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXTRACTION_PRECISIONS = ("auto", "fp32", "bf16")
"""eval and embed extract features in fp32 or bf16 autocast; fp16 is not offered there (no CPU benefit, and the
features feed k-NN and probes whose bf16 accuracy is measured: BENCHMARKS.md, "Feature precision")."""
TRAINING_PRECISION_HELP = ("train.precision (default auto: bf16 autocast on a CPU with native bf16 (AVX-512 BF16, "
                           "AMX) and on a GPU with bf16, fp16 with a GradScaler on a GPU without, fp32 on a CPU "
                           "without native bf16, where it is emulated and slower; fp16 needs CUDA)")
"""What ``auto`` trains in: :func:`unsupdistill.train.precision.resolve_precision`."""
TRAINING_DEVICES = ("auto", "cpu", "cuda")
"""``train.device``: under torchrun each process takes CUDA device LOCAL_RANK, so there is no ``cuda:N``."""
LABELED_HELP = f"a folder of class subfolders, a .csv file ({CSV_FORMAT}), or digits"

TRAINING_KEYS = {"precision": "train.precision", "device": "train.device", "workers": "data.num_workers",
                 "batch_size": "train.batch_size", "eval_train": "eval.train", "eval_test": "eval.test"}
"""The training verbs' flags (argparse dest) and the config keys they set."""
FLAGS = {"precision": "--precision", "device": "--device", "workers": "--workers", "batch_size": "--batch-size",
         "eval_train": "--eval-train", "eval_test": "--eval-test"}

_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,11}")


def deprecated(old: str, new: str) -> None:
    """Log that the old spelling ``old`` was read as ``new``, and goes in the next release."""
    logger.warning("%s is deprecated and will be removed in the next release; use %s (read as such this time)",
                   old, new)


class OldSpelling(argparse.Action):
    """A hidden option that stores its value under the new option's dest; :func:`apply_old_spellings` then says so
    (and refuses a new spelling given with another value)."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=f"old_{dest}", help=argparse.SUPPRESS, **kwargs)
        self.new, self.new_dest = new, dest

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        used = list(getattr(namespace, "old_spellings", None) or [])
        used.append((option_string or self.option_strings[0], self.new, self.new_dest, values))
        namespace.old_spellings = used


def apply_old_spellings(args: argparse.Namespace) -> None:
    """Move the values of old spellings to their new options, warning once each; ``args.spelling`` maps a dest to
    the option the user wrote, so messages name it.

    Raises:
        ConfigError: an old and a new spelling of one option with different values.
    """
    args.spelling = {}
    for old, new, dest, value in getattr(args, "old_spellings", None) or []:
        current = getattr(args, dest, None)
        if current is not None and current != value:
            raise ConfigError(f"{new} {current} and {old} {value} disagree; give {new} only ({old} is its old "
                              "spelling)")
        setattr(args, dest, value)
        args.spelling[dest] = old
        deprecated(old, new)


def spelled(args: argparse.Namespace, dest: str) -> str:
    """The option the user wrote for ``dest``: its new spelling unless an old one was used."""
    return getattr(args, "spelling", {}).get(dest, FLAGS.get(dest, "--" + dest.replace("_", "-")))


def count(text: str) -> int:
    """argparse type: an integer >= 0 (the flag's help says what 0 means)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_out(p: argparse.ArgumentParser, what: str, default: str) -> None:
    """``--out DIR``: the folder for the command's outputs."""
    p.add_argument("--out", type=Path, metavar="DIR", help=f"folder for {what} (default {default})")


def add_labeled_sets(p: argparse.ArgumentParser, train_help: str, test_help: str, old: tuple[str, str]) -> None:
    """``--eval-train`` / ``--eval-test`` (config keys eval.train / eval.test) and their old spellings ``old``."""
    p.add_argument("--eval-train", metavar="LABELED", help=f"{train_help}: {LABELED_HELP} (eval.train; was {old[0]})")
    p.add_argument("--eval-test", metavar="LABELED", help=f"{test_help} (eval.test; was {old[1]})")
    p.add_argument(old[0], action=OldSpelling, new="--eval-train", dest="eval_train")
    p.add_argument(old[1], action=OldSpelling, new="--eval-test", dest="eval_test")


def add_batch_options(p: argparse.ArgumentParser, *, training: bool, batch_default: int | None = None,
                      images: str = "", workers_help: str = "") -> None:
    """``--precision``, ``--device``, ``--workers`` and ``--batch-size``; on a training verb they set the config keys of
    :data:`TRAINING_KEYS` (default: the recipe's or the automatic choice). Elsewhere ``images`` names the images
    whose count precision auto looks at, and ``workers_help`` says what --workers does."""
    if training:
        p.add_argument("--precision", choices=TRAINING_PRECISIONS, help=TRAINING_PRECISION_HELP)
        p.add_argument("--device", choices=TRAINING_DEVICES,
                       help="train.device (default auto: CUDA when available, else the CPU; no cuda:N: under "
                            "torchrun each process takes CUDA device LOCAL_RANK, else pick one with "
                            "CUDA_VISIBLE_DEVICES)")
        p.add_argument("--workers", type=count, metavar="N",
                       help="data.num_workers, image-decoding processes (default: chosen for the folder; none for "
                            "the in-memory digits)")
        p.add_argument("--batch-size", type=positive, metavar="N",
                       help="train.batch_size, global over all processes (default: the recipe's, or chosen for the "
                            "folder and device)")
        return
    p.add_argument("--precision", choices=EXTRACTION_PRECISIONS, default="auto",
                   help=f"auto (default): bf16 autocast only on a CPU with native bf16 (AVX-512 BF16, AMX) when "
                        f"{images} {AUTO_BF16_MIN_IMAGES:,} images or more (~2x faster; CIFAR-10 top-1 within 0.06 "
                        "points), else fp32, on CUDA too (unlike training's auto); fp16 is not offered")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the network runs (default auto: CUDA when available, else the CPU)")
    p.add_argument("--workers", type=count, metavar="N", help=workers_help)
    p.add_argument("--batch-size", type=positive, default=batch_default, metavar="N",
                   help=f"images per forward pass (default {batch_default})")


def looks_like_file(out: Path | None) -> bool:
    """True for an ``--out`` naming a file, the old spelling of export and embed: its name ends in a file extension
    (``.onnx``, ``.npy``, ``.parquet``; a letter, then up to 11 letters or digits) and it is not an existing folder."""
    return out is not None and not out.is_dir() and _FILE_EXTENSION.fullmatch(out.suffix) is not None


def training_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """``overrides`` followed by the ``key=value`` each training flag given stands for (:data:`TRAINING_KEYS`), so
    the automatic settings treat them as explicit.

    Raises:
        ConfigError: one of --eval-train/--eval-test without the other, or a flag and a ``key=value`` override of
            the same key with different values (both are named). A labeled set that does not exist is refused with
            the config's pair, by ``cli.training.labeled_pair``.
    """
    given = {dest: getattr(args, dest, None) for dest in TRAINING_KEYS}
    named = {item.partition("=")[0].strip() for item in overrides}
    train, test = given["eval_train"], given["eval_test"]
    if (train is None) != (test is None) and not {"eval.train", "eval.test"} & named:
        raise ConfigError(f"give {spelled(args, 'eval_train')} and {spelled(args, 'eval_test')} together (labeled "
                          f"sets: {LABELED_HELP})")
    added = []
    for dest, key in TRAINING_KEYS.items():
        if given[dest] is None:
            continue
        item = f"{key}={given[dest]}"
        wanted = parse_override(item)[1]
        for other in overrides:
            if other.partition("=")[0].strip() == key and parse_override(other)[1] != wanted:
                raise ConfigError(f"{spelled(args, dest)} {given[dest]} and {other} disagree; give one of them")
        added.append(item)
    return [*overrides, *added]


SHOW_KINDS = ("attention", "pca", "retrieval", "views", "curves")
"""The pictures ``unsupdistill show`` draws."""
RETRIEVAL_K = 5
"""``show --k``'s default: neighbours per image in the retrieval picture."""
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped by SIGTERM/SIGINT with a checkpoint; --resume continues

TRAINING_EPILOG = (
    f"exit status: 0 done; 1 training error (non-finite loss or gradients, a checkpoint that cannot be written; "
    f"the last good checkpoint is kept); 2 bad input; {EXIT_STOPPED} stopped by SIGTERM or SIGINT after writing a "
    "checkpoint (--resume continues the run). torchrun turns any non-zero status into 1: read RUN/status.json "
    "(state running, done, preempted or failed)."
)


def add_training_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The arguments ``pretrain`` and ``distill`` share; ``command`` is the verb (its help differs)."""
    no_folder = ("omit for scikit-learn's digits, run with recipes/digits.yaml" if command == "pretrain" else
                 "omit for scikit-learn's digits, run with the defaults (not recipes/digits.yaml, which is tuned "
                 "for DINO pretraining; --recipe digits takes it)")
    p.add_argument("args", nargs="*", metavar="[PATH] [key=value ...]",
                   help=f"image folder ({no_folder}; without --recipe, the settings are chosen from its images and "
                        "the device) and section.key=value config overrides")
    p.add_argument("--recipe", help=f"shipped recipe ({', '.join(recipe_names())}) or a YAML file")
    add_out(p, "the run: checkpoints, exported backbone, metrics, config", "runs/<timestamp>")
    p.add_argument("--resume", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its newest checkpoint that loads (checkpoints/last.pt or "
                        "epoch_*.pt; corrupt ones are skipped with a warning), or from the given .pt file")
    add_labeled_sets(p, "labeled set whose k-NN memory scores the run (every eval.every_epochs epochs, and in the "
                        "end-of-run summary), with --eval-test", "labeled set scored",
                     old=("--probe-train", "--probe-test"))
    add_batch_options(p, training=True)
    p.add_argument("--dry-run", action="store_true",
                   help="build everything and run one step on a batch of 2 per process; write nothing")
    for flag, owners in registry.flags().values():  # the flags of the methods this verb runs by default
        if any(registry.entry(name).verb == command for name in owners):
            p.add_argument(flag.name, metavar=flag.metavar, help=flag.help)
