"""Helpers for equivalence tests and benchmarks: random non-zero weights, the tolerance rule.

A freshly initialised LEGO outputs exactly zero (adaLN-Zero), so every comparison of two
implementations must first randomise EVERY parameter; `randomize_` does that.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Fill every parameter (position tables included) with non-zero values of a sane size:
    weights ~ U(+-sqrt(3/fan_in)) (unit-variance outputs), biases and 1-D tensors ~ N(0, 0.1^2)
    shifted away from zero. Deterministic for a seed, whatever the device."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2 and not name.endswith("pos_embed"):
            fan_in = math.prod(p.shape[1:])
            bound = scale * math.sqrt(3.0 / fan_in)
            v = (torch.rand(p.shape, generator=g) * 2 - 1) * bound
        else:
            v = torch.randn(p.shape, generator=g) * 0.1 * scale
        v = torch.where(v.abs() < 1e-4, torch.full_like(v, 1e-3), v)
        p.copy_(v.to(p.dtype))
    return module


def max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in float64; inf if a holds NaN or inf, or the difference is not finite."""
    a64, r64 = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a64).all():
        return math.inf
    if not a64.numel():
        return 0.0
    err = (a64 - r64).abs().max().item()
    return err if math.isfinite(err) else math.inf


def assert_close_to_reference(out: torch.Tensor, ref_fp32: torch.Tensor, same_dtype_torch: Optional[torch.Tensor] = None,
                              atol: float = 1e-5, factor: float = 2.0, what: str = "output") -> None:
    """The flash-attn rule: |out - ref| <= factor * |torch_same_dtype - ref| + atol, NaN never passes.

    `ref_fp32` is the reference op in fp32 (or fp64); `same_dtype_torch` is the reference op run in
    the kernel's dtype (omit it for fp32 kernels, where the bound is just `atol`). The bound is
    never infinite: a reference, or a same-dtype baseline, that overflowed (inf or NaN) fails the
    check instead of letting every finite output pass; choose inputs where both are finite."""
    assert out.shape == ref_fp32.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref_fp32.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (unwritten or broken elements)"
    assert math.isfinite(atol) and math.isfinite(factor) and atol >= 0 and factor >= 0, \
        f"{what}: atol {atol} and factor {factor} must be finite and >= 0"
    assert torch.isfinite(ref_fp32).all(), f"{what}: the reference holds inf or NaN: it bounds nothing; choose inputs it computes"
    err = max_error(out, ref_fp32)
    base = max_error(same_dtype_torch, ref_fp32) if same_dtype_torch is not None else 0.0
    assert math.isfinite(base), (f"{what}: the same-dtype PyTorch baseline's error is {base} (it overflowed or holds "
                                 f"NaN), which would let any output pass: choose inputs where it stays finite")
    bound = factor * base + atol
    assert math.isfinite(bound), f"{what}: tolerance bound {bound} is not finite"
    assert err <= bound, f"{what}: max error {err:.3e} > {factor} x PyTorch same-dtype error {base:.3e} + atol {atol:.1e}"
