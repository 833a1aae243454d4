"""The training step's parts: gradient clipping (per parameter or in total), the EMA update and the optimizer."""

import pytest
import torch
from conftest import randn
from lightly.models.utils import update_momentum
from torch import nn

from unsupdistill.config import OptimConfig
from unsupdistill.models.ema import update_ema
from unsupdistill.train.optimizer import build_optimizer, clip_gradients


def test_per_parameter_clipping_bounds_every_gradient():
    layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    grads = [randn(*p.shape, seed=i) * (10.0 if i % 2 else 0.01) for i, p in enumerate(layers.parameters())]
    for p, g in zip(layers.parameters(), grads):
        p.grad = g.clone()
    params = list(layers.parameters())
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    clip_gradients(params, OptimConfig(clip_grad=3.0, clip_mode="per_param"), total)
    for p, g in zip(params, grads):
        norm = g.norm().item()
        assert p.grad.norm().item() == pytest.approx(min(norm, 3.0), rel=1e-4)  # large ones cut, small ones kept
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_gradients(params, OptimConfig(clip_grad=3.0, clip_mode="total"), total)
    assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(3.0, rel=1e-4)


def test_ema_update_matches_lightly_and_the_optimizer_is_fused():
    torch.manual_seed(0)
    student, ours, theirs = (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)) for _ in range(3))
    theirs.load_state_dict(ours.state_dict())
    before = [p.clone() for p in ours.parameters()]
    update_ema(student, ours, 0.9)
    update_momentum(student, theirs, 0.9)  # lightly's, one parameter at a time
    for mine, reference, old, s in zip(ours.parameters(), theirs.parameters(), before, student.parameters()):
        torch.testing.assert_close(mine, reference)
        torch.testing.assert_close(mine, 0.9 * old + 0.1 * s)
    with pytest.raises(ValueError, match="parameters"):
        update_ema(student, nn.Linear(4, 8), 0.9)
    optimizer = build_optimizer(OptimConfig(), student)
    assert optimizer.defaults["fused"]  # one kernel per step, not a Python loop over parameters
