"""Numeric settings a benchmark runs under (TF32, autocast) and small dtype helpers."""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """"bfloat16" for torch.bfloat16 (None stays None): how dtypes are written in a report."""
    return None if dtype is None else str(dtype).replace("torch.", "")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def precision(device, tf32: bool = True):
    """TF32 for fp32 matmuls and convolutions on or off inside the block (restored after): the
    switches the reference ops and, for their fp32 dots, the kernels follow
    (`fastlego.kernels.policy.tf32`)."""
    from ..kernels.policy import tf32 as tf32_switches
    return tf32_switches(tf32)


def autocast(device: torch.device, dtype: Optional[torch.dtype], cache: bool = True):
    """torch.autocast on `device`'s type in `dtype`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||out - ref|| / ||ref|| in fp64 (inf when out is not finite)."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
