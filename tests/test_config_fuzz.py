"""Property-based fuzzing of the config: every input validates or raises ConfigError, never anything else.

Random nested mappings mix the real sections and keys with unknown ones; values are plausible ones
near each default or junk of any type (NaN and infinity, huge and negative numbers, strings, lists of
the wrong length, nested mappings, None, booleans). A config that validates must also survive the
round trip through ``config.yaml``, as a run writes it and ``--resume`` reads it back.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unsupdistill.config import Config, ConfigError, config_from_dict, load_config

DEFAULTS = Config().to_dict()

FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Strings the config gives meaning to (Literal values, names, paths), next to arbitrary text.
WORDS = ["adamw", "sgd", "auto", "cpu", "cuda", "fp32", "bf16", "fp16", "full", "header", "resnet18",
         "vit_tiny_patch16_224", "digits", "", " ", "null", "none", "1e-3", "nan", "inf", "-inf", "1e400"]

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(WORDS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
"""Any value YAML can hold, NaN and infinity included (``st.floats()`` draws them)."""

UNKNOWN_KEYS = st.text(max_size=10) | st.sampled_from(["epoch", "lr ", "Train", "global", "size_", "1"])


def _near(default: Any) -> st.SearchStrategy[Any]:
    """Values of the default's kind, in range or not (three times as likely as the rest), or junk."""
    if isinstance(default, bool):
        plausible, odd = st.booleans(), JUNK
    elif isinstance(default, int):
        plausible = st.integers(-2, 64)
        odd = st.integers() | st.integers(2**63 - 2, 2**64) | st.integers(10**300, 10**4000) | JUNK
    elif isinstance(default, float):
        plausible = st.floats(-0.5, 2.0) | st.floats(0.0, 1.0) | st.integers(-3, 5)
        odd = st.floats() | st.integers(10**300, 10**4000) | st.sampled_from(["1e-3", "nan", "-inf", "1e400"]) | JUNK
    elif isinstance(default, str):
        plausible, odd = st.sampled_from(WORDS), st.text(max_size=12) | JUNK
    elif isinstance(default, list):  # the dataclasses' tuples of numbers
        numbers = st.floats(0.01, 1.0) | st.floats() | st.integers(-1, 3) | st.sampled_from(["0.5", "x"])
        plausible = st.lists(st.floats(0.01, 1.0), min_size=len(default), max_size=len(default))
        odd = st.lists(numbers, max_size=len(default) + 2) | JUNK
    elif isinstance(default, dict):  # model.backbone_kwargs: any mapping
        plausible = st.dictionaries(st.sampled_from(["drop_rate", "img_size", "channels"]), st.integers(0, 32),
                                    max_size=2)
        odd = st.dictionaries(st.text(max_size=8) | st.integers(), JUNK, max_size=3) | JUNK
    else:  # fields whose default is null
        plausible, odd = st.none() | st.integers(-2, 64), st.text(max_size=12) | JUNK
    return st.one_of(plausible, plausible, plausible, odd)


def _mapping(defaults: dict[str, Any]) -> st.SearchStrategy[dict[Any, Any]]:
    """A mapping with any subset of the real keys (sections recursively) plus, sometimes, unknown keys."""
    optional = {key: (_mapping(value) | JUNK) if isinstance(value, dict) and key != "backbone_kwargs"
                else _near(value) for key, value in defaults.items()}
    known = st.fixed_dictionaries({}, optional=optional)
    unknown = st.dictionaries(UNKNOWN_KEYS, JUNK, max_size=2)
    return st.one_of(known, known, known, st.builds(lambda a, b: {**b, **a}, known, unknown))


def _leaves(defaults: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in defaults.items():
        if isinstance(value, dict) and key != "backbone_kwargs":
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


LEAVES = _leaves(DEFAULTS)


@st.composite
def _override(draw: st.DrawFn) -> str:
    """One command-line argument: mostly ``key=value`` with a real or made-up dotted key and a value
    written as JSON (which is YAML) or as raw text; sometimes malformed."""
    key, default = draw(st.sampled_from(LEAVES))
    key = draw(st.sampled_from([key, key, key, key.rsplit(".", 1)[0], f"{key}.x", "model.backbone_kwargs.depth"])
               | st.text(max_size=12))
    value = draw(_near(default))
    text = value if isinstance(value, str) else draw(st.sampled_from([json.dumps(value), str(value)]))
    text = draw(st.sampled_from([text, text, text, "", "[1, 2", "{a: 1", "2020-13-45", "2020-01-01", ".nan",
                                 "-.inf", "1.0e+400", "!!python/object:os.system", "*alias", "[" * 300, "~"]))
    forms = {"key=value": f"{key}={text}", "value": text, "=value": f"={text}", "key": key,
             "key.=value": f"{key}.={text}"}
    return forms[draw(st.sampled_from(["key=value"] * 5 + list(forms)))]


def _validates_or_config_error(build: Any) -> Config | None:
    """The config ``build()`` returns, or None after a ConfigError; any other exception fails the test."""
    try:
        config = build()
    except ConfigError as err:
        assert str(err).strip()
        return None
    assert isinstance(config, Config)
    return config


def _check_round_trip(config: Config) -> None:
    """Every number is finite, and the config written as YAML and read back is the same (NaN-safe)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    again = config_from_dict(yaml.safe_load(text), "config.yaml")
    assert yaml.safe_dump(again.to_dict(), sort_keys=False) == text
    for key, value in _leaves(again.to_dict()):
        numbers = value if isinstance(value, list) else [value]
        if key != "model.backbone_kwargs":  # timm's arguments pass through as given
            assert all(math.isfinite(v) for v in numbers if isinstance(v, float)), key


@FUZZ
@given(data=_mapping(DEFAULTS) | JUNK)
def test_config_from_dict_validates_or_raises_config_error(data: Any) -> None:
    config = _validates_or_config_error(lambda: config_from_dict(data))
    if config is not None:
        _check_round_trip(config)


@FUZZ
@given(overrides=st.lists(_override(), max_size=4))
def test_overrides_validate_or_raise_config_error(overrides: list[str]) -> None:
    config = _validates_or_config_error(lambda: load_config(None, overrides))
    if config is not None:
        _check_round_trip(config)


RECIPES = st.one_of(
    _mapping(DEFAULTS).map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
    st.text(max_size=200).map(str.encode),
    st.binary(max_size=200),  # not UTF-8, or not text at all
)


@FUZZ
@given(recipe=RECIPES)
def test_recipe_files_validate_or_raise_config_error(recipe: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(recipe)
        config = _validates_or_config_error(lambda: load_config(str(path)))
    if config is not None:
        _check_round_trip(config)


def test_fuzzing_reaches_both_outcomes() -> None:
    """The strategies are not all junk: some random configs validate, and some are rejected."""
    outcomes: set[bool] = set()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=_mapping(DEFAULTS))
    def collect(data: dict[Any, Any]) -> None:
        outcomes.add(_validates_or_config_error(lambda: config_from_dict(data)) is not None)

    collect()
    assert outcomes == {True, False}
