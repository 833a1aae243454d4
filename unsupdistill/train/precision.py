"""Mixed precision: the autocast dtype, and a workaround for a oneDNN bf16 kernel that is wrong on CPU."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsupdistill.config import ConfigError
from unsupdistill.devices import cpu_has_native_bf16
from unsupdistill.models.backbone import input_channels

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None for float32). auto: bf16 on a CPU with native bf16, where its matrix products peak at
    4x fp32's (BENCHMARKS.md, Speed: 876 against 218 GFLOP/s on the 2-core VM); fp32 on a CPU without, where oneDNN
    emulates bf16 (the quarter-width ResNet-18's training step at 96 px, batch 256, on a 2-core AVX2 EPYC: 158
    images/s in fp32, 26 in emulated bf16); bf16 (else fp16) on CUDA."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    if precision == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        if device.type == "cpu" and not cpu_has_native_bf16():
            return None
        return torch.bfloat16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: an autocast dtype as the config and every report spell it."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class WidthOneConv2d(nn.Conv2d):
    """A ``Conv2d`` that runs with width stride 1 on inputs one pixel wide: the same single output column.

    oneDNN's bf16 weight gradient of a convolution strided along the width of a width-1 input (e.g. a
    ResNet's 3x3/2 downsampling convolution on a 1x1 feature map) leaves the gradient of the kernel
    columns that only see padding uninitialised: whatever the memory held, often Inf or NaN (torch
    2.14.1, oneDNN 3.12; fp32 and width stride 1 are right; tests/test_precision.py shows it). With
    "same" padding along the width, a width-1 input gives one output column at any stride, so stride
    1 computes the same output and gradients. Parameters and their names are those of ``nn.Conv2d``.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if input.shape[-1] == 1:  # (B, C, H, 1)
            return F.conv2d(input, weight, bias, (self.stride[0], 1), self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def avoid_cpu_bf16_faults(backbone: nn.Module, crop_sizes: tuple[int, ...], autocast_dtype: torch.dtype | None,
                          device: torch.device) -> list[str]:
    """Under bf16 autocast on CPU, make the convolutions that see width-1 inputs a ``WidthOneConv2d``.

    Which convolutions see width-1 inputs is found by running ``backbone`` once per crop size (in eval
    mode, without gradients). Nothing changes in any other case (fp32, CUDA, or no such convolution,
    e.g. the CIFAR-stem ResNets at the default crop sizes), so the common case runs the plain kernels.

    Args:
        backbone: the student's backbone, changed in place (parameter names stay as they are).
        crop_sizes: the view sizes the network will see.
        autocast_dtype: the training autocast dtype (None for float32).
        device: the training device.

    Returns:
        The names of the convolutions changed, in ``backbone``.
    """
    if autocast_dtype != torch.bfloat16 or device.type != "cpu":
        return []
    candidates = {name: conv for name, conv in backbone.named_modules() if _strided_same_width(conv)}
    seen = _width_one_inputs(backbone, candidates, crop_sizes) if candidates else {}
    for name in seen:
        candidates[name].__class__ = WidthOneConv2d
    if seen:
        sizes = sorted(set().union(*seen.values()))
        logger.info("bf16 autocast on CPU: the backbone's %s get 1-px-wide inputs (from %s-px crops), where "
                    "oneDNN's bf16 weight gradient of a width-strided convolution gives Inf/NaN; they run with "
                    "width stride 1 on such inputs (the same output, still in bf16)", ", ".join(seen),
                    "/".join(map(str, sizes)))
    return list(seen)


def _strided_same_width(module: nn.Module) -> bool:
    """A plain Conv2d strided along the width whose width padding keeps a width-1 input one column wide."""
    if type(module) is not nn.Conv2d or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return False
    (kernel, stride, padding, dilation) = (module.kernel_size[1], module.stride[1], module.padding[1],
                                           module.dilation[1])
    return stride > 1 and kernel > 1 and 2 * padding == dilation * (kernel - 1)


def _width_one_inputs(backbone: nn.Module, convs: dict[str, nn.Module], crop_sizes: tuple[int, ...]
                      ) -> dict[str, set[int]]:
    """Which of ``convs`` get a width-1 input, and at which crop sizes: one forward per size, batch 2."""
    hit: set[str] = set()

    def record(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if args[0].shape[-1] == 1:
                hit.add(name)
        return hook

    seen: dict[str, set[int]] = {}
    hooks = [conv.register_forward_pre_hook(record(name)) for name, conv in convs.items()]
    was_training = backbone.training
    try:
        backbone.eval()  # no BatchNorm statistics updated
        with torch.no_grad():
            for size in sorted(set(crop_sizes)):
                hit.clear()
                backbone(torch.zeros(2, input_channels(backbone), size, size))  # (2, C, S, S)
                for name in hit:
                    seen.setdefault(name, set()).add(size)
    finally:
        backbone.train(was_training)
        for hook in hooks:
            hook.remove()
    return {name: seen[name] for name in convs if name in seen}  # in module order
