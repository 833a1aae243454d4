"""unsupdistill: DINO-style self-supervised pretraining on any image folder."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["load_feature_extractor"]


def __getattr__(name: str) -> Any:
    # imported on first use, so `import unsupdistill` (and the CLI's argument parsing) stays light
    if name == "load_feature_extractor":
        from unsupdistill.export import load_feature_extractor

        return load_feature_extractor
    raise AttributeError(f"module 'unsupdistill' has no attribute '{name}'")
