"""The GPU check runs unchanged on CPU (--quick): real throughput, data wait, FLOPs and utilisation figures."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval" / "tools"))
import gpu_check  # noqa: E402  (eval/tools/ is a folder of scripts, not a package)

from unsupdistill.train.precision import precision_name, resolve_precision  # noqa: E402


def vit_forward_flops(size: int, kwargs: dict, head_dims: tuple[int, ...]) -> float:
    """Matmul FLOPs of one image's forward through a timm ViT and a DINO head (attention scores left out)."""
    patch, dim = kwargs["patch_size"], kwargs["embed_dim"]
    patches = (size // patch) ** 2
    embed = patches * patch * patch * 3 * dim
    blocks = kwargs["depth"] * (patches + 1) * 12 * dim * dim  # per token: qkv 3D^2, projection D^2, MLP 8D^2
    head = sum(a * b for a, b in zip(head_dims, head_dims[1:]))
    return 2.0 * (embed + blocks + head)


def test_quick_check_reports_throughput_data_wait_and_utilisation(tmp_path):
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--quick", "--device", "cpu", "--batch-size", "6", "--json", str(out)])

    assert json.loads(out.read_text())["mfu"] == results["mfu"]
    assert results["batch"] == {"size": 6, "searched": False, "tries": []}
    assert results["environment"]["device"] == "cpu"
    assert results["workload"]["crops"] == "2x32 + 2x16"
    # every measured step in one epoch: warm-up, timed steps, stages and the FLOP count
    assert results["steps_per_epoch"] >= results["warmup"] + results["steps"] + results["stage_steps"] + 1

    assert 0 < results["images_per_s"] < math.inf
    assert results["images_per_s"] == pytest.approx(6 / results["step_seconds_mean"])
    assert 0 <= results["data_wait_share"] <= 1
    assert all(seconds >= 0 for seconds in results["stage_seconds"].values())

    # FLOPs per image: teacher forward on 2 global crops, student forward and backward (about twice the
    # forward) on all 4 crops; the tiny ViT's count follows from its shape
    kwargs = results["workload"]["backbone_kwargs"]
    head = (kwargs["embed_dim"], 64, 64, 32, 256)
    global_view, local_view = vit_forward_flops(32, kwargs, head), vit_forward_flops(16, kwargs, head)
    expected = 2 * global_view + 3 * (2 * global_view + 2 * local_view)
    assert results["gflop_per_image"] * 1e9 == pytest.approx(expected, rel=0.1)

    auto = precision_name(resolve_precision("auto", torch.device("cpu")))  # bf16 where the CPU has it natively
    assert results["peak"]["dtype"] == results["precision"] == auto
    assert results["peak_tflop_per_s"] > 0
    achieved = results["gflop_per_image"] * results["images_per_s"] / 1e3
    assert results["achieved_tflop_per_s"] == pytest.approx(achieved)
    assert 0 < results["mfu"] < 1
    assert results["mfu"] == pytest.approx(achieved / results["peak_tflop_per_s"])
