"""EDM's exponential moving average of the weights (Karras et al. 2022): the network that samples.

The EMA's decay per step comes from a half-life counted in training images (so it does not
depend on the batch size): after `halflife` images an old weight's share has halved, i.e.
`beta = 0.5 ** (batch_size / halflife)`. Early in a run the half-life is capped at
`rampup * images seen so far`, so the average forgets the random initialisation quickly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def ema_beta(batch_size: int, nimg: int, halflife_kimg: float, rampup: Optional[float]) -> float:
    """EDM's EMA decay per step: half-life in images, capped by `rampup * nimg` early on."""
    halflife = halflife_kimg * 1000
    if rampup is not None:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net for trained parameters; everything else copied."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), net.parameters())]
    trained = [(e, p) for e, p in pairs if p.requires_grad]
    if trained:
        torch._foreach_lerp_([e for e, _ in trained], [p.detach() for _, p in trained], 1.0 - beta)
    for e, p in pairs:
        if not p.requires_grad:
            e.copy_(p)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)
