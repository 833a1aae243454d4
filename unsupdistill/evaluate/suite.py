"""Benchmark suites: several models evaluated on several labeled sets, one table.

A suite file is YAML::

    datasets:                     # one entry per labeled train/test pair
      - name: digits
        train: digits             # a folder of class subfolders, a path,label CSV, or digits
        test: digits
        image_size: 16            # for models that record no input size (pixels, random-init timm:)
      - name: cifar10
        train: /data/cifar10/train
        test: /data/cifar10/test
        image_size: 32

Relative paths are read from the suite file's folder. Every (dataset, model) pair runs the same
:func:`~unsupdistill.evaluate.run.evaluate` as ``unsupdistill eval``; features are cached per pair as usual.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from unsupdistill.config import ConfigError
from unsupdistill.evaluate.report import format_table, write_json
from unsupdistill.evaluate.run import EvalOptions, evaluate, summary_row
from unsupdistill.storage import atomic_write

SUITE_KEYS = ("name", "train", "test", "image_size")
SPEED_NOTE = ("Speed (--speed): eager PyTorch at each model's input size on the eval device and precision, median "
              "images/s over batches of {batch}, latency of a batch of 1, parameters in millions, forward GFLOPs per "
              "image (torch's FlopCounterMode: a multiply-add is 2 FLOPs).")


@dataclass(frozen=True)
class LabeledPair:
    """One entry of a suite: a named train/test pair and the input size of models that record none."""

    name: str
    train: str
    test: str
    image_size: int | None = None


def load_suite(path: str | Path) -> list[LabeledPair]:
    """Read and check a suite file; a bad file is a :class:`ConfigError` naming the entry and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"suite file {path} cannot be read: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"suite file {path} is not valid YAML: {err}") from err
    entries = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"suite file {path}: expected a top-level 'datasets:' list of entries with keys "
                          f"{', '.join(SUITE_KEYS)} (see `unsupdistill eval --help`)")
    pairs, names = [], set()
    for i, entry in enumerate(entries):
        where = f"suite file {path}, datasets[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(SUITE_KEYS)}, got {entry!r}")
        unknown = set(entry) - set(SUITE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed keys: "
                              f"{', '.join(SUITE_KEYS)}")
        for key in ("name", "train", "test"):
            if not isinstance(entry.get(key), str | int) or not str(entry[key]).strip():
                raise ConfigError(f"{where}: '{key}' is missing; give a "
                                  + ("name for the table" if key == "name" else
                                     "folder of class subfolders, a path,label CSV file, or digits"))
        size = entry.get("image_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"{where}: image_size={size!r}; allowed: an integer >= 1, or leave it out")
        name = str(entry["name"])
        if name in names:
            raise ConfigError(f"{where}: the name '{name}' is used twice; give each entry its own name")
        names.add(name)
        pairs.append(LabeledPair(name, _resolve(entry["train"], path), _resolve(entry["test"], path), size))
    return pairs


def _resolve(spec: str | int, suite_path: Path) -> str:
    """A set spec with a relative path read from the suite file's folder; ``digits`` as it is."""
    spec = str(spec)
    if spec == "digits" or os.path.isabs(spec):
        return spec
    return str(suite_path.parent / spec)


def run_suite(models: Sequence[str], pairs: Sequence[LabeledPair], options: EvalOptions,
              out_dir: Path) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Evaluate every model on every pair; write ``suite.md`` and ``suite.json`` (and each pair's report in
    ``out_dir/<dataset>/<model index>-<model name>/``). Returns the table's rows and all results."""
    rows, results = [], []
    for pair in pairs:
        for i, model in enumerate(models):
            pair_options = replace(options, image_size=pair.image_size or options.image_size)
            report_dir = out_dir / _safe(pair.name) / f"{i}-{_safe(model)}"
            result = evaluate(model, pair.train, pair.test, pair_options, report_dir)
            results.append({"dataset": pair.name, **result})
            rows.append({"dataset": pair.name, **summary_row(result), "dim": str(result["feature_dim"]),
                         "eval s": f"{sum(result['seconds'].values()):.0f}"})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{c: row.get(c, "") for c in columns} for row in rows]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    text = (format_table(rows, columns, markdown=True)
            + f"\n\nDate: {datetime.date.today().isoformat()}. Machine: {machine}. k-NN: k = 20, T = 0.07, top-1 on "
            f"the test split; linear probe: {options.linear_backend}, chosen on 20 % of the training split."
            + (f" {SPEED_NOTE.format(batch=options.speed_batch_size)}" if options.speed else "") + "\n")
    atomic_write(out_dir / "suite.md", lambda tmp: Path(tmp).write_text(text))
    write_json({"date": datetime.date.today().isoformat(), "machine": machine, "models": list(models),
                "datasets": [vars(p) for p in pairs], "results": results}, out_dir / "suite.json")
    return rows, results


def _safe(name: str) -> str:
    """A folder name for a model spec or a dataset name (path separators and odd characters replaced)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))[-80:] or "model"
