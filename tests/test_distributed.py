"""Many processes: torchrun on CPU (gloo) against one process, a signal to one process and resuming under torchrun,
rank 0 alone writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, read_metrics

from unsupdistill import distributed
from unsupdistill.cli import EXIT_STOPPED, main
from unsupdistill.storage import load_checkpoint

STEPS = 20
RUN_ARGS = [*TINY, "train.log_every_steps=1", "train.seed=0"]

NO_PER_PROCESS_RANDOMNESS = [
    # crops of the whole image with no photometric changes: every view is the same in every process
    *(f"augment.{view}.{setting}" for view in ("global_1", "global_2", "local")
      for setting in ("scale=[1, 1]", "flip_p=0", "color_jitter_p=0", "grayscale_p=0", "blur_p=0", "solarize_p=0")),
    # LayerNorm instead of BatchNorm: no statistics over the batch, which each process sees only part of
    "model.backbone=vit_tiny_patch16_224", "model.small_image_stem=false", "dino.head_batch_norm=false",
    "model.backbone_kwargs={img_size: 16, patch_size: 4, depth: 2, embed_dim: 48, num_heads: 2}",
    "model.input_size=16", "model.input_size=16", "dino.local.size=8",  # multiples of the patch
    "train.precision=fp32",
]

EXACT_TOLERANCE = 1e-4
"""Largest |two-process - one-process| loss without per-process randomness (measured: 2.6e-6)."""

STEP_TOLERANCE = 1.5
"""Largest |two-process - one-process| loss at any step of the tiny config (measured: 0.78)."""

MEAN_TOLERANCE = 0.25
"""Largest difference of the tiny config's mean loss over the first 20 steps (measured: 0.056)."""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS``, one intra-op thread per process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], env=_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config for 20 steps on the digits, under torchrun with 2 processes."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun("-m", "unsupdistill", "pretrain", "--out", str(out), *RUN_ARGS, f"train.max_steps={STEPS}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_without_per_process_randomness_two_processes_equal_one(tmp_path: Path) -> None:
    """Same seed and global batch (16): 2 processes x 8 images against 1 process x 16 images.

    With crops of the whole image and no photometric changes, a model without BatchNorm (a tiny ViT,
    no BatchNorm in the head) and fp32, nothing depends on which process holds which image. The
    distributed sampler gives the two ranks together the images the one process sees, DDP averages
    the gradients, the centre and the logged loss are all-reduced: the 20 losses must then agree to
    rounding. Measured: at most 2.6e-6 apart; tolerance 1e-4. A sampler that gave both ranks the
    same 8 images moved the losses by 0.03 at the first step and by up to 0.44 later.
    """
    args = ["pretrain", *RUN_ARGS, *NO_PER_PROCESS_RANDOMNESS, f"train.max_steps={STEPS}"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # in this process, with one thread as each of the two
    double = torchrun("-m", "unsupdistill", *args, "--out", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")

    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=EXACT_TOLERANCE), step


@pytest.mark.slow
def test_two_processes_stay_close_to_one_on_the_tiny_config(two_process_run: Path, tmp_path: Path) -> None:
    """The tiny config as is: same seed and global batch (16), 2 processes x 8 against 1 x 16 images.

    Each process draws its own augmentations (seed + rank) and BatchNorm normalises with per-process
    batch statistics (SyncBatchNorm is used on CUDA only), so the losses differ at every step. With a
    teacher temperature of 0.01 and 16 images a step, they are dominated by augmentation noise: one
    process with only its augmentation seed changed moved them by up to 0.74. Measured over the first
    20 steps (seeds 0 and 1): at most 0.78 apart at a step, mean losses 0.056 apart. Tolerances: 1.5
    at a step, 0.25 for the mean. The exact agreement of the mechanics is the test above.
    """
    assert main(["pretrain", "--out", str(tmp_path / "one"), *RUN_ARGS, f"train.max_steps={STEPS}"]) == 0

    one, two = _losses(tmp_path / "one"), _losses(two_process_run)

    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert max(abs(two[step] - one[step]) for step in one) <= STEP_TOLERANCE
    assert abs(sum(two.values()) - sum(one.values())) / STEPS <= MEAN_TOLERANCE


@pytest.mark.slow
def test_only_rank_zero_writes_files(two_process_run: Path) -> None:
    files = sorted(p.relative_to(two_process_run).as_posix() for p in two_process_run.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("tensorboard/")]

    assert len(events) == 1 and "events.out.tfevents" in events[0]  # one writer, not one per rank
    assert [f for f in files if f not in events] == [
        "backbone.json", "backbone.safetensors", "checkpoints/last.pt", "config.yaml", "metrics.jsonl", "status.json",
        "train.log", "training_curves.png"]
    steps = [m["step"] for m in read_metrics(two_process_run)]
    assert steps == list(range(1, STEPS + 1))  # no line written twice
    assert (two_process_run / "train.log").read_text().count("over 2 process(es)") == 1
    state = load_checkpoint(two_process_run / "checkpoints" / "last.pt")
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2


def worker_pids(parent: int) -> dict[int, int]:
    """Rank -> pid of the torchrun workers under ``parent`` (Linux /proc)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(item.split("=", 1) for item in (stat.parent / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            workers[int(env["RANK"])] = int(stat.parent.name)
    return workers


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_a_signalled_process_stops_both_at_one_step_and_the_resume_under_torchrun_continues(two_process_run: Path,
                                                                                         tmp_path: Path) -> None:
    """SIGTERM to rank 1 only (a preemption): both processes stop after the same step, rank 0 writes its checkpoint
    and status.json says how to resume; resumed under torchrun to step 14, the step sequence goes on unbroken and the
    losses are those of the uninterrupted 2-process run."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m", "unsupdistill", "pretrain", "--out", str(out), *RUN_ARGS, "train.max_steps=60"],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=stderr_file)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not any(m["step"] >= 3 for m in read_metrics(out)):
        time.sleep(0.01)
    workers = worker_pids(proc.pid)
    assert proc.poll() is None and sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGTERM)
    proc.wait(timeout=120)
    stderr = log.read_text()

    assert proc.returncode != 0, stderr[-3000:]  # torchrun reports the workers' status 75 as a failure
    reached = max(m["step"] for m in read_metrics(out))
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == reached < 14 and state["world_size"] == 2 and len(state["rng"]) == 2, stderr[-3000:]
    assert f"stopped by a signal to another process after step {reached}" in (out / "train.log").read_text()
    # torchrun turned the workers' 75 into 1; status.json still tells a requeue script what happened
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == EXIT_STOPPED and status["step"] == reached
    assert status["resume"] == f"torchrun --standalone --nproc_per_node 2 -m unsupdistill pretrain --resume {out}"

    resumed = torchrun("-m", "unsupdistill", "pretrain", "--resume", str(out), "train.max_steps=14")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 15))
    assert f"resumed at step {reached}" in (out / "train.log").read_text()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 14
    assert len(list((out / "tensorboard").iterdir())) == 2  # one events file per launch, from rank 0 only
    uninterrupted = _losses(two_process_run)  # 20 steps: the schedules follow the epochs, not train.max_steps
    for m in metrics:
        assert m["loss"] == pytest.approx(uninterrupted[m["step"]], rel=1e-5), m["step"]


@pytest.mark.slow
def test_collectives_under_torchrun(tmp_path: Path) -> None:
    """The helpers in unsupdistill.distributed, in two real gloo processes."""
    script = tmp_path / "collectives.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from unsupdistill import distributed
        distributed.init_distributed(torch.device("cpu"))
        rank = distributed.rank()
        mean = distributed.all_reduce_mean(torch.tensor([1.0 + 2 * rank, 10.0]))
        report = {{"rank": rank, "world": distributed.world_size(), "main": distributed.is_main_process(),
                   "local_rank": distributed.local_rank(), "mean": mean.tolist(),
                   "gathered": distributed.gather_objects({{"rank": rank}})}}
        open(f"{tmp_path}/rank{{rank}}.json", "w").write(json.dumps(report))
        distributed.cleanup()
    """))

    result = torchrun(str(script), timeout=120)

    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report == {"rank": rank, "world": 2, "main": rank == 0, "local_rank": rank, "mean": [2.0, 10.0],
                          "gathered": [{"rank": 0}, {"rank": 1}]}


def test_single_process_needs_no_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    distributed.init_distributed(torch.device("cpu"))

    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main_process()
    value = torch.tensor([1.5, -2.0])
    assert torch.equal(distributed.all_reduce_mean(value), value)
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    distributed.cleanup()  # nothing to clean up: no error


@pytest.mark.slow
def test_process_0_decides_for_both_the_run_directory_the_scan_and_the_time_budgets_steps(tmp_path: Path) -> None:
    """A folder, no --out, a time budget, under torchrun: process 0 names the run directory for both; process 0
    alone scans the folder, logs and writes the scan, and the automatic settings split the batch over the two
    processes; process 0's step plan is broadcast, so with the budget both processes stop after the same step."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        Image.new("RGB", (20, 20), (i * 10, 255 - i * 10, 7 * i)).save(images / f"{i:02d}.png")
    result = torchrun("-m", "unsupdistill", "pretrain", "images", *TINY[:3], "train.log_every_steps=1",
                      "train.epochs=10000", "train.time_budget_s=6", "train.save_every_steps=100000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # one directory, not one per process
    output = result.stdout + result.stderr
    assert output.count("checking 24 image files") == 1 and output.count("settings chosen for 24 images") == 1
    assert (runs[0] / "scan.json.gz").is_file() and json.loads((runs[0] / "status.json").read_text())["state"] == "done"
    # a global batch of 8 (at most half the 24 images), 4 per process: each process's 12 images make 3 steps an
    # epoch (a batch of 8 in each would make 1)
    assert yaml.safe_load((runs[0] / "config.yaml").read_text())["train"]["batch_size"] == 8
    assert "global batch 8 over 2 process(es)" in (runs[0] / "train.log").read_text()
    records = [r for r in read_metrics(runs[0]) if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in records] == [(r["step"], pytest.approx(r["step"] / 3)) for r in records]
    # the budget's last step is the one both processes planned, and the one checkpointed
    assert records[-1]["planned_steps"] == records[-1]["step"] == load_checkpoint(runs[0] / "checkpoints" /
                                                                                   "last.pt")["step"]
    assert records[-1]["budget_left_s"] < 2.0
