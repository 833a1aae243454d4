"""The reason to distill, measured: images/s, latency, parameters and GFLOPs of a frozen backbone, in ``eval
--speed`` reports and in a distilled run's summary next to its teacher's."""

import json
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from unsupdistill.cli import main
from unsupdistill.config import load_config
from unsupdistill.evaluate.run import EvalOptions, evaluate
from unsupdistill.evaluate.speed import measure_speed, speed_ratio
from unsupdistill.evaluate.summary import run_summary
from unsupdistill.models.backbone import create_backbone, describe_backbone
from unsupdistill.models.frozen import FeatureModel
from unsupdistill.models.load import load_model
from unsupdistill.storage import save_backbone

STUDENT = "timm:resnet18,channels=[8,8,16,16],stem_width=8,small_image_stem=true"
FAST = ["--no-linear", "--no-clustering", "--no-plots", "--no-cache", "--precision", "fp32"]


def feature_model(backbone: nn.Module, size: int, architecture: str = "test") -> FeatureModel:
    return FeatureModel("test", backbone.eval(), size, (0.5,) * 3, (0.25,) * 3, "key", architecture)


class Sleeper(nn.Module):
    """A network whose every forward pass takes 20 ms, whatever the batch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x.flatten(1)[:, :5] * self.scale


def test_a_single_convolution_counts_its_analytic_flops_and_parameters():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    speed = measure_speed(feature_model(nn.Sequential(conv, nn.Flatten()), 16), batch_size=4, seconds=0.05)
    assert speed["gflops"] * 1e9 == 2 * 3 * 8 * 3 * 3 * 16 * 16  # a multiply-add is 2 FLOPs
    assert speed["parameters"] == 3 * 8 * 3 * 3 + 8
    assert speed["images_per_s"] > 0 and speed["latency_ms"] > 0
    assert (speed["input_size"], speed["batch_size"], speed["precision"], speed["device"]) == (16, 4, "fp32", "cpu")


def test_timing_is_per_batch_for_throughput_and_per_image_for_latency():
    speed = measure_speed(feature_model(Sleeper(), 4), batch_size=8, seconds=0.1)
    assert 20 <= speed["latency_ms"] < 60  # one 20 ms pass for one image
    assert 8 / 0.06 < speed["images_per_s"] <= 8 / 0.02  # one 20 ms pass for 8 images
    assert speed["parameters"] == 5 and speed["gflops"] == 0  # an element-wise product is no FLOP counted


def test_bf16_runs_under_autocast_and_pixels_are_not_timed():
    model = load_model(STUDENT, image_size=12)
    speed = measure_speed(model, batch_size=4, precision="bf16", seconds=0.05)
    assert speed["precision"] == "bf16" and speed["images_per_s"] > 0
    assert measure_speed(load_model("pixels", image_size=8)) is None
    with pytest.raises(ValueError, match="fp32 or bf16"):
        measure_speed(model, precision="fp16")


def test_speed_ratio_reads_like_a_sentence():
    student = {"images_per_s": 530.0, "gflops": 0.11, "parameters": 8}
    teacher = {"images_per_s": 100.0, "gflops": 1.0, "parameters": 100}
    assert speed_ratio(student, teacher) == "5.3x the teacher's images/s, 0.11x its GFLOPs and 0.08x its parameters"
    assert speed_ratio(teacher, student, "its").startswith("0.19x its images/s, 9.1x its GFLOPs and 12x its")


def test_eval_speed_writes_speed_into_eval_json_and_the_report(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", STUDENT, "--image-size", "12", "--train", "digits", "--test", "digits", "--out", str(out),
                 *FAST, "--speed", "--speed-batch", "16", "--speed-seconds", "0.1"]) == 0
    speed = json.loads((out / "eval.json").read_text())["speed"]
    network = timm.create_model("resnet18", num_classes=0, channels=[8, 8, 16, 16], stem_width=8)
    stem = network.conv1.out_channels  # small_image_stem: a 3x3 stride-1 convolution without bias instead
    expected_parameters = sum(p.numel() for p in network.parameters()) - 3 * stem * 7 * 7 + 3 * stem * 3 * 3
    assert speed["parameters"] == expected_parameters
    assert (speed["input_size"], speed["batch_size"], speed["precision"]) == (12, 16, "fp32")
    assert speed["images_per_s"] > 0 and speed["latency_ms"] > 0
    printed = capsys.readouterr().out
    assert f"{speed['images_per_s']:,.0f}" in printed and "images/s" in printed and "GFLOPs" in printed
    with pytest.raises(SystemExit) as refused:  # argparse: the flag and its allowed values
        main(["eval", STUDENT, "--image-size", "12", "--train", "digits", "--test", "digits",
              "--out", str(tmp_path / "bad"), "--speed-batch", "0"])
    assert refused.value.code == 2
    assert main(["eval", STUDENT, "--image-size", "12", "--train", "digits", "--test", "digits",
                 "--out", str(tmp_path / "bad"), "--speed-seconds", "-1"]) == 2
    assert not (tmp_path / "bad").exists()


def test_several_models_get_speed_columns_in_the_suite_table(tmp_path):
    out = tmp_path / "suite"
    assert main(["eval", STUDENT, "pixels", "--image-size", "12", "--train", "digits", "--test", "digits",
                 "--out", str(out), *FAST, "--speed", "--speed-seconds", "0.05"]) == 0
    student, pixels = json.loads((out / "suite.json").read_text())["results"]
    assert pixels["speed"] is None and student["speed"]["batch_size"] == 64
    table = (out / "suite.md").read_text()
    header, _, student_cells, pixels_cells = ([c.strip() for c in line.split("|")[1:-1]]
                                              for line in table.splitlines()[:4])
    speed = header.index("images/s")
    assert header[speed:speed + 4] == ["images/s", "latency ms", "params M", "GFLOPs"]
    assert student_cells[speed] == f"{student['speed']['images_per_s']:,.0f}"
    assert float(student_cells[speed + 3]) == pytest.approx(student["speed"]["gflops"], rel=1e-2)
    assert pixels_cells[speed:speed + 4] == ["", "", "", ""]
    assert "multiply-add is 2 FLOPs" in table


def export(out: Path, channels: list[int], size: int) -> Path:
    """A backbone exported the way a run exports one, at random init: a run directory to summarise."""
    config = load_config("digits", [f"model.backbone_kwargs={{channels: {channels}, stem_width: 8}}",
                                    f"model.input_size={size}", f"model.input_size={size}"])
    torch.manual_seed(0)
    backbone, spec = create_backbone(config.model)
    save_backbone(backbone.state_dict(), describe_backbone(spec, config, 0, "teacher"), out)
    return out


def knn(spec: str, size: int | None) -> float:
    options = EvalOptions(image_size=size, linear=False, clustering=False, plots=False, cache=False)
    return evaluate(spec, "digits", "digits", options)["knn"][20]["top1"]


def test_a_distilled_run_is_summarised_next_to_its_teacher(tmp_path):
    student = export(tmp_path / "student", [8, 8, 16, 16], 12)
    teacher = export(tmp_path / "teacher", [8, 16, 32, 64], 16)
    summary = run_summary(student, "digits", "digits", teacher=str(teacher), speed_seconds=0.05)
    scores, speed = summary["knn_top1"], summary["speed"]
    assert list(scores) == ["this run", "same network, random init", "raw pixels", "teacher"]
    assert scores["teacher"] == knn(str(teacher), None)  # at its own 16 px, not the student's 12
    assert (speed["this run"]["input_size"], speed["teacher"]["input_size"]) == (12, 16)
    assert speed["teacher"]["parameters"] == sum(p.numel() for p in load_model(str(teacher)).backbone.parameters())
    gap = scores["this run"] - scores["teacher"]
    assert (f"The student is {abs(gap):.1f} k-NN points {'below' if gap < 0 else 'above'} its teacher at "
            f"{speed_ratio(speed['this run'], speed['teacher'], 'its')}.") in summary["reading"]
    teacher_line = summary["table"].splitlines()[-1]
    assert teacher_line.split()[:3] == ["teacher", f"{scores['teacher']:.1f}", "16"]
    assert f"{speed['teacher']['images_per_s']:,.0f}" in teacher_line
    assert json.loads((student / "summary.json").read_text())["reading"] == summary["reading"]


def test_a_timm_teacher_from_a_local_file_is_scored_at_the_distillation_teacher_size(tmp_path):
    """The spec a user gives ``distill --teacher``: timm's pretrained loader, weights from a file, and the size
    distillation fed the teacher (``distill.teacher_size``)."""
    student = export(tmp_path / "student", [8, 8, 16, 16], 12)
    torch.manual_seed(7)
    network = timm.create_model("resnet18", num_classes=0, channels=[8, 16, 32, 64], stem_width=8)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights))
    spec = ("timm:resnet18,pretrained=true,channels=[8,16,32,64],stem_width=8,"
            f"pretrained_cfg_overlay={{file: {weights}, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}")
    summary = run_summary(student, "digits", "digits", teacher=spec, teacher_size=32, speed_seconds=0.05)
    assert summary["models"]["teacher"] == spec and summary["teacher_size"] == 32
    assert summary["knn_top1"]["teacher"] == knn(spec, 32)
    teacher = summary["speed"]["teacher"]
    assert teacher["input_size"] == 32 and teacher["parameters"] == sum(p.numel() for p in network.parameters())
    assert "its teacher at" in summary["reading"] and "--image-size 32" in summary["teacher_command"]
