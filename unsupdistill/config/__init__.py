"""Typed configuration: one dataclass per component, YAML recipes and ``key=value`` overrides.

A recipe holds only its differences from the defaults below; the defaults are the built-in
run (a half-width ResNet-18 on scikit-learn's digits). ``load_config`` merges defaults, recipe and
overrides, checks every key and value, and raises :class:`ConfigError` naming the key, the
source and the allowed values.
"""

from unsupdistill.config.checks import config_errors, validate
from unsupdistill.config.loading import (
    absolute_paths,
    apply_overrides,
    config_from_dict,
    load_config,
    merge,
    parse_override,
    path_keys,
    read_recipe,
    recipe_names,
)
from unsupdistill.config.sections import (
    PATH,
    AudioConfig,
    Config,
    ConfigError,
    CropSpec,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    SoundViewSpec,
    TrainConfig,
    ViewSpec,
    method_sections,
    reads_section,
)

__all__ = ["PATH", "AudioConfig", "Config", "ConfigError", "CropSpec",
           "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "TrainConfig", "absolute_paths", "apply_overrides",
           "config_errors", "config_from_dict", "load_config", "merge", "parse_override", "path_keys", "read_recipe",
           "recipe_names", "method_sections",
           "reads_section", "SoundViewSpec", "validate", "ViewSpec"]
