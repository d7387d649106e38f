"""EDM's training loss (Karras et al. 2022), the objective `fastlego train` minimises.

For an image y, `sigma = exp(P_mean + P_std * u)` with u ~ N(0, 1), `n = sigma * N(0, I)`, and
the loss is `lambda(sigma) * |D(y + n; sigma) - y|^2` with
`lambda = (sigma^2 + s_d^2) / (sigma * s_d)^2`, which makes the effective training target of
the raw backbone unit-variance at every sigma. When the network returns one denoiser per brick
(`train_intermediate_stages`, the release's choice) the loss is the average over bricks. Patch
Diffusion training (`fastlego.patch_diffusion`) applies it unchanged to crops, passing the crops'
coordinates and the last brick that tiles them as network arguments (`coords`,
`return_stage_idx`): the average is then over the bricks that ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn


@dataclass(frozen=True)
class EDMLoss:
    """EDM's loss: log-normal sigmas (P_mean, P_std) and the weight that whitens the target."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def sigma(self, normal: torch.Tensor) -> torch.Tensor:
        """sigma = exp(P_mean + P_std * u) for standard-normal draws u."""
        return (normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + s_d^2) / (sigma * s_d)^2 = 1 / c_out(sigma)^2."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net: nn.Module, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 labels: Optional[torch.Tensor] = None, **net_kwargs):
        """(loss, per_brick): the batch mean of `lambda * (D(y + sigma*noise; sigma) - y)^2`.

        images (B, C, H, W) in [-1, 1]; sigma (B,); noise (B, C, H, W) standard normal. When the
        network returns one output per brick, `loss` averages the bricks and `per_brick` lists
        each brick's loss (detached); otherwise `per_brick` holds the one loss."""
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        weight = self.weight(sigma)
        y = images.to(torch.float32)
        D = net(y + noise * sigma, sigma.flatten(), labels, **net_kwargs)
        outputs = D if isinstance(D, (list, tuple)) else [D]
        losses = [(weight * (d.to(torch.float32) - y) ** 2).mean() for d in outputs]
        loss = torch.stack(losses).mean()
        return loss, [l.detach() for l in losses]
