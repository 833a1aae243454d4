"""What a run learned, in three numbers: k-NN of its exported backbone, of the same network at random
initialisation, and of raw pixels, on a labeled train/test pair, by the code of ``unsupdistill eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unsupdistill.evaluate.report import format_table, write_json
from unsupdistill.evaluate.run import HEADLINE_K, EvalOptions, evaluate

SUMMARY_FILE = "summary.json"


def random_init_spec(sidecar: dict[str, Any]) -> str:
    """The ``timm:`` MODEL spec of an export's architecture at random initialisation (``unsupdistill eval`` takes
    it as written), from its ``backbone.json``."""
    parts = [sidecar["timm_name"]]
    if sidecar.get("small_image_stem"):
        parts.append("small_image_stem=true")
    parts += [f"{key}={json.dumps(value).replace(' ', '')}" for key, value in sidecar["timm_kwargs"].items()]
    return "timm:" + ",".join(parts)


def run_summary(run_dir: Path, train: str, test: str, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """k-NN (k = 20, T = 0.07) of the run's backbone, of its architecture at random init (seeded) and of raw pixels
    at its input size; written to ``run_dir/summary.json`` and returned with a table and a one-line reading.

    Args:
        run_dir: a finished run (``backbone.safetensors`` + ``backbone.json``).
        train: the labeled set the k-NN memory is built from (as ``unsupdistill eval --train``).
        test: the labeled set scored (as ``--test``).
        seed: torch seed of the random initialisation.
        device: where the networks run.
    """
    sidecar = json.loads((run_dir / "backbone.json").read_text())
    size = int(sidecar["input_size"])
    options = EvalOptions(image_size=size, linear=False, clustering=False, plots=False, cache=False, device=device)
    specs = {"this run": str(run_dir), "same network, random init": random_init_spec(sidecar), "raw pixels": "pixels"}
    scores = {}
    for name, spec in specs.items():
        torch.manual_seed(seed)  # the random init is the same on every call
        scores[name] = evaluate(spec, train, test, options)["knn"][HEADLINE_K]["top1"]
    trained, random, pixels = scores.values()
    summary = {"train": train, "test": test, "k": HEADLINE_K, "knn_top1": scores, "models": specs,
               "reading": reading(trained, random, pixels),
               "command": f"unsupdistill eval MODEL --train {train} --test {test} --image-size {size} "
                          "--no-linear --no-clustering"}
    summary["table"] = format_table([{"features": name, "k-NN top-1 (%)": f"{top1:.1f}"}
                                     for name, top1 in scores.items()], ["features", "k-NN top-1 (%)"])
    write_json(summary, run_dir / SUMMARY_FILE)
    return summary


def reading(trained: float, random: float, pixels: float) -> str:
    """One line saying what the three k-NN figures mean."""
    gain = f"{trained - random:+.1f} points over the same network at random initialisation"
    if trained < random + 2:
        return (f"Not learned yet: {gain}. Train longer (train.epochs or train.time_budget_s) and look at the "
                "teacher entropy in metrics.jsonl (README: 'Health signals').")
    if trained < pixels:
        return (f"Learned: {gain}, still {pixels - trained:.1f} below raw pixels, which are hard to beat on small, "
                "centred images; longer training closes the gap.")
    return f"Learned: {gain}, and {trained - pixels:.1f} above raw pixels."
