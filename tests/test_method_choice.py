"""Which method a run trains (the recipe or method=, the verb only a default), the flags each method adds, the keys
that moved to the method that reads them (issue 34), and one teacher load per run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from PIL import Image

from unsupdistill.cli import main
from unsupdistill.config import ConfigError, load_config
from unsupdistill.methods.distill import method as distill_method

TINY = ["model.backbone_kwargs={channels: [8, 16, 32, 64], stem_width: 8, layers: [1, 1, 1, 1]}",
        "data.num_workers=0", "train.device=cpu", "train.precision=fp32"]
TEACHER = ["--teacher", "timm:resnet10t", "distill.teacher_size=16"]
"""A random-init timm network as the teacher, at 16 px: nothing to download."""


def images(folder: Path, count: int = 8, side: int = 24) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (side, side), (30 * i % 256, 80, 160)).save(folder / f"{i}.png")
    return folder


def test_a_recipe_names_the_method_and_the_verb_gives_only_a_default(tmp_path: Path, caplog) -> None:
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(yaml.safe_dump({"method": "distill", "model": {"input_size": 16},
                                      "distill": {"teacher": "timm:resnet10t", "teacher_size": 16}}))
    with caplog.at_level(logging.INFO):  # `pretrain` runs the recipe's distillation, not DINO
        assert main(["pretrain", "--recipe", str(recipe), "--dry-run", *TINY]) == 0
    assert "method distill (from " in caplog.text and "`unsupdistill distill` runs by default" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # method= wins over the verb too; without either, the verb's own
        assert main(["distill", "method=dino", "--dry-run", *TINY]) == 0
    assert "method dino (from method= on the command line)" in caplog.text


def test_a_flag_of_another_method_is_refused_with_the_fix(tmp_path: Path, caplog) -> None:
    recipe = tmp_path / "dino.yaml"
    recipe.write_text("method: dino\n")
    with caplog.at_level(logging.ERROR):
        assert main(["distill", "--recipe", str(recipe), "--dry-run", *TINY, *TEACHER]) == 2
    assert ("--teacher is a flag of method distill and kd; this run trains dino (from " in caplog.text
            and "drop --teacher, or add method=distill" in caplog.text)


def test_a_random_init_timm_teacher_runs_in_automatic_mode_and_loads_once(tmp_path: Path, monkeypatch) -> None:
    """Issue 34, defect 4: the automatic settings loaded the teacher without its given size (an error that asked for
    the very distill.teacher_size the command set), and the run loaded it a second time."""
    loads = []
    load = distill_method.load_teacher

    def counted(*args, **kwargs):
        loads.append(args)
        return load(*args, **kwargs)

    monkeypatch.setattr(distill_method, "load_teacher", counted)
    folder = images(tmp_path / "photos")
    assert main(["distill", str(folder), "--dry-run", *TINY, *TEACHER]) == 0
    assert loads == [("timm:resnet10t", 16)]


def test_old_keys_are_read_under_their_new_names_with_a_warning(tmp_path: Path, caplog) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("augment:\n  global_1: {size: 20, blur_p: 0.3}\n  global_2: {size: 20}\n  local: {size: 8}\n"
                   "  num_local_crops: 3\n  mean: [0.5, 0.5, 0.5]\n"
                   "model: {head_output_dim: 64, norm_last_layer: false}\n"
                   "distill: {crop_scale: [0.3, 1.0], flip_p: 0.1}\n")
    with caplog.at_level(logging.WARNING):
        config = load_config(str(old), ["augment.std=[0.2, 0.2, 0.2]"])
    assert (config.model.input_size, config.model.mean, config.model.std) == (20, (0.5,) * 3, (0.2,) * 3)
    assert (config.dino.global_1.blur_p, config.dino.local.size, config.dino.num_local_crops) == (0.3, 8, 3)
    assert (config.dino.head_output_dim, config.dino.norm_last_layer) == (64, False)
    assert (config.distill.view.scale, config.distill.view.flip_p) == ((0.3, 1.0), 0.1)
    for old_key, new_key in (("augment.global_1.size", "model.input_size"), ("augment.local", "dino.local"),
                             ("model.head_output_dim", "dino.head_output_dim"), ("augment.std", "model.std"),
                             ("distill.crop_scale", "distill.view.scale")):
        assert f"{old_key} is now {new_key}" in caplog.text
    # a key of the old section that never existed is still an error naming the section it was looked for in
    with pytest.raises(ConfigError, match="unknown key 'augment"):
        load_config(None, ["augment.global_3.size=4"])
