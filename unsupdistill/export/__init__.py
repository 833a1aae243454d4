"""Frozen feature extractors for use anywhere: safetensors / TorchScript / ONNX exports checked for
parity, folder embedding, and the Python API."""

from unsupdistill.export.embed import EmbedResult, embed_folder
from unsupdistill.export.extractor import FeatureExtractor, load_feature_extractor
from unsupdistill.export.formats import EXPORT_FORMATS, ExportError, ExportResult, export_model

__all__ = ["EXPORT_FORMATS", "EmbedResult", "ExportError", "ExportResult", "FeatureExtractor", "embed_folder",
           "export_model", "load_feature_extractor"]
