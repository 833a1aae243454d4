"""Chaos test of checkpoints and resume: kill a short training run at random moments, resume it, compare.

A short training on the built-in digits (a tiny network, fixed seed, CPU) runs once uninterrupted. Then
it runs again and is interrupted ``--kills`` times with SIGKILL and ``--sigterm`` times with SIGTERM (a
cluster's preemption), in a random order, and resumed with ``--resume`` after each. A SIGKILL lands at a
random moment of the process's start (1 in 5) or of its training; a SIGTERM during training. After every
kill each checkpoint file of the run is loaded (``weights_only``); at the end the final step and every
logged loss are compared with the uninterrupted run's (same seed, CPU: they must be equal).

Checks: no corrupt checkpoint, ever; each SIGTERM exits with status 75 after writing a checkpoint of the
step it reached; every planned kill happened; the final step and losses equal the uninterrupted run's;
no temporary files are left. Prints tables and exits with status 1 if a check fails. From the
repository root::

    python eval/tools/chaos.py -n 10
    python eval/tools/chaos.py --quick --json chaos.json
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py and the benchmarks

import common

from unsupdistill import run_dir
from unsupdistill.cli import EXIT_STOPPED
from unsupdistill.evaluate.report import format_table
from unsupdistill.storage import CheckpointError, latest_checkpoint, load_checkpoint

BATCH = 16
TINY = [*common.TINY_MODEL, f"train.batch_size={BATCH}", "dino.num_local_crops=2", "data.num_workers=0",
        "train.device=cpu"]
"""The network and settings of both runs: a training step takes tens of milliseconds on 2 CPU cores."""
SAVE_EVERY = 5
STARTUP_KILL_SHARE = 0.2
PROCESS_TIMEOUT_S = 300


@dataclass
class Interruption:
    """One kill of the training process and what it left behind."""

    signal: str
    moment: str
    """``start`` (before the first step) or ``training``."""
    started_at: int
    """Step of the checkpoint the process resumed from (0 for the first process)."""
    stopped_at: int
    """Last step in metrics.jsonl once the process was gone."""
    exit_code: int | None
    checkpoint: int | None
    """Step of the newest checkpoint that loads, after the kill."""
    corrupt: list[str]
    """Checkpoint files that did not load, with the reason."""


def train_args(steps: int, seed: int) -> list[str]:
    """Overrides of both runs: frequent checkpoints, epoch copies, a loss logged at every step."""
    return [*TINY, f"train.max_steps={steps}", f"train.seed={seed}", "train.log_every_steps=1",
            f"train.save_every_steps={SAVE_EVERY}", "train.keep_every_epochs=1"]


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """Start ``python -m unsupdistill pretrain ARGS`` with its output going to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "unsupdistill", "pretrain", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def read_metrics(run: Path) -> list[dict]:
    """The run's metric records so far (none before its first; a line still being written is left out)."""
    return run_dir.read_metrics(run)[0] if (run / run_dir.METRICS).exists() else []


def last_step(run: Path) -> int:
    return max((m["step"] for m in read_metrics(run)), default=0)


def progress(run: Path, launched: float, started_at: int) -> int:
    """Last step the process launched at ``launched`` logged (``started_at`` if none yet).

    Lines a killed process logged after its checkpoint are stale until the new process rewrites
    metrics.jsonl as it starts, so only a file modified after the launch counts.
    """
    metrics = run / run_dir.METRICS
    if metrics.exists() and metrics.stat().st_mtime > launched:
        return max(last_step(run), started_at)
    return started_at


def wait_for_training(proc: subprocess.Popen, run: Path, launched: float, started_at: int,
                      need_checkpoint: bool = True) -> bool:
    """Wait until the process has logged a step after ``started_at`` (and a checkpoint exists); False if
    it ended first."""
    deadline = time.time() + PROCESS_TIMEOUT_S
    while proc.poll() is None and time.time() < deadline:
        if (progress(run, launched, started_at) > started_at
                and (not need_checkpoint or run_dir.last_checkpoint(run).exists())):
            return True
        time.sleep(0.02)
    return False


def corrupt_checkpoints(run: Path) -> list[str]:
    """Load every checkpoint file of the run; the reasons of those that fail."""
    corrupt = []
    for path in sorted(run_dir.checkpoints_dir(run).glob("*.pt")):
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            corrupt.append(str(err))
    return corrupt


def newest_checkpoint_step(run: Path) -> int | None:
    try:
        return int(latest_checkpoint(run)[1]["step"])
    except CheckpointError:
        return None


def reference_run(out: Path, steps: int, seed: int) -> tuple[list[dict], float, float]:
    """The uninterrupted run: its metrics, its start-up seconds and its median seconds per step."""
    run = out / "reference"
    launched = time.time()
    proc = launch(["--out", str(run), *train_args(steps, seed)], out / "reference.log")
    if not wait_for_training(proc, run, launched, 0, need_checkpoint=False):
        raise SystemExit(f"the uninterrupted run failed (exit {proc.wait()}); see {out / 'reference.log'}")
    startup_s = time.time() - launched
    if proc.wait(timeout=PROCESS_TIMEOUT_S) != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {proc.returncode}); see {out / 'reference.log'}")
    metrics = read_metrics(run)
    return metrics, startup_s, statistics.median(BATCH / m["images_per_s"] for m in metrics)


def interrupted_run(out: Path, plan: list[str], steps: int, seed: int, rng: random.Random, startup_s: float,
                    step_s: float) -> tuple[Path, list[Interruption], int, int]:
    """Run with the interruptions of ``plan``, resuming after each, then to the end.

    Returns the run directory, the interruptions, the number of resumes and the exit status of the last
    (uninterrupted) process.
    """
    run, logs = out / "chaos", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    interruptions: list[Interruption] = []
    resumes = 0
    for i, kind in enumerate(plan):
        if i == 0:
            started_at, args = 0, ["--out", str(run), *train_args(steps, seed)]
        else:
            started_at, args = newest_checkpoint_step(run) or 0, ["--resume", str(run)]
            resumes += 1
        launched = time.time()
        proc = launch(args, logs / f"process_{i:02d}.log")
        # the first process must leave a checkpoint to resume from; a SIGTERM is meant for training
        moment = "start" if i and kind == "SIGKILL" and rng.random() < STARTUP_KILL_SHARE else "training"
        if moment == "start":
            time.sleep(rng.uniform(0, startup_s))
        elif wait_for_training(proc, run, launched, started_at):
            # spread the kills still to come over the steps left
            time.sleep(rng.uniform(0, step_s * (steps - started_at) / (len(plan) - i + 1)))
        if proc.poll() is not None:
            print(f"process {i} ended (exit {proc.returncode}) before its {kind}; see {logs}", file=sys.stderr)
            break
        proc.send_signal(getattr(signal, kind))
        proc.wait(timeout=PROCESS_TIMEOUT_S)
        interruption = Interruption(kind, moment, started_at, progress(run, launched, started_at), proc.returncode,
                                    newest_checkpoint_step(run), corrupt_checkpoints(run))
        interruptions.append(interruption)
        print(f"{i + 1}/{len(plan)}: {kind} during {moment}, steps {started_at} -> {interruption.stopped_at}, "
              f"exit {proc.returncode}, newest checkpoint {interruption.checkpoint}, "
              f"{len(interruption.corrupt)} corrupt", file=sys.stderr, flush=True)
    proc = launch(["--resume", str(run)], logs / "process_final.log")
    return run, interruptions, resumes + 1, proc.wait(timeout=PROCESS_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    parser = common.script_parser(__doc__, quick="a small test: 30 steps, 2 SIGKILLs, 1 SIGTERM",
                                  json="write the report as JSON",
                                  out="folder for the runs and their logs (default: a temporary folder, removed at "
                                      "the end)")
    parser.add_argument("-n", "--kills", type=int, help="SIGKILLs (default 5; --quick: 2)")
    parser.add_argument("--sigterm", type=int, help="SIGTERMs (default 2; --quick: 1)")
    parser.add_argument("--steps", type=int, help="training steps (default 150; --quick: 30)")
    parser.add_argument("--seed", type=int, default=0, help="training seed and the kills' random moments")
    args = parser.parse_args(argv)
    common.quick_defaults(args, kills=(5, 2), sigterm=(2, 1), steps=(150, 30))
    kills, sigterms, steps = args.kills, args.sigterm, args.steps
    if kills + sigterms < 1 or steps <= 2 * SAVE_EVERY:
        parser.error(f"need at least one kill and more than {2 * SAVE_EVERY} steps")

    folder = contextlib.nullcontext(args.out) if args.out else tempfile.TemporaryDirectory(prefix="chaos-")
    with folder as out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rng = random.Random(args.seed)
        plan = ["SIGKILL"] * kills + ["SIGTERM"] * sigterms
        rng.shuffle(plan)
        tic = time.time()
        reference, startup_s, step_s = reference_run(out, steps, args.seed)
        print(f"uninterrupted run: {steps} steps, start-up {startup_s:.1f} s, {step_s * 1000:.0f} ms per step",
              file=sys.stderr, flush=True)
        run, interruptions, resumes, final_exit = interrupted_run(out, plan, steps, args.seed, rng, startup_s,
                                                                  step_s)
        report = summarize(run, reference, plan, interruptions, resumes, final_exit)
        report["seconds"] = time.time() - tic

    print(format_table([{**asdict(i), "corrupt": len(i.corrupt)} for i in interruptions],
                       ["signal", "moment", "started_at", "stopped_at", "exit_code", "checkpoint", "corrupt"]))
    print()
    print(format_table(report["checks"], ["check", "result", "expected", "ok"]))
    for i in interruptions:
        for reason in i.corrupt:
            print(f"corrupt: {reason}")
    print(f"\n{len(interruptions)} interruptions, {report['resumes']} resumes, {report['seconds']:.0f} s; "
          f"{'all checks passed' if report['passed'] else 'FAILED'}")
    common.save_json({**report, "interruptions": [asdict(i) for i in interruptions],
                      "settings": {"kills": kills, "sigterm": sigterms, "steps": steps, "seed": args.seed}}, args.json)
    return 0 if report["passed"] else 1


def summarize(run: Path, reference: list[dict], plan: list[str], interruptions: list[Interruption], resumes: int,
              final_exit: int) -> dict:
    """The checks of the chaos run against the uninterrupted one."""
    expected = {m["step"]: m["loss"] for m in reference}
    got = {m["step"]: m["loss"] for m in read_metrics(run)}
    equal = sum(step in got and math.isclose(got[step], loss, rel_tol=1e-6, abs_tol=1e-7)
                for step, loss in expected.items())
    diff = max((abs(got[s] - expected[s]) for s in expected.keys() & got.keys()), default=math.inf)
    sigterms = [i for i in interruptions if i.signal == "SIGTERM"]
    clean = sum(i.exit_code == EXIT_STOPPED and i.checkpoint == i.stopped_at > i.started_at for i in sigterms)
    corrupt = sum(len(i.corrupt) for i in interruptions)
    temp_files = len([*run.glob(".*.tmp"), *run_dir.checkpoints_dir(run).glob(".*.tmp")])
    final = newest_checkpoint_step(run)
    final_step = max(expected)

    def check(name: str, result: object, target: object, ok: bool) -> dict:
        return {"check": name, "result": str(result), "expected": str(target), "ok": "yes" if ok else "NO"}

    sigkills = len(interruptions) - len(sigterms)
    planned_sigkills, planned_sigterms = plan.count("SIGKILL"), plan.count("SIGTERM")
    checks = [
        check("SIGKILLs sent", sigkills, planned_sigkills, sigkills == planned_sigkills),
        check("SIGTERMs sent", len(sigterms), planned_sigterms, len(sigterms) == planned_sigterms),
        check("resumes (--resume)", resumes, len(plan), resumes == len(plan)),
        check("corrupt checkpoints found", corrupt, 0, corrupt == 0),
        check("SIGTERM: exit 75, checkpoint of the step reached", f"{clean}/{len(sigterms)}",
              f"{len(sigterms)}/{len(sigterms)}", clean == len(sigterms)),
        check("final run exit status", final_exit, 0, final_exit == 0),
        check("final step (uninterrupted run's)", final, final_step, final == final_step),
        check("losses equal to the uninterrupted run's", f"{equal}/{len(expected)} (max diff {diff:.2g})",
              f"{len(expected)}/{len(expected)}", equal == len(expected) and got.keys() == expected.keys()),
        check("temporary files left", temp_files, 0, temp_files == 0),
    ]
    return {"checks": checks, "passed": all(c["ok"] == "yes" for c in checks),
            "sigkills": sigkills, "sigterms": len(sigterms), "resumes": resumes,
            "corrupt_checkpoints": corrupt, "temp_files_left": temp_files, "final_step": final,
            "reference_final_step": final_step, "losses_equal": equal, "max_loss_diff": diff}


if __name__ == "__main__":
    sys.exit(main())
