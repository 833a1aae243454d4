import dataclasses
import logging
import re

import pytest

from unsupdistill.config import Config, ConfigError, config_from_dict, load_config, read_recipe, recipe_names


def error_of(recipe=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(overrides))
    return str(info.value)


def built_in_run(monkeypatch, tmp_path, *args: str) -> Config:
    """The config ``unsupdistill pretrain ARGS`` (no folder) hands to its run, which is skipped."""
    from unsupdistill.cli import main, training

    handed = []

    def run(config, *rest):
        handed.append(config)
        return 0, config, None

    monkeypatch.setattr(training, "train_run", run)
    assert main(["pretrain", "--out", str(tmp_path / "run"), *args]) == 0
    return handed[0]


def test_the_built_in_run_is_the_defaults_with_recipes_digits(monkeypatch, tmp_path):
    """``unsupdistill pretrain`` with no folder and no recipe trains on the digits with recipes/digits.yaml's
    settings for 8x8 gray digits (chosen in the trials its comments cite), not with the bare defaults."""
    cfg = built_in_run(monkeypatch, tmp_path)
    assert cfg.method == "dino" and cfg.data.path is None  # scikit-learn's digits
    a = cfg.dino
    assert (cfg.model.input_size, a.local.size, a.num_local_crops) == (12, 6, 2)
    for crop in (a.global_1, a.global_2, a.local):  # mirrored digits are other digits; gray has no colour
        assert (crop.flip_p, crop.color_jitter_p, crop.grayscale_p) == (0.0, 0.0, 0.0)
    assert cfg.model.backbone == "resnet18" and cfg.model.small_image_stem
    assert cfg.model.backbone_kwargs == {"channels": [32, 64, 128, 256], "stem_width": 32, "layers": [1, 1, 1, 1]}
    assert cfg.dino.centering == "sinkhorn" and cfg.train.epochs == 12
    # everything the recipe does not name is the default
    assert cfg.optim == Config().optim and cfg.dino.head_output_dim == Config().dino.head_output_dim
    # key=value overrides still win over the recipe, and the rest of the recipe stays
    cfg = built_in_run(monkeypatch, tmp_path, "train.epochs=3", "dino.local.size=4")
    assert (cfg.train.epochs, cfg.dino.local.size, cfg.model.input_size) == (3, 4, 12)
    # another recipe replaces it
    cfg = built_in_run(monkeypatch, tmp_path, "--recipe", "cifar10")
    assert cfg == load_config("cifar10")


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_config(None, ["train.epochs=5", "optim.lr=1e-3", "dino.local.scale=[0.1, 0.3]",
                             "model.backbone_kwargs.stem_width=16", "train.threads=null"])
    assert cfg.train.epochs == 5 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.dino.local.scale == (0.1, 0.3)
    assert cfg.model.backbone_kwargs == {"channels": [32, 64, 128, 256], "stem_width": 16}
    assert cfg.train.threads is None


def test_unknown_key_names_key_suggestion_and_allowed_keys():
    message = error_of(overrides=["train.epoch=5"])
    assert "train.epoch" in message and "did you mean 'train.epochs'" in message and "batch_size" in message
    assert "unknown key 'colour'" in error_of(overrides=["colour=1"])
    assert "dino.local.sise" in error_of(overrides=["dino.local.sise=3"])


@pytest.mark.parametrize("override, key, allowed", [
    ("train.precision=fp8", "train.precision", "auto, fp32, bf16, fp16"),
    ("optim.name=lamb", "optim.name", "adamw, sgd"),
    ("train.epochs=ten", "train.epochs", "integer"),
    ("train.epochs=2.5", "train.epochs", "integer"),
    ("data.strict=yesplease", "data.strict", "true or false"),
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("dino.teacher_momentum=1.5", "dino.teacher_momentum", "[0, 1]"),
    ("dino.local.scale=[0.5, 0.2]", "dino.local.scale", "min <= max"),
    ("dino.local.size=64", "dino.local.size", "at most the global crop size"),
    ("dino.num_local_crops=-1", "dino.num_local_crops", ">= 0"),
    ("dino.global_1.grayscale_p=2", "dino.global_1.grayscale_p", "probability"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("model.mean=[0.5, 0.5]", "model.mean", "list of 3"),
    ("eval.train=digits", "eval.test", "both eval.train and eval.test"),
    ("eval.every_epochs=-1", "eval.every_epochs", ">= 0"),  # 0: k-NN only at the end of the run
    # momentum outside [0, 1]
    ("dino.teacher_momentum=-0.1", "dino.teacher_momentum", "[0, 1]"),
    ("dino.teacher_momentum_end=1.01", "dino.teacher_momentum_end", "[0, 1]"),
    ("dino.center_momentum=1", "dino.center_momentum", "[0, 1)"),
    ("optim.sgd_momentum=-0.5", "optim.sgd_momentum", "[0, 1)"),
    # zero-size crops, zero or negative epochs and batch
    ("dino.local.size=0", "dino.local.size", ">= 1"),
    ("model.input_size=0", "model.input_size", ">= 1"),
    ("dino.local.scale=[0, 0.4]", "dino.local.scale", "0 < min"),
    ("train.epochs=0", "train.epochs", ">= 1"),
    ("train.epochs=-3", "train.epochs", ">= 1"),
    ("train.batch_size=-8", "train.batch_size", ">= 1"),
    ("optim.min_lr=0.1", "optim.min_lr", "[0, optim.lr=0.008]"),
    # NaN and infinity, however they are written
    ("optim.lr=.nan", "optim.lr", "finite"),
    ("optim.lr=nan", "optim.lr", "finite"),
    ("optim.clip_grad=.inf", "optim.clip_grad", "finite"),
    ("optim.warmup_epochs=1e400", "optim.warmup_epochs", "finite"),  # YAML reads it as a string
    ("optim.weight_decay=1.0e+400", "optim.weight_decay", "finite"),
    ("optim.lr=1" + "0" * 400, "optim.lr", "finite"),  # an integer too large for a float
    ("dino.teacher_temp=-.inf", "dino.teacher_temp", "finite"),
    ("dino.local.scale=[.nan, 0.4]", "dino.local.scale", "finite"),
    ("model.std=[0.2, .inf, 0.2]", "model.std", "finite"),
    # values that break later stages
    ("train.seed=-1", "train.seed", "[0, 4294967295]"),
    ("train.seed=4294967296", "train.seed", "[0, 4294967295]"),
    ("data.path=''", "data.path", "folder path"),
    ("eval.train=' '", "eval.train", "digits, a folder or a CSV file"),
    ("model.backbone=''", "model.backbone", "timm model name"),
    ("model.backbone_kwargs={1: 2}", "model.backbone_kwargs", "argument names"),
    ("model.backbone_kwargs.start=2020-01-01", "model.backbone_kwargs", "argument names"),  # a YAML date
    # values YAML cannot build
    ("train.seed=2020-13-45", "train.seed", "not valid YAML"),
    ("train.epochs=" + "[" * 2000, "train.epochs", "not valid YAML"),
])
def test_bad_values_name_key_and_allowed_values(override, key, allowed):
    message = error_of(overrides=[override])
    assert key in message and allowed in message


def test_non_finite_value_is_reported_once_not_with_every_range_check():
    message = error_of(overrides=["optim.lr=.nan", "dino.student_temp=.inf"])
    assert "optim.lr: expected a finite number, got nan" in message
    assert "dino.student_temp: expected a finite number, got inf" in message
    assert "optim.lr: expected a number > 0" not in message
    assert message.count("\n") == 3  # the header line, the two keys, and min_lr that compares against lr


@pytest.mark.parametrize("data, key", [
    ({"optim": {"lr": float("nan")}}, "optim.lr"),
    ({"optim": {"lr": 10**400}}, "optim.lr"),
    ({"optim": {"teacher_momentum": float("inf")}}, "dino.teacher_momentum"),
    ({"augment": {"local": {"blur_sigma": [0.1, float("inf")]}}}, "dino.local.blur_sigma"),
    ({"train": "fast"}, "train"),
    ({"train": {"epochs": None}}, "train.epochs"),
    ({"model": {"backbone_kwargs": {"img_size": {3, 4}}}}, "model.backbone_kwargs"),  # a set: not YAML
    ({7: 1}, "7"),
    ({"train": {"epochs": 2**64}}, "train.epochs"),
    ({"augment": {"global_1": {"size": 10**5000}}}, "model.input_size"),  # too long even to print
])
def test_config_from_dict_rejects_bad_values_with_config_error(data, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(data)


def test_recipe_file_that_is_not_utf8_or_holds_a_bad_date_names_the_file(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"data:\n  path: /photos/caf\xe9\n")
    assert str(latin) in error_of(recipe=str(latin)) and "UTF-8" in error_of(recipe=str(latin))
    dated = tmp_path / "dated.yaml"
    dated.write_text("train:\n  seed: 2020-02-30\n")
    message = error_of(recipe=str(dated))
    assert str(dated) in message and "not valid YAML" in message


def test_malformed_override_and_unknown_recipe():
    assert "section.key=value" in error_of(overrides=["=3"])
    message = error_of(recipe="imagenet_vit_smal")
    assert "imagenet_vit_small" in message and "cifar10" in message
    assert "does not exist" in error_of(recipe="/no/such/recipe.yaml")


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    message = error_of(recipe=str(bad))
    assert str(bad) in message and "train.epochz" in message


@pytest.mark.parametrize(("name", "given"), [("digits", []), ("cifar10", []), ("imagenet_vit_small", []),
                                             ("cifar10_distill", ["distill.teacher=t"]),
                                             ("cifar10_kd", ["distill.teacher=t", "data.labels=l.csv"])])
def test_shipped_recipes_load_and_hold_only_differences(name, given):
    """Every shipped recipe loads (with the teacher and labels its command line gives) and repeats no default."""
    assert name in recipe_names()
    cfg = load_config(name, given)
    data, _ = read_recipe(name)
    defaults = Config().to_dict()

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "backbone_kwargs":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    flat_defaults = dict(leaves(defaults))
    for key, value in leaves(data):
        assert flat_defaults[key] != (list(value) if isinstance(value, tuple) else value), \
            f"recipes/{name}.yaml repeats the default of {key}"
    assert config_from_dict(cfg.to_dict()) == cfg  # the resolved config round-trips


def test_recipe_backbone_kwargs_replace_defaults_but_overrides_update_them():
    cfg = load_config("imagenet_vit_small")
    assert cfg.model.backbone_kwargs == {"drop_path_rate": 0.1}
    cfg = load_config("cifar10")
    assert cfg.model.backbone == "resnet18" and cfg.model.backbone_kwargs == {}
    cfg = load_config("cifar10", ["model.backbone_kwargs.drop_rate=0.1"])
    assert cfg.model.backbone_kwargs == {"drop_rate": 0.1}


def test_config_is_dataclasses_per_component_and_each_method_owns_its_section():
    assert {f.name for f in dataclasses.fields(Config)} == {"method", "data", "model", "audio", "optim", "train",
                                                            "eval", "sections"}
    from unsupdistill.methods import METHODS

    config = Config()
    assert set(config.to_dict()) == {"method", "data", "model", "audio", "optim", "train", "eval", "dino", "distill",
                                     "kd"}
    for method in METHODS.values():  # every section is defined in a method's package (kd reads distill's too)
        for name, section in method.settings.items():
            assert section.__module__.startswith(f"unsupdistill.methods.{name}.")
            assert type(getattr(config, name)) is section
    with pytest.raises(ConfigError, match="dino.center_momentum: expected a number in"):
        load_config(None, ["dino.center_momentum=1.5"])
    with pytest.raises(ConfigError, match="method: expected one of dino, distill, kd"):
        load_config(None, ["method=simclr"])


def test_renamed_keys_are_read_under_their_new_names_with_a_warning(tmp_path, caplog):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("loss: {teacher_temp: 0.03}\noptim: {lr: 0.001, teacher_momentum: 0.95}\n")
    with caplog.at_level("WARNING"):
        config = load_config(str(recipe), ["optim.freeze_last_layer_epochs=0.5"])
    assert (config.dino.teacher_temp, config.dino.teacher_momentum, config.dino.freeze_last_layer_epochs,
            config.optim.lr) == (0.03, 0.95, 0.5, 0.001)
    assert "loss is now dino" in caplog.text and "optim.teacher_momentum is now dino.teacher_momentum" \
        in caplog.text and "optim.freeze_last_layer_epochs is now dino.freeze_last_layer_epochs" in caplog.text
    with pytest.raises(ConfigError, match="unknown key 'optim.teacher_momentum_start'"):
        load_config(None, ["optim.teacher_momentum_start=0.9"])


def test_whole_mapping_override_replaces_and_dotted_override_updates():
    cfg = load_config(None, ["model.backbone=resnet18", "model.backbone_kwargs={channels: [8, 16, 32, 64]}",
                             "model.backbone_kwargs.stem_width=8"])
    assert cfg.model.backbone_kwargs == {"channels": [8, 16, 32, 64], "stem_width": 8}


@pytest.mark.parametrize("override", ["optim.lr=-1", "train.epochs=0", "dino.local.size=99", "optim.lr=.nan",
                                      "train.batch_size=0", "colour=red"])
def test_bad_config_stops_the_run_before_any_data_is_read(tmp_path, monkeypatch, caplog, override):
    import unsupdistill.data
    from unsupdistill.cli import main
    from unsupdistill.config import DataConfig

    def read_data(*args, **kwargs):
        raise AssertionError("the data was read before the config was checked")

    monkeypatch.setattr(unsupdistill.data, "ImageFolderDataset", read_data)
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(AssertionError, match="data was read"):  # the trap is on the path a run reads data by
        unsupdistill.data.build_dataset(DataConfig(path=str(images)), 16)

    with caplog.at_level(logging.ERROR):
        assert main(["pretrain", str(images), "--out", str(tmp_path / "bad"), override]) == 2
    assert override.split("=")[0] in caplog.text
    assert not (tmp_path / "bad").exists()
