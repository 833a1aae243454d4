"""Loading models to evaluate (runs, checkpoints, exports, random-init timm, pixels) and the feature cache."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY

from unsupdistill.config import load_config
from unsupdistill.data.labeled import LabeledDigits, LabeledImages
from unsupdistill.evaluate.cache import cache_path, cached_features, data_fingerprint, default_cache_dir
from unsupdistill.methods import train
from unsupdistill.models.load import ModelSpecError, load_model, parse_timm_spec
from unsupdistill.storage import CHECKPOINT_FORMAT

FEATURE_DIM = 64  # the last stage width of TINY's ResNet
CROP = 16  # the default global crop size


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run directory: two training steps of the tiny ResNet, exported and checkpointed."""
    run = tmp_path_factory.mktemp("run") / "tinyrun"
    train(load_config(None, [*TINY, "train.max_steps=2"]), run)
    assert (run / "backbone.safetensors").is_file() and (run / "checkpoints" / "last.pt").is_file()
    return run


def _features(model, batch: int = 4, seed: int = 1) -> torch.Tensor:
    images = torch.rand(batch, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.backbone((images - mean) / std)


# ----------------------------------------------------------------------------------------------
# Trained models
# ----------------------------------------------------------------------------------------------


def test_run_export_and_checkpoint_give_the_teacher(run_dir: Path, tmp_path: Path) -> None:
    from_run = load_model(str(run_dir))
    from_weights = load_model(str(run_dir / "backbone.safetensors"))
    from_checkpoint = load_model(str(run_dir / "checkpoints" / "last.pt"))
    export_only = tmp_path / "exported"
    export_only.mkdir()
    for name in ("backbone.safetensors", "backbone.json"):
        shutil.copy(run_dir / name, export_only / name)
    from_export_dir = load_model(str(export_only))

    expected = _features(from_run)
    assert expected.shape == (4, FEATURE_DIM)
    for model in (from_run, from_weights, from_checkpoint, from_export_dir):
        assert not model.backbone.training
        assert (model.input_size, model.architecture) == (CROP, "resnet18")
        assert model.mean == pytest.approx((0.485, 0.456, 0.406)) and model.std == pytest.approx((0.229, 0.224, 0.225))
        torch.testing.assert_close(_features(model), expected, rtol=0, atol=0)  # the same teacher weights
    assert from_run.name == "run:tinyrun"
    assert from_run.cache_key == from_weights.cache_key == from_export_dir.cache_key  # same file bytes
    assert len(from_run.cache_key) == 64


def test_run_without_export_uses_its_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    model = load_model(str(tmp_path))
    torch.testing.assert_close(_features(model), _features(load_model(str(run_dir))), rtol=0, atol=0)


def test_student_backbone(run_dir: Path) -> None:
    teacher = load_model(str(run_dir))
    student = load_model(str(run_dir), student=True)
    student_ckpt = load_model(str(run_dir / "checkpoints" / "last.pt"), student=True)
    assert _features(student).shape == (4, FEATURE_DIM)
    torch.testing.assert_close(_features(student), _features(student_ckpt), rtol=0, atol=0)
    assert not torch.allclose(_features(student), _features(teacher))  # two steps apart: EMA lags the student
    assert student.cache_key != teacher.cache_key
    assert student.cache_key != load_model(str(run_dir / "checkpoints" / "last.pt")).cache_key
    assert student.name.endswith("student")


def test_student_needs_a_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    for name in ("backbone.safetensors", "backbone.json"):
        shutil.copy(run_dir / name, tmp_path / name)
    for spec in (str(tmp_path), str(tmp_path / "backbone.safetensors")):
        with pytest.raises(ModelSpecError, match="student"):
            load_model(spec, student=True)


def test_image_size_overrides_the_training_crop(run_dir: Path) -> None:
    model = load_model(str(run_dir), image_size=24)
    assert model.input_size == 24
    assert model.cache_key != load_model(str(run_dir)).cache_key
    assert _features(model).shape == (4, FEATURE_DIM)


# ----------------------------------------------------------------------------------------------
# Random-init timm baseline and pixels
# ----------------------------------------------------------------------------------------------


def test_timm_spec_parsing() -> None:
    name, kwargs = parse_timm_spec("timm:resnet18,small_image_stem=true,channels=[32,64,128,256],stem_width=32")
    assert name == "resnet18"
    assert kwargs == {"small_image_stem": True, "channels": [32, 64, 128, 256], "stem_width": 32}
    assert parse_timm_spec("timm:vit_tiny_patch16_224,img_size=32,patch_size=4,dynamic_img_size=false") == (
        "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "dynamic_img_size": False})
    assert parse_timm_spec("timm:resnet18") == ("resnet18", {})
    for bad in ("timm:", "timm:resnet18,stem_width", "timm:resnet18,a=1,a=2", "timm:resnet18,a=[1,2"):
        with pytest.raises(ModelSpecError, match="timm:"):
            parse_timm_spec(bad)


def test_timm_random_init_small_stem() -> None:
    model = load_model("timm:resnet18,small_image_stem=true,channels=[32,64,128,256],stem_width=32", image_size=16)
    assert (model.name, model.architecture, model.input_size) == ("timm:resnet18", "resnet18", 16)
    conv = model.backbone.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert _features(model).shape == (4, 256)
    assert not model.backbone.training


def test_timm_vit_takes_its_size_from_img_size() -> None:
    model = load_model("timm:vit_tiny_patch16_224,img_size=32,patch_size=4,depth=1")
    assert model.input_size == 32
    assert _features(model, batch=2).shape == (2, 192)
    assert load_model("timm:vit_tiny_patch16_224,img_size=32,patch_size=4,depth=1", image_size=32).cache_key \
        == model.cache_key


def test_timm_init_is_seeded_and_leaves_the_callers_rng_alone() -> None:
    spec = "timm:resnet18,small_image_stem=true,channels=[8,16,32,64],stem_width=8"
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = load_model(spec, image_size=16)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # another caller state must not change the weights
    second = load_model(spec, image_size=16)
    torch.testing.assert_close(_features(first), _features(second), rtol=0, atol=0)
    assert first.cache_key == second.cache_key
    other = load_model(spec.replace("stem_width=8", "stem_width=16"), image_size=16)
    assert other.cache_key != first.cache_key


def test_timm_without_image_size() -> None:
    with pytest.raises(ModelSpecError, match="--image-size") as err:
        load_model("timm:resnet18")
    assert "timm:resnet18" in str(err.value)


def test_timm_rejected_arguments() -> None:
    with pytest.raises(ModelSpecError, match="small_image_stem"):
        load_model("timm:resnet18,small_image_stem=maybe", image_size=16)
    with pytest.raises(ModelSpecError, match="ResNet"):
        load_model("timm:vit_tiny_patch16_224,img_size=32,patch_size=4,depth=1,small_image_stem=true")
    with pytest.raises(ModelSpecError, match="no_such_kwarg"):
        load_model("timm:resnet18,no_such_kwarg=1", image_size=16)


def test_pixels() -> None:
    model = load_model("pixels", image_size=8)
    assert (model.mean, model.std, model.input_size, model.architecture) == ((0.0,) * 3, (1.0,) * 3, 8, "pixels")
    images = torch.rand(5, 3, 8, 8)
    features = model.backbone(images)
    assert features.shape == (5, 3 * 8 * 8)
    torch.testing.assert_close(features.mean(dim=1), torch.zeros(5), rtol=0, atol=1e-6)
    torch.testing.assert_close(features + images.flatten(1).mean(1, keepdim=True), images.flatten(1))
    assert load_model("pixels", image_size=16).cache_key != model.cache_key
    with pytest.raises(ModelSpecError, match="--image-size"):
        load_model("pixels")


# ----------------------------------------------------------------------------------------------
# Errors and safety
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "text_pt", "empty_dir", "unknown_timm", "other_file", "bare_weights"])
def test_bad_specs_name_themselves(kind: str, tmp_path: Path, run_dir: Path) -> None:
    if kind == "missing":
        spec = str(tmp_path / "no_such_run")
    elif kind == "text_pt":
        spec = str(tmp_path / "model.pt")
        Path(spec).write_text("not a checkpoint\n")
    elif kind == "empty_dir":
        spec = str(tmp_path)
    elif kind == "unknown_timm":
        spec = "timm:not_a_model"
    elif kind == "other_file":
        spec = str(tmp_path / "weights.bin")
        Path(spec).write_bytes(b"\0" * 16)
    else:  # exported weights copied without their .json
        spec = str(tmp_path / "backbone.safetensors")
        shutil.copy(run_dir / "backbone.safetensors", spec)
    with pytest.raises(ModelSpecError) as err:
        load_model(spec, image_size=16)
    assert spec in str(err.value)


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    spec = str(tmp_path / "other.pt")
    torch.save({"model": torch.zeros(2)}, spec)  # loadable, but not an unsupdistill checkpoint
    with pytest.raises(ModelSpecError, match="other.pt"):
        load_model(spec)
    incomplete = str(tmp_path / "incomplete.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1}, incomplete)
    with pytest.raises(ModelSpecError, match="incomplete.pt"):
        load_model(incomplete)


class _RunsCode:
    """Unpickling this object runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    malicious = tmp_path / "run" / "checkpoints" / "last.pt"
    malicious.parent.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _RunsCode(marker)}, malicious)
    for spec in (str(malicious), str(tmp_path / "run")):
        with pytest.raises(ModelSpecError, match="pickled code|not a safe"):
            load_model(spec)
        assert not marker.exists()
    torch.load(malicious, weights_only=False)  # the payload is real: a plain unpickle does run it
    assert marker.exists()


# ----------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------


def test_cached_features_reuse_and_invalidation(tmp_path: Path) -> None:
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(12, dtype=torch.float32).view(3, 4) + len(calls)

    first, hit = cached_features("model", "data", "train", tmp_path, compute)
    assert not hit and len(calls) == 1
    again, hit = cached_features("model", "data", "train", tmp_path, compute)
    assert hit and len(calls) == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    _, hit = cached_features("model", "other data", "train", tmp_path, compute)
    assert not hit and len(calls) == 2
    _, hit = cached_features("model", "data", "test", tmp_path, compute)
    assert not hit and len(calls) == 3
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors"] * 3  # no temp files left

    path = cache_path("model", "data", "train", tmp_path)
    path.write_bytes(b"truncated garbage")
    recomputed, hit = cached_features("model", "data", "train", tmp_path, compute)
    assert not hit and len(calls) == 4
    reread, hit = cached_features("model", "data", "train", tmp_path, compute)  # the bad file was replaced
    assert hit and len(calls) == 4
    torch.testing.assert_close(reread, recomputed, rtol=0, atol=0)


def test_no_cache_dir_always_computes() -> None:
    calls = []
    for _ in range(2):
        _, hit = cached_features("m", "d", "", None, lambda: calls.append(1) or torch.zeros(1, 2))
        assert not hit
    assert len(calls) == 2


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNSUPDISTILL_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("UNSUPDISTILL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "unsupdistill" / "features"


def test_data_fingerprint_follows_the_files(tmp_path: Path) -> None:
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        path.write_bytes(b"image bytes")
    dataset = LabeledImages(paths, [0, 1], ["cat", "dog"], image_size=8, verify=False)
    first = data_fingerprint(dataset)
    assert data_fingerprint(LabeledImages(paths, [0, 1], ["cat", "dog"], image_size=8, verify=False)) == first
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = data_fingerprint(dataset)
    assert touched != first
    assert data_fingerprint(LabeledImages(paths, [1, 0], ["cat", "dog"], image_size=8, verify=False)) != touched
    assert data_fingerprint(LabeledImages(paths, [0, 1], ["cat", "dog"], image_size=16, verify=False)) != touched


def test_data_fingerprint_of_digits() -> None:
    train, test = LabeledDigits(8, range(0, 100)), LabeledDigits(8, range(100, 200))
    assert data_fingerprint(train) == data_fingerprint(LabeledDigits(8, range(0, 100)))
    assert data_fingerprint(train) != data_fingerprint(test)
    assert data_fingerprint(train) != data_fingerprint(LabeledDigits(16, range(0, 100)))


def test_cpu_extraction_through_the_fastest_path_matches_the_eager_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import unsupdistill.evaluate.features as features

    model = load_model("timm:resnet18,small_image_stem=true,channels=[8,8,16,16],stem_width=8", image_size=16)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (41 * 4 + 3, 3, 16, 16), dtype=torch.uint8, generator=generator)
    dataset = [images[i] for i in range(len(images))]  # a map-style dataset of (3, S, S) uint8 tensors
    chosen = []

    def spy(network, example, device, allowed, min_cosine):
        path = fastest_path(network, example, device, allowed, min_cosine)
        chosen.append((path.name, tuple(allowed)))
        return path

    fastest_path = features.fastest_path
    monkeypatch.setattr(features, "fastest_path", spy)
    monkeypatch.setattr(features, "CHOICE_PAYS_S", 0.0)  # as though the eager network would take long enough
    args = (model.backbone, dataset, 16, model.mean, model.std)
    fast = features.extract_features(*args, batch_size=4, progress=False)  # 41 full batches and a partial one
    eager = features.extract_features(*args, batch_size=4, progress=False, optimize=False)
    assert len(chosen) == 1 and chosen[0][1] == features.FP32_PATHS  # chosen once, on the first batch, fp32 only
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(features, "CHOICE_PAYS_S", 1e9)  # an extraction too short to pay for the choice
    few = features.extract_features(*args[:1], dataset[:20], *args[2:], batch_size=4, progress=False)
    assert len(chosen) == 1
    torch.testing.assert_close(few, eager[:20], rtol=1e-4, atol=1e-5)


def test_auto_precision_is_bf16_only_for_large_sets_on_a_native_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import unsupdistill.evaluate.run as run

    cpu = torch.device("cpu")
    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: True)
    assert run.extraction_precision("auto", cpu, run.AUTO_BF16_MIN_IMAGES) == "bf16"
    assert run.extraction_precision("auto", cpu, run.AUTO_BF16_MIN_IMAGES - 1) == "fp32"
    assert run.extraction_precision("auto", torch.device("cuda"), 60_000) == "fp32"
    assert run.extraction_precision("fp32", cpu, 60_000) == "fp32"
    assert run.extraction_precision("bf16", cpu, 10) == "bf16"
    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: False)
    assert run.extraction_precision("auto", cpu, 60_000) == "fp32"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        run.extraction_precision("fp16", cpu, 60_000)


@pytest.mark.parametrize("threshold, expected", [(500, "bf16"), (1_000, "fp32")])
def test_evaluate_extracts_train_and_test_at_one_auto_precision(
        monkeypatch: pytest.MonkeyPatch, threshold: int, expected: str) -> None:
    """digits: 1,257 train and 540 test images. The test split decides for both: with a threshold of 1,000 the
    train split (over it alone) is extracted in fp32 too; the report says which precision was used."""
    import unsupdistill.evaluate.run as run

    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(run, "AUTO_BF16_MIN_IMAGES", threshold)
    seen = []

    def spy(*args, precision=None, **kwargs):
        seen.append(precision)
        return extract_features(*args, precision=precision, **kwargs)

    extract_features = run.extract_features
    monkeypatch.setattr(run, "extract_features", spy)
    options = run.EvalOptions(image_size=8, linear=False, clustering=False, plots=False, cache=False, device="cpu")
    results = run.evaluate("timm:resnet18,small_image_stem=true,channels=[8,8,16,16],stem_width=8", "digits",
                           "digits", options)
    assert results["precision"] == expected
    assert seen == [torch.bfloat16 if expected == "bf16" else None] * 2


def test_a_picture_that_does_not_fit_is_a_warning_and_a_bug_in_one_raises(tmp_path, monkeypatch, caplog) -> None:
    import logging

    import unsupdistill.evaluate.pictures as pictures

    model = load_model("timm:resnet18,small_image_stem=true,channels=[8,8,16,16],stem_width=8", image_size=8)
    train_set, test_set = LabeledDigits(8, range(0, 40)), LabeledDigits(8, range(40, 50))
    train_features, test_features = torch.randn(40, 16), torch.randn(10, 16)
    args = (model, train_set, test_set, train_features, test_features)
    with caplog.at_level(logging.WARNING, logger="unsupdistill.evaluate.pictures"):
        written = pictures.write_pictures(*args, tmp_path / "a")
    assert set(written) == {"pca", "retrieval"}  # a CNN: no class-token attention, said with the reason
    assert "no attention.png" in caplog.text and "VisionTransformer with a class token" in caplog.text

    def broken(*_):
        raise ValueError("a bug in the PCA picture")

    monkeypatch.setattr(pictures, "show_pca", broken)
    with pytest.raises(ValueError, match="a bug in the PCA picture"):
        pictures.write_pictures(*args, tmp_path / "b")
