"""What one timed step of a mode is: `STEP_BUILDERS[mode](model, inputs, backend, device,
autocast_dtype) -> step()`.

- `infer`: a `torch.no_grad()` forward of the backbone.
- `latency`: the same forward (one network call), timed at small batches.
- `train`: one training step: forward of `EDMPrecond` (every brick trained as a denoiser) + EDM
  loss (averaged over bricks) + backward + fused AdamW step (on CUDA), as
  `fastlego.training.TrainStep` runs it, eagerly or captured once as a CUDA graph.

`graph_infer_step` is the forward captured once with `torch.cuda.graph` and replayed (the
`fastlego_graph` and `compile_graph` forwards).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from .. import dispatch
from ..loss import EDMLoss
from ..train_step import TrainStep, adamw, make_capturable
from .config import TRAIN_LR
from .numerics import autocast


def infer_step(model, inputs, backend: str, device: torch.device, autocast_dtype,
               cache: bool = True) -> Callable[[], torch.Tensor]:
    """A `torch.no_grad()` forward of `model` on `inputs` under `backend` and autocast (its cast
    cache off with `cache=False`, as a CUDA-graph capture needs)."""
    def step():
        with torch.no_grad(), dispatch.use_backend(backend), autocast(device, autocast_dtype, cache=cache):
            return model(*inputs)
    return step


def graph_infer_step(model, inputs, backend: str, device: torch.device, autocast_dtype,
                     warmup: int = 3) -> Callable[[], torch.Tensor]:
    """The forward of `infer_step` captured once as a CUDA graph and replayed. The first call
    runs `warmup` eager forwards on a side stream (kernels compile, autotune and settle their
    dispatch decisions), captures one forward with `torch.cuda.graph` on the static `inputs`,
    and replays it; every later call replays. Returns the graph's output tensor, overwritten by
    the next call. `step.eager` is the same forward run eagerly (to record what it dispatches);
    `step.captured` says whether the graph exists. A capture that fails raises, saying why."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"a CUDA-graph forward needs a CUDA GPU (got device {device}): time the eager forward instead")
    eager = infer_step(model, inputs, backend, device, autocast_dtype, cache=False)
    state = {"graph": None, "out": None}

    def step():
        if state["graph"] is None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    eager()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = eager()
            except Exception as exc:
                torch.cuda.synchronize(device)
                raise RuntimeError(f"the forward could not be captured as a CUDA graph "
                                   f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc
            state["graph"], state["out"] = graph, out
            step.captured = True
        state["graph"].replay()
        return state["out"]
    step.eager = eager
    step.captured = False
    return step


def train_step(net, inputs, backend: str, device: torch.device, autocast_dtype,
               cuda_graph: bool = False) -> Callable[[], torch.Tensor]:
    """One training step of `net` (an EDMPrecond, or torch.compile of one) on `inputs` =
    `make_train_inputs(...)`: forward + EDM loss under autocast, backward, AdamW step (fused on
    CUDA, the same in every variant, capturable with `cuda_graph`; its state is created by the
    first step), as
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
STEP_BUILDERS: Dict[str, Callable] = {"infer": infer_step, "latency": infer_step, "train": train_step}
FLOP_MULTIPLIER: Dict[str, int] = {"infer": 1, "latency": 1, "train": 3}
