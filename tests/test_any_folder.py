"""Any folder: settings chosen from the images, paths taken as written, status.json, metrics on resume,
the scan made once per run."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, read_metrics
from PIL import Image

from unsupdistill.auto import auto_settings, explicit_keys
from unsupdistill.cli import main
from unsupdistill.config import Config, ConfigError, load_config
from unsupdistill.data import scan_folder
from unsupdistill.data.scan import SCAN_FILE, FolderScan
from unsupdistill.storage import load_checkpoint
from unsupdistill.train.status import read_status

# TINY without its batch size: the folders here hold 24 images, the automatic batch is 8
SMALL_NET = [item for item in TINY if not item.startswith("train.batch_size")]


def make_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return folder


def run_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))


# ---- settings chosen from the data ---------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "crop", "local", "decode", "small_stem"), [
    (24, 24, 20, 8, 24, True),        # tiny images: crop below the image, decoded at full size
    (64, 64, 52, 24, 64, True),       # CIFAR-stem sizes
    (300, 200, 96, 40, 120, False),   # photos: capped at 96 px on CPU, decoded at 1.25 x the crop
])
def test_a_folder_gets_crops_decode_size_and_export_that_fit_its_images(
        tmp_path, caplog, width, height, crop, local, decode, small_stem):
    images = make_images(tmp_path / "images", 24, width, height)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", str(images), "--out", str(out), *SMALL_NET, "train.max_steps=2"]) == 0
    config = run_config(out)
    a = config["dino"]
    assert (config["model"]["input_size"], a["local"]["size"]) == (crop, local)
    assert config["data"]["image_size"] == decode and config["model"]["small_image_stem"] is small_stem
    assert crop < decode <= max(crop, min(width, height)) or decode == crop == min(width, height)
    assert 1.15 <= decode / crop <= 2 or decode == min(width, height)  # crops near 1:1, no upsampling
    sidecar = json.loads((out / "backbone.json").read_text())
    assert sidecar["input_size"] == crop and sidecar["resize"]["shorter_side"] == decode
    # the table says why, and config.yaml keeps it as comments
    shorter = min(width, height)
    assert f"median shorter side {shorter} px" in caplog.text
    assert "# Settings chosen automatically for 24 images on CPU" in (out / "config.yaml").read_text()
    assert config["dino"]["teacher_temp"] == 0.02 and config["dino"]["teacher_momentum"] == 0.99
    assert config["train"]["batch_size"] == 8  # at most half the 24 images
    # the explicit TINY values won over the automatic ones
    assert config["model"]["backbone_kwargs"] == {"channels": [8, 16, 32, 64], "stem_width": 8}
    assert a["num_local_crops"] == 2


def scan_of(sizes: list[tuple[int, int]]) -> FolderScan:
    return FolderScan("/images", "full", [f"{i}.png" for i in range(len(sizes))], sizes)


def test_explicit_values_win_and_the_rest_follows_them():
    overrides = ["model.input_size=48", "train.epochs=3", "dino.head_output_dim=77"]
    config = load_config(None, overrides, check=False)
    chosen, choices = auto_settings(config, scan_of([(300, 200)] * 100), "cpu", explicit_keys(overrides))
    assert chosen.model.input_size == chosen.model.input_size == 48  # yours, and global_2 follows
    assert chosen.dino.local.size == 20 and chosen.data.image_size == 60  # follow your 48 px
    assert chosen.train.epochs == 3 and chosen.dino.head_output_dim == 77
    assert not {"model.input_size", "train.epochs", "dino.head_output_dim"} & {c.key for c in choices}


def test_device_caps_the_crop_and_dataset_size_scales_dino_settings():
    photos = [(640, 480)] * 8
    cpu, _ = auto_settings(Config(), scan_of(photos), "cpu", set())
    gpu, _ = auto_settings(Config(), scan_of(photos), "cuda", set())
    assert (cpu.model.input_size, gpu.model.input_size) == (96, 224)
    assert gpu.data.image_size == 280 and not gpu.model.small_image_stem

    def scaled(n: int) -> Config:
        scan = FolderScan("/images", "header", ["x.png"] * n, [(32, 32)] * n)
        return auto_settings(Config(), scan, "cpu", set())[0]

    small, mid, huge = scaled(1_000), scaled(608_000), scaled(2_000_000)
    assert (small.dino.head_output_dim, mid.dino.head_output_dim, huge.dino.head_output_dim) == (1024, 65536, 65536)
    assert scaled(30_000).dino.head_output_dim == 2048
    assert (small.dino.teacher_temp, mid.dino.teacher_temp, huge.dino.teacher_temp) == (0.02, 0.05, 0.07)
    assert (small.dino.teacher_momentum, huge.dino.teacher_momentum) == (0.99, 0.996)
    assert huge.dino.warmup_teacher_temp == 0.04 and huge.dino.warmup_teacher_temp_epochs == 30
    # tiny sets: warm-up in steps (10 % of at least 1,000 steps), not DINO's 10 epochs of 2 steps
    tiny = auto_settings(Config(), scan_of([(32, 32)] * 40), "cpu", set())[0]
    steps_per_epoch = 40 // tiny.train.batch_size
    assert tiny.train.epochs * steps_per_epoch >= 1000
    assert tiny.optim.warmup_share == 0.1  # of the planned steps (see test_schedules for what the engine does)


def test_a_vit_gets_a_patch_size_that_fits_the_crop():
    overrides = ["model.backbone=vit_tiny_patch16_224"]
    config, _ = auto_settings(load_config(None, overrides), scan_of([(300, 200)] * 10), "cpu",
                              explicit_keys(overrides))
    assert config.model.backbone_kwargs == {"img_size": 96, "patch_size": 8}
    assert config.dino.local.size % 8 == 0 and not config.model.small_image_stem


def handed_to_training(monkeypatch, *args: str) -> tuple[Config, bool]:
    """The config ``unsupdistill pretrain ARGS`` hands to its run (which is skipped) and whether the automatic
    settings are to complete it."""
    from unsupdistill.cli import training

    handed = []

    def run(config, run_dir, checkpoint, ckpt_path, automatic, *rest):
        handed.append((config, automatic))
        return 0, config, None

    monkeypatch.setattr(training, "train_run", run)
    assert main(["pretrain", *args]) == 0
    return handed[0]


def test_the_built_in_digits_run_takes_its_recipe_and_a_folder_the_automatic_settings(tmp_path, monkeypatch):
    config, automatic = handed_to_training(monkeypatch, "--out", str(tmp_path / "digits"))
    assert not automatic and config.data.path is None
    assert config == load_config("digits", ["method=dino"]) != Config()  # recipes/digits.yaml, not the bare defaults
    images = make_images(tmp_path / "images", 4, 20, 20)
    config, automatic = handed_to_training(monkeypatch, str(images), "--out", str(tmp_path / "folder"))
    assert automatic and config.data.path == str(images)
    # a folder starts from the defaults (its sizes are chosen from its images), not from the digits' recipe
    assert config.dino.centering == Config().dino.centering != "sinkhorn"
    assert config.model.backbone_kwargs == Config().model.backbone_kwargs


def test_a_recipe_turns_the_automatic_settings_off(tmp_path, caplog):
    images = make_images(tmp_path / "images", 4, 300, 200)
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", str(images), "--recipe", "digits", "--dry-run", *TINY]) == 0
    assert "settings chosen" not in caplog.text


# ---- paths are paths -------------------------------------------------------------------------------


NAMES = ["2024", "true", "null", "~", "run #1", "a=b", "with spaces", "données-日本"]


@pytest.mark.parametrize("name", NAMES)
def test_folder_names_that_look_like_yaml_or_overrides_train(tmp_path, monkeypatch, name):
    make_images(tmp_path / name, 8, 20, 20)
    monkeypatch.chdir(tmp_path)
    out = f"{name} out"
    assert main(["pretrain", name, "--out", out, *SMALL_NET, "train.max_steps=1"]) == 0
    assert run_config(Path(out))["data"]["path"] == str(tmp_path / name)  # stored absolute
    assert read_status(Path(out))["state"] == "done"


def test_path_keys_are_not_parsed_as_yaml(tmp_path):
    config = load_config(None, ["data.path=2024", "eval.train=true", "eval.test=run #1"])
    assert (config.data.path, config.eval.train, config.eval.test) == ("2024", "true", "run #1")
    assert load_config(None, ["data.path='null'"]).data.path == "null"  # quotes as a shell user types them
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {path: 2024}\n")  # unquoted in a YAML file: YAML reads a number
    with pytest.raises(ConfigError) as error:
        load_config(str(recipe))
    assert str(error.value) == (f"{recipe}: data.path=2024 is invalid; expected a path (in a YAML file, quote a path "
                                "that YAML would read as a number, a boolean or null, e.g. '2024')")


def test_eval_takes_labeled_folders_with_such_names(tmp_path, monkeypatch):
    for split, seed in (("2024", 0), ("run #1", 1)):
        for label in ("a=b", "null"):
            make_images(tmp_path / split / label, 6, 8, 8, seed=seed + len(label))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "pixels", "--train", "2024", "--test", "run #1", "--image-size", "8", "--out", "true",
                 "--no-linear", "--no-clustering", "--no-plots", "--no-cache"]) == 0
    assert json.loads((tmp_path / "true" / "eval.json").read_text())["num_test"] == 12


def test_a_run_resumes_from_another_working_directory(tmp_path, monkeypatch):
    make_images(tmp_path / "a" / "photos", 16, 20, 20)
    monkeypatch.chdir(tmp_path / "a")
    assert main(["pretrain", "photos", "--out", "run", *SMALL_NET, "train.max_steps=2"]) == 0
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["pretrain", "--resume", "../a/run", "train.max_steps=4"]) == 0
    assert max(m["step"] for m in read_metrics(tmp_path / "a" / "run")) == 4


def test_an_argument_that_is_neither_path_nor_override_is_named(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert main(["pretrain", "epochs=5"]) == 2
    assert "'epochs=5' is neither an existing image folder nor a section.key=value override" in caplog.text


# ---- the scan is made once per run ------------------------------------------------------------------


def test_the_scan_is_cached_in_the_run_and_reused_on_resume(tmp_path, monkeypatch, caplog):
    images = make_images(tmp_path / "images", 16, 20, 20)
    out = tmp_path / "run"
    assert main(["pretrain", str(images), "--out", str(out), *SMALL_NET, "train.max_steps=2"]) == 0
    scan = FolderScan.load(out / SCAN_FILE)
    assert len(scan.files) == 16 and scan.sizes[0] == (20, 20)

    import unsupdistill.data.scan as scan_module

    def no_second_scan(*args, **kwargs):
        raise AssertionError("the folder was scanned again")

    monkeypatch.setattr(scan_module, "scan_folder", no_second_scan)
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", "--resume", str(out), "train.max_steps=3"]) == 0
    assert "from this run's scan" in caplog.text


def test_a_file_that_fails_after_a_header_scan_is_replaced_and_counted(tmp_path):
    images = make_images(tmp_path / "images", 16, 20, 20)
    data = (images / "img_003.png").read_bytes()
    (images / "img_003.png").write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    assert len(scan_folder(images, "header").files) == 16
    out = tmp_path / "run"
    assert main(["pretrain", str(images), "--out", str(out), *SMALL_NET, "data.verify=header",
                 "train.max_steps=4", "train.log_every_steps=2", "train.batch_size=16"]) == 0
    assert read_metrics(out)[-1]["files_failed"] >= 1
    assert "img_003.png\tfailed after the start-up scan" in (out / "skipped.txt").read_text()


# ---- status.json and metrics on resume ----------------------------------------------------------------


def test_metrics_with_a_damaged_last_line_resume(tmp_path, caplog):
    out = tmp_path / "run"
    args = [*TINY, "train.log_every_steps=1", "train.save_every_steps=3"]
    assert main(["pretrain", "--out", str(out), *args, "train.max_steps=3"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1')  # a writer killed mid-line
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", "--resume", str(out), "train.max_steps=5"]) == 0
    assert "dropped 1 line(s) that are not complete JSON records" in caplog.text
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_resuming_an_older_checkpoint_sets_the_later_run_aside(tmp_path, caplog):
    out = tmp_path / "run"
    args = [*TINY, "train.log_every_steps=1", "train.save_every_steps=3"]
    assert main(["pretrain", "--out", str(out), *args, "train.max_steps=3"]) == 0
    older = out / "checkpoints" / "epoch_0000.pt"
    older.write_bytes((out / "checkpoints" / "last.pt").read_bytes())  # a kept checkpoint of step 3
    assert main(["pretrain", "--resume", str(out), "train.max_steps=6"]) == 0
    with caplog.at_level(logging.WARNING):
        assert main(["pretrain", "--resume", str(older), "train.max_steps=4"]) == 0
    aside = next((out / "superseded").iterdir())
    assert "resuming from step 3 of a run that reached step 6" in caplog.text and str(aside) in caplog.text
    assert max(m["step"] for m in read_metrics(aside)) == 6  # the later metrics, kept
    assert load_checkpoint(aside / "checkpoints" / "last.pt")["step"] == 6
    assert (aside / "backbone.safetensors").exists()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert _tensorboard_steps(out / "tensorboard", "train/loss") == [1, 2, 3, 4]  # TensorBoard agrees


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]
