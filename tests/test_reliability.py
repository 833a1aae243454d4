"""Reliability: preemption by SIGTERM/SIGINT (of one process of a torchrun: test_distributed.py), resume from the
newest checkpoint that loads, checkpoint write failures, non-finite losses and gradients, and the chaos script."""

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, eval_script, read_metrics
from lightly.loss import DINOLoss
from PIL import Image

from unsupdistill.cli import EXIT_STOPPED, main
from unsupdistill.config import load_config
from unsupdistill.methods import build_trainer
from unsupdistill.methods.dino import method as dino
from unsupdistill.storage import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from unsupdistill.train import loop

STEPS = 20
ARGS = [*TINY, f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.seed=5"]  # saves at the end


def all_finite(state_dict: dict) -> bool:
    return all(t.isfinite().all() for t in state_dict.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted run of ARGS, by step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["pretrain", "--out", str(out), *ARGS]) == 0
    losses = {m["step"]: m["loss"] for m in read_metrics(out)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def assert_losses_equal(run: Path, reference: dict[int, float]) -> None:
    got = read_metrics(run)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # lines after the checkpoint were replaced
    for m in got:
        assert m["loss"] == pytest.approx(reference[m["step"]], rel=1e-6, abs=1e-7), f"step {m['step']}"


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_at_a_step_boundary_and_resume_matches(tmp_path, reference):
    """A scheduler's preemption: SIGTERM to the training process and its DataLoader worker. The process
    writes a checkpoint of the step it reached and exits with status 75; the resumed run's losses equal
    the uninterrupted run's."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unsupdistill", "pretrain", "--out", str(out), *ARGS, "data.num_workers=1"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(m["step"] >= 4 for m in read_metrics(out)):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)

    assert proc.returncode == EXIT_STOPPED, log.read_text()[-3000:]
    reached = max(m["step"] for m in read_metrics(out))
    assert 4 <= reached < STEPS
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == reached  # save_every_steps is 100
    assert f"stopped by SIGTERM after step {reached}" in log.read_text() and f"--resume {out}" in log.read_text()
    assert not (out / "backbone.safetensors").exists()
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["step"]) == ("preempted", EXIT_STOPPED, reached)
    assert status["resume"] == f"unsupdistill pretrain --resume {out}"

    assert main(["pretrain", "--resume", str(out)]) == 0
    assert_losses_equal(out, reference)


def test_ctrl_c_stops_at_a_step_boundary_and_resume_matches(tmp_path, reference, monkeypatch, caplog):
    train_step = loop.Trainer.train_step

    def ctrl_c_during_step_5(self, *args, **kwargs):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", ctrl_c_during_step_5)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", "--out", str(out), *ARGS]) == EXIT_STOPPED
    assert signal.getsignal(signal.SIGINT) is before  # restored
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 5
    assert f"stopped by SIGINT after step 5 of {STEPS}" in caplog.text and f"--resume {out}" in caplog.text

    assert main(["pretrain", "--resume", str(out)]) == 0
    assert_losses_equal(out, reference)


def test_resume_picks_the_newest_checkpoint_that_loads(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for name, step in [("last.pt", 20), ("epoch_0001.pt", 10), ("epoch_0002.pt", 20), ("epoch_0003.pt", 30),
                       ("epoch_0004.pt", 40)]:
        save_checkpoint({"step": step}, folder / name)
    data = (folder / "epoch_0004.pt").read_bytes()
    (folder / "epoch_0004.pt").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        path, state = latest_checkpoint(tmp_path)
    assert (path.name, state["step"]) == ("epoch_0003.pt", 30)  # newer than last.pt
    assert "epoch_0004.pt" in caplog.text and "truncated" in caplog.text

    (folder / "epoch_0003.pt").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path)[0].name == "last.pt"  # last.pt wins the tie with epoch_0002.pt
    assert "epoch_0003.pt" in caplog.text

    for name in ("last.pt", "epoch_0002.pt", "epoch_0001.pt"):
        (folder / name).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError):  # a file named explicitly is never skipped
        latest_checkpoint(folder / "last.pt")


def test_resume_skips_a_truncated_last_checkpoint_with_a_warning(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):  # 3 steps per epoch
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "run"
    assert main(["pretrain", str(images), "--out", str(out), *TINY, "train.epochs=4", "train.max_steps=7",
                 "train.keep_every_epochs=1", "train.log_every_steps=1"]) == 0
    last = out / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["step"] == 7 and load_checkpoint(last.with_name("epoch_0002.pt"))["step"] == 6
    last.write_bytes(last.read_bytes()[:1000])

    with caplog.at_level(logging.INFO):
        assert main(["pretrain", "--resume", str(out), "train.max_steps=9"]) == 0
    assert f"{last} is not a safe unsupdistill checkpoint (it may be truncated" in caplog.text
    assert f"resuming from {last.with_name('epoch_0002.pt')} (step 6)" in caplog.text
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 10))
    assert load_checkpoint(last)["step"] == 9


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/7: file write failed")])
def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(tmp_path, monkeypatch, caplog, error):
    real_save, calls = torch.save, itertools.count(1)

    def save_then_fail(obj, f, *args, **kwargs):
        if next(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", save_then_fail)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = main(["pretrain", "--out", str(out), *TINY, "train.max_steps=8", "train.save_every_steps=2",
                     "train.log_every_steps=1"])
    assert code == 1
    last = out / "checkpoints" / "last.pt"
    assert f"could not write checkpoint {last}: {error}" in caplog.text
    assert "the last good checkpoint (step 2) is kept" in caplog.text and f"--resume {out}" in caplog.text
    assert load_checkpoint(last)["step"] == 2
    assert os.listdir(out / "checkpoints") == ["last.pt"]  # no temporary file left
    assert max(m["step"] for m in read_metrics(out)) == 4  # stopped at the failed write
    assert not (out / "backbone.safetensors").exists()


def test_nan_loss_stops_with_a_diagnosis_before_the_teacher_sees_it(tmp_path, monkeypatch, caplog):
    forward, calls = DINOLoss.forward, itertools.count(1)

    def nan_at_step_5(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if next(calls) == 5 else loss

    monkeypatch.setattr(DINOLoss, "forward", nan_at_step_5)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = main(["pretrain", "--out", str(out), *TINY, "train.max_steps=8", "train.save_every_steps=2",
                     "train.device=cpu", "train.precision=bf16", "dino.centering=ema"])  # DINOLoss, patched above
    assert code == 1
    for expected in ("non-finite loss at step 5", "loss nan", "lr ", "loss scale n/a", "precision bf16 on cpu",
                     "health at this step: teacher_entropy", "student_feature_std", "no teacher update",
                     "last good checkpoint (step 4) is kept", "lower optim.lr", "raise optim.warmup_epochs",
                     "train.precision=fp32", f"--resume {out}"):
        assert expected in caplog.text, expected
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 4 and all_finite(state["teacher"]) and all_finite(state["student"])
    assert not (out / "backbone.safetensors").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1 and "non-finite loss at step 5" in status["reason"]


def test_non_finite_gradients_stop_before_the_optimizer_and_the_teacher(tmp_path, monkeypatch, caplog):
    """As oneDNN's bf16 kernels on CPU sometimes do: a finite loss, an Inf/NaN gradient."""
    build = dino.build_student_teacher

    def build_with_a_bad_gradient_at_step_4(*args, **kwargs):
        student, teacher, spec = build(*args, **kwargs)
        calls = itertools.count(1)

        def inf_at_step_4(weight: torch.Tensor) -> None:
            if next(calls) == 4:
                weight.grad.fill_(float("inf"))

        student.backbone.conv1.weight.register_post_accumulate_grad_hook(inf_at_step_4)
        return student, teacher, spec

    monkeypatch.setattr(dino, "build_student_teacher", build_with_a_bad_gradient_at_step_4)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        code = main(["pretrain", "--out", str(out), *TINY, "train.max_steps=6", "train.save_every_steps=2",
                     "train.device=cpu", "train.precision=bf16"])
    assert code == 1
    for expected in ("non-finite gradients at step 4", "total gradient norm inf", "backbone.conv1.weight",
                     "teacher_kl_uniform", "use train.precision=fp32 (bf16 autocast on CPU",
                     "last good checkpoint (step 2) is kept"):
        assert expected in caplog.text, expected
    # without the check, step 4 would update the student and the teacher with Inf and save them
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 2 and all_finite(state["teacher"]) and all_finite(state["student"])
    assert not (out / "backbone.safetensors").exists()


def test_a_non_finite_teacher_is_never_saved_or_exported(tmp_path):
    config = load_config(None, [*TINY, "train.max_steps=1"])
    trainer = build_trainer(config, tmp_path / "run")
    trainer.run_dir.mkdir()
    next(b for b in trainer.method.teacher.backbone.buffers() if b.is_floating_point()).fill_(float("nan"))
    with pytest.raises(loop.TrainingError, match=r"refusing to write .*last\.pt: teacher tensor .* not finite"):
        trainer.save()
    with pytest.raises(loop.TrainingError, match="refusing to export"):
        trainer.export_backbone()
    assert not list(trainer.run_dir.rglob("*.pt")) and not list(trainer.run_dir.rglob("*.safetensors"))


def test_signal_handlers_live_in_the_main_thread_during_training_only(tmp_path, monkeypatch):
    before = {sig: signal.getsignal(sig) for sig in loop.StopRequest.SIGNALS}
    during = []
    train_step = loop.Trainer.train_step

    def recording_step(self, *args, **kwargs):
        during.append(signal.getsignal(signal.SIGTERM))
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", recording_step)
    assert main(["pretrain", "--out", str(tmp_path / "main"), *TINY, "train.max_steps=1"]) == 0
    assert getattr(during[0], "__func__", None) is loop.StopRequest._handle
    assert {sig: signal.getsignal(sig) for sig in loop.StopRequest.SIGNALS} == before

    # from another thread (where Python refuses handlers) training runs without them
    codes = []
    thread = threading.Thread(target=lambda: codes.append(
        main(["pretrain", "--out", str(tmp_path / "thread"), *TINY, "train.max_steps=1"])))
    thread.start()
    thread.join(timeout=120)
    assert codes == [0] and during[1] == before[signal.SIGTERM]


@pytest.mark.slow
def test_chaos_quick_finds_no_corrupt_checkpoint(tmp_path):
    report_path = tmp_path / "chaos.json"
    # one SIGKILL and one SIGTERM at random moments (--quick has two SIGKILLs; each interruption costs a process's
    # start, about 9 s here): test_resume.py kills every method at a chosen step
    code, printed = eval_script("tools/chaos.py", "--quick", "--kills", "1", "--out", str(tmp_path), "--json",
                                str(report_path))
    assert code == 0, printed
    assert "corrupt checkpoints found" in printed and "all checks passed" in printed
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["corrupt_checkpoints"] == 0
    assert (report["sigkills"], report["sigterms"], report["resumes"]) == (1, 1, 2)
    assert report["final_step"] == report["reference_final_step"] == 30
    assert report["losses_equal"] == 30
