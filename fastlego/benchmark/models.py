"""The networks and inputs a workload runs: random non-zero weights, random inputs."""

from __future__ import annotations

import copy
from typing import Tuple

import torch
import torch.nn.functional as F

from ..edm import EDMPrecond
from ..loss import EDMLoss
from ..model import LegoBackbone
from ..testing import randomize_
from .config import TRAIN_INIT_SCALE, Case


def build_model(case: Case, device, seed: int = 0) -> LegoBackbone:
    """The preset in eval mode, fp32, every parameter random and non-zero."""
    with torch.device(device):
        model = LegoBackbone.from_preset(case.preset, **case.model_kwargs())
    return randomize_(model.eval(), seed=seed)


def _one_hot_labels(case: Case, g: torch.Generator):
    """One-hot labels of random classes, or None when the workload is unconditional."""
    if not case.label_dim:
        return None
    return F.one_hot(torch.randint(0, case.label_dim, (case.batch,), generator=g), case.label_dim).float()


def make_inputs(case: Case, device, seed: int = 0, dtype=torch.float32) -> tuple:
    """(x, timesteps, class_labels): Gaussian images, EDM timesteps log(sigma)/4 with
    ln(sigma) ~ N(-1.2, 1.2^2), one-hot labels of random classes (None when unconditional)."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.input_shape, generator=g)
    t = (-1.2 + 1.2 * torch.randn(case.batch, generator=g)) / 4
    y = _one_hot_labels(case, g)
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), t.to(device), cast(y)


def build_train_net(case: Case, device, seed: int = 0, scale: float = TRAIN_INIT_SCALE) -> EDMPrecond:
    """`EDMPrecond` around the preset (`train_intermediate_stages=True`: one output per brick, the
    release's joint loss), fp32, in training mode, every parameter random and non-zero."""
    kw = {} if case.depths is None else {"depths": list(case.depths)}
    with torch.device(device):
        net = EDMPrecond(case.resolution, case.in_channels, label_dim=case.label_dim, model_type=case.preset,
                         train_intermediate_stages=True, **kw)
    return randomize_(net, seed=seed, scale=scale).train()


def make_train_inputs(case: Case, device, seed: int = 0, loss: EDMLoss = EDMLoss()) -> tuple:
    """(images, sigma, noise, labels) of one training step: images ~ U(-1, 1) (the data range),
    EDM's log-normal sigmas, Gaussian noise, one-hot labels of random classes (None when
    unconditional). The same batch every step (drawing new ones costs nothing measurable)."""
    g = torch.Generator().manual_seed(seed + 2)
    images = torch.rand(case.input_shape, generator=g) * 2 - 1
    sigma = loss.sigma(torch.randn(case.batch, generator=g))
    noise = torch.randn(case.input_shape, generator=g)
    labels = _one_hot_labels(case, g)
    return tuple(None if v is None else v.to(device) for v in (images, sigma, noise, labels))


def bf16_copy(model: LegoBackbone, inputs: tuple) -> Tuple[LegoBackbone, tuple]:
    """The model with its weights in bf16, and the inputs with x and the labels in bf16."""
    cast = lambda v: None if v is None else (v.to(torch.bfloat16) if v.is_floating_point() and v.dim() > 1 else v)  # noqa: E731
    return copy.deepcopy(model).to(torch.bfloat16), tuple(cast(v) for v in inputs)
