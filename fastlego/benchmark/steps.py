"""What one timed step of a mode is: `STEP_BUILDERS[mode](model, inputs, backend, device,
autocast_dtype) -> step()`.

- `infer`: a `torch.no_grad()` forward of the backbone.
- `train`: one training step: forward of `EDMPrecond` (every brick trained as a denoiser) + EDM
  loss (averaged over bricks) + backward + AdamW step, as `fastlego.training.TrainStep` runs it.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from .. import dispatch
from ..loss import EDMLoss
from ..train_step import TrainStep, adamw, make_capturable
from .config import TRAIN_LR
from .numerics import autocast


def infer_step(model, inputs, backend: str, device: torch.device, autocast_dtype) -> Callable[[], torch.Tensor]:
    def step():
        with torch.no_grad(), dispatch.use_backend(backend), autocast(device, autocast_dtype):
            return model(*inputs)
    return step


def train_step(net, inputs, backend: str, device: torch.device, autocast_dtype,
               cuda_graph: bool = False) -> Callable[[], torch.Tensor]:
    """One training step of `net` (an EDMPrecond, or torch.compile of one) on `inputs` =
    `make_train_inputs(...)`: forward + EDM loss under autocast, backward, AdamW step (fused on
    CUDA, the same in every variant; its state is created by the first step), as
    `fastlego.training.TrainStep` runs it: eagerly, or with `cuda_graph` captured after 3 eager
    steps and replayed. Returns the loss (detached; with a graph, the graph's tensor,
    overwritten by the next step). The step's `train_step` attribute is its TrainStep."""
    images, sigma, noise, labels = inputs
    opt = adamw([p for p in net.parameters() if p.requires_grad], device, lr=TRAIN_LR)
    make_capturable(opt, cuda_graph, device)
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)

    def body(images, sigma, noise, labels):
        with dispatch.use_backend(backend):
            with autocast(device, autocast_dtype, cache=not cuda_graph):
                loss, _ = loss_fn(net, images, sigma, noise, labels)
            loss.backward()
            opt.step()
        return loss.detach()

    run = TrainStep(body, opt, cuda_graph=cuda_graph)

    def step():
        return run(images, sigma, noise, labels)
    step.train_step = run
    return step


# mode -> builder(model, inputs, backend, device, autocast_dtype) -> step(); a train step counts
# 3x the forward's FLOPs (backward = 2 forwards).
STEP_BUILDERS: Dict[str, Callable] = {"infer": infer_step, "train": train_step}
FLOP_MULTIPLIER: Dict[str, int] = {"infer": 1, "train": 3}
