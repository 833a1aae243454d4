"""``unsupdistill pretrain`` and ``unsupdistill distill``: one training run, its run directory and its status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from unsupdistill import distributed, registry
from unsupdistill import run_dir as layout
from unsupdistill.auto import auto_settings, automatic_keys, explicit_keys, format_choices, sound_settings
from unsupdistill.cli.options import EXIT_STOPPED, LABELED_HELP, TRAINING_KEYS, spelled, training_overrides
from unsupdistill.config import (
    Config,
    ConfigError,
    absolute_paths,
    apply_overrides,
    config_from_dict,
    load_config,
    merge,
    validate,
)
from unsupdistill.data import DataError, FolderScan, num_workers, scan_for_run
from unsupdistill.devices import training_device
from unsupdistill.export import ExportError
from unsupdistill.models.load import ModelSpecError
from unsupdistill.storage import CLASSIFIER_FILE, CheckpointError, latest_checkpoint
from unsupdistill.train.checkpoint import set_aside_later_state
from unsupdistill.train.faults import TrainingError, TrainingStopped
from unsupdistill.train.status import STATUS_FILE, resume_command, write_status

logger = logging.getLogger("unsupdistill")

USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelSpecError, ExportError)
BUILT_IN_RECIPE = "digits"  # what `pretrain` with no folder and no --recipe runs
def train_command(args: argparse.Namespace) -> int:
    """``pretrain`` and ``distill``: one training run, its run directory and status."""
    from unsupdistill.cli.generations import (
        GENERATIONS_FILE,
        is_generations_root,
        resume_generations,
        train_generations,
    )
    from unsupdistill.methods import METHODS  # heavy imports after checks

    paths, overrides = split_pretrain_args(args.args)
    overrides = training_overrides(args, overrides)  # --precision, --eval-train, ...: key=value as written
    generations = getattr(args, "generations", None)  # distill's --generations (>= 1, argparse); None: one student
    checkpoint, ckpt_path = None, None
    if args.resume and is_generations_root(args.resume):  # born-again generations: go on with them
        return resume_generations(args, Path(args.resume), paths, overrides, generations)
    if args.resume and generations is not None and generations > 1:  # before the run is touched
        run = layout.run_of(Path(args.resume)) or args.resume
        raise ConfigError(f"--generations {generations} with --resume {args.resume}: that is one run, not born-again "
                          f"generations (it has no {GENERATIONS_FILE}), and it does not turn into them; nothing was "
                          f"changed. Resume it without --generations; to train generations after it, distill from it "
                          f"once it is done: unsupdistill distill FOLDER --teacher {run} [--labels LABELED] "
                          "--generations N --out NEW_DIR")
    if args.resume:
        if args.recipe:
            raise ConfigError("--resume takes the run's own config; pass changes as key=value, not --recipe")
        ckpt_path, checkpoint = latest_checkpoint(args.resume)
        logger.info("resuming from %s (step %d)", ckpt_path, checkpoint["step"])
        config = config_from_dict(checkpoint["config"], str(ckpt_path))
        config = apply_overrides(config, overrides)
    else:
        config = load_config(args.recipe, overrides, check=False)  # checked below
        if args.recipe is None and not paths and config.data.path is None and args.command == "pretrain":
            # the built-in digits run: the defaults and recipes/digits.yaml's settings for 8x8 digits
            config = load_config(BUILT_IN_RECIPE, overrides, check=False)
    if paths:  # a path as written, never parsed as YAML
        config = merge(config, {"data": {"path": paths[0]}}, "command line")
    given = method_flags(args)
    for flag, key, value in given:  # --teacher, --labels: the methods' own flags, each a key=value
        section, name = key.split(".")
        config = merge(config, {section: {name: value}}, flag)
    config = absolute_paths(config)
    automatic = args.recipe is None and checkpoint is None and config.data.path is not None
    # before any data is read; what the automatic settings will set is checked once they have
    config = choose_method(config, args.command, _method_source(args, overrides, ckpt_path), given)
    method = METHODS[config.method]
    validate(config, ignore=automatic_keys(method) - explicit_keys(overrides) if automatic else frozenset())

    pair = labeled_pair(config, args)  # scored at the end
    device = training_device(config.train.device)
    # a resume goes on in its run's directory; a checkpoint outside a run's checkpoints/ folder starts a new one
    default_out = (layout.run_of(ckpt_path) if ckpt_path is not None else None) \
        or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    with distributed.session(device):  # every process joins now: process 0 names the run directory, scans the folder
        run_dir = Path(distributed.broadcast_object(str(args.out or default_out)))
        if args.dry_run:
            return dry_run(config, run_dir, checkpoint, automatic, overrides, device)
        if generations is not None and generations > 1:
            chain = {"generations": generations, "config": config.to_dict(), "automatic": automatic,
                     "overrides": overrides, "pair": pair}
            return train_generations(run_dir, chain, device)
        code, config, backbone = train_run(config, run_dir, checkpoint, ckpt_path, automatic, overrides, device)
    if code is not None:
        return code
    if backbone is not None:
        finish_run(run_dir, config, backbone, pair)
    return 0


def finish_run(run_dir: Path, config: Config, backbone: Path, pair: tuple[str, str] | None) -> None:
    """Process 0 after a run: status ``done``, the curves, where the outputs went, and what the run learned (with a
    labeled pair, in ``summary.json``)."""
    from unsupdistill.methods import METHODS

    method = METHODS[config.method]
    sidecar = json.loads(backbone.with_suffix(".json").read_text())
    write_status(run_dir, "done", 0, step=sidecar["step"], backbone=str(backbone))
    curves = training_curves(run_dir, method.curves)
    classifier = run_dir / CLASSIFIER_FILE
    print(f"\nrun directory: {run_dir}\n"
          f"  backbone:    {backbone} (+ backbone.json, input size {sidecar['input_size']} px)\n"
          + (f"  classifier:  {classifier} (+ classifier.json, {len(sidecar.get('classes', []))} classes)\n"
             if classifier.is_file() else "")
          + f"  checkpoint:  {layout.last_checkpoint(run_dir)}\n"
          f"  metrics:     {run_dir / layout.METRICS}  (tensorboard --logdir {run_dir / layout.TENSORBOARD})\n"
          f"  config:      {run_dir / layout.CONFIG}\n"
          f"  status:      {run_dir / STATUS_FILE}"
          + (f"\n  curves:      {curves}" if curves else ""))
    if pair is None or not config.eval.summary:
        return
    from unsupdistill.evaluate.summary import SUMMARY_FILE, run_summary

    teacher, teacher_size = method.teacher_of(config) or (None, None)
    summary = run_summary(run_dir, *pair, seed=config.train.seed, device=config.train.device,
                          teacher=teacher, teacher_size=teacher_size)
    memory, scored = (f"the digits' {part} split" if spec == "digits" else spec
                      for spec, part in zip(pair, ("train", "test")))
    print(f"\nWhat the run learned: k-NN top-1 (k = 20) on {scored}, memory {memory}:\n"
          f"{summary['table']}\n{summary['reading']}\n  summary:     {run_dir / SUMMARY_FILE}")


def train_run(config: Config, run_dir: Path, checkpoint: dict | None, ckpt_path: Path | None, automatic: bool,
               overrides: list[str], device: torch.device) -> tuple[int | None, Config, Path | None]:
    """Train in this process, with ``train.log`` and ``status.json`` kept by process 0.

    Returns:
        An exit status when the run did not finish (None when it did), the config as completed by the automatic
        settings, and the exported backbone's path (process 0) or None.
    """
    from unsupdistill.methods import METHODS, train

    log_file = None
    if distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = _file_handler(run_dir / "train.log")
        logging.getLogger().addHandler(log_file)
        if ckpt_path is not None and layout.run_of(ckpt_path.resolve()) == run_dir.resolve():
            set_aside_later_state(run_dir, int(checkpoint["step"]))  # before anything of the run is rewritten
        write_status(run_dir, "running", step=checkpoint["step"] if checkpoint else 0)
    try:
        config, scan, notes = _settings_for_data(config, run_dir, automatic, overrides, device)
        probe = None
        if config.eval.train and config.eval.every_epochs > 0 and distributed.is_main_process():
            # read now: a bad set fails before training
            from unsupdistill.evaluate.probe import KNNProbe

            probe = KNNProbe(config, device)
        backbone = train(config, run_dir, checkpoint, scan=scan, config_notes=notes, probe=probe, device=device)
    except TrainingStopped as stop:
        write_status(run_dir, "preempted", EXIT_STOPPED, step=stop.step,
                     resume=resume_command(run_dir, METHODS[config.method].command))
        if log_file is not None:
            logger.warning("%s", stop)
        return EXIT_STOPPED, config, None
    except TrainingError as err:
        write_status(run_dir, "failed", 1, reason=str(err))
        logger.error("%s", err)
        return 1, config, None
    except USER_ERRORS as err:
        write_status(run_dir, "failed", 2, reason=str(err))
        raise
    except BaseException as err:  # a crash or a second Ctrl-C: say so, then let it propagate
        write_status(run_dir, "failed", 130 if isinstance(err, KeyboardInterrupt) else 1,
                     reason=f"{type(err).__name__}: {err}")
        raise
    finally:
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    return None, config, backbone


def method_flags(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The methods' flags given on the command line (``--teacher X``): (flag, the key it sets, value)."""
    return [(flag.name, flag.key, getattr(args, _dest(flag.name))) for flag, _ in registry.flags().values()
            if getattr(args, _dest(flag.name), None) is not None]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _method_source(args: argparse.Namespace, overrides: list[str], ckpt_path: Path | None) -> str:
    """Where ``config.method`` came from, for messages."""
    if "method" in explicit_keys(overrides):
        return "method= on the command line"
    return str(ckpt_path) if ckpt_path else (args.recipe or "")


def choose_method(config: Config, command: str, source: str, given: list[tuple[str, str, str]]) -> Config:
    """The config with its method: the one the recipe, the checkpoint or ``method=`` names, else the verb's default
    (the registry's; with ``data.labels``, the verb's method that learns from labels). A method flag (``--teacher``)
    the chosen method does not declare is an error that names the methods that do."""
    if config.method is not None and config.method not in registry.names():
        validate(config)  # names the method and the allowed ones
    if config.method is None:
        config = merge(config, {"method": registry.default_method(command, config.data.labels is not None)},
                       f"unsupdistill {command}")
    elif registry.entry(config.method).verb != command:
        logger.info("method %s (from %s), which `unsupdistill %s` runs by default", config.method, source,
                    registry.entry(config.method).verb)
    flags = registry.flags()
    for flag, _key, _value in given:
        owners = flags[flag][1]
        if config.method not in owners:
            raise ConfigError(f"{flag} is a flag of method {' and '.join(owners)}; this run trains {config.method}"
                              + (f" (from {source})" if source else "") + f": drop {flag}, or add method={owners[0]}")
    return config


def labeled_pair(config: Config, args: argparse.Namespace) -> tuple[str, str] | None:
    """The labeled train/test pair the end-of-run summary scores: eval.train/eval.test (--eval-train/--eval-test),
    else the digits' fixed split for a run on the built-in digits; None without labels.

    Raises:
        ConfigError: a set that does not exist, named as the user gave it (flag or key), before any training."""
    if config.eval.train and config.eval.test:
        for dest, spec in (("eval_train", config.eval.train), ("eval_test", config.eval.test)):
            if spec != "digits" and not os.path.exists(spec):
                given = spelled(args, dest) if getattr(args, dest, None) is not None else TRAINING_KEYS[dest]
                raise ConfigError(f"{given} {spec} does not exist; give {LABELED_HELP}")
        return config.eval.train, config.eval.test
    return ("digits", "digits") if config.data.path is None else None


def training_curves(run_dir: Path, panels: tuple[tuple[str, tuple[str, ...]], ...]) -> Path | None:
    """Draw ``training_curves.png`` from the run's metrics, with the method's own ``panels`` after the shared ones; a
    run is not failed by its picture (logged instead)."""
    from unsupdistill.show import plot_training_curves

    try:
        return plot_training_curves(run_dir, run_dir / "training_curves.png", panels=panels)
    except (ValueError, OSError) as err:
        logger.warning("no training_curves.png: %s", err)
        return None


def _settings_for_data(config: Config, run_dir: Path | None, automatic: bool, overrides: list[str],
                       device: torch.device) -> tuple[Config, FolderScan | None, str]:
    """Scan the image folder (once per run, see ``scan_for_run``) and, for a folder without a recipe, choose
    the settings that depend on it. Returns the config, the scan and the choices as config.yaml comments."""
    if config.data.path is None:
        return config, None, ""
    scan = scan_for_run(config.data.path, config.data.verify, run_dir, max(1, num_workers(config.data)))
    if config.data.kind is not None and config.data.kind != scan.kind:
        raise ConfigError(f"data.kind={config.data.kind}, but {config.data.path} holds {scan.noun}s: set data.kind to "
                          f"{scan.kind} or null (found by the scan), or give a folder of {config.data.kind}s")
    choices = []
    if scan.kind == "audio":  # the front end, recipe or not: the rate, the clip and the normalisation
        config, choices = sound_settings(config, scan, explicit_keys(overrides))
    if automatic:
        config, more = auto_settings(config, scan, device.type, explicit_keys(overrides),
                                     distributed.launched_world_size())
        choices += more
    if not choices:
        return config, scan, ""
    table = format_choices(choices)
    logger.info("settings chosen for %d %s in %s on %s (a key=value argument or --recipe overrides any):\n%s",
                len(scan.files), scan.noun + "s", config.data.path, device.type.upper(), table)
    notes = (f"Settings chosen automatically for {len(scan.files)} {scan.noun}s on {device.type.upper()} "
             "(value, why):\n" + table)
    return config, scan, notes


def dry_run(config: Config, run_dir: Path, checkpoint: dict | None, automatic: bool, overrides: list[str],
             device: torch.device) -> int:
    """Build everything and run one step on a tiny batch; write nothing."""
    from unsupdistill.methods import train

    config, scan, _ = _settings_for_data(config, None, automatic, overrides, device)
    report = train(config, run_dir, checkpoint, dry_run=True, scan=scan, device=device)
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


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler
