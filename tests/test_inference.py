"""fastest_path: every path it accepts keeps the eager fp32 outputs, a path that does not is refused, ``allowed``
restricts the choice, and the chosen path runs any batch size."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import unsupdistill.models.inference as inference
from unsupdistill.models.inference import REFERENCE, FrozenNetwork, fastest_path

CPU = torch.device("cpu")
SECONDS = 0.05
"""Timing budget of each choice, all paths together (each still runs at least once)."""
MIN_COSINE = 0.995


def tiny_net() -> nn.Module:
    """conv-BN-ReLU twice, pooled, then a linear layer (signed outputs, so a cosine says something)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for layer in net:
        if isinstance(layer, nn.BatchNorm2d):  # running statistics that are not the identity
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return net.eval()


NET = tiny_net()
BATCH = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def cosines(output: Tensor, reference: Tensor) -> Tensor:
    """Per-image cosine of two (B, ...) outputs, computed here, independently of the module under test."""
    return F.cosine_similarity(output.flatten(1).double(), reference.flatten(1).double(), dim=1)


def assert_keeps_outputs(run, batch: Tensor) -> None:
    with torch.no_grad():
        got, want = run(batch), NET(batch)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert cosines(got, want).min() >= MIN_COSINE


@pytest.mark.parametrize("name", list(inference.PATHS["cpu"]))
def test_every_accepted_path_keeps_the_eager_outputs(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # bf16 is a candidate only on a CPU with native bf16; emulated, it computes the same, slower
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    path = fastest_path(NET, BATCH, CPU, allowed=name, seconds=SECONDS)
    assert path.name == name, path.report  # forced: chosen when it keeps the outputs, and these all do
    assert path.cosine >= MIN_COSINE and path.images_per_s > 0
    for batch in (BATCH, BATCH[:1], BATCH[:3], torch.randn(13, 3, 32, 32)):  # the example's size, and others
        assert_keeps_outputs(path.run, batch)


def test_auto_chooses_an_accepted_path_and_names_every_candidate(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="unsupdistill.models.inference"):
        path = fastest_path(NET, BATCH, CPU, seconds=SECONDS)
    assert path.report in caplog.text
    for name in inference.PATHS["cpu"]:
        assert name in path.report
    assert path.name in inference.PATHS["cpu"]
    assert f"{path.name} refused" not in path.report and f"{path.name} skipped" not in path.report
    assert path.report.endswith(f"chose {path.name}")
    assert_keeps_outputs(path.run, BATCH)
    assert_keeps_outputs(path.run, torch.randn(5, 3, 32, 32))  # another batch size


def _noise(net: FrozenNetwork):
    return lambda x: torch.randn(len(x), 10)


def _close_but_not_enough(net: FrozenNetwork):
    """The eager output on the example with 25 % noise (cosine about 0.97), returned at once."""
    with torch.no_grad():
        out = net.module(net.example)
    out = out + 0.25 * out.std() * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    return lambda x: out


def _non_finite(net: FrozenNetwork):
    return lambda x: torch.full((len(x), 10), float("nan"))


def _wrong_shape(net: FrozenNetwork):
    return lambda x: torch.zeros(len(x), 11)


@pytest.mark.parametrize("broken, why", [(_noise, "cosine"), (_close_but_not_enough, "cosine"),
                                         (_non_finite, "non-finite"), (_wrong_shape, "output (8, 11), not (8, 10)")])
def test_a_path_that_does_not_keep_the_outputs_is_refused(monkeypatch: pytest.MonkeyPatch, broken, why: str) -> None:
    # each broken path returns at once, far faster than the network: only the check keeps it from being chosen
    monkeypatch.setitem(inference.PATHS["cpu"], "broken fp32", broken)
    path = fastest_path(NET, BATCH, CPU, allowed=[REFERENCE, "broken fp32"], seconds=SECONDS)
    assert path.name == REFERENCE
    assert f"broken fp32 refused ({why}" in path.report
    assert_keeps_outputs(path.run, BATCH)


def test_a_path_that_cannot_be_built_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def unbuildable(net: FrozenNetwork):
        raise ModuleNotFoundError("No module named 'onnxruntime'")

    monkeypatch.setitem(inference.PATHS["cpu"], "onnxruntime fp32", unbuildable)
    path = fastest_path(NET, BATCH, CPU, allowed=[REFERENCE, "onnxruntime fp32"], seconds=SECONDS)
    assert path.name == REFERENCE
    assert "onnxruntime fp32 skipped (ModuleNotFoundError: No module named 'onnxruntime')" in path.report


def test_allowed_eager_forces_the_reference_and_an_unknown_name_is_an_error() -> None:
    path = fastest_path(NET, BATCH, CPU, allowed="eager fp32", seconds=SECONDS)
    assert path.name == REFERENCE and path.cosine == 1.0
    assert "traced" not in path.report and "onnxruntime" not in path.report  # nothing else was built
    with torch.no_grad():
        torch.testing.assert_close(path.run(BATCH), NET(BATCH), rtol=0, atol=0)
    for allowed in ("tensorrt fp16", ["eager fp32", "tensorrt fp16"], []):
        with pytest.raises(ValueError, match="allowed values: auto, or any of eager fp32, ") as raised:
            fastest_path(NET, BATCH, CPU, allowed=allowed)
        for name in inference.PATHS["cpu"]:
            assert name in str(raised.value)


class BakedBatch(nn.Module):
    """Right in eager mode at any batch size; its trace bakes in the example's batch size (``int(...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).reshape(int(x.shape[0]), -1)


def test_a_traced_graph_that_fails_on_another_batch_size_runs_the_eager_module(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    module = BakedBatch().eval()
    path = fastest_path(module, BATCH, CPU, allowed="traced fp32", seconds=SECONDS)
    assert path.name == "traced fp32"
    small = BATCH[:4]
    with caplog.at_level(logging.WARNING, logger="unsupdistill.models.inference"), torch.no_grad():
        got = path.run(small)
        torch.testing.assert_close(got, module(small))
    assert "running the eager network for a batch of 4" in caplog.text
