"""A method defined here, outside the package, runs end to end: the engine, the config and the command line take any
registered method (issue 34). BYOL (Grill et al. 2020) with lightly's heads and loss: an online network with a
predictor matches a momentum target network's projections of another view of the image."""

from __future__ import annotations

import copy
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import update_momentum
from safetensors.torch import load_file
from torch import Tensor, nn

from unsupdistill import registry
from unsupdistill.augment import build_view_transform
from unsupdistill.cli import main
from unsupdistill.config import Config, CropSpec, load_config
from unsupdistill.models.backbone import create_backbone
from unsupdistill.models.load import load_model
from unsupdistill.train.method import Batch, Export, Method, Runtime
from unsupdistill.train.schedules import ScheduleValues, cosine_at

TINY = ["model.backbone_kwargs={channels: [8, 16, 32, 64], stem_width: 8, layers: [1, 1, 1, 1]}",
        "train.batch_size=32", "data.num_workers=0", "train.log_every_steps=1", "train.device=cpu",
        "train.precision=fp32"]


@dataclass
class BYOLConfig:
    """BYOL's settings (the ``byol`` section)."""

    hidden_dim: int = 64
    projection_dim: int = 16
    momentum: float = 0.99
    """The target network's EMA momentum at step 0, cosine to 1."""
    crop_scale: tuple[float, float] = (0.3, 1.0)

    def checks(self, config: Config) -> list[tuple[bool, str, str]]:
        return [(0 <= self.momentum <= 1, "byol.momentum", "a number in [0, 1]"),
                (self.projection_dim >= 1, "byol.projection_dim", "an integer >= 1")]


class BYOL(Method):
    """The online backbone + projector + predictor against the EMA target's projection, both views symmetric."""

    name = "byol"
    command = "pretrain"
    settings: ClassVar[dict[str, type]] = {"byol": BYOLConfig}
    curves: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (("target momentum", ("target_momentum",)),)

    def __init__(self, config: Config, runtime: Runtime) -> None:
        super().__init__(config, runtime)
        m, b = config.model, config.byol
        self.image_size = m.input_size
        backbone, self.spec = create_backbone(m, (m.input_size,))
        projector = BYOLProjectionHead(self.spec.feature_dim, b.hidden_dim, b.projection_dim)
        self.student = nn.ModuleDict({"backbone": backbone, "projector": projector,
                                      "predictor": BYOLPredictionHead(b.projection_dim, b.hidden_dim,
                                                                      b.projection_dim)}).to(runtime.device)
        self.target = copy.deepcopy(nn.ModuleDict({"backbone": backbone, "projector": projector}))
        self.target.requires_grad_(False).to(runtime.device)
        view = CropSpec(size=m.input_size, scale=b.crop_scale, blur_p=0.5)
        self.augment = build_view_transform(view, m.mean, m.std, m.input_size).to(runtime.device)
        self.criterion = NegativeCosineSimilarity()
        self.last_cosine = 0.0

    def views(self, batch: Batch, sched: ScheduleValues) -> Tensor:
        images = batch.images.float().div(255)  # (B, 3, H, W)
        return torch.stack([self.augment(images), self.augment(images)])  # (2, B, 3, S, S)

    def _online(self, x: Tensor) -> Tensor:
        return self.student["predictor"](self.student["projector"](self.student["backbone"](x)))

    def loss(self, views: Tensor, sched: ScheduleValues) -> Tensor:
        with torch.no_grad():
            targets = [self.target["projector"](self.target["backbone"](v)) for v in views]
        p0, p1 = self._online(views[0]), self._online(views[1])
        loss = 0.5 * (self.criterion(p0, targets[1]) + self.criterion(p1, targets[0]))
        self.last_cosine = -loss.item()
        return loss

    def signals(self, sched: ScheduleValues) -> dict[str, float]:
        return {"prediction_cosine": self.last_cosine}

    def scheduled(self, sched: ScheduleValues) -> dict[str, float]:
        return {"target_momentum": cosine_at(sched, self.config.byol.momentum, 1.0)}

    def after_optimizer_step(self, sched: ScheduleValues) -> None:
        momentum = cosine_at(sched, self.config.byol.momentum, 1.0)
        update_momentum(self.student["backbone"], self.target["backbone"], momentum)
        update_momentum(self.student["projector"], self.target["projector"], momentum)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"online": self.student.state_dict(), "target": self.target.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])

    def exported_network(self) -> str:
        return "online"  # BYOL keeps the online encoder

    def probe_backbone(self) -> nn.Module:
        return self.student["backbone"]

    def export(self) -> Export:
        return Export(self.student["backbone"].state_dict(), self.spec, "student", {})


@pytest.fixture
def byol() -> Any:
    """BYOL registered as ``method: byol`` for one test."""
    registry.register("byol", BYOL, types.SimpleNamespace(SECTIONS={"byol": BYOLConfig}))
    yield BYOL
    registry.unregister("byol")


def test_a_method_defined_outside_the_package_trains_through_recipe_and_method_key(tmp_path: Path, byol) -> None:
    # through a recipe that names it: the recipe, not the verb, picks the method
    recipe = tmp_path / "byol.yaml"
    recipe.write_text(yaml.safe_dump({"method": "byol", "byol": {"projection_dim": 8}, "model": {"input_size": 12},
                                      "train": {"epochs": 1}}))
    run = tmp_path / "recipe-run"
    assert main(["pretrain", "--recipe", str(recipe), "--out", str(run), *TINY, "train.max_steps=4",
                 "eval.summary=false"]) == 0
    config = load_config(str(run / "config.yaml"))
    assert config.method == "byol" and config.byol.projection_dim == 8
    assert "dino" not in yaml.safe_load((run / "config.yaml").read_text())  # only what the run read
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(-1 <= r["loss"] <= 1 and "target_momentum" in r and "prediction_cosine" in r
               for r in records if "loss" in r)
    assert (run / "training_curves.png").is_file()
    # the checkpoint records the network the method exports: loading it gives the export's weights
    exported = load_file(run / "backbone.safetensors")
    from_checkpoint = load_model(str(run / "checkpoints" / "last.pt")).backbone.state_dict()
    assert exported.keys() == from_checkpoint.keys()
    assert all(torch.equal(exported[key], from_checkpoint[key]) for key in exported)
    # resume continues it under the same method
    assert main(["pretrain", "--resume", str(run), "train.max_steps=6", "eval.summary=false"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]

    # through method= on the built-in digits, with the end-of-run summary (k-NN of the export against raw pixels)
    run = tmp_path / "key-run"
    assert main(["pretrain", "method=byol", "byol.momentum=0.9", "--out", str(run), *TINY, "train.max_steps=2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["knn_top1"]) >= {"this run", "raw pixels"}
    assert load_config(str(run / "config.yaml")).byol.momentum == 0.9


def test_a_registered_method_is_checked_and_named_like_the_built_in_ones(byol, caplog) -> None:
    assert "byol" in registry.names()
    with pytest.raises(ValueError, match="byol.momentum: expected a number in"):
        load_config(None, ["method=byol", "byol.momentum=2"])
    registry.unregister("byol")
    with pytest.raises(ValueError, match="method: expected one of dino, distill, kd"):
        load_config(None, ["method=byol"])


def test_a_recipe_loads_without_torch_and_the_command_line_answers_at_once(tmp_path: Path) -> None:
    """Config, recipes and ``--help`` read the torch-free registry and settings, nothing heavier."""
    import subprocess

    code = ("import sys; from unsupdistill.config import load_config; from unsupdistill.cli import build_parser; "
            "load_config('digits'); load_config('cifar10_kd', ['distill.teacher=timm:x', 'data.labels=y']); "
            "build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'timm', 'kornia', 'lightly', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stdout
