"""The export and embedding formats and the parity tolerance (torch-free, for the command line's help)."""

EXPORT_FORMATS = ("safetensors", "torchscript", "onnx")
ATOL, RTOL = 1e-4, 1e-3
"""Parity tolerance: the export passes when max |exported - pytorch| <= ATOL + RTOL * max |pytorch|."""
EMBED_SUFFIXES = (".npy", ".npz")
EMBED_FORMATS = ("npy", "npz")


class ExportError(ValueError):
    """An export that cannot be made or does not match the PyTorch model; nothing was written."""
