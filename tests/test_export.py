"""Exports (safetensors, TorchScript, ONNX) reload without unsupdistill and match PyTorch; embed; Python API."""

import contextlib
import csv
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import TINY
from PIL import Image
from safetensors.torch import load_file

from unsupdistill import load_feature_extractor
from unsupdistill.cli import main
from unsupdistill.data import DigitsDataset
from unsupdistill.export import formats
from unsupdistill.models.load import ModelSpecError

FORMATS = {"safetensors": "teacher.safetensors", "torchscript": "teacher.torchscript.pt", "onnx": "teacher.onnx"}
TINY_HEAD = [item for item in TINY if not item.startswith("model.backbone_kwargs")]
RUNS = {
    "resnet_small_stem": TINY,  # the default: a ResNet with the 3x3 stride-1 stem for small images
    # the ImageNet stem (7x7/2 conv, max-pool); fp32, so that the export is compared at full precision
    "resnet": [*TINY, "model.small_image_stem=false", "model.input_size=32", "model.input_size=32",
               "dino.local.size=16", "train.precision=fp32"],
    "vit": [*TINY_HEAD, "model.backbone=vit_tiny_patch16_224", "model.small_image_stem=false",
            "dino.head_batch_norm=false", "model.input_size=16", "model.input_size=16",
            "dino.local.size=8",
            "model.backbone_kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"],
}

# Runs in a fresh interpreter where `import unsupdistill` fails: only torch, timm, safetensors, onnxruntime. One
# interpreter for every run's exports (each start imports torch, timm and onnxruntime: seconds).
RELOAD_WITHOUT_UNSUPDISTILL = r"""
import json, sys
sys.modules["unsupdistill"] = None  # any import of the package now raises ImportError
try:
    import unsupdistill
    raise SystemExit("unsupdistill is still importable")
except ImportError:
    pass
import numpy as np, timm, torch, onnxruntime
from safetensors.torch import load_file

for export_dir, images_path, out_path in zip(*[iter(sys.argv[1:])] * 3):
    images = torch.from_numpy(np.load(images_path))  # (N, 3, S, S) float in [0, 1]
    out = {}
    meta = json.load(open(f"{export_dir}/teacher.json"))
    model = timm.create_model(meta["timm_name"], num_classes=0, **meta["timm_kwargs"])
    if meta["small_image_stem"]:  # as the sidecar's "rebuild" says
        model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    model.load_state_dict(load_file(f"{export_dir}/teacher.safetensors"), strict=True)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        out["safetensors"] = model.eval()((images - mean) / std).numpy()
        out["torchscript"] = torch.jit.load(f"{export_dir}/teacher.torchscript.pt")(images).numpy()
    session = onnxruntime.InferenceSession(f"{export_dir}/teacher.onnx", providers=["CPUExecutionProvider"])
    out["onnx"] = session.run(["features"], {"images": images.numpy()})[0]
    np.savez(out_path, **out)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs (2 steps each) of a small-stem ResNet, a plain ResNet and a ViT."""
    root = tmp_path_factory.mktemp("runs")
    for name, args in RUNS.items():
        assert main(["pretrain", "--out", str(root / name), *args, "train.max_steps=2"]) == 0
    return root


def real_images(size, count=5):
    """``count`` real digits as float (N, 3, S, S) in [0, 1]; 5 is not the batch the graphs were traced with."""
    digits = DigitsDataset(size, indices=range(100, 100 + count))
    return torch.stack([digits[i] for i in range(count)]).float() / 255


@pytest.fixture(scope="module")
def reloaded(runs, tmp_path_factory) -> dict[str, dict]:
    """Each run exported in every format by ``unsupdistill export`` (what it printed, the sidecars), the features of
    the Python API on real images, and those of the exports reloaded in a fresh interpreter without unsupdistill."""
    root = tmp_path_factory.mktemp("exports")
    results, argv = {}, []
    for name in RUNS:
        export_dir, printed = root / name, {}
        for fmt, file in FORMATS.items():
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                assert main(["export", str(runs / name), "--format", fmt, "--out", str(export_dir / file)]) == 0
            printed[fmt] = stdout.getvalue()
        extractor = load_feature_extractor(runs / name)
        images = real_images(extractor.input_size)
        np.save(root / f"{name}.npy", images.numpy())
        results[name] = {"export_dir": export_dir, "printed": printed, "expected": extractor(images).numpy(),
                         "sidecars": {fmt: json.loads(formats.sidecar_path(export_dir / file).read_text())
                                      for fmt, file in FORMATS.items()}}
        argv += [str(export_dir), str(root / f"{name}.npy"), str(root / f"{name}.npz")]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_UNSUPDISTILL, *argv], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in RUNS:
        results[name]["got"] = dict(np.load(root / f"{name}.npz"))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_every_export_reloads_without_unsupdistill_and_matches_pytorch(reloaded, name):
    run = reloaded[name]
    for fmt, file in FORMATS.items():
        printed = run["printed"][fmt]
        assert "max abs error" in printed and "passed" in printed and str(run["export_dir"] / file) in printed
    sidecars = run["sidecars"]
    assert sidecars["onnx"]["onnx_opset"] == formats.ONNX_OPSET
    assert all(meta["parity"]["max_abs_error"] <= meta["parity"]["tolerance"] for meta in sidecars.values())
    expected = run["expected"]
    tolerance = formats.ATOL + formats.RTOL * np.abs(expected).max()
    for fmt in FORMATS:
        got = run["got"][fmt]
        assert got.shape == expected.shape, fmt
        error = np.abs(got - expected).max()
        assert error <= tolerance, f"{fmt}: max abs error {error} > {tolerance}"


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_safetensors_export_loads_into_plain_timm_with_strict_keys(runs, tmp_path, name):
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(runs / name), "--format", "safetensors", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(meta["timm_name"], num_classes=0, **meta["timm_kwargs"])
    model.load_state_dict(load_file(out), strict=True)
    size = meta["input_size"]
    assert model.eval()(torch.rand(2, 3, size, size)).shape == (2, meta["feature_dim"])
    assert out.stat().st_mode & 0o044 == 0o044  # readable by others, like any file the user writes


def test_export_that_fails_parity_writes_nothing(runs, tmp_path, monkeypatch, caplog):
    """A broken exporter (simulated: its outputs are perturbed) must not replace or leave any file."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    real_runner = formats._RUNNERS["onnx"]

    def perturbed(path, model):
        run = real_runner(path, model)
        return lambda batch: run(batch) + 0.01

    monkeypatch.setitem(formats._RUNNERS, "onnx", perturbed)
    with caplog.at_level(logging.ERROR):
        assert main(["export", str(runs / "vit"), "--format", "onnx", "--out", str(out)]) == 2
    assert "does not match the PyTorch model" in caplog.text and "nothing was written" in caplog.text
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_a_checkpoint_that_runs_code_is_refused_and_the_code_does_not_run(tmp_path, caplog):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "unsupdistill.checkpoint/1", "teacher": RunsCode()}, evil)
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"format": "unsupdistill.checkpoint/1", "teacher": RunsCode()}, f)
    for path in (evil, legacy):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
        assert "not a safe unsupdistill checkpoint" in caplog.text
        with pytest.raises(ModelSpecError, match="not a safe unsupdistill checkpoint"):
            load_feature_extractor(path)
    assert not os.path.exists(MARKER)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("args, expected", [
    (["pixels", "--format", "onnx"], "no trained weights"),
    (["RUN", "--format", "onnx", "--out", "model.pt"], "must end in .onnx"),
    (["RUN", "--format", "safetensors", "--data", "/no/such/images"], "/no/such/images"),
])
def test_export_bad_input_is_named(runs, tmp_path, caplog, args, expected):
    args = [str(runs / "vit") if a == "RUN" else str(tmp_path / a) if a.startswith("model.") else a for a in args]
    with caplog.at_level(logging.ERROR):
        assert main(["export", *args]) == 2
    assert expected in caplog.text


def write_digit_folder(folder, count):
    folder.mkdir()
    digits = DigitsDataset(8, indices=range(count))
    for i in range(count):
        Image.fromarray(digits[i].permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


def test_embed_writes_one_row_per_readable_image_and_lists_the_rest(runs, tmp_path, capsys):
    data = tmp_path / "images"
    write_digit_folder(data, 30)
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.png").write_text("not an image")

    out = tmp_path / "features.npy"
    assert main(["embed", str(runs / "resnet_small_stem"), str(data), "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 30 images" in printed and "2 unreadable files skipped" in printed and str(out) in printed
    features = np.load(out)
    with open(tmp_path / "features.csv") as f:
        rows = list(csv.DictReader(f))
    assert features.shape[0] == len(rows) == 30
    assert [r["path"] for r in rows] == [str(data / f"{i:03d}.png") for i in range(30)]
    skipped = (tmp_path / "features.skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in skipped) == [str(data / "empty.jpg"), str(data / "text.png")]
    summary = json.loads((tmp_path / "features.json").read_text())
    assert summary["images"] == 30 and summary["skipped"] == 2 and summary["images_per_s"] > 0

    # the same rows as the Python API gives for the same paths
    extractor = load_feature_extractor(runs / "resnet_small_stem")
    np.testing.assert_allclose(features, extractor([r["path"] for r in rows]).numpy(), atol=1e-5)

    bundle = tmp_path / "features.npz"
    assert main(["embed", str(runs / "resnet_small_stem"), str(data), "--out", str(bundle), "--workers", "0"]) == 0
    with np.load(bundle) as loaded:
        np.testing.assert_allclose(loaded["features"], features, atol=1e-6)
        assert list(loaded["paths"]) == [r["path"] for r in rows]


def test_embed_rejects_an_unknown_output_type(runs, tmp_path, caplog):
    data = tmp_path / "images"
    write_digit_folder(data, 3)
    with caplog.at_level(logging.ERROR):
        assert main(["embed", str(runs / "vit"), str(data), "--out", str(tmp_path / "f.parquet")]) == 2
    assert ".npy" in caplog.text and ".npz" in caplog.text


def test_python_api_works_from_an_exported_safetensors_file_alone(runs, tmp_path):
    exported = tmp_path / "elsewhere"
    exported.mkdir()
    for name in ("backbone.safetensors", "backbone.json"):
        shutil.copy(runs / "resnet_small_stem" / name, exported / name)
    extractor = load_feature_extractor(exported / "backbone.safetensors")
    size = extractor.input_size

    digits = DigitsDataset(8, indices=range(4))
    pil_images = [Image.fromarray(digits[i].permute(1, 2, 0).numpy()) for i in range(4)]
    paths = []
    for i, image in enumerate(pil_images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    from_pil = extractor(pil_images)
    assert from_pil.shape == (4, json.loads((exported / "backbone.json").read_text())["feature_dim"])
    torch.testing.assert_close(extractor([str(p) for p in paths]), from_pil)
    torch.testing.assert_close(extractor(pil_images[0]), from_pil[:1])

    # tensors: uint8 or float, one image or a batch, any size (resized and centre-cropped like files)
    batch = torch.stack([DigitsDataset(size, indices=range(4))[i] for i in range(4)])  # (4, 3, S, S) uint8
    torch.testing.assert_close(extractor(batch), extractor(batch.float() / 255))
    torch.testing.assert_close(extractor(batch[0]), extractor(batch[:1]))
    assert extractor(torch.rand(2, 3, 2 * size, 3 * size)).shape == from_pil[:2].shape
    # and the same features as the trained run's teacher
    torch.testing.assert_close(load_feature_extractor(runs / "resnet_small_stem")(pil_images), from_pil)
    with pytest.raises(TypeError, match="cannot embed"):
        extractor([42])
