"""Mixed precision: the autocast dtype, and the workaround for oneDNN's bf16 weight gradient of a convolution
strided along the width of a width-1 input, which reads memory it never wrote."""

import ctypes
import logging
import math

import pytest
import torch
from conftest import TINY, read_metrics
from safetensors.torch import load_file
from torch import nn

from unsupdistill.config import ConfigError, ModelConfig, load_config
from unsupdistill.methods import train
from unsupdistill.models.backbone import create_backbone, rebuild_backbone
from unsupdistill.train import precision
from unsupdistill.train.precision import WidthOneConv2d, avoid_cpu_bf16_faults, resolve_precision

M_PERTURB = -6  # glibc mallopt: fill every block malloc hands out with this byte ^ 0xff
CPU = torch.device("cpu")


@pytest.fixture
def poisoned_heap():
    """While the test runs, every block glibc's malloc hands out holds 0x7f bytes (fp32 3.4e38), so a kernel
    that reads memory it never wrote gives huge or Inf values every time, not only when the heap happened to
    hold garbage (which made the training failure come and go)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or not mallopt(M_PERTURB, 0x80):
        pytest.skip("needs glibc's mallopt(M_PERTURB) to make reads of uninitialised memory reproducible")
    yield
    mallopt(M_PERTURB, 0)


def test_width_one_conv_gives_the_exact_bf16_weight_gradient_on_a_width_1_input(poisoned_heap, monkeypatch):
    """What the workaround is for: a ResNet's 3x3/2 convolution on a 1x1 input, in bf16, channels-last, run as
    WidthOneConv2d, gets the exact weight gradient (8 at the centre tap, 0 at the taps that only see padding), with
    the heap poisoned, because the kernel runs with width stride 1. oneDNN's native bf16 kernel (on CPUs with
    AVX-512 BF16 or AMX) left those taps uninitialised (Inf here) at width stride 2; a CPU that emulates bf16
    computes them right at either stride, so there the stride the kernel gets is what shows the workaround."""
    strides = []
    conv2d = torch.nn.functional.conv2d

    def spy(input, weight, bias=None, stride=1, *args):
        strides.append((tuple(input.shape[-2:]), tuple(stride) if isinstance(stride, tuple | list) else stride))
        return conv2d(input, weight, bias, stride, *args)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    exact = torch.zeros(32, 16, 3, 3)
    exact[:, :, 1, 1] = 8.0
    for dtype in (torch.bfloat16, torch.float32):
        conv = WidthOneConv2d(16, 32, 3, stride=2, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.fill_(0.01)
        conv = conv.to(dtype=dtype, memory_format=torch.channels_last)
        x = torch.ones(8, 16, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)  # (N, C, 1, 1)
        out = conv(x)  # (N, 32, 1, 1): one output pixel, as the strided nn.Conv2d gives
        assert out.shape == (8, 32, 1, 1)
        out.sum().backward()
        assert torch.equal(conv.weight.grad.float(), exact), dtype
    assert strides == [((1, 1), (2, 1))] * 2  # width stride 1 on the 1-px-wide input
    conv(torch.ones(8, 16, 4, 4, dtype=torch.float32).contiguous(memory_format=torch.channels_last))
    assert strides[-1] == ((4, 4), (2, 2))  # wider inputs: the convolution's own stride


def test_width_one_conv_computes_what_the_strided_conv_does():
    """Same outputs and gradients as nn.Conv2d, on width-1 inputs (1x1, 4x1) and on wider ones, in fp32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    safe = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    safe.load_state_dict(conv.state_dict())
    safe.__class__ = WidthOneConv2d
    assert list(safe.state_dict()) == list(conv.state_dict())
    for shape in [(4, 6, 1, 1), (4, 6, 4, 1), (4, 6, 5, 5)]:
        x = torch.randn(shape)
        outputs = [module(x) for module in (conv, safe)]
        assert outputs[0].shape == outputs[1].shape
        torch.testing.assert_close(outputs[1], outputs[0])
        grads = [torch.autograd.grad(y.square().sum(), module.parameters()) for y, module in zip(outputs, (conv, safe))]
        for got, expected in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("small_image_stem", "sizes", "expected"), [
    (False, (16, 8), ["layer3.0.conv1", "layer4.0.conv1"]),  # the ImageNet stem on the digits' crops
    (False, (32, 16), ["layer4.0.conv1"]),
    (False, (224, 96), []),  # photo-sized crops: no feature map is 1 px wide
    (True, (16, 8), []),  # the default CIFAR stem: nothing changes
])
def test_only_the_convolutions_that_see_width_1_inputs_change(caplog, small_image_stem, sizes, expected):
    model = ModelConfig(backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8},
                        small_image_stem=small_image_stem)
    backbone, _ = create_backbone(model)
    names = list(backbone.state_dict())
    with caplog.at_level(logging.INFO, logger="unsupdistill.train.precision"):
        assert avoid_cpu_bf16_faults(backbone, sizes, torch.bfloat16, CPU) == expected
    assert [name for name, m in backbone.named_modules() if isinstance(m, WidthOneConv2d)] == expected
    assert list(backbone.state_dict()) == names and backbone.training
    assert all(name in caplog.text for name in expected) and ("oneDNN" in caplog.text) == bool(expected)
    fresh, _ = create_backbone(model)
    assert avoid_cpu_bf16_faults(fresh, sizes, None, CPU) == []  # fp32: the kernel is right
    assert avoid_cpu_bf16_faults(fresh, sizes, torch.bfloat16, torch.device("cuda")) == []


def test_imagenet_stem_resnet_trains_in_bf16_on_cpu_with_finite_gradients(tmp_path, caplog, poisoned_heap):
    """precision=bf16 on CPU with the ImageNet stem on the digits' 16/8-px crops: 20 steps, every gradient
    norm finite. Before the workaround this failed at step 2 with the heap poisoned (in 1 to 4 steps without)."""
    out = tmp_path / "run"
    config = load_config(None, [*TINY, "model.small_image_stem=false", "train.precision=bf16", "train.device=cpu",
                                "train.max_steps=20", "train.log_every_steps=1"])
    with caplog.at_level(logging.INFO, logger="unsupdistill.train.precision"):
        train(config, out)
    assert "layer3.0.conv1, layer4.0.conv1" in caplog.text and "bf16" in caplog.text
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(math.isfinite(m["grad_norm"]) for m in metrics), [m["grad_norm"] for m in metrics]
    # the export is the plain timm network: same parameter names, nothing of the workaround in it
    backbone = rebuild_backbone(create_backbone(config.model)[1])
    backbone.load_state_dict(load_file(out / "backbone.safetensors"), strict=True)
    assert not any(isinstance(m, WidthOneConv2d) for m in backbone.modules())


def test_resolve_precision(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # oneDNN would emulate bf16: 6x slower
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("fp32", CPU) is None
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_precision("fp16", CPU)
