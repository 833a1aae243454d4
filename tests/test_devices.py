"""Devices and decoding workers for eval, embed and the Python API: --device resolution, the same
features with and without DataLoader workers, and the network on CUDA when there is one."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unsupdistill import load_feature_extractor
from unsupdistill.cli import main
from unsupdistill.data import DigitsDataset
from unsupdistill.devices import DeviceError, resolve_device

# a random-init ViT small enough to embed all of digits in about a second; it records its own input size
TINY_VIT = "timm:vit_tiny_patch16_224,img_size=16,patch_size=4,depth=1,embed_dim=32,num_heads=2"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")




@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """70 digit images as PNG files: more than one default batch (64) of the Python API."""
    folder = tmp_path_factory.mktemp("images")
    digits = DigitsDataset(8, indices=range(70))
    paths = [folder / f"{i:03d}.png" for i in range(len(digits))]
    for i, path in enumerate(paths):
        Image.fromarray(digits[i].permute(1, 2, 0).numpy()).save(path)
    return paths


def _eval(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / name
    assert main(["eval", TINY_VIT, "--train", "digits", "--test", "digits", "--out", str(out), "--no-linear",
                 "--no-clustering", "--no-plots", "--no-cache", *args]) == 0
    return json.loads((out / "eval.json").read_text())


# ----------------------------------------------------------------------------------------------
# Resolving --device
# ----------------------------------------------------------------------------------------------


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("CUDA:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"--device 'cuda:1': only 1 CUDA device\(s\) are visible"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", torch.device("cuda", 0)])
def test_cuda_without_cuda_is_a_clear_error(no_cuda: None, name: str | torch.device) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available") as err:
        resolve_device(name)
    assert "--device" in str(err.value) and "auto, cpu, cuda, cuda:N" in str(err.value)
    with pytest.raises(DeviceError, match="^device "):  # the Python API names its argument
        resolve_device(name, option="device")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cpu:0 ", "mps", ""])
def test_malformed_device_names_the_allowed_values(name: str) -> None:
    with pytest.raises(DeviceError, match=r"is not a device; allowed values: auto, cpu, cuda, cuda:N"):
        resolve_device(name)


def test_cli_exits_2_naming_the_flag_for_cuda_without_cuda(no_cuda: None, image_paths: list[Path],
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "pixels", "--image-size", "8", "--train", "digits", "--test", "digits",
                     "--out", str(tmp_path / "eval"), "--device", "cuda"]) == 2
    assert "--device 'cuda': CUDA is not available" in caplog.text and "cuda:N" in caplog.text
    assert not (tmp_path / "eval").exists()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["embed", "pixels", str(image_paths[0].parent), "--image-size", "8", "--device", "cuda",
                     "--out", str(tmp_path / "features.npy")]) == 2
    assert "--device 'cuda': CUDA is not available" in caplog.text and "cuda:N" in caplog.text
    assert not (tmp_path / "features.npy").exists()


# ----------------------------------------------------------------------------------------------
# Decoding workers change nothing but speed
# ----------------------------------------------------------------------------------------------


def test_eval_with_workers_gives_the_same_knn_and_reports_the_device(no_cuda: None, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    serial = _eval(tmp_path, "serial", "--workers", "0")
    with caplog.at_level(logging.INFO):
        parallel = _eval(tmp_path, "parallel", "--workers", "2")
    assert "on 1257 images: cpu, fp32, 2 decoding workers" in caplog.text and "on 540 images" in caplog.text
    assert serial["device"] == parallel["device"] == "cpu"  # auto, without CUDA
    assert serial["knn"] == parallel["knn"]
    assert serial["knn"]["20"]["top1"] > 20  # real features: far above chance on 10 classes


def test_embed_with_workers_gives_the_same_features_and_reports_them(no_cuda: None, image_paths: list[Path],
                                                                      tmp_path: Path) -> None:
    folder = str(image_paths[0].parent)
    for workers in ("0", "2"):
        assert main(["embed", TINY_VIT, folder, "--out", str(tmp_path / f"w{workers}.npy"), "--workers", workers]) == 0
        summary = json.loads((tmp_path / f"w{workers}.json").read_text())
        assert (summary["device"], summary["workers"], summary["images"]) == ("cpu", int(workers), 70)
    np.testing.assert_array_equal(np.load(tmp_path / "w0.npy"), np.load(tmp_path / "w2.npy"))


def test_extractor_decodes_lists_in_workers_with_the_same_features(no_cuda: None, image_paths: list[Path]) -> None:
    serial = load_feature_extractor(TINY_VIT, workers=0)
    assert serial.device == torch.device("cpu")  # auto, without CUDA
    one_by_one = torch.cat([serial(path) for path in image_paths])  # (70, D)
    assert one_by_one.dtype == torch.float32 and one_by_one.device.type == "cpu"
    paths = [str(path) for path in image_paths]
    parallel = load_feature_extractor(TINY_VIT, workers=2)
    torch.testing.assert_close(parallel(paths, batch_size=16), one_by_one, rtol=1e-5, atol=1e-5)
    # the default for a list longer than one batch: one worker per core (up to 8)
    default = load_feature_extractor(TINY_VIT)
    assert default._workers(paths, batch_size=64) > 0 and default._workers(paths[:64], batch_size=64) == 0
    torch.testing.assert_close(default(paths), one_by_one, rtol=1e-5, atol=1e-5)

    # PIL images and tensors still work, mixed with paths, in workers too
    pil = Image.open(image_paths[1]).convert("RGB")
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1)  # (3, H, W) uint8
    mixed = parallel([paths[0], pil, tensor], batch_size=1)
    torch.testing.assert_close(mixed[:2], one_by_one[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2:], serial(tensor), rtol=1e-5, atol=1e-5)  # resized by torch, not PIL
    with pytest.raises(TypeError, match="cannot embed int"):
        parallel([paths[0], 42], batch_size=1)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------


@NEEDS_CUDA
def test_eval_embed_and_extractor_run_on_cuda(image_paths: list[Path], tmp_path: Path) -> None:
    on_cpu = _eval(tmp_path, "cpu", "--device", "cpu", "--workers", "0")
    on_cuda = _eval(tmp_path, "cuda", "--workers", "2")  # auto
    assert (on_cpu["device"], on_cuda["device"]) == ("cpu", "cuda")
    for k, result in on_cpu["knn"].items():  # fp32 on both: at most a vote or two moves
        assert abs(result["top1"] - on_cuda["knn"][k]["top1"]) < 0.5

    folder = str(image_paths[0].parent)
    assert main(["embed", TINY_VIT, folder, "--out", str(tmp_path / "cuda.npy"), "--device", "cuda:0"]) == 0
    assert json.loads((tmp_path / "cuda.json").read_text())["device"] == "cuda:0"
    assert main(["embed", TINY_VIT, folder, "--out", str(tmp_path / "cpu.npy"), "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "cuda.npy"), np.load(tmp_path / "cpu.npy"), rtol=1e-3, atol=1e-3)

    extractor = load_feature_extractor(TINY_VIT)  # auto
    assert extractor.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in extractor.network.parameters())
    features = extractor([str(path) for path in image_paths], batch_size=16)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, load_feature_extractor(TINY_VIT, device="cpu")(image_paths[:]),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("command", ["eval", "embed"])
def test_a_negative_worker_count_is_a_usage_error(tmp_path, capsys, command):
    args = (["eval", "pixels", "--train", "digits", "--test", "digits"] if command == "eval"
            else ["embed", "pixels", str(tmp_path), "--out", str(tmp_path / "f.npy")])
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--workers", "-1"])
    assert exit_info.value.code == 2 and "expected an integer >= 0" in capsys.readouterr().err
