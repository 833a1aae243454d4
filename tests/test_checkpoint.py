import os
import pickle
import subprocess
import sys

import pytest
import torch

from unsupdistill.storage import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)


def test_roundtrip_with_tensors_and_rng(tmp_path):
    state = {"step": 7, "model": {"w": torch.randn(3, 3)}, "rng": [{"torch": torch.get_rng_state()}]}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not private like a mkstemp file
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def write_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, write_then_fail)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "unsupdistill.checkpoint/1", "payload": RunsCode()}, f)
    # also in torch's zip format
    torch.save({"format": "unsupdistill.checkpoint/1", "payload": RunsCode()}, tmp_path / "evil_zip.pt")
    for path in (evil, tmp_path / "evil_zip.pt"):
        with pytest.raises(CheckpointError, match="not a safe unsupdistill checkpoint"):
            load_checkpoint(path)
    assert not os.path.exists(MARKER)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    save_checkpoint({"step": 1}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an unsupdistill checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_mapped_look_at_a_checkpoint_refuses_truncated_files_too(tmp_path):
    save_checkpoint({"step": 3, "weights": torch.randn(10_000)}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt", mmap=True)["step"] == 3
    data = (tmp_path / "ok.pt").read_bytes()
    for size in (0, 100, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="may be truncated"):
            load_checkpoint(tmp_path / "cut.pt", mmap=True)


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.pt.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".last.pt.{os.getpid()}.4567ef01.tmp"
    other = tmp_path / ".notes.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_run_of_a_path_is_the_one_rule_for_resume_and_export(tmp_path, monkeypatch):
    """A checkpoint copied out of its run's checkpoints/ folder belongs to no run: --resume of it starts a new run
    directory (it used to take the file's grandparent, writing train.log and status.json there), and its export
    goes beside it; inside a run, both use the run."""
    import shutil

    from conftest import TINY

    from unsupdistill.cli import main
    from unsupdistill.export.formats import default_export_path
    from unsupdistill.run_dir import last_checkpoint, run_of

    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *TINY, "train.max_steps=1"]) == 0
    loose = tmp_path / "copies" / "step1.pt"
    loose.parent.mkdir()
    shutil.copy(last_checkpoint(run), loose)
    assert run_of(run) == run and run_of(last_checkpoint(run)) == run and run_of(loose) is None
    assert default_export_path(last_checkpoint(run), "onnx", "teacher") == run / "export" / "last-teacher.onnx"
    assert default_export_path(loose, "onnx", "teacher") == loose.parent / "export" / "step1-teacher.onnx"

    monkeypatch.chdir(tmp_path / "copies")
    assert main(["pretrain", "--resume", str(loose), "train.max_steps=2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copies", "run"]  # nothing written in the grandparent
    assert sorted(p.name for p in loose.parent.iterdir()) == ["runs", "step1.pt"]
    (resumed,) = (loose.parent / "runs").iterdir()
    assert load_checkpoint(last_checkpoint(resumed))["step"] == 2 and (resumed / "status.json").is_file()
