"""An exponential moving average of a network: DINO's momentum teacher, distillation's EMA student."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(model: nn.Module, ema: nn.Module, momentum: float) -> None:
    """``ema``'s parameters <- ``momentum`` * themselves + (1 - ``momentum``) * ``model``'s (DINO's teacher update).

    lightly's ``update_momentum`` does the same one parameter at a time; one ``_foreach_lerp_`` over all of them
    does it in a few kernels (the two networks have the same architecture, so their parameters pair up in order).
    """
    targets = list(ema.parameters())
    sources = [p.detach() for p in model.parameters()]
    if len(targets) != len(sources):
        raise ValueError(f"EMA network has {len(targets)} parameters, the network it follows {len(sources)}")
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)
