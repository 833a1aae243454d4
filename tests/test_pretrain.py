"""End-to-end pretraining in one process: run directory, dry run, collapse warnings, k-NN probe, eval, CLI errors.
Resume after SIGKILL is tested in test_resume.py, runs under torchrun in test_distributed.py."""

import json
import logging
import math
import os
import signal

import pytest
import torch
import yaml
from conftest import cli, read_metrics
from safetensors.torch import load_file

from unsupdistill.cli import EXIT_STOPPED, main
from unsupdistill.config import load_config
from unsupdistill.evaluate.probe import KNNProbe
from unsupdistill.models.backbone import BackboneSpec, create_backbone, rebuild_backbone
from unsupdistill.storage import load_checkpoint
from unsupdistill.train import loop


@pytest.mark.slow
def test_run_directory_holds_everything(tmp_path, tiny):
    out = tmp_path / "run"
    result = cli("pretrain", "--out", str(out), *tiny, "train.max_steps=6", "train.log_every_steps=2",
                 "train.save_every_steps=3")
    assert result.returncode == 0, result.stderr
    assert f"run directory: {out}" in result.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["batch_size"] == 16 and config["data"]["path"] is None  # fully resolved
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    for key in ("loss", "lr", "weight_decay", "teacher_momentum", "teacher_temp", "teacher_entropy",
                "teacher_kl_uniform", "student_feature_std", "images_per_s"):
        assert key in metrics[-1], key
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["step"]) == ("done", 0, 6)
    assert status["backbone"] == str(out / "backbone.safetensors")
    # the exported backbone rebuilds from its JSON with plain timm and gives the recorded feature size
    meta = json.loads((out / "backbone.json").read_text())
    spec = BackboneSpec(meta["timm_name"], meta["timm_kwargs"], meta["small_image_stem"], meta["feature_dim"])
    model = rebuild_backbone(spec)
    model.load_state_dict(load_file(out / "backbone.safetensors"), strict=True)
    size = meta["input_size"]
    assert model.eval()(torch.rand(2, 3, size, size)).shape == (2, meta["feature_dim"])


@pytest.mark.slow
def test_vit_recipe_trains_exports_evaluates_and_resumes(tmp_path, monkeypatch):
    """recipes/cifar10_vit_cpu.yaml (iBOT, Sinkhorn-Knopp, KoLeo, per-parameter clipping) on the built-in digits,
    shrunk to a two-block ViT: it trains, logs its loss terms, exports and evaluates; stopped by Ctrl-C after
    step 2 and resumed, it gives the same losses (iBOT's masks and centre come back with the checkpoint)."""
    args = ["--recipe", "cifar10_vit_cpu", "train.max_steps=4", "train.time_budget_s=null", "train.log_every_steps=1",
            "model.backbone_kwargs={img_size: 32, patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}",
            "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "dino.head_output_dim=256",
            "train.batch_size=16", "data.num_workers=0"]
    run = tmp_path / "vit"
    assert main(["pretrain", "--out", str(run), *args]) == 0
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and r["ibot_loss"] > 0 and math.isfinite(r["koleo_loss"])
    assert (run / "backbone.safetensors").is_file()
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--train", "digits", "--test", "digits", "--out", str(out), "--no-plots",
                 "--no-clustering", "--no-linear"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert 10 <= report["knn"]["20"]["top1"] <= 100  # a real accuracy over 10 classes

    train_step = loop.Trainer.train_step

    def ctrl_c_during_step_3(self, *step_args, **kwargs):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, *step_args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", ctrl_c_during_step_3)
    stopped = tmp_path / "stopped"
    assert main(["pretrain", "--out", str(stopped), *args]) == EXIT_STOPPED
    monkeypatch.undo()
    assert main(["pretrain", "--resume", str(stopped)]) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(stopped) if "loss" in r}
    assert resumed == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)


def test_dry_run_of_a_recipe_too_large_for_this_machine(tmp_path, capsys):
    code = main(["pretrain", "--recipe", "imagenet_vit_small", "--dry-run", "--out", str(tmp_path / "x"),
                 "data.num_workers=0"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] == "ok" and report["batch_used"] == 2 and report["feature_dim"] == 384
    assert torch.isfinite(torch.tensor(report["loss"]))
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, expected", [
    (["train.epoch=5"], "did you mean 'train.epochs'"),
    (["optim.lr=-1"], "optim.lr: expected a number > 0"),
    (["/no/such/folder"], "/no/such/folder"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["model.backbone=not_a_model"], "model.backbone='not_a_model' is not a timm model"),
    (["model.backbone=vit_tiny_patch16_224"], "model.backbone_kwargs"),  # the default ResNet kwargs
    (["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 16, patch_size: 4}"],
     "small_image_stem"),
    # the built-in run's 12 / 6-px crops (recipes/digits.yaml) and 4-px patches: named before any step
    (["model.backbone=vit_tiny_patch16_224", "model.small_image_stem=false",
      "model.backbone_kwargs={img_size: 16, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}"],
     "crop sizes [6] px are not multiples of the ViT's patch size 4: set model.input_size"),
])
def test_bad_input_exits_with_a_clear_error(tmp_path, caplog, args, expected):
    with caplog.at_level(logging.ERROR):
        assert main(["pretrain", "--out", str(tmp_path / "run"), *args]) == 2
    assert expected in caplog.text


def test_empty_folder_and_too_few_images(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.ERROR):
        assert main(["pretrain", str(empty), "--out", str(tmp_path / "r1")]) == 2
    assert str(empty) in caplog.text

    few = tmp_path / "few"
    few.mkdir()
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(few / f"{i}.png")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["pretrain", str(few), "--out", str(tmp_path / "r2"), "train.batch_size=8"]) == 2
    assert "fewer than one batch" in caplog.text and "train.batch_size" in caplog.text


def test_collapse_is_reported_in_plain_words_during_training(tmp_path, tiny, caplog):
    """A teacher temperature of 100 flattens the teacher's output: the run must say so."""
    with caplog.at_level(logging.WARNING):
        code = main(["pretrain", "--out", str(tmp_path / "run"), *tiny, "train.max_steps=2",
                     "train.log_every_steps=1", "dino.teacher_temp=100", "dino.warmup_teacher_temp=100"])
    assert code == 0
    assert "collapse to uniform" in caplog.text and "dino.teacher_temp" in caplog.text
    assert caplog.text.count("nearly uniform") == 1  # once while it lasts, not every log step


def test_knn_on_a_labeled_probe_set_during_pretraining(tmp_path, tiny):
    """The probe logs the k-NN of the run's network as it ends (the exported teacher's, by the same probe); that
    pretraining beats random init on it is tests/test_learning.py's (3 steps do not)."""
    out = tmp_path / "run"
    code = main(["pretrain", "--out", str(out), *tiny, "train.max_steps=3", "train.log_every_steps=1",
                 "eval.train=digits", "eval.test=digits", "eval.every_epochs=1"])
    assert code == 0
    evals = [m for m in read_metrics(out) if "knn_top1" in m]
    assert len(evals) == 1 and evals[0]["step"] == 3 and evals[0]["knn_k"] == 20
    config = load_config(str(out / "config.yaml"))
    exported, _ = create_backbone(config.model)
    exported.load_state_dict(load_file(out / "backbone.safetensors"))
    assert evals[0]["knn_top1"] == KNNProbe(config, torch.device("cpu"))(exported)["knn_top1"]


def test_bad_probe_set_fails_before_training(tmp_path, tiny, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["pretrain", "--out", str(tmp_path / "run"), *tiny, "eval.train=/no/such/set",
                     "eval.test=digits"])
    assert code == 2 and "/no/such/set" in caplog.text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_command_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "pixels", "--train", "digits", "--test", "digits", "--image-size", "8", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "k-NN top-1" in printed and "linear top-1" in printed and "NMI" in printed
    results = json.loads((out / "eval.json").read_text())
    assert results["knn"]["20"]["top1"] > 90 and results["linear"]["top1"] >= 95
    for plot in ("feature_map.png", "knn_vs_k.png", "confusion.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "cache").iterdir())  # features were cached


@pytest.mark.parametrize("model, expected", [
    ("/no/such/model", "/no/such/model"),
    ("timm:resnet18", "--image-size"),
])
def test_eval_rejects_a_model_that_is_not_a_model(tmp_path, caplog, model, expected):
    with caplog.at_level(logging.ERROR):
        assert main(["eval", model, "--train", "digits", "--test", "digits", "--out", str(tmp_path / "r")]) == 2
    assert expected in caplog.text
