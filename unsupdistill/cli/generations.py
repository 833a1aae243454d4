"""Born-again generations (``distill --generations N``): ``ROOT/gen_1`` learns from ``distill.teacher``,
``ROOT/gen_k+1`` from ``ROOT/gen_k``'s export, each a run of its own. ``ROOT/generations.json`` records their plan,
and ``distill --resume ROOT`` goes on with it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from unsupdistill import distributed
from unsupdistill import run_dir as layout
from unsupdistill.cli import training  # its functions looked up at each call: one run, whoever replaces it
from unsupdistill.cli.options import EXIT_STOPPED
from unsupdistill.config import Config, ConfigError, config_from_dict, merge
from unsupdistill.devices import training_device
from unsupdistill.storage import latest_checkpoint, write_json_atomic
from unsupdistill.train.status import read_status, resume_command, write_status

logger = logging.getLogger("unsupdistill")

GENERATIONS_FILE = "generations.json"
"""A born-again run's plan in its root folder: the generations, the config before the automatic settings, the
overrides and the labeled pair; ``distill --resume ROOT`` continues it."""

_RECORD = {"generations": (int, "an integer >= 1"), "config": (dict, "the config, an object"),
           "automatic": (bool, "true or false"), "overrides": (list, "a list of key=value strings")}
"""The keys of generations.json a resume reads, their types and what they hold (``pair`` is optional)."""


def is_generations_root(path: str | Path) -> bool:
    return (Path(path) / GENERATIONS_FILE).is_file()


def resume_generations(args: argparse.Namespace, root: Path, paths: list[str], overrides: list[str],
                       generations: int | None) -> int:
    """``distill --resume ROOT`` of born-again generations: go on with them in ROOT; ``--generations N`` raises their
    number, ``--dry-run`` builds the generation to train next and runs one step, writing nothing.

    Raises:
        ConfigError: before anything is written: generations.json does not read, or the command gives something a
            resume of generations cannot take (a recipe, folder, override or config flag, ``--teacher``,
            ``--labels``, ``--out`` elsewhere, fewer ``--generations``); the message names it and what to do.
    """
    if args.recipe or overrides or paths:
        raise ConfigError("--resume of generations takes their own config (generations.json): drop the --recipe, "
                          "folder, key=value and config flags (--eval-train/--eval-test, --precision, --device, "
                          "--workers, --batch-size) from the command")
    chain = read_generations(root)
    record = root / GENERATIONS_FILE
    base = config_from_dict(chain["config"], str(record))
    new_folder = "start new generations in another folder: unsupdistill distill FOLDER"
    teacher, labels = getattr(args, "teacher", None), getattr(args, "labels", None)
    if teacher:
        raise ConfigError(f"--teacher {teacher} with --resume {root}: resumed generations keep their own teacher "
                          f"(generation 1 learns from {base.distill.teacher}, each later one from the generation "
                          f"before it, as {record} records). Drop --teacher to go on; to distill from {teacher} "
                          f"instead, {new_folder} --teacher {teacher} --generations N --out NEW_DIR")
    if labels:
        raise ConfigError(f"--labels {labels} with --resume {root}: resumed generations keep their own labels "
                          f"(data.labels={base.data.labels} in {record}: each generation's checkpoint and classifier "
                          f"are trained on their classes). Drop --labels to go on; to learn from {labels}, "
                          f"{new_folder} --teacher TEACHER --labels {labels} --generations N --out NEW_DIR")
    if args.out is not None and Path(args.out).resolve() != root.resolve():
        raise ConfigError(f"--out {args.out} with --resume {root}: resumed generations go on in their own folder, "
                          f"{root}, beside their finished generations. Drop --out to go on; to train elsewhere, "
                          f"{new_folder} --teacher TEACHER --generations N --out {args.out}")
    planned = chain["generations"]
    if generations is not None and generations < planned:
        raise ConfigError(f"--generations {generations} with --resume {root}: {record} plans {planned} generations; "
                          f"a resume can raise their number (--generations {planned + 1} trains one more, from the "
                          f"last), not lower it. Drop --generations to go on with {planned}, or give {planned} "
                          "or more")
    if generations is not None:
        chain = {**chain, "generations": generations}
    device = training_device(base.train.device)
    with distributed.session(device):
        if args.dry_run:
            return _dry_run_generations(root, chain, base, device)
        return train_generations(root, chain, device)


def read_generations(root: Path) -> dict[str, Any]:
    """``ROOT/generations.json``, checked: the generations' plan.

    Raises:
        ConfigError: the file does not read as a generations record (cut short, edited); the message names it, what
            is wrong and what to do.
    """
    path = root / GENERATIONS_FILE
    try:
        chain = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # a truncated file: JSONDecodeError, a ValueError
        problem = f"it does not read as JSON ({type(err).__name__}: {err}); it may have been cut short"
    else:
        problem = _record_problem(chain)
    if problem is None:
        return chain
    raise ConfigError(f"{path} is not a readable generations record: {problem}. It holds the plan and config of the "
                      f"generations in {root}, written when they started: restore it from a copy, or go on without "
                      f"it: resume an unfinished generation on its own (unsupdistill distill --resume {root}/gen_K), "
                      f"then distill further generations from a finished one (unsupdistill distill FOLDER --teacher "
                      f"{root}/gen_K --generations N --out NEW_DIR)")


def _record_problem(chain: Any) -> str | None:
    """What is wrong with a generations record read from JSON, or None."""
    if not isinstance(chain, dict):
        return f"it holds a JSON {type(chain).__name__}, not an object"
    for key, (kind, what) in _RECORD.items():
        value = chain.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"key '{key}' is {'missing' if key not in chain else repr(value)}; expected {what}"
    if chain["generations"] < 1:
        return f"key 'generations' is {chain['generations']}; expected {_RECORD['generations'][1]}"
    pair = chain.get("pair")
    if pair is not None and not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
        return f"key 'pair' is {pair!r}; expected null or [train, test], the labeled sets"
    return None


def train_generations(root: Path, chain: dict, device: torch.device) -> int:
    """Born-again generations: ``ROOT/gen_1`` learns from ``distill.teacher``, ``ROOT/gen_k+1`` from ``ROOT/gen_k``'s
    export (the same student network, its classifier too), each a run of its own with its own automatic settings. A
    finished generation is kept; one with a checkpoint resumes. Ends with a table of every generation."""
    if distributed.is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(chain, root / GENERATIONS_FILE)
    base = merge(Config(), chain["config"], str(root / GENERATIONS_FILE))  # checked as each generation starts
    pair = tuple(chain["pair"]) if chain.get("pair") else None
    rows = []
    for k in range(1, chain["generations"] + 1):
        run_dir, teacher = root / f"gen_{k}", _teacher(root, base, k)
        if not _finished(run_dir):
            config, checkpoint, ckpt_path, automatic = _generation_start(root, chain, base, k)
            if checkpoint is not None:
                logger.info("generation %d: resuming from %s (step %d)", k, ckpt_path, checkpoint["step"])
            else:
                logger.info("generation %d of %d: distilling from %s", k, chain["generations"], teacher)
            code, config, backbone = training.train_run(config, run_dir, checkpoint, ckpt_path, automatic,
                                                        chain["overrides"], device)
            if code is not None:
                write_status(root, "preempted" if code == EXIT_STOPPED else "failed", code, generation=k,
                             resume=resume_command(root, "distill"))
                if code == EXIT_STOPPED:
                    logger.warning("generation %d stopped; continue the generations with: %s", k,
                                   resume_command(root, "distill"))
                return code
            if backbone is None:  # another process of a torchrun: process 0 reports
                continue
            training.finish_run(run_dir, config, backbone, pair)
        rows.append(_generation_row(k, run_dir, teacher))
    if rows:
        from unsupdistill.evaluate.report import format_table

        write_status(root, "done", 0, generations=len(rows))
        table = format_table(rows, list(rows[0]))
        (root / "generations.md").write_text(table + "\n")
        print(f"\nBorn-again generations in {root} (each generation's teacher is the one before it):\n{table}\n"
              f"  table:       {root / 'generations.md'}")
    return 0


def _finished(run_dir: Path) -> bool:
    """A generation that is done: status ``done`` and its export written."""
    return (read_status(run_dir) or {}).get("state") == "done" and (run_dir / layout.BACKBONE).is_file()


def _teacher(root: Path, base: Config, k: int) -> str:
    """Generation ``k``'s teacher: ``distill.teacher`` for the first, the generation before it for the others."""
    return base.distill.teacher if k == 1 else str(root / f"gen_{k - 1}")


def _generation_start(root: Path, chain: dict, base: Config, k: int) -> tuple[Config, dict | None, Path | None, bool]:
    """What unfinished generation ``k`` trains from: its newest checkpoint and that checkpoint's config when it has
    checkpoints, else the plan's config with its teacher.

    Returns:
        (config, checkpoint or None, its path or None, whether the automatic settings apply)
    """
    run_dir = root / f"gen_{k}"
    if layout.checkpoints_dir(run_dir).is_dir():
        ckpt_path, checkpoint = latest_checkpoint(run_dir)
        return config_from_dict(checkpoint["config"], str(ckpt_path)), checkpoint, ckpt_path, False
    size = base.distill.teacher_size if k == 1 else None  # a later generation's teacher: the previous student's size
    config = merge(base, {"distill": {"teacher": _teacher(root, base, k), "teacher_size": size}}, f"generation {k}")
    return config, None, None, chain["automatic"]


def _dry_run_generations(root: Path, chain: dict, base: Config, device: torch.device) -> int:
    """``--resume ROOT --dry-run``: build the generation a resume would train next (from its checkpoint if it has
    one) and run one step on a tiny batch; write nothing."""
    for k in range(1, chain["generations"] + 1):
        run_dir = root / f"gen_{k}"
        if _finished(run_dir):
            continue
        config, checkpoint, ckpt_path, automatic = _generation_start(root, chain, base, k)
        logger.info("dry run of generation %d of %d in %s (teacher %s%s); nothing is written", k,
                    chain["generations"], run_dir, _teacher(root, base, k), f", from {ckpt_path}" if ckpt_path else "")
        return training.dry_run(config, run_dir, checkpoint, automatic, chain["overrides"], device)
    print(json.dumps({"dry_run": "ok", "generations": f"all {chain['generations']} generations in {root} are done: "
                                                      "nothing to train"}, indent=2))
    return 0


def _generation_row(k: int, run_dir: Path, teacher: str) -> dict[str, str]:
    """One generation's figures: where its training ended (its last ``metrics.jsonl`` record: epochs, loss, agreement
    with its teacher, accuracy on its labeled training views), and its test scores from ``summary.json`` (with a
    labeled pair: ``--eval-train`` and ``--eval-test``)."""
    from unsupdistill.evaluate.summary import SUMMARY_FILE

    row = {"generation": str(k), "teacher": teacher if k == 1 else f"gen_{k - 1}", "run": str(run_dir)}
    records = layout.read_metrics(run_dir)[0] if (run_dir / layout.METRICS).is_file() else []
    last = next((r for r in reversed(records) if "loss" in r), None)
    if last is not None:
        row |= {"epochs": f"{last['epoch']:.1f}", "final loss": f"{last['loss']:.4f}"}
        if "teacher_agreement" in last:
            row["teacher agreement"] = f"{last['teacher_agreement']:.2f}"
        if "student_label_accuracy" in last:
            row["label accuracy, training views (%)"] = f"{last['student_label_accuracy'] * 100:.1f}"
    path = run_dir / SUMMARY_FILE
    if path.is_file():
        summary = json.loads(path.read_text())
        scores = summary["knn_top1"]
        row["k-NN top-1 (%)"] = f"{scores['this run']:.1f}"
        if "teacher" in scores:
            row["teacher k-NN (%)"] = f"{scores['teacher']:.1f}"
        if "classifier_top1" in summary:
            row["classifier top-1 (%)"] = f"{summary['classifier_top1']:.1f}"
    return row
