"""What a run learned, in three numbers: k-NN of its exported backbone, of the same network at random
initialisation, and of raw pixels, on a labeled train/test pair, by the code of ``unsupdistill eval``; for a
distilled run also its teacher's k-NN, and what the student and its teacher cost to run."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unsupdistill.evaluate.report import format_table, write_json
from unsupdistill.evaluate.run import HEADLINE_K, EvalOptions, evaluate
from unsupdistill.evaluate.speed import SPEED_COLUMNS, speed_cells, speed_ratio
from unsupdistill.models.load import LOGMEL
from unsupdistill.run_dir import BACKBONE_SIDECAR, METRICS, read_metrics

SUMMARY_FILE = "summary.json"


def eval_command_line(model: str, train: str, test: str, *options: str) -> str:
    """The ``unsupdistill eval`` command that scores ``model`` on ``train`` / ``test`` with ``options``, in today's
    spelling (``--eval-train`` / ``--eval-test``), quoted for a POSIX shell."""
    return shlex.join(["unsupdistill", "eval", model, "--eval-train", train, "--eval-test", test, *options])


def random_init_spec(sidecar: dict[str, Any], seed: int) -> str:
    """The ``timm:`` MODEL spec of an export's architecture at random initialisation drawn with ``seed``
    (``unsupdistill eval`` takes it as written), from its ``backbone.json``."""
    parts = [sidecar["timm_name"], f"seed={seed}"]
    if sidecar.get("small_image_stem"):
        parts.append("small_image_stem=true")
    parts += [f"{key}={json.dumps(value).replace(' ', '')}" for key, value in sidecar["timm_kwargs"].items()]
    return "timm:" + ",".join(parts)


def run_summary(run_dir: Path, train: str, test: str, seed: int = 0, device: str = "auto",
                teacher: str | None = None, teacher_size: int | None = None,
                speed_seconds: float = 2.0) -> dict[str, Any]:
    """k-NN (k = 20, T = 0.07) of the run's backbone, of its architecture at random init (seeded) and of raw pixels
    at its input size; written to ``run_dir/summary.json`` and returned with a table and a one-line reading.

    With a distillation ``teacher``, the teacher gets a row too (k-NN at its own input size, as distillation fed
    it), the run and its teacher get speed columns (:func:`~unsupdistill.evaluate.speed.measure_speed` on the
    same device, batch and precision), and the reading says how far the student is from its teacher and at
    what cost.

    Args:
        run_dir: a finished run (``backbone.safetensors`` + ``backbone.json``).
        train: the labeled set the k-NN memory is built from (as ``unsupdistill eval --eval-train``).
        test: the labeled set scored (as ``--eval-test``).
        seed: seed of the random initialisation (the run's ``train.seed``), part of its ``timm:`` spec.
        device: where the networks run.
        teacher: the frozen teacher a distillation run learned from, as ``distill --teacher`` takes it (a run
            directory, an export, a checkpoint or ``timm:NAME[,pretrained=true][,key=value...]``); None: no
            teacher row and no speed columns.
        teacher_size: the teacher's input side (``distill.teacher_size``); None: its own.
        speed_seconds: time limit of each speed timing (throughput, latency) of each network.
    """
    sidecar = json.loads((run_dir / BACKBONE_SIDECAR).read_text())
    size = int(sidecar["input_size"])
    frontend = sidecar.get("frontend")  # a model of sounds: its baselines hear through its front end
    options = EvalOptions(image_size=size, linear=False, clustering=False, plots=False, cache=False, device=device,
                          speed_seconds=speed_seconds, frontend=frontend)
    baseline, baseline_spec = ("log-mel statistics", LOGMEL) if frontend else ("raw pixels", "pixels")
    specs = {"this run": str(run_dir), "same network, random init": random_init_spec(sidecar, seed),
             baseline: baseline_spec}
    scores, speeds, sizes = {}, {}, dict.fromkeys(specs, size)
    classifier = None
    for name, spec in specs.items():
        result = evaluate(spec, train, test, replace(options, speed=teacher is not None and name == "this run"))
        scores[name] = result["knn"][HEADLINE_K]["top1"]
        speeds[name] = result.get("speed")
        if name == "this run" and "top1" in result.get("classifier", {}):  # distilled with labels: its classifier
            classifier = result["classifier"]["top1"]
    trained, random, pixels = scores.values()
    text = reading(trained, random, pixels, run_facts(run_dir, sidecar), baseline)
    if classifier is not None:
        text += f" Its classifier: {classifier:.1f} % top-1 on the test set."
    shares = time_shares(run_dir)
    if shares:
        text += " Its wall time: " + ", ".join(f"{part} {100 * share:.0f} %" for part, share in shares.items()
                                               if part != "wall_s") + f" of {shares['wall_s']:.0f} s."
    columns = ["features", "k-NN top-1 (%)"]
    if teacher is not None:
        # at the teacher's own input size (or distill.teacher_size), as distillation fed it, not the student's
        result = evaluate(teacher, train, test, replace(options, image_size=teacher_size, speed=True))
        specs["teacher"], scores["teacher"] = teacher, result["knn"][HEADLINE_K]["top1"]
        speeds["teacher"], sizes["teacher"] = result["speed"], result["input_size"]
        text += " " + teacher_reading(trained, scores["teacher"], speeds["this run"], speeds["teacher"])
        columns += ["input px", *SPEED_COLUMNS]
    summary = {"train": train, "test": test, "k": HEADLINE_K, "knn_top1": scores, "models": specs, "reading": text,
               "command": eval_command_line("MODEL", train, test, "--image-size", str(size), "--no-linear",
                                            "--no-clustering")}
    if classifier is not None:
        summary["classifier_top1"] = classifier
    if shares:
        summary["time_shares"] = shares
    if teacher is not None:
        summary["speed"] = {name: speeds[name] for name in ("this run", "teacher")}
        summary["teacher_size"] = sizes["teacher"]
        size_option = ["--image-size", str(teacher_size)] if teacher_size else []
        summary["teacher_command"] = eval_command_line(teacher, train, test, *size_option, "--no-linear",
                                                       "--no-clustering", "--speed")
    summary["table"] = format_table([{"features": name, "k-NN top-1 (%)": f"{top1:.1f}", "input px": str(sizes[name]),
                                      **speed_cells(speeds.get(name))} for name, top1 in scores.items()], columns)
    write_json(summary, run_dir / SUMMARY_FILE)
    return summary


def time_shares(run_dir: Path) -> dict[str, float]:
    """Where a run's wall time went (``decode``, ``views``, ``teacher``, ``student``, ``rest``: shares; ``wall_s``),
    from its last ``metrics.jsonl`` record that has them; empty when none has."""
    records = read_metrics(run_dir)[0] if (run_dir / METRICS).is_file() else []
    last = next((r for r in reversed(records) if "time_wall_s" in r), None)
    if last is None:
        return {}
    shares = {key[len("time_"):-len("_share")]: value for key, value in last.items()
              if key.startswith("time_") and key.endswith("_share")}
    return shares | {"wall_s": last["time_wall_s"]}


def teacher_reading(student: float, teacher: float, student_speed: dict, teacher_speed: dict) -> str:
    """One line saying how far a distilled student is from its teacher, and at what cost."""
    gap = student - teacher
    where = f"{abs(gap):.1f} k-NN points {'below' if gap < 0 else 'above'}" if round(gap, 1) else "level with"
    return f"The student is {where} its teacher at {speed_ratio(student_speed, teacher_speed, 'its')}."


FLAT = 0.02
"""The loss has flattened when its mean over the run's last tenth is within this share of the tenth before."""


@dataclass(frozen=True)
class RunFacts:
    """What a run did, for its reading: its length, its images and where its loss was going at the end.

    Attributes:
        steps: optimizer steps trained.
        epochs: passes over the images (None when not logged).
        images: the folder (or ``digits``) it trained on.
        input_size: the side of its exported backbone's inputs.
        loss_change: relative change of the mean loss over the last tenth of the logged steps against the tenth
            before (-0.1: fell 10 %); None with under 20 loss records.
    """

    steps: int
    epochs: float | None
    images: str
    input_size: int
    loss_change: float | None


def run_facts(run_dir: Path, sidecar: dict[str, Any]) -> RunFacts:
    """The :class:`RunFacts` of a finished run, from its ``backbone.json`` and ``metrics.jsonl``."""
    records = read_metrics(run_dir)[0] if (run_dir / METRICS).is_file() else []
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), int | float)]
    tenth = len(losses) // 10
    change = None
    if tenth >= 2:
        before, last = sum(losses[-2 * tenth:-tenth]) / tenth, sum(losses[-tenth:]) / tenth
        change = (last - before) / abs(before) if before else 0.0
    epochs = next((float(r["epoch"]) for r in reversed(records) if isinstance(r.get("epoch"), int | float)), None)
    return RunFacts(int(sidecar.get("step", 0)), epochs, str(sidecar.get("trained_on") or "digits"),
                    int(sidecar["input_size"]), change)


def reading(trained: float, random: float, pixels: float, facts: RunFacts, baseline: str = "raw pixels") -> str:
    """What the three k-NN figures and the run's facts say: whether it learned, and what would help (``pixels``: the
    k-NN of the ``baseline`` features, raw pixels or a sound's log-mel statistics)."""
    gain = f"{trained - random:+.1f} points over the same network at random initialisation"
    length = f"{facts.steps} steps" + (f" ({facts.epochs:.1f} epochs)" if facts.epochs is not None else "")
    run = f"It trained {length} on {facts.images} at {facts.input_size} px"
    if facts.loss_change is None:
        run += "; it logged too few steps to tell whether its loss had flattened."
    elif facts.loss_change > -FLAT:
        run += f"; its loss had flattened ({facts.loss_change:+.1%} over the last tenth of the run)."
    else:
        run += f"; its loss was still falling ({facts.loss_change:+.1%} over the last tenth of the run)."
    falling = facts.loss_change is not None and facts.loss_change <= -FLAT
    if trained < random + 2:
        advice = ("Train longer (train.epochs or train.time_budget_s)." if falling or facts.loss_change is None else
                  "Its loss no longer falls: look at the health signals in metrics.jsonl (teacher entropy, feature "
                  "spread) and the learning rate (optim.lr).")
        return f"Not learned yet: {gain}. {run} {advice}"
    if trained < pixels:
        advice = ("A longer run (train.epochs or train.time_budget_s) should gain more." if falling else
                  "It ended its learning-rate schedule with its loss flat: a longer schedule (train.epochs), a larger "
                  "network or distillation from a pretrained teacher (unsupdistill distill --teacher) may close the "
                  "gap."
                  if facts.loss_change is not None else "")
        return f"Learned: {gain}, still {pixels - trained:.1f} below {baseline}. {run} {advice}".rstrip()
    return f"Learned: {gain}, and {trained - pixels:.1f} above {baseline}. {run}"
