"""Where a frozen network runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, resolved to a :class:`torch.device`."""

from __future__ import annotations

import re

import torch

from unsupdistill import distributed
from unsupdistill.config import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N"
"""The device names ``--device`` accepts; auto is CUDA when it is available, else the CPU."""


class DeviceError(ConfigError):
    """A device name that is malformed or names an accelerator this machine does not have."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 numbers in hardware (AVX-512 BF16 or AMX), where bf16 convolutions and
    matrix products run about twice as fast as fp32; elsewhere oneDNN emulates bf16 and gains little."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_device(device: str | torch.device = "auto", option: str = "--device") -> torch.device:
    """The device ``device`` names, checked against what this machine has.

    Args:
        device: ``auto`` (CUDA when ``torch.cuda.is_available()``, else the CPU), ``cpu``, ``cuda``,
            ``cuda:N``, or a :class:`torch.device`.
        option: how error messages name the setting (``--device`` on the command line).

    Raises:
        DeviceError: the name is not one of the allowed values, or it asks for CUDA (or a CUDA
            device index) that is not visible.
    """
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str) and not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise DeviceError(f"{option} {device!r} is not a device; allowed values: {DEVICES}")
    resolved = torch.device(name)
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise DeviceError(f"{option} {device!r}: CUDA is not available on this machine (no GPU visible to "
                          f"PyTorch {torch.__version__}); use {option} cpu or auto (allowed values: {DEVICES})")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise DeviceError(f"{option} {device!r}: only {count} CUDA device(s) are visible (cuda:0 to "
                          f"cuda:{count - 1}); allowed values: {DEVICES}")
    return resolved


def training_device(name: str) -> torch.device:
    """The device of this training process for ``train.device`` (auto, cpu, cuda): under torchrun, CUDA
    device ``LOCAL_RANK``.

    Raises:
        ConfigError: ``cuda`` without a visible CUDA device.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", distributed.local_rank())
