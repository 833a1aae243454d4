"""Frozen distillation teachers: every form loads (run, export, checkpoint, timm pretrained weights from a
local file), gives pooled and spatial features, and a teacher that cannot work fails before training."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file
from torch import nn

from unsupdistill.config import Config, load_config
from unsupdistill.models import DINONetwork, build_student_teacher
from unsupdistill.models.backbone import describe_backbone, pooled_and_spatial
from unsupdistill.models.load import ModelSpecError, load_model
from unsupdistill.models.teachers import Teacher, TeacherError, load_teacher
from unsupdistill.storage import save_backbone, save_checkpoint

CNN_KWARGS = "channels=[8,16,32,64],stem_width=8"
VIT = "timm:vit_tiny_patch16_224,img_size=16,patch_size=4,embed_dim=32,depth=1,num_heads=2"
OVERLAY_CFG = "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], input_size: [3, 16, 16]"




@dataclass
class Run:
    path: Path
    config: Config
    teacher: DINONetwork  # the network whose weights were saved as the run's teacher


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A run directory of ours, written the way training writes one: an export and a checkpoint."""
    config = load_config(None, [*TINY, "model.backbone=resnet18", "model.small_image_stem=true"])
    torch.manual_seed(0)
    student, teacher, spec = build_student_teacher(config.model, config.dino, (16,))
    with torch.no_grad():  # the student moved on: loading it instead of the teacher would show
        for param in student.parameters():
            param.add_(0.1)
    path = tmp_path_factory.mktemp("runs") / "tinyrun"
    save_checkpoint({"config": config.to_dict(), "backbone": spec.to_dict(), "step": 3,
                     "student": student.state_dict(), "teacher": teacher.state_dict()},
                    path / "checkpoints" / "last.pt")
    backbone = {k.removeprefix("backbone."): v for k, v in teacher.state_dict().items() if k.startswith("backbone.")}
    save_backbone(backbone, describe_backbone(spec, config, 3, "teacher"), path)
    return Run(path, config, teacher.eval())


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a seeded tiny ResNet-18, as a user would download them."""
    torch.manual_seed(7)
    model = timm.create_model("resnet18", num_classes=0, channels=[8, 16, 32, 64], stem_width=8)
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def pretrained_spec(path: Path, extra: str = OVERLAY_CFG) -> str:
    return f"timm:resnet18,pretrained=true,{CNN_KWARGS},pretrained_cfg_overlay={{file: {path}, {extra}}}"


def assert_frozen(teacher: Teacher) -> None:
    for module in (teacher.backbone, teacher.head):
        if module is not None:
            assert not module.training
            assert not any(p.requires_grad for p in module.parameters())


def batch(size: int = 16, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------
# Every form loads
# ----------------------------------------------------------------------------------------------


def test_run_export_and_checkpoint(run: Run) -> None:
    x = batch()
    with torch.no_grad():
        expected = run.teacher.backbone(x)  # (2, 64)
    forms = {str(run.path): "run:tinyrun", str(run.path / "backbone.safetensors"): "export:backbone",
             str(run.path / "checkpoints" / "last.pt"): "ckpt:tinyrun/last.pt"}
    for spec, name in forms.items():
        teacher = load_teacher(spec)
        assert (teacher.name, teacher.architecture) == (name, "resnet18")
        assert (teacher.input_size, teacher.feature_dim) == (16, 64)
        assert teacher.mean == pytest.approx(run.config.model.mean) and teacher.head is None
        assert teacher.description is not None and teacher.description["timm_name"] == "resnet18"
        assert_frozen(teacher)
        with torch.no_grad():
            torch.testing.assert_close(teacher.backbone(x), expected, rtol=0, atol=0)  # the teacher, not the student
    assert load_teacher(str(run.path), input_size=24).input_size == 24


def test_dino_head_of_a_run_and_a_checkpoint(run: Run) -> None:
    x = batch()
    with torch.no_grad():
        features, logits = run.teacher([x])  # (2, 64), (2, 256)
    for spec in (str(run.path), str(run.path / "checkpoints" / "last.pt")):
        teacher = load_teacher(spec, need_head=True)
        assert teacher.head is not None and teacher.head_config == run.config.dino
        assert teacher.name in ("run:tinyrun", "ckpt:tinyrun/last.pt")
        assert_frozen(teacher)
        with torch.no_grad():
            torch.testing.assert_close(teacher.head(teacher.backbone(x)), logits, rtol=0, atol=0)
            torch.testing.assert_close(teacher.backbone(x), features, rtol=0, atol=0)


def test_timm_pretrained_loads_the_local_file(weights_file: Path, tmp_path: Path) -> None:
    teacher = load_teacher(pretrained_spec(weights_file))
    saved = load_file(weights_file)
    loaded = teacher.backbone.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)  # timm really read the file
    assert (teacher.input_size, teacher.mean, teacher.std) == (16, (0.5,) * 3, (0.25,) * 3)  # the pretrained cfg
    assert (teacher.name, teacher.architecture, teacher.feature_dim) == ("timm:resnet18,pretrained", "resnet18", 64)
    assert teacher.head is None and teacher.description["pretrained"] is True
    assert_frozen(teacher)

    # the cache key follows the weights and preprocessing, not where the file lies
    model = load_model(pretrained_spec(weights_file))
    moved = tmp_path / "moved.safetensors"
    shutil.copy(weights_file, moved)
    assert load_model(pretrained_spec(moved)).cache_key == model.cache_key
    assert load_model(pretrained_spec(weights_file), image_size=24).cache_key != model.cache_key
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in saved.items()}, str(moved))
    assert load_model(pretrained_spec(moved)).cache_key != model.cache_key
    # without an overlay the size and normalisation are timm's for these weights (ImageNet's, 224 px)
    plain = load_model(pretrained_spec(weights_file, "tag: local"))
    assert (plain.input_size, plain.mean) == (224, pytest.approx((0.485, 0.456, 0.406)))


def test_timm_pretrained_errors(weights_file: Path, tmp_path: Path) -> None:
    missing = pretrained_spec(tmp_path / "nope.safetensors")
    with pytest.raises(ModelSpecError, match="does not exist") as err:
        load_model(missing)
    assert missing in str(err.value)
    mismatched = pretrained_spec(weights_file).replace(CNN_KWARGS, "channels=[16,16,32,64],stem_width=8")
    with pytest.raises(TeacherError, match=r"(?s)size mismatch.*internet.*pretrained_cfg_overlay") as err:
        load_teacher(mismatched)
    assert mismatched in str(err.value)
    with pytest.raises(ModelSpecError, match="small_image_stem"):
        load_model(pretrained_spec(weights_file) + ",small_image_stem=true")


# ----------------------------------------------------------------------------------------------
# Pooled and spatial features
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "size", "grid", "dim"), [
    (f"timm:resnet18,small_image_stem=true,{CNN_KWARGS}", 16, 2, 64),
    (VIT, 16, 4, 32),
    (VIT + ",reg_tokens=2", 16, 4, 32),
    (VIT + ",dynamic_img_size=true", 24, 6, 32),
])
def test_pooled_and_spatial(spec: str, size: int, grid: int, dim: int) -> None:
    teacher = load_teacher(spec, input_size=size)
    assert teacher.feature_dim == dim
    x = batch(size)
    with torch.no_grad():
        pooled, spatial = pooled_and_spatial(teacher.backbone, x)
        features = teacher.backbone.forward_features(x)
        torch.testing.assert_close(pooled, teacher.backbone(x), rtol=0, atol=0)
    assert pooled.shape == (2, dim) and spatial is not None and spatial.shape == (2, grid, grid, dim)
    if features.ndim == 3:  # the patch tokens in row-major order, prefix (class, register) tokens dropped
        prefix = teacher.backbone.num_prefix_tokens
        assert prefix == (3 if "reg_tokens" in spec else 1)
        torch.testing.assert_close(spatial.reshape(2, grid * grid, dim), features[:, prefix:], rtol=0, atol=0)
    else:
        torch.testing.assert_close(spatial, features.permute(0, 2, 3, 1), rtol=0, atol=0)


def test_pooled_and_spatial_keep_gradients() -> None:
    student = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=32,
                                depth=1, num_heads=2)
    pooled, spatial = pooled_and_spatial(student, batch())
    (pooled.sum() + spatial.sum()).backward()
    assert all(p.grad is not None for p in student.patch_embed.parameters())


class _FlatFeatures(nn.Module):
    """A model whose features are neither a map nor tokens."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, 3*S*S)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features


def test_no_spatial_features_for_flat_ones() -> None:
    pooled, spatial = pooled_and_spatial(_FlatFeatures(), batch(4))
    assert pooled.shape == (2, 48) and spatial is None


# ----------------------------------------------------------------------------------------------
# Errors name the problem and the fix, before any training
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "text_pt", "bare_weights", "text_file"])
def test_not_a_teacher(kind: str, run: Run, tmp_path: Path) -> None:
    spec = tmp_path / {"missing": "no_run", "text_pt": "model.pt", "bare_weights": "backbone.safetensors",
                       "text_file": "notes.txt"}[kind]
    if kind in ("text_pt", "text_file"):
        spec.write_text("not a model\n")
    elif kind == "bare_weights":  # exported weights copied without their .json
        shutil.copy(run.path / "backbone.safetensors", spec)
    with pytest.raises(TeacherError) as err:
        load_teacher(str(spec))
    assert str(spec) in str(err.value) and "teacher" in str(err.value)
    assert isinstance(err.value, ModelSpecError)  # the CLI reports it as a user error


def test_dino_loss_needs_a_head(run: Run, weights_file: Path, tmp_path: Path) -> None:
    export_only = tmp_path / "export_only"
    export_only.mkdir()
    for name in ("backbone.safetensors", "backbone.json"):
        shutil.copy(run.path / name, export_only / name)
    for spec in (str(export_only), str(export_only / "backbone.safetensors"), pretrained_spec(weights_file)):
        with pytest.raises(TeacherError, match=r"no DINO head.*distill\.loss=queue_kl"):
            load_teacher(spec, need_head=True)
        assert load_teacher(spec).head is None  # fine without the head


def test_fixed_size_vit_asked_for_another_size() -> None:
    with pytest.raises(TeacherError, match=r"24x24.*distill\.teacher_size.*dynamic_img_size=true") as err:
        load_teacher(VIT, input_size=24)
    assert "vit_tiny_patch16_224" in str(err.value)
    with pytest.raises(TeacherError, match="distill.teacher_size"):
        load_teacher(f"timm:resnet18,{CNN_KWARGS}")  # a random-init CNN has no size of its own
    with pytest.raises(TeacherError, match="no network"):
        load_teacher("pixels")
