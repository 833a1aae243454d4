"""Knowledge distillation end to end: every teacher form, the frozen teacher, the student learning from it, its EMA,
resume with another teacher (resume after SIGKILL: test_resume.py), export, errors."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY, read_metrics
from safetensors.torch import load_file, save_file

from unsupdistill.cli import main
from unsupdistill.config import load_config
from unsupdistill.evaluate.probe import KNNProbe
from unsupdistill.methods import build_trainer
from unsupdistill.models.backbone import create_backbone, describe_backbone
from unsupdistill.storage import load_checkpoint, save_backbone

STUDENT = ["model.backbone_kwargs={channels: [8, 8, 16, 16], stem_width: 8}", "train.batch_size=16",
           "data.num_workers=0", "train.log_every_steps=1", "eval.summary=false"]
"""A student narrower than the tiny teachers below; no end-of-run summary (k-NN and speed of three networks)."""
VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A 4-step DINO run of ours: exported backbone, checkpoint with the DINO head."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["pretrain", "--out", str(out), *TINY, "train.max_steps=4"]) == 0
    return out


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory) -> Path:
    """An exported ViT backbone (a teacher of another architecture than the students)."""
    out = tmp_path_factory.mktemp("vit")
    config = load_config(None, ["model.backbone=vit_tiny_patch16_224", f"model.backbone_kwargs={json.dumps(VIT)}",
                                "model.small_image_stem=false"])
    torch.manual_seed(0)
    backbone, spec = create_backbone(config.model)
    return save_backbone(backbone.state_dict(), describe_backbone(spec, config, 0, "teacher"), out)


def distill(out: Path, teacher: str, *args: str) -> int:
    return main(["distill", "--out", str(out), "--teacher", teacher, *STUDENT, *args])


@pytest.mark.parametrize("form", ["run", "export", "export-stem", "checkpoint"])
def test_teacher_forms_of_ours_distill_and_export_the_student(teacher_run, tmp_path, form):
    teacher = {"run": teacher_run, "export": teacher_run / "backbone.safetensors",
               "export-stem": teacher_run / "backbone",  # as ../shared/teachers names its teacher
               "checkpoint": teacher_run / "checkpoints" / "last.pt"}[form]
    out = tmp_path / "student"
    assert distill(out, str(teacher), "train.max_steps=3", "distill.loss=queue_kl") == 0
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["source"] == "student" and meta["distill_loss"] == "queue_kl" and meta["step"] == 3
    assert meta["timm_kwargs"]["channels"] == [8, 8, 16, 16]  # the student's architecture, not the teacher's
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done"
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert (out / "tensorboard").is_dir() and (out / "config.yaml").read_text().startswith("method: distill")
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["method"] == "distill" and state["losses"]["queue"].shape[1] == 64  # the teacher's dimension
    assert not any(key.startswith("teacher") for key in state)  # the frozen teacher is not copied into checkpoints


def test_the_teacher_gets_no_gradients_and_keeps_its_weights(teacher_run, tmp_path):
    config = load_config(None, ["method=distill", f"distill.teacher={teacher_run}", *STUDENT, "train.max_steps=3",
                                "distill.dense_weight=1"])
    trainer = build_trainer(config, tmp_path / "run")
    teacher = trainer.method.teacher.backbone
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.method.student.state_dict().items()}
    trainer.fit()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical, BatchNorm statistics included
    student = trainer.method.student.state_dict()
    assert not all(torch.equal(v, student[k]) for k, v in student_before.items())  # while the student trained
    assert read_metrics(tmp_path / "run")[-1]["dense_loss"] > 0


@pytest.fixture(scope="module")
def pixel_teacher(tmp_path_factory) -> Path:
    """An exported ViT of no blocks on one 16-px patch: a random projection of the whole image to 64-d, layer-normed.
    Nearly the pixels, so it knows the digits (96 % k-NN) where a tiny CNN at random init does not (about 55 %)."""
    kwargs = {"img_size": 16, "patch_size": 16, "embed_dim": 64, "depth": 0, "num_heads": 1, "global_pool": "avg",
              "class_token": False}
    config = load_config(None, ["model.backbone=vit_tiny_patch16_224", f"model.backbone_kwargs={json.dumps(kwargs)}",
                                "model.small_image_stem=false"])
    torch.manual_seed(0)
    backbone, spec = create_backbone(config.model)
    return save_backbone(backbone.state_dict(), describe_backbone(spec, config, 0, "teacher"),
                         tmp_path_factory.mktemp("pixel_teacher"))


@pytest.mark.slow
def test_the_student_learns_from_its_teacher(pixel_teacher, tmp_path):
    """One epoch of the digits (56 steps of 32) against the same network at the same init trained with lr ~ 0,
    whose BatchNorm statistics adapt to the digits alike: the student's k-NN on the digits rises well above it
    (measured, seeds 0-2: 74 / 77 / 73 % against 62 / 58 / 63 %, 57 / 53 / 56 % at init, teacher 96 %), and its
    agreement (cosine) with the teacher rises from about 0 to over 0.7 (at lr ~ 0: stays about 0). A student
    matched to another image's teacher features (a target rolled across the batch) scored 61 / 58 % and 0.42 / 0.47:
    it fails both."""
    args = ["method=distill", f"distill.teacher={pixel_teacher}", *STUDENT,
            "model.backbone_kwargs={channels: [8, 16, 16, 32], stem_width: 8}", "train.batch_size=32",
            "train.epochs=1", "optim.warmup_epochs=0", "distill.targets=views", "distill.cache=off",
            "eval.train=digits", "eval.test=digits",  # the teacher on each view: one patch, no map to pool
            "train.precision=bf16"]  # as measured; in fp32 (2026-12-07, seed 0) 57 / 62 / 67 %: +9.8 over init
    learning = build_trainer(load_config(None, [*args, "optim.lr=0.08"]), tmp_path / "learning")
    still = build_trainer(load_config(None, [*args, "optim.lr=1e-12", "optim.min_lr=0"]), tmp_path / "still")
    knn = KNNProbe(learning.config, torch.device("cpu"))  # k = 20 on the digits' test split, the train split as memory
    random_init = knn(learning.method.student.backbone)["knn_top1"]
    assert knn(still.method.student.backbone)["knn_top1"] == random_init  # the same network, the same init
    assert knn(learning.method.teacher.backbone)["knn_top1"] > 90
    learning.fit()
    still.fit()
    learned, adapted = (knn(trainer.method.student.backbone)["knn_top1"] for trainer in (learning, still))
    assert learned > max(adapted + 5, random_init + 10), (random_init, adapted, learned)
    agreement = [m["teacher_agreement"] for m in read_metrics(tmp_path / "learning")]
    assert len(agreement) == 56 and agreement[0] < 0.3 and sum(agreement[-5:]) / 5 > 0.6, agreement
    assert abs(read_metrics(tmp_path / "still")[-1]["teacher_agreement"]) < 0.3


def test_the_ema_student_keeps_the_students_batchnorm_statistics(teacher_run, tmp_path):
    """The EMA averages the student's weights, but its BatchNorm statistics are the student's own (an average of
    running statistics of other weights would not fit them); the exported EMA carries them."""
    config = load_config(None, ["method=distill", f"distill.teacher={teacher_run}", *STUDENT, "train.max_steps=3",
                                "distill.ema_momentum=0.9", "distill.cache=off"])
    trainer = build_trainer(config, tmp_path / "run")
    initial = {k: v.clone() for k, v in trainer.method.ema.state_dict().items()}
    trainer.fit()
    ema, student = trainer.method.ema.state_dict(), trainer.method.student.state_dict()
    statistics = [k for k in ema if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(statistics) > 10
    for key in statistics:
        assert torch.equal(ema[key], student[key]), key
        assert not torch.equal(ema[key], initial[key]), key  # they moved: 3 steps of the student's batches
    conv = "backbone.conv1.weight"
    assert not torch.equal(ema[conv], student[conv]) and not torch.equal(ema[conv], initial[conv])  # an average
    exported = load_file(tmp_path / "run" / "backbone.safetensors")
    for key in statistics:
        assert torch.equal(exported[key.removeprefix("backbone.")], student[key]), key


def test_the_dense_term_is_refused_for_a_student_without_spatial_features(teacher_run, tmp_path, caplog):
    """LeViT's features are tokens on no patch grid: the dense term cannot compare patches; the run stops before
    training, naming the network and the fix."""
    levit = {"img_size": 16, "embed_dim": [16, 32, 48], "key_dim": 8, "num_heads": [1, 1, 1], "depth": [1, 1, 1]}
    out = tmp_path / "run"
    assert distill(out, str(teacher_run), "model.backbone=levit_128s", f"model.backbone_kwargs={json.dumps(levit)}",
                   "model.small_image_stem=false", "model.input_size=16", "distill.dense_weight=0.5") == 2
    assert ("distill.dense_weight=0.5 needs spatial features, but the student (LevitDistilled) gives none; set "
            "distill.dense_weight=0") in caplog.text
    assert not (out / "checkpoints").exists() and json.loads((out / "status.json").read_text())["exit_code"] == 2


def test_resume_takes_the_runs_own_teacher_and_refuses_another(tmp_path, caplog):
    """Resuming checks the teacher: one of another feature dimension is refused naming both dimensions; one as wide
    but with other weights is refused too (the checkpoint keeps the teacher's sha256 identity); the run's own
    teacher, copied elsewhere, is taken (the identity is of the weights and input, not the path)."""
    def export(name: str, channels: list[int], seed: int) -> Path:
        config = load_config(None, [f"model.backbone_kwargs={{channels: {channels}, stem_width: 8}}"])
        torch.manual_seed(seed)
        backbone, spec = create_backbone(config.model)
        return save_backbone(backbone.state_dict(), describe_backbone(spec, config, 0, "teacher"), tmp_path / name)

    first, same, other = (export("first", [8, 16, 16, 32], 0), export("same", [8, 16, 16, 32], 1),
                          export("other", [8, 16, 32, 64], 0))
    out = tmp_path / "run"
    assert distill(out, str(first), "train.max_steps=2") == 0
    assert main(["distill", "--resume", str(out), "--teacher", str(other), "train.max_steps=3"]) == 2
    assert "32-d features), but distill.teacher=" in caplog.text and "gives 64-d features" in caplog.text
    assert "resume with the run's own teacher" in caplog.text
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2 and len(read_metrics(out)) == 2
    caplog.clear()
    assert main(["distill", "--resume", str(out), "--teacher", str(same), "train.max_steps=3"]) == 2
    assert "is another teacher: other weights, input size or normalisation" in caplog.text
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2 and len(read_metrics(out)) == 2
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in first.parent.glob(f"{first.stem}.*"):
        shutil.copy(path, moved / path.name)
    assert main(["distill", "--resume", str(out), "--teacher", str(moved / first.name), "train.max_steps=3"]) == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["config"]["distill"]["teacher"] == str(moved / first.name)


@pytest.mark.parametrize("student, teacher_kind", [("cnn", "vit"), ("vit", "cnn")])
def test_vit_and_cnn_teachers_and_students_with_the_dense_term(teacher_run, vit_export, tmp_path, student,
                                                               teacher_kind):
    teacher = str(vit_export) if teacher_kind == "vit" else str(teacher_run)
    student_args = [] if student == "cnn" else [
        "model.backbone=vit_tiny_patch16_224", f"model.backbone_kwargs={json.dumps({**VIT, 'img_size': 8})}",
        "model.small_image_stem=false", "model.input_size=8", "model.input_size=8",
        "dino.local.size=8"]
    out = tmp_path / "run"
    assert distill(out, teacher, *student_args, "train.max_steps=2", "distill.dense_weight=0.5",
                   "distill.loss=cosine", "distill.mixup_alpha=0.4") == 0
    assert all(m["dense_loss"] > 0 for m in read_metrics(out))
    assert json.loads((out / "backbone.json").read_text())["input_size"] == (16 if student == "cnn" else 8)


def test_dino_loss_against_the_frozen_head_exports_the_student_ema(teacher_run, tmp_path):
    out = tmp_path / "run"
    assert distill(out, str(teacher_run), "distill.loss=dino", "distill.ema_momentum=0.9", "train.max_steps=3") == 0
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["source"] == "student_ema"
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["exported"] == "student_ema" and "center" in state["losses"]
    assert all("teacher_entropy" in m for m in read_metrics(out))


def test_timm_teacher_through_a_local_weights_file(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT)
    weights = tmp_path / "w.safetensors"
    save_file(reference.state_dict(), weights)
    kwargs = ",".join(f"{k}={v}" for k, v in VIT.items())
    spec = f"timm:vit_tiny_patch16_224,pretrained=true,pretrained_cfg_overlay={{file: {weights}}},{kwargs}"
    config = load_config(None, ["method=distill", f"distill.teacher={spec}", *STUDENT, "train.max_steps=1"])
    trainer = build_trainer(config, tmp_path / "run")
    loaded = trainer.method.teacher.backbone.state_dict()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in reference.state_dict().items())
    assert trainer.method.teacher.input_size == 16
    trainer.fit()
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


@pytest.mark.parametrize("teacher, override, expected", [
    ("/no/such/teacher", [], ["teacher '/no/such/teacher' does not exist; give a run directory of ours"]),
    ("NOTES", [], ["NOTES is not a safe unsupdistill checkpoint (it may be truncated, from another tool, or contain "
                   "pickled code"]),
    ("VIT", ["distill.teacher_size=24"], ["VIT) cannot take 24x24 inputs",
                                          "set distill.teacher_size to the size it was built for"]),
    (None, ["method=distill"], ["distill.teacher: expected a teacher when method=distill"]),
])
def test_a_bad_teacher_fails_before_training_with_a_clear_message(vit_export, tmp_path, caplog, teacher, override,
                                                                    expected):
    notes = tmp_path / "notes.pt"
    notes.write_text("a text file, not a model\n")
    names = {"NOTES": str(notes), "VIT": str(vit_export)}
    teacher = names.get(teacher, teacher)
    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), *STUDENT, *override] if teacher is None else \
        ["distill", "--out", str(out), "--teacher", teacher, *STUDENT, *override]
    assert main(args) == 2
    for text in expected:
        for name, path in names.items():
            text = text.replace(name, path)
        assert text in caplog.text, caplog.text
    assert not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def distilled(teacher_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distilled") / "run"
    assert distill(out, str(teacher_run), "train.max_steps=2") == 0
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_the_distilled_student_exports_with_parity(distilled, fmt, capsys):
    assert main(["export", str(distilled), "--format", fmt]) == 0
    assert "passed" in capsys.readouterr().out
    ext = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx"}[fmt]
    assert (distilled / "export" / f"student{ext}").is_file()  # named after what it holds


@pytest.mark.parametrize("model", ["run", "checkpoint"])
def test_eval_takes_the_distilled_student(distilled, tmp_path, model):
    target = distilled if model == "run" else distilled / "checkpoints" / "last.pt"
    assert main(["eval", str(target), "--train", "digits", "--test", "digits", "--out", str(tmp_path / "e"),
                 "--no-linear", "--no-clustering", "--no-plots", "--no-cache"]) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["feature_dim"] == 16  # the student's features (the teacher's are 64-d)
