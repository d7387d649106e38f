"""Inputs and comparisons shared by the kernel test files (tests/test_kernel_*.py).

Rule of every comparison: the kernel's output (written into a NaN-filled `out=`, or allocated by a
launcher whose torch.empty is NaN-filled, `poisoned_empty`) against the reference op in float64,
with the error bound 2 x (error of the reference op run in the kernel's dtype) + a small atol.
Inputs: tokens with a non-zero mean (LN must remove it), per-image shift/scale/gate ~ N(0, 1)
taken as chunks of a (B, 6D) adaLN output (strided, never copied), weights U(+-sqrt(3/K)),
biases ~ N(0, 0.1^2), all non-zero.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlego
from fastlego import dispatch
from fastlego import reference as R
from fastlego.testing import assert_close_to_reference

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand64(shape, g, scale=1.0, offset=0.0):
    """float64 N(offset, scale^2) values."""
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset


def f64(args):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in args]


def nan_out(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled tensors, so an element a kernel fails to write
    shows up as NaN (the launchers allocate their outputs with them)."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype in FLOATS else t

    def empty_like(*args, **kwargs):
        t = real_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype in FLOATS else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def check_piece(got, ref64, same, dtype, what, rel=1e-5):
    """A backward piece's output against its float64 reference; `same` (the reference in the
    kernel's dtype) sets the bound for 16-bit dtypes."""
    atol = rel * max(1.0, ref64.abs().max().item())
    assert_close_to_reference(got.double(), ref64, None if dtype == torch.float32 else same.double(),
                              atol=atol, what=what)


def forced_reasons(op, *args):
    """The reasons the forced triton backend gives for a call (empty: it takes the call)."""
    with fastlego.use_backend("triton"):
        try:
            dispatch.choose(op, *args)
        except fastlego.BackendNotSupported as exc:
            return str(exc)
    return ""


# --------------------------------------------------------------------------------------------
# The two matmul ops: modulated_linear and linear_gated_residual
# --------------------------------------------------------------------------------------------

def linear_weights(n_out, k, dtype, device, g):
    w = (torch.rand(n_out, k, generator=g) * 2 - 1) * math.sqrt(3.0 / k)
    b = torch.randn(n_out, generator=g) * 0.1
    return w.to(device, dtype), b.to(device, dtype)


def adaln_chunks(B, D, dtype, device, g):
    """shift1, scale1, gate1, shift2, scale2, gate2: strided (B, D) views of one (B, 6D) tensor."""
    return (torch.randn(B, 6 * D, generator=g)).to(device, dtype).chunk(6, dim=1)


def modulated_inputs(B, L, T, D, n_out, dtype, device="cpu", seed=0):
    g = gen(seed)
    h = (torch.randn(B * L, T, D, generator=g) * 1.5 + 0.7).to(device, dtype)
    shift, scale = adaln_chunks(B, D, dtype, device, g)[:2]
    w, b = linear_weights(n_out, D, dtype, device, g)
    return h, shift, scale, w, b


def gated_inputs(B, L, T, K, N, dtype, device="cpu", seed=0):
    g = gen(seed)
    a = torch.randn(B * L, T, K, generator=g).to(device, dtype)
    residual = torch.randn(B * L, T, N, generator=g).to(device, dtype)
    gate = adaln_chunks(B, N, dtype, device, g)[2]
    w, b = linear_weights(N, K, dtype, device, g)
    return a, w, b, gate, residual


def gemm_atol(ref, dtype):
    scale = max(1.0, ref.abs().max().item())
    return scale * (1e-5 if dtype == torch.float32 else 1e-3)


def check_modulated(h, shift, scale, w, b, act, launcher, **kw):
    out = nan_out(h.shape[:-1] + (w.shape[0],), h.dtype, h.device)
    got = launcher(h, shift, scale, w, b, act, out=out, **kw)
    assert got is out
    ref = R.modulated_linear(*f64([h, shift, scale, w, b]), act)
    same = R.modulated_linear(h, shift, scale, w, b, act)
    assert_close_to_reference(out, ref, same, atol=gemm_atol(ref, h.dtype), what=f"modulated_linear {h.dtype} {act}")


def check_gated(a, w, b, gate, residual, launcher, **kw):
    out = nan_out(residual.shape, residual.dtype, residual.device)
    got = launcher(a, w, b, gate, residual, out=out, **kw)
    assert got is out
    ref = R.linear_gated_residual(*f64([a, w, b, gate, residual]))
    same = R.linear_gated_residual(a, w, b, gate, residual)
    assert_close_to_reference(out, ref, same, atol=gemm_atol(ref, a.dtype), what=f"linear_gated_residual {a.dtype}")


def config_case(index, dtype, layout):
    """(GEMM_CONFIGS[index], (B, L, T)) for a test of one tile config explicitly (autotuning alone
    would only ever run the fastest): 512 rows per image ("aligned": every tile in one image) or
    84 ("straddle"); skipped where the autotuner prunes the config for `dtype`."""
    from fastlego.kernels import gemm

    config = gemm.GEMM_CONFIGS[index]
    if not gemm.config_fits(config, dtype.itemsize, dtype.itemsize):
        pytest.skip("config pruned for this dtype (shared memory)")
    return config, ((2, 1, 512) if layout == "aligned" else (3, 21, 4))


# (B, L, T): rows per image L * T vs the interpreter's BLOCK_M = 16
CPU_LAYOUTS = {
    "straddle": (2, 5, 4),     # 20 rows per image: tiles cross images (gathered shift/scale/gate)
    "aligned": (2, 2, 16),     # 32 rows per image: every tile in one image (vector loads)
    "one_image": (1, 1, 40),   # B = 1, M = 40 not a multiple of 16
}
# (B, L, T): rows per image 300 / 20 / 256 / 64; M = 300 / 60 / 768 / 192
CUDA_LAYOUTS = {"B1_T300": (1, 1, 300), "B3_L5_T4": (3, 5, 4), "B3_T256": (3, 1, 256), "B3_L16_T4": (3, 16, 4)}
CPU_DTYPES = [torch.float32, torch.float16]
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (device, dtype) of the row-wise kernels' tests: the interpreter's dtypes on the CPU, every dtype
# on a GPU (cuda-marked)
DEVICE_DTYPES = [("cpu", dt) for dt in CPU_DTYPES] + [pytest.param("cuda", dt, marks=pytest.mark.cuda)
                                                      for dt in CUDA_DTYPES]
