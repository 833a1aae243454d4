"""The benchmark scripts run end to end (--quick) and report positive, finite figures; the training benchmark's
two pipelines see the same views. No timing is asserted: the figures depend on the machine."""

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from unsupdistill.augment import MultiCropAugmentation
from unsupdistill.config import Config, load_config, read_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import bench_train  # noqa: E402  (a script folder, not a package)

STAGES = ["data loader wait (decode in workers)", "augmentation (the method's views)", "student forward",
          "teacher forward and loss (rest of the method's loss)", "optimizer step",
          "after the step (EMA update, queue)", "backward, gradient norm, clip (rest of the step)"]


def run_script(name: str, *args: str) -> dict:
    """Run eval/NAME with ARGS in a fresh process and return the JSON it wrote."""
    out = Path(args[args.index("--json") + 1])
    result = subprocess.run([sys.executable, str(ROOT / "eval" / name), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| " in result.stdout  # a markdown table
    return json.loads(out.read_text())


def numbers(tree: object) -> Iterator[float]:
    """Every number in a JSON tree."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield float(tree)


def assert_positive_finite(tree: object) -> None:
    values = list(numbers(tree))
    assert values and all(math.isfinite(v) and v > 0 for v in values), values


def test_bench_train_quick_reports_every_variant_ratio_and_stage(tmp_path):
    results = run_script("bench_train.py", "--quick", "--breakdown", "--json", str(tmp_path / "train.json"))
    assert set(results["workloads"]) == {"cifar10", "multicrop"}
    for workload in results["workloads"].values():
        assert workload["precision"] == {"ours": "bf16", "ref-fp32": "fp32", "ref-bf16": "bf16"}
        assert len(workload["rounds"]) == 1
        assert set(workload["median_images_per_s"]) == {"ours", "ref-fp32", "ref-bf16"}
        assert set(workload["median_ratio"]) == {"ours/ref-fp32", "ours/ref-bf16"}
        breakdown = workload["breakdown"]
        assert list(breakdown["stage_seconds"]) == STAGES
        assert set(breakdown["peaks"]) == {"fp32", "bf16"}
        assert set(workload["utilisation"]) == {"ours", "ref-fp32", "ref-bf16"}
        assert_positive_finite({key: value for key, value in workload.items() if key != "precision"})
    # local crops add FLOPs
    multicrop, cifar10 = (results["workloads"][w]["breakdown"]["gflop_per_image"] for w in ("multicrop", "cifar10"))
    assert multicrop > cifar10


def test_bench_eval_quick_reports_knn_kmeans_and_extraction(tmp_path):
    results = run_script("bench_eval.py", "--quick", "--json", str(tmp_path / "eval.json"))
    assert set(results["classes"]) == {"10", "100"}
    for per_class in results["classes"].values():
        for task in ("knn", "kmeans"):
            assert {"ours", "sklearn", "sklearn_over_ours"} <= set(per_class[task])
        assert_positive_finite(per_class)
    extraction = results["extraction"]
    assert {"fp32", "bf16", "bf16_over_fp32"} <= set(extraction)
    assert extraction["fp32"]["images"] == extraction["bf16"]["images"] == 64
    assert_positive_finite(extraction)


def test_bench_recipe_is_lightlys_cifar10_setting_and_holds_only_differences():
    cfg = load_config(str(bench_train.RECIPE))
    a, m = cfg.augment, cfg.model
    assert (a.global_1.size, a.local.size, a.num_local_crops) == (32, 16, 0)
    assert (a.global_1.blur_p, a.global_2.blur_p, a.local.blur_p) == (0, 0, 0)
    assert (m.backbone, m.backbone_kwargs, m.small_image_stem) == ("resnet18", {}, True)
    assert (m.head_hidden_dim, m.head_bottleneck_dim, m.head_output_dim) == (2048, 256, 2048)
    assert cfg.train.batch_size == 128
    data, _ = read_recipe(str(bench_train.RECIPE))

    def leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
        for key, value in tree.items():
            if isinstance(value, dict) and key != "backbone_kwargs":
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", list(value) if isinstance(value, tuple) else value

    defaults = dict(leaves(Config().to_dict()))
    for key, value in leaves(data):
        assert defaults[key] != value, f"{key} repeats the default"


@pytest.mark.parametrize("workload", ["cifar10", "multicrop"])
def test_both_pipelines_make_the_same_views(workload):
    cfg = load_config(str(bench_train.RECIPE), bench_train.WORKLOADS[workload])
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    reference = bench_train.dino_transform(cfg.augment)(image)
    global_views, local_views = MultiCropAugmentation(cfg.augment)(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    ours = [tuple(global_views.shape[1:])] * 2
    if local_views is not None:
        ours += [tuple(local_views.shape[1:])] * (local_views.shape[0] // 4)
    assert [tuple(view.shape) for view in reference] == ours


def test_bench_budget_quick_trains_the_reference_for_its_budget_and_scores_it(tmp_path):
    out = tmp_path / "ref"
    result = subprocess.run([sys.executable, str(ROOT / "eval" / "bench_budget.py"), "--quick", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pipeline"] == "ref-fp32" and summary["steps"] >= 2
    assert 0.5 * 6 < summary["train_seconds"] < 6 + 5  # --quick: a 6-second budget, ended by it
    assert 0 <= summary["eval"]["knn"]["20"]["top1"] <= 100
    # exported like an unsupdistill run, with the steps it trained
    assert json.loads((out / "backbone.json").read_text())["step"] == summary["steps"]
    assert (out / "backbone.safetensors").is_file() and (out / "metrics.jsonl").is_file()


def test_bench_distill_quick_distills_trains_dino_and_scores_every_run(tmp_path):
    result = run_script("bench_distill.py", "--quick", "--out", str(tmp_path), "--json", str(tmp_path / "r.json"))
    kinds = [row["kind"] for row in result["rows"]]
    assert kinds == ["teacher"] * 2 + ["distilled from tiny", "distilled from tiny, no cache", "DINO from scratch"]
    for row in result["rows"]:
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100 and row["gflops_per_image"] > 0
        assert row["inference_images_per_s"] > 0 and row["latency_ms"] > 0 and row["parameters"] > 0
    teacher, at16 = result["rows"][:2]
    assert (teacher["input_size"], at16["input_size"]) == (32, 16)  # its own size, then --teacher-sizes
    assert at16["gflops_per_image"] * 3 < teacher["gflops_per_image"]  # 4x the pixels, about 4x the FLOPs
    student, uncached, scratch = result["rows"][2:]
    assert student["images_per_s"] > 0 and scratch["images_per_s"] > 0 and student["steps"] >= 1
    assert json.loads((tmp_path / "resnet18-tiny-from-tiny" / "backbone.json").read_text())["source"] == "student"
    config = (tmp_path / "resnet18-tiny-from-tiny-nocache" / "config.yaml").read_text()
    assert "cache: false" in config and "# Settings chosen automatically" in config  # no recipe: automatic
    # the teacher is 4x the student's width: more FLOPs per image and more parameters
    assert teacher["gflops_per_image"] > student["gflops_per_image"]
    assert teacher["parameters"] > student["parameters"] == uncached["parameters"]


def test_bench_kd_quick_runs_every_row_and_scores_the_classifiers(tmp_path):
    result = run_script("bench_kd.py", "--quick", "--out", str(tmp_path), "--json", str(tmp_path / "r.json"))
    assert [row["kind"] for row in result["rows"]] == [
        "teacher, probe on the labels", "(a) cross-entropy on the labels only",
        "(b) distillation without labels, then the probe", "(c) distillation with labels",
        "(d) born-again generation 2"]
    teacher, labels_only, unlabeled, kd, gen2 = result["rows"]
    assert teacher["classifier_top1"] is None and unlabeled["classifier_top1"] is None  # no classifier exported
    for row in (labels_only, kd, gen2):
        assert 0 <= row["classifier_top1"] <= 100 and row["images_per_s"] > 0
    assert all(0 <= row["linear_top1"] <= 100 and row["gflops_per_image"] > 0 for row in result["rows"])
    with open(tmp_path / "labels.csv") as f:
        assert len(f.readlines()) == 1 + 3 * 8  # 8 labeled images of each of the 3 classes
    chain = tmp_path / "c-kd-tiny"
    assert f"teacher: {chain / 'gen_1'}" in (chain / "gen_2" / "config.yaml").read_text()


def test_bench_trials_quick_runs_and_scores_each_trial(tmp_path):
    result = run_script("bench_trials.py", "--quick", "--out", str(tmp_path), "--json", str(tmp_path / "r.json"))
    assert [row["trial"] for row in result["rows"]] == ["base", "sinkhorn"]
    assert result["rows"][1]["overrides"] == "dino.centering=sinkhorn dino.koleo_weight=0.1"
    for row in result["rows"]:
        assert 0 <= row["knn_top1"] <= 100 and row["steps"] >= 1 and row["images_per_s"] > 0
    config = (tmp_path / "sinkhorn" / "config.yaml").read_text()
    assert "centering: sinkhorn" in config and "koleo_weight: 0.1" in config


def test_bench_probe_quick_runs_both_probes_on_the_same_features(tmp_path):
    result = run_script("bench_probe.py", "--quick", "--json", str(tmp_path / "probe.json"))
    assert [row["model"] for row in result["rows"]] == ["pixels", "timm:resnet18"]
    for row in result["rows"]:
        assert row["sklearn_finished"] and 0 < row["torch_top1"] <= 100 and 0 < row["sklearn_top1"] <= 100
        assert row["torch_s"] > 0 and row["speedup"] == pytest.approx(row["sklearn_s"] / row["torch_s"])
    assert result["rows"][0]["dim"] == 3 * 16 * 16 and result["rows"][0]["train"] == 1257  # the digits split


def test_bench_extract_and_profile_step_quick(tmp_path):
    result = run_script("bench_extract.py", "--quick", "--folder", str(tmp_path / "jpegs"),
                        "--json", str(tmp_path / "extract.json"))
    [row] = result["rows"]
    assert row["images"] == 200 and row["images_per_s"] > 0 and row["feature_dim"] == 16
    assert (tmp_path / "jpegs-quick" / "class3").is_dir()  # 10 class folders of generated JPEGs
    profile = subprocess.run([sys.executable, str(ROOT / "eval" / "profile_step.py"), "--quick"], cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
    assert profile.returncode == 0, profile.stderr[-3000:]
    for stage in STAGES:
        assert stage in profile.stdout  # every stage of the step, after the operator table
    assert "Self CPU" in profile.stdout and "steps/s" in profile.stdout


def test_bench_precision_quick_compares_bf16_with_fp32(tmp_path):
    result = run_script("bench_precision.py", "--quick", "--json", str(tmp_path / "precision.json"))
    fp32, bf16 = result["rows"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16") and fp32["test"] == 540
    for row in (fp32, bf16):
        assert 0 < row["knn_top1"] <= 100 and 0 < row["linear_top1"] <= 100 and row["images_per_s"] > 0
    assert 0 < bf16["feature_error_pct"] < 5  # bf16 keeps ~3 significant digits: close to fp32, not equal
    assert 0 <= bf16["knn_flips"] <= 540 and 0 <= bf16["linear_flips"] <= 540
