import dataclasses

import pytest

from unsupdistill.config import Config, ConfigError, config_from_dict, load_config, read_recipe, recipe_names


def error_of(recipe=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(overrides))
    return str(info.value)


def test_defaults_are_the_builtin_digits_run():
    cfg = load_config()
    assert cfg.data.path is None
    assert cfg == Config()


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_config(None, ["train.epochs=5", "optim.lr=1e-3", "augment.local.scale=[0.1, 0.3]",
                             "model.backbone_kwargs.stem_width=16", "train.threads=null"])
    assert cfg.train.epochs == 5 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.augment.local.scale == (0.1, 0.3)
    assert cfg.model.backbone_kwargs == {"channels": [32, 64, 128, 256], "stem_width": 16}
    assert cfg.train.threads is None


def test_unknown_key_names_key_suggestion_and_allowed_keys():
    message = error_of(overrides=["train.epoch=5"])
    assert "train.epoch" in message and "did you mean 'train.epochs'" in message and "batch_size" in message
    assert "unknown key 'colour'" in error_of(overrides=["colour=1"])
    assert "augment.local.sise" in error_of(overrides=["augment.local.sise=3"])


@pytest.mark.parametrize("override, key, allowed", [
    ("train.precision=fp8", "train.precision", "auto, fp32, bf16, fp16"),
    ("optim.name=lamb", "optim.name", "adamw, sgd"),
    ("train.epochs=ten", "train.epochs", "integer"),
    ("train.epochs=2.5", "train.epochs", "integer"),
    ("data.strict=yesplease", "data.strict", "true or false"),
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("optim.teacher_momentum=1.5", "optim.teacher_momentum", "[0, 1]"),
    ("augment.local.scale=[0.5, 0.2]", "augment.local.scale", "min <= max"),
    ("augment.local.size=64", "augment.local.size", "at most the global crop size"),
    ("augment.global_2.size=24", "augment.global_2.size", "same size as augment.global_1.size"),
    ("augment.num_local_crops=-1", "augment.num_local_crops", ">= 0"),
    ("augment.global_1.grayscale_p=2", "augment.global_1.grayscale_p", "probability"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("augment.mean=[0.5, 0.5]", "augment.mean", "list of 3"),
    ("eval.train=digits", "eval.test", "both eval.train and eval.test"),
    ("eval.every_epochs=0", "eval.every_epochs", ">= 1"),
])
def test_bad_values_name_key_and_allowed_values(override, key, allowed):
    message = error_of(overrides=[override])
    assert key in message and allowed in message


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


@pytest.mark.parametrize("name", ["digits", "cifar10", "imagenet_vit_small"])
def test_shipped_recipes_load_and_hold_only_differences(name):
    assert name in recipe_names()
    cfg = load_config(name)
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


def test_config_is_dataclasses_per_component():
    assert {f.name for f in dataclasses.fields(Config)} == {"data", "augment", "model", "loss", "optim", "train",
                                                            "eval"}


def test_whole_mapping_override_replaces_and_dotted_override_updates():
    cfg = load_config(None, ["model.backbone=resnet18", "model.backbone_kwargs={channels: [8, 16, 32, 64]}",
                             "model.backbone_kwargs.stem_width=8"])
    assert cfg.model.backbone_kwargs == {"channels": [8, 16, 32, 64], "stem_width": 8}
