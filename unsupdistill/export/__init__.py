"""Frozen feature extractors for use anywhere: safetensors / TorchScript / ONNX exports checked for
parity, folder embedding, and the Python API.

The names below load on first use, so importing a light submodule (``export.names``) loads no torch.
"""

import importlib
from typing import Any

from unsupdistill.export.names import EXPORT_FORMATS

_HOMES = {
    "EmbedResult": "unsupdistill.export.embed", "embed_folder": "unsupdistill.export.embed",
    "FeatureExtractor": "unsupdistill.export.extractor", "load_feature_extractor": "unsupdistill.export.extractor",
    "ExportError": "unsupdistill.export.formats", "ExportResult": "unsupdistill.export.formats",
    "export_model": "unsupdistill.export.formats",
}

__all__ = ["EXPORT_FORMATS", "EmbedResult", "ExportError", "ExportResult", "FeatureExtractor", "embed_folder",
           "export_model", "load_feature_extractor"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'unsupdistill.export' has no attribute '{name}'")
