"""Loading: YAML recipes and ``key=value`` overrides merged onto the defaults, every key and value checked."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from unsupdistill import registry
from unsupdistill.config.checks import validate
from unsupdistill.config.sections import Config, ConfigError, method_sections

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("unsupdistill.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe(recipe: str) -> tuple[dict[str, Any], str]:
    """Return the recipe's mapping and a label for error messages.

    Args:
        recipe: a shipped recipe name (``cifar10``) or a path to a YAML file.
    """
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist")
        try:
            text, label = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"recipe file {recipe} cannot be read (UTF-8 text expected): {err}") from err
    else:
        candidate = resources.files("unsupdistill.recipes") / f"{recipe}.yaml"
        if not candidate.is_file():
            raise ConfigError(
                f"unknown recipe '{recipe}'; shipped recipes: {', '.join(recipe_names())} "
                "(or pass a path to a .yaml file)"
            )
        text, label = candidate.read_text(), f"recipes/{recipe}.yaml"
    try:
        data = _parse_yaml(text) or {}
    except ValueError as err:
        raise ConfigError(f"{label} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of sections (data, model, train, ...)")
    return data, label


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"train.epochs=5"`` into ``(["train", "epochs"], 5)``.

    The value is parsed as YAML, except for path-valued keys (``data.path``, ``eval.train``, ...), whose
    value is the text after the first ``=`` as written (one pair of enclosing quotes removed); nothing
    after the ``=`` is null.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5")
    if key in path_keys():
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":  # quoted, as a shell user might: unquote
            return key.split("."), raw[1:-1]
        return key.split("."), raw or None
    try:
        value = _parse_yaml(raw) if raw else None
    except ValueError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from err
    return key.split("."), value


def path_keys(node: Any = None, prefix: str = "") -> set[str]:
    """Dotted names of the path-valued keys (fields with ``PATH`` metadata), the methods' sections' included."""
    keys = set()
    if node is None:
        node = Config
        for name, section in method_sections().items():
            keys |= path_keys(section, f"{name}.")
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        if f.name == "sections" and node is Config:
            continue
        if f.metadata.get("path"):
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys |= path_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


DIGITS_KEYS = ("eval.train", "eval.test", "data.labels")
"""Path keys where ``digits`` names the built-in digits."""


def absolute_paths(config: Config) -> Config:
    """``config`` with its relative paths made absolute, so the stored config works from any folder.

    A path that exists as written is taken as written (a folder named ``~`` stays that folder); otherwise
    ``~`` is expanded. ``digits`` in :data:`DIGITS_KEYS` stays the built-in set unless a file or folder of that
    name exists; a ``timm:`` teacher is a model name, not a path.
    """
    data: dict[str, Any] = {}
    for key in sorted(path_keys()):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is None or (key in DIGITS_KEYS and value == "digits" and not Path(value).exists()):
            continue
        if value.startswith(_not_paths(key)):  # a model name where a path could be (timm:NAME)
            continue
        path = Path(value) if Path(value).exists() else Path(value).expanduser()
        data.setdefault(section, {})[name] = os.path.abspath(path)
    return merge(config, data, "absolute paths")


def _not_paths(key: str) -> tuple[str, ...]:
    """The prefixes that make a value of path key ``key`` a name rather than a path (``PATH`` metadata's
    ``not_paths``)."""
    section, name = key.split(".")
    cls = method_sections().get(section) or typing.get_type_hints(Config)[section]
    return next((f.metadata.get("not_paths", ()) for f in dataclasses.fields(cls) if f.name == name), ())


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises only ValueError for bad input.

    PyYAML also raises ValueError for impossible dates (``2020-13-45``) and RecursionError for
    deeply nested flow collections; both become ValueError here, like its own YAMLError.
    """
    try:
        return yaml.safe_load(text)
    except RecursionError as err:
        raise ValueError("nested too deeply") from err
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides in order.

    A key that reaches into a mapping field (``model.backbone_kwargs.img_size=16``) sets that one
    entry; a mapping given whole (``model.backbone_kwargs={}``) replaces the field, as in a recipe.
    """
    for item in overrides:
        parts, value = parse_override(item)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        config = merge(config, nested, "command line", update_dicts=_reaches_into_mapping(config, parts))
    return config


def _reaches_into_mapping(config: Any, parts: list[str]) -> bool:
    node = config
    for part in parts[:-1]:
        node = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
        if isinstance(node, dict):
            return True
    return False


def load_config(recipe: str | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Defaults, then the recipe's differences, then ``key=value`` overrides; validated unless ``check`` is
    false (the automatic settings complete the config first, then validate it)."""
    config = Config()
    if recipe:
        data, label = read_recipe(recipe)
        config = merge(config, data, label)
    config = apply_overrides(config, overrides or [])
    if check:
        validate(config)
    return config


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Rebuild a full config (e.g. one stored in a checkpoint) and validate it."""
    config = merge(Config(), data, source)
    validate(config)
    return config


def merge(config: Any, data: dict[str, Any], source: str, prefix: str = "", update_dicts: bool = False) -> Any:
    """Return a copy of dataclass ``config`` with the values in ``data`` checked and applied.

    Mapping fields (``model.backbone_kwargs``) are replaced whole, unless ``update_dicts`` is set
    (an override that names one entry of the mapping).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(config))
    fields = {f.name: f for f in dataclasses.fields(config)}
    sections = None
    if isinstance(config, Config):  # the top level: the methods' sections are keys of it too
        data = _renamed(data, source)
        sections = dict(config.sections)
        del fields["sections"]
    names = list(fields) + list(sections or {})
    changes: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if sections is not None and key in sections:
            sections[key] = merge(sections[key], value, source, f"{path}.", update_dicts)
            continue
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(
                f"{source}: unknown key '{path}'{hint}; allowed keys in {where}: {', '.join(names)}"
            )
        current = getattr(config, key)
        if fields[key].metadata.get("path") and not (value is None or isinstance(value, str)):
            raise ConfigError(f"{source}: {path}={_show(value)} is invalid; expected a path (in a YAML file, quote "
                              f"a path that YAML would read as a number, a boolean or null, e.g. '{value}')")
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, source, f"{path}.", update_dicts)
        elif update_dicts and isinstance(current, dict) and isinstance(value, dict):
            changes[key] = {**current, **value}
        else:
            changes[key] = _coerce(value, hints[key], path, source)
    if sections is not None:
        changes["sections"] = sections
    return dataclasses.replace(config, **changes)


def _renamed(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a whole config's mapping) with the keys that moved under their new names, logged once each: every
    method declares its own (``RENAMED`` of its settings, e.g. DINO's old ``loss`` section -> ``dino``). A
    value under the new name wins over one under the old; an old section left empty is dropped."""
    data = _copy_mappings(data)
    for old, new in registry.renamed().items():
        *old_parents, old_key = old.split(".")
        parent = _node(data, old_parents)
        if parent is None or old_key not in parent:
            continue
        value = parent.pop(old_key)
        *new_parents, new_key = new.split(".")
        target = _node(data, new_parents, create=True)
        if target is None:  # a non-mapping where a section belongs: merge() names it
            continue
        current = target.get(new_key)
        if isinstance(value, dict) and isinstance(current, dict):
            target[new_key] = {**value, **current}
        else:
            target.setdefault(new_key, value)
        _drop_empty(data, old_parents)
        logger.warning("%s: %s is now %s (read as such; rename it there)", source, old, new)
    return data


def _copy_mappings(data: Any) -> Any:
    return {k: _copy_mappings(v) for k, v in data.items()} if isinstance(data, dict) else data


def _node(data: dict[str, Any], parts: list[str], create: bool = False) -> dict[str, Any] | None:
    """The mapping at ``parts`` inside ``data`` (made when ``create``); None where there is none."""
    node: Any = data
    for part in parts:
        if create and part not in node:
            node[part] = {}
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return None
    return node


def _drop_empty(data: dict[str, Any], parts: list[str]) -> None:
    """Remove the mapping at ``parts`` and its parents while they are empty."""
    for depth in range(len(parts), 0, -1):
        parent = _node(data, parts[:depth - 1])
        if parent is None or parent.get(parts[depth - 1]) != {}:
            return
        del parent[parts[depth - 1]]


def _coerce(value: Any, hint: Any, path: str, source: str) -> Any:
    """Check ``value`` against the type hint; return it in the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = f"{source}: {path}={_show(value)} is invalid; "
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(bad + f"allowed values: {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(bad + "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(bad + "expected an integer")
        if not -(2**63) <= value < 2**63:  # sizes, steps and seeds all end up in 64-bit C integers
            raise ConfigError(bad + "expected an integer of at most 64 bits")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(bad + "expected a number")
        try:
            return float(value)
        except OverflowError as err:  # an integer beyond float range, e.g. 10**400
            raise ConfigError(bad + "expected a finite number") from err
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(bad + "expected a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(bad + f"expected a list of {len(args)} numbers")
        return tuple(_coerce(v, a, path, source) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(bad + "expected a mapping")
        return dict(value)
    raise TypeError(f"config field {path} has an unsupported type {hint}")  # a bug, not user input


def _show(value: Any) -> str:
    """``repr(value)`` for an error message, cut to 100 characters."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python will print
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= 100 else text[:97] + "..."
