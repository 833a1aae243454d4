"""Resume after SIGKILL: a run killed as a step starts resumes from its last checkpoint and gives the
losses of the uninterrupted run, step for step, for every method and the state it carries across steps (DINO's
teacher and centre; distillation's queue and EMA student over stored teacher maps or over the stored views of the
teacher cache; distillation with labels, in the second of two born-again generations).

The killed run is a process of its own that sends itself SIGKILL as a chosen step starts (no handler runs, nothing
is flushed or cleaned up, as with the OOM killer or ``kill -9``): always at the same step, so the test needs only a
few steps and does not race the process. The uninterrupted run and the resume run in this
process. Random moments of SIGKILL and SIGTERM are eval/tools/chaos.py's (tests/test_reliability.py runs it)."""

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import TINY, export_teacher, read_metrics, write_images
from safetensors.torch import load_file

from unsupdistill.cli import main
from unsupdistill.storage import load_checkpoint

pytestmark = pytest.mark.slow  # end-to-end runs

STEPS, SAVE_EVERY = 6, 2
"""Every run: 6 steps, a checkpoint every 2 (and at each epoch's end)."""
COMMON = [f"train.max_steps={STEPS}", f"train.save_every_steps={SAVE_EVERY}", "train.log_every_steps=1",
          "train.seed=3", "train.threads=1", "data.num_workers=0", "eval.summary=false"]
"""One intra-op thread in the killed process as in this one: the same arithmetic, so the losses are equal."""
STUDENT = ["model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}", "model.input_size=12",
           "train.batch_size=16", "distill.loss=queue_kl", "distill.queue_size=48", "distill.ema_momentum=0.9"]
"""A student narrower than the teacher; 48 images make 3 steps an epoch. State carried across steps: a queue of 48
teacher embeddings (the batch's 16 and 32 stored; the default for 48 images, 16, would hold the batch alone) and an
EMA of the student, which is exported."""

KILL_ON_ENTERING = """
import os, signal, sys
from safetensors.torch import load_file

from unsupdistill.cli import main
from unsupdistill.train import loop

after, run = int(sys.argv[1]), sys.argv[2]
train_step = loop.Trainer.train_step

def killed_in_the_next_step(self, *args, **kwargs):
    if self.step == after and self.run_dir.name == run:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self, *args, **kwargs)

loop.Trainer.train_step = killed_in_the_next_step
sys.exit(main(sys.argv[3:]))
"""
"""``python -c KILL_ON_ENTERING AFTER RUN ARGS...``: ``unsupdistill ARGS``, SIGKILLed as step AFTER + 1 of the run
directory named RUN starts."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, Path]:
    """48 images (3 steps an epoch), 8 of them labeled in each of 3 classes, a teacher of 16 px, and 48 sounds."""
    root = tmp_path_factory.mktemp("resume")
    images = write_images(root / "images", 48, 20, 20)
    (root / "sounds").mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):  # tones of 200-3,000 Hz, 0.2-0.4 s, at 8 kHz
        t = np.arange(int(8000 * rng.uniform(0.2, 0.4))) / 8000
        tone = (0.5 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)).astype(np.float32)
        sf.write(root / "sounds" / f"{i:02d}.wav", tone, 8000)
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *([str(images / f"{i:03d}.png"), "abc"[i % 3]] for i in range(24))])
    return {"images": images, "labels": labels, "teacher": export_teacher(root / "teacher", 16, seed=0),
            "sounds": root / "sounds"}


KILLED_AFTER = 5
"""The killed process dies as step 6 starts: its last checkpoint is step 4's, step 5 is logged (and replaced)."""
CASES = {  # method: the verb, its arguments after --out, the run directory that dies (None: the one of --out)
    "dino": ("pretrain", [*TINY], None),  # the built-in digits
    "dino, sounds": ("pretrain", [*TINY], None),  # a folder of sounds: its views, the front end chosen on resume too
    "distill, stored teacher maps": ("distill", ["distill.targets=map", "distill.teacher_runtime=eager fp32"], None),
    # one stored view per image: epoch 1 (steps 1-3) records, epoch 2 (steps 4-6) replays
    "distill, teacher cache": ("distill", ["distill.targets=views", "distill.cache=on", "distill.cache_views=1"],
                               None),
    "kd, generation 2": ("distill", ["--generations", "2"], "gen_2"),
}


@pytest.mark.parametrize("method", list(CASES))
def test_resume_after_sigkill_gives_the_losses_of_the_uninterrupted_run(folder, tmp_path, caplog, method):
    verb, args, dies = CASES[method]
    if verb == "distill":
        args = [str(folder["images"]), "--teacher", str(folder["teacher"]), *STUDENT, *args]
        if method.startswith("kd"):
            args += ["--labels", str(folder["labels"])]
    if method == "dino, sounds":
        args = [str(folder["sounds"]), *args]
    args = [*args, *COMMON]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([verb, "--out", str(reference), *args]) == 0
    run = (lambda root: root / dies) if dies else (lambda root: root)

    process = subprocess.run([sys.executable, "-c", KILL_ON_ENTERING, str(KILLED_AFTER), run(killed).name, verb,
                              "--out", str(killed), *args], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == -9, process.stderr[-3000:]  # SIGKILL
    resumed_from = load_checkpoint(run(killed) / "checkpoints" / "last.pt")["step"]
    assert resumed_from == 4  # the last checkpoint before the kill
    assert [m["step"] for m in read_metrics(run(killed)) if "loss" in m] == list(range(1, KILLED_AFTER + 1))
    if dies:  # the first generation finished before the kill: the resume keeps it
        finished = (killed / "gen_1" / "backbone.safetensors").stat().st_mtime_ns

    with caplog.at_level(logging.INFO):
        assert main([verb, "--resume", str(killed)]) == 0
    expected = {m["step"]: m["loss"] for m in read_metrics(run(reference)) if "loss" in m}
    got = [(m["step"], m["loss"]) for m in read_metrics(run(killed)) if "loss" in m]
    assert [step for step, _ in got] == list(range(1, STEPS + 1))  # the lines after the checkpoint were replaced
    for step, loss in got:
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    exported = load_file(run(killed) / "backbone.safetensors")  # DINO's teacher, distillation's EMA student
    for name, tensor in load_file(run(reference) / "backbone.safetensors").items():
        assert torch.equal(exported[name], tensor), name
    log = caplog.text
    assert f"resumed at step {resumed_from}" in log
    if method == "distill, teacher cache":
        assert "reused: 48 of 48 views stored" in log  # the resumed run replays the views stored before the kill
        assert [m["teacher_cache_hits"] for m in read_metrics(run(killed))][resumed_from:] == [1.0] * 2
    if method == "distill, stored teacher maps":
        assert "teacher maps reused: all 48 stored" in log  # the teacher's pass is not run again
    if dies:
        assert (killed / "gen_1" / "backbone.safetensors").stat().st_mtime_ns == finished
