"""A model of sounds exported and embedded: the ONNX and TorchScript graphs carry the front end (waves in, features
out) and reload without unsupdistill, safetensors keeps the front end in its sidecar, and ``embed``, the Python API
and the exports give evaluation's features of the same files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SOUND_RATE as RATE
from conftest import TINY, write_tones

from unsupdistill import load_feature_extractor
from unsupdistill.cli import main
from unsupdistill.data import read_sound
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.run import labeled_inputs
from unsupdistill.export import formats, parity
from unsupdistill.models.load import load_model

SOUND = [item for item in TINY if not item.startswith("eval.summary")]
EXPORTS = {"onnx": "teacher.onnx", "torchscript": "teacher.torchscript.pt"}

# A fresh interpreter where `import unsupdistill` fails: the graphs run on waves with only torch and onnxruntime.
RELOAD_WITHOUT_UNSUPDISTILL = r"""
import sys
sys.modules["unsupdistill"] = None
import numpy as np, onnxruntime, torch

folder, waves_path, out_path = sys.argv[1:]
waves = np.load(waves_path)  # (N, 1, clip_samples) float32
session = onnxruntime.InferenceSession(f"{folder}/teacher.onnx", providers=["CPUExecutionProvider"])
out = {"onnx": session.run(["features"], {"waves": waves})[0],
       "torchscript": torch.jit.load(f"{folder}/teacher.torchscript.pt")(torch.from_numpy(waves)).detach().numpy()}
np.savez(out_path, **out)
"""


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ folders of class subfolders of tones of three pitches, each of its own length, 8 kHz WAV."""
    return write_tones(tmp_path_factory.mktemp("sounds"), {"train": 6, "test": 3}, 0.5)


@pytest.fixture(scope="module")
def run(sounds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few DINO steps on the train folder (no summary)."""
    out = tmp_path_factory.mktemp("runs") / "sound"
    assert main(["pretrain", str(sounds / "train"), "--out", str(out), *SOUND, "eval.summary=false",
                 "train.batch_size=6", "train.max_steps=2"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(run: Path, sounds: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The run exported to ONNX and TorchScript with the test folder's clips for parity; the graphs' features on
    those clips in a fresh interpreter without unsupdistill, and the sidecars."""
    folder = tmp_path_factory.mktemp("exports")
    for fmt in EXPORTS:
        assert main(["export", str(run), "--format", fmt, "--out", str(folder), "--data", str(sounds / "test")]) == 0
    files = sorted((sounds / "test").rglob("*.wav"))
    extractor = load_feature_extractor(run, device="cpu")
    waves = torch.stack([extractor.preprocess(path) for path in files])  # (N, 1, clip_samples)
    np.save(folder / "waves.npy", waves.numpy())
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_UNSUPDISTILL, str(folder),
                             str(folder / "waves.npy"), str(folder / "got.npz")], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"expected": extractor(files).numpy(), "got": dict(np.load(folder / "got.npz")),
            "sidecars": {fmt: json.loads(formats.sidecar_path(folder / file).read_text())
                         for fmt, file in EXPORTS.items()}}


def _evaluation_features(run: Path, labeled: Path) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Evaluation's features of a labeled sound folder, by file name relative to it (``low/0.wav``)."""
    model = load_model(str(run))
    dataset = labeled_inputs(model, str(labeled), "test")
    features = extract_features(model.backbone, dataset, model.input_size, model.mean, model.std, progress=False,
                                frontend=model.frontend)
    names = [str(Path(path).relative_to(labeled)) for path in dataset.paths]
    return dict(zip(names, features.numpy())), features


@pytest.mark.slow
def test_onnx_and_torchscript_of_a_sound_run_take_waves_and_match_pytorch_without_unsupdistill(exported, sounds):
    expected = exported["expected"]
    tolerance = formats.ATOL + formats.RTOL * np.abs(expected).max()
    for fmt in EXPORTS:
        got = exported["got"][fmt]
        assert got.shape == expected.shape, fmt
        assert np.abs(got - expected).max() <= tolerance, fmt
        meta = exported["sidecars"][fmt]
        assert meta["input_name"] == "waves" and f"(N, 1, {meta['frontend']['clip_samples']})" in meta["input"]
        assert "front end is inside the graph" in meta["input"] and "resize" not in meta and "mean" not in meta
        parity = meta["parity"]
        assert parity["clips"] == str(sounds / "test") and "images" not in parity
        assert parity["batch_sizes"] == [9, 1] and parity["max_abs_error"] <= parity["tolerance"]


def test_embed_of_a_sound_folder_gives_evaluations_features_and_skips_bad_files(run, sounds, tmp_path):
    folder = tmp_path / "clips"
    shutil.copytree(sounds / "test", folder)
    (folder / "low" / "empty.wav").write_bytes(b"")
    (folder / "mid" / "noise.flac").write_bytes(b"not a sound")
    out = tmp_path / "embed"
    assert main(["embed", str(run), str(folder), "--out", str(out), "--workers", "0"]) == 0
    features = np.load(out / "features.npy")
    paths = [row.split(",", 1)[1] for row in (out / "features.csv").read_text().splitlines()[1:]]
    summary = json.loads((out / "embed.json").read_text())
    assert summary["kind"] == "audio" and summary["images"] == 9 and summary["skipped"] == 2
    assert summary["frontend"]["sample_rate"] == RATE
    assert {Path(line.split("\t")[0]).name for line in (out / "skipped.txt").read_text().splitlines()} == {
        "empty.wav", "noise.flac"}
    evaluation, _ = _evaluation_features(run, sounds / "test")
    assert len(paths) == len(evaluation) == len(features)
    for path, row in zip(paths, features):
        np.testing.assert_allclose(row, evaluation[str(Path(path).relative_to(folder))], rtol=1e-5, atol=1e-5)


def test_the_extractor_on_files_and_on_waves_gives_evaluations_features(run, sounds, tmp_path):
    extractor = load_feature_extractor(run, device="cpu")
    rate, samples = extractor.sample_rate, extractor.clip_samples
    assert rate == RATE and samples == json.loads((run / "backbone.json").read_text())["frontend"]["clip_samples"]
    evaluation, _ = _evaluation_features(run, sounds / "test")
    names = sorted(evaluation)
    files = [sounds / "test" / name for name in names]
    expected = np.stack([evaluation[name] for name in names])  # (N, D)

    by_path = extractor([str(path) for path in files]).numpy()
    np.testing.assert_allclose(by_path, expected, rtol=1e-5, atol=1e-5)
    raw = [read_sound(path, RATE) for path in files]  # each its own length: cut or padded by the extractor
    np.testing.assert_allclose(extractor(raw).numpy(), expected, rtol=1e-5, atol=1e-5)
    waves = torch.stack([extractor.preprocess(path) for path in files])  # (N, 1, clip_samples)
    np.testing.assert_allclose(extractor(waves).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extractor(waves[:, 0], batch_size=4).numpy(), expected, rtol=1e-5, atol=1e-5)
    one = extractor(raw[0]).numpy()  # a single 1-D wave
    np.testing.assert_allclose(one, expected[:1], rtol=1e-5, atol=1e-5)

    # a file at twice the rate is resampled to the model's: the features of the same tone written at the model's
    fast, slow = tmp_path / "fast.wav", tmp_path / "slow.wav"
    for path, rate in ((fast, 2 * RATE), (slow, RATE)):
        sf.write(path, 0.5 * np.sin(2 * np.pi * 900.0 * np.arange(int(0.3 * rate)) / rate), rate)
    a, b = extractor([fast, slow])
    np.testing.assert_allclose(a, b, atol=0.02 * float(b.abs().max()))  # the resampler's edges differ a little
    with pytest.raises(TypeError, match="mono wave"):
        extractor([np.zeros((2, 100), dtype=np.float32)])


def test_safetensors_export_of_a_sound_run_keeps_the_front_end(run, sounds, tmp_path):
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "teacher.json").read_text())
    assert meta["frontend"] == json.loads((run / "backbone.json").read_text())["frontend"]
    assert meta["parity"]["clips"] == str(sounds / "train")  # the run's training folder, still there
    files = sorted((sounds / "test").rglob("*.wav"))
    np.testing.assert_allclose(load_feature_extractor(tmp_path / "teacher.safetensors", device="cpu")(files),
                               load_feature_extractor(run, device="cpu")(files), rtol=1e-6, atol=1e-6)


def test_without_a_sound_folder_parity_runs_on_the_generated_clips(run, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run / "backbone.safetensors", moved / "backbone.safetensors")
    meta = json.loads((run / "backbone.json").read_text())
    (moved / "backbone.json").write_text(json.dumps({**meta, "trained_on": str(tmp_path / "gone")}))
    assert main(["export", str(moved), "--format", "safetensors", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "teacher.json").read_text())["parity"]["clips"] == parity.GENERATED_CLIPS
    clips = parity.generated_clips(RATE, 4000, 16)
    assert clips.shape == (16, 1, 4000) and clips.dtype == torch.float32
    assert torch.equal(clips, parity.generated_clips(RATE, 4000, 16))  # the rule, not chance
    assert (clips[0, 0] != 0).all() and (clips[-1, 0, :1000] == 0).all()  # the last sounds in 30 % of the clip
    assert clips.abs().max() < 1


def test_a_sound_model_checked_on_images_is_refused(run, tmp_path, caplog):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "out"),
                 "--data", str(images)]) != 0
    assert "sound folder" in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
