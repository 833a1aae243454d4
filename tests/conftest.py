"""Shared helpers: a tiny configuration for fast end-to-end runs, and running the CLI; one thread per process."""

import os

# One intra-op thread in this process (the fixture below) and in every process a test starts (the CLI, torchrun,
# eval/'s scripts): the networks are tiny, and on a busy 2-core machine a second thread mostly spins waiting (20 steps
# of recipes/digits.yaml took 18 s with one thread and 62 s with two at a load of 6). Set before torch is imported:
# set after, it made this process's training steps 10 times slower. `OMP_NUM_THREADS=N pytest` runs with N.
os.environ.setdefault("OMP_NUM_THREADS", "1")
THREADS = int(os.environ["OMP_NUM_THREADS"])

import contextlib
import importlib.util
import io
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unsupdistill import run_dir as run_directory
from unsupdistill.config import load_config
from unsupdistill.models.backbone import create_backbone, describe_backbone
from unsupdistill.storage import save_backbone

REPO = Path(__file__).resolve().parents[1]

# A network small enough that a training step takes tens of milliseconds on 2 CPU cores.
TINY = [
    "model.backbone_kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
    "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "dino.head_output_dim=256",
    "train.batch_size=16", "dino.num_local_crops=2", "data.num_workers=0", "eval.summary=false",
]


def cli(*args: str, cwd: Path | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run ``python -m unsupdistill ARGS`` in a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "unsupdistill", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True, **popen)


def eval_script(path: str, *args: str) -> tuple[object, str]:
    """Run eval/PATH's ``main(ARGS)`` in this process, from the repository root, the way ``python eval/PATH ARGS``
    would (in-process, the package is imported once for all the scripts, not once each: seconds each); restore what
    a script sets for the whole process (torch's thread count, the root logger, sys.argv). What ``main`` returned,
    and what it printed."""
    name = Path(path).stem  # as a script's import of another finds it (and a worker process unpickles from it)
    spec = importlib.util.spec_from_file_location(name, REPO / "eval" / path)
    script = sys.modules[name] = importlib.util.module_from_spec(spec)
    root, cwd, threads, argv = logging.getLogger(), Path.cwd(), torch.get_num_threads(), sys.argv
    level, handlers = root.level, list(root.handlers)
    printed = io.StringIO()
    try:
        os.chdir(REPO)
        sys.argv = [str(REPO / "eval" / path), *args]  # the command a script records
        spec.loader.exec_module(script)
        with contextlib.redirect_stdout(printed):
            code = script.main(list(args))
    finally:
        os.chdir(cwd)
        sys.argv = argv
        torch.set_num_threads(threads)
        root.setLevel(level)
        root.handlers[:] = handlers
    return code, printed.getvalue()


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metric records so far (none before its first; a line still being written is left out)."""
    return run_directory.read_metrics(run_dir)[0] if (run_dir / run_directory.METRICS).exists() else []


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture(autouse=True)
def threads() -> Iterator[None]:
    """Every test starts with THREADS intra-op threads (a run's train.threads or a script may change them)."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normals (float32) from NumPy's generator: the same values on every torch version."""
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).float()


def write_images(folder: Path, count: int, width: int, height: int, seed: int = 0, fmt: str = "PNG") -> Path:
    """``count`` images of random blocks (each different), as PNG or JPEG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        blocks = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST)
        image.save(folder / f"{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}", fmt)
    return folder


def export_teacher(folder: Path, size: int, seed: int) -> Path:
    """A tiny exported ResNet teacher whose sidecar says ``size`` px."""
    config = load_config(None, ["model.backbone_kwargs={channels: [8, 16, 16, 32], stem_width: 8}",
                                f"model.input_size={size}", f"model.input_size={size}"])
    torch.manual_seed(seed)
    backbone, spec = create_backbone(config.model)
    return save_backbone(backbone.state_dict(), describe_backbone(spec, config, 0, "teacher"), folder)


LONGEST_FIRST = ("test_benchmarks.py", "test_distributed.py", "test_learning.py", "test_reliability.py",
                 "test_resume.py", "test_distill.py", "test_kd.py", "test_teacher_cache.py")
"""The files of longest total time (152, 148, 132, 127, 80, 72, 66 and 50 s of the 1,170 s measured on 2026-12-08),
started first; the rest follow in collection order. With one process per core (pyproject's ``--dist loadfile``)
each file goes to one process whole, and pytest-xdist would otherwise start the files with the most tests first
(``--no-loadscope-reorder`` turns that off): test_learning.py, one test of 132 s, then started last and ran alone
for its last minute. Simulated on the measured times: 642 s for the busier process, 587 s in this order."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = Path(str(item.fspath)).name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file's own order is kept


SOUND_RATE = 8000
PITCHES = {"low": 300.0, "mid": 900.0, "high": 2500.0}
"""The classes of the generated sound folders: tones of three pitches far apart."""


def tone(pitch: float, seconds: float, rng: np.random.Generator, rate: int = SOUND_RATE) -> np.ndarray:
    """A sine of ``pitch`` Hz at half scale with a little noise, float32."""
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * pitch * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def write_tones(root: Path, counts: dict[str, int], longest: float) -> Path:
    """``root/SPLIT/CLASS/I.wav`` for each split and its count of clips per class of :data:`PITCHES`: each tone 3 %
    off its pitch (random), 0.2 s to ``longest`` long, 8 kHz WAV; the same files for the same arguments."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    for split, count in counts.items():
        for label, pitch in PITCHES.items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                wave = tone(pitch * (1 + 0.03 * rng.standard_normal()), rng.uniform(0.2, longest), rng)
                sf.write(folder / f"{i}.wav", wave, SOUND_RATE)
    return root
