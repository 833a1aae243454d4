"""Validation: ranges and relations that types cannot express."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from unsupdistill import registry
from unsupdistill.config.sections import Config, ConfigError, method_sections

# ----------------------------------------------------------------------------------------------
# Validation: ranges and relations that types cannot express
# ----------------------------------------------------------------------------------------------


def validate(config: Config, ignore: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise ConfigError for out-of-range values, naming the key and what is allowed.

    Args:
        config: the config to check.
        ignore: keys whose errors are left out (the automatic settings will set them).
    """
    errors = [message for key, message in config_errors(config) if key not in ignore]
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def config_errors(config: Config) -> list[tuple[str, str]]:
    """(key, message) of every out-of-range value."""
    method_sections()  # every method's section is known (and checked), whichever runs
    checks: list[tuple[bool, str, str]] = []

    def need(ok: bool, key: str, allowed: str) -> None:
        checks.append((ok, key, allowed))

    d = config.data
    need(d.path is None or bool(d.path.strip()), "data.path", "null (the built-in digits) or a folder path")
    need(d.image_size is None or d.image_size >= 1, "data.image_size", "null or an integer >= 1")
    need(d.num_workers is None or d.num_workers >= 0, "data.num_workers", "null or an integer >= 0")
    need(d.keep_decoded_max_gb > 0, "data.keep_decoded_max_gb", "a number of gigabytes > 0")

    m = config.model
    need(bool(m.backbone.strip()), "model.backbone", "a timm model name, e.g. resnet18 or vit_small_patch16_224")
    need(_is_plain_mapping(m.backbone_kwargs), "model.backbone_kwargs",
         "a mapping of argument names to numbers, strings, booleans, null, or lists and mappings of these")
    need(m.input_size >= 1, "model.input_size", "an integer >= 1")
    need(m.in_chans in (1, 3), "model.in_chans", "3 (images) or 1 (sounds)")
    need(all(s > 0 for s in m.std), "model.std", "three positive numbers")
    checks.extend(config.audio.checks())

    o = config.optim
    need(o.lr > 0, "optim.lr", "a number > 0")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", f"a number in [0, optim.lr={o.lr}]")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", "a number >= 0")
    need(o.warmup_share is None or 0 <= o.warmup_share <= 1, "optim.warmup_share",
         "null (use optim.warmup_epochs) or a share of the planned steps in [0, 1]")
    need(o.weight_decay >= 0 and o.weight_decay_end >= 0, "optim.weight_decay", "numbers >= 0")
    need(0 <= o.sgd_momentum < 1, "optim.sgd_momentum", "a number in [0, 1)")
    need(o.clip_grad >= 0, "optim.clip_grad", "a number >= 0 (0 disables clipping)")

    t = config.train
    need(t.epochs >= 1, "train.epochs", "an integer >= 1")
    need(0 <= t.seed <= _MAX_SEED, "train.seed", f"an integer in [0, {_MAX_SEED}]")
    need(t.batch_size >= 1, "train.batch_size", "an integer >= 1")
    need(t.log_every_steps >= 1, "train.log_every_steps", "an integer >= 1")
    need(t.save_every_steps >= 1, "train.save_every_steps", "an integer >= 1")
    need(t.keep_every_epochs >= 0, "train.keep_every_epochs", "an integer >= 0")
    need(t.threads is None or t.threads >= 1, "train.threads", "null or an integer >= 1")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "null or an integer >= 1")
    need(t.time_budget_s is None or t.time_budget_s > 0, "train.time_budget_s", "null or a number of seconds > 0")

    e = config.eval
    need((e.train is None) == (e.test is None), "eval.test" if e.test is None else "eval.train",
         "both eval.train and eval.test set (or neither)")
    for key in ("train", "test"):
        value = getattr(e, key)
        need(value is None or bool(value.strip()), f"eval.{key}", "null, digits, a folder or a CSV file")
    need(e.every_epochs >= 0, "eval.every_epochs", "an integer >= 0 (0: only the end-of-run summary)")
    need(e.k >= 1, "eval.k", "an integer >= 1")
    need(e.temperature > 0, "eval.temperature", "a number > 0")

    names = registry.names()
    need(config.method is None or config.method in names, "method",
         f"one of {', '.join(names)}, or null for the verb's own")
    for section in config.sections.values():  # each method checks its own section
        checks.extend(section.checks(config) if hasattr(section, "checks") else [])

    # NaN fails every range check above, but infinity passes the one-sided ones (lr > 0). A key
    # that is not finite gets this error alone: its range checks would only repeat it.
    not_finite = _non_finite_keys(config)
    errors = [(key, f"{key}: expected a finite number, got {value}") for key, value in not_finite.items()]
    errors += [(key, f"{key}: expected {allowed}") for ok, key, allowed in checks if not ok and key not in not_finite]
    return errors


_MAX_SEED = 2**32 - 1
"""Largest seed every generator in the run accepts (NumPy's limit; torch takes 64 bits)."""


def _non_finite_keys(node: Any, prefix: str = "") -> dict[str, float]:
    """Dotted keys of the float fields (and float tuples) holding NaN or infinity, with the bad value."""
    found: dict[str, float] = {}
    items = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    if isinstance(node, Config):  # the methods' sections, as top-level ones
        items = [(name, value) for name, value in items if name != "sections"] + list(node.sections.items())
    for name, value in items:
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            found.update(_non_finite_keys(value, f"{key}."))
            continue
        numbers = value if isinstance(value, tuple) else (value,)
        bad = [v for v in numbers if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            found[key] = bad[0]
    return found


def _is_plain_mapping(value: Any) -> bool:
    """True for a mapping with string keys whose values YAML and ``torch.load(weights_only=True)`` both
    read back as they were: numbers, strings, booleans, null, and lists or mappings of these."""
    return isinstance(value, dict) and all(isinstance(k, str) for k in value) and all(
        _is_plain_value(v) for v in value.values())


def _is_plain_value(value: Any) -> bool:
    """True for a YAML scalar, or a list or mapping of plain values."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_value(v) for v in value)
    return _is_plain_mapping(value)
