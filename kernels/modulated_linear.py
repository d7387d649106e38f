"""LayerNorm + adaLN modulate + Linear [+ tanh-GELU], the forward of the `modulated_linear` op
(twin of `fastlego.reference.modulated_linear`): a DiT block's qkv (N = 3D, no activation) and
fc1 (N = 4D, tanh-GELU), K = D.

  modulated_linear(h, shift, scale, W, bias, act) = act((LN(h) * (1 + scale[img]) + shift[img]) @ W^T + bias)

Layout and tiles: see `kernels/gemm.py` (h seen as M rows, per-image shift/scale (B, K) chunks
of the adaLN output, any strides, never copied).

Two paths, chosen per shape by `fastlego.tuning.lookup` (measured by `fastlego.tune`; untuned
shapes and deterministic mode take the fixed rule: cuBLAS on CUDA, the fused GEMM under the
interpreter). Nothing here times or syncs, so a call is the same in eager, in a CUDA-graph capture
and on every DDP rank:
(a) fused: `_row_stats_kernel` computes mean and rstd of every row of h in fp32 (one read of h,
    `row_mean_m2`), then `_modulated_linear_kernel`, a tiled GEMM whose prologue normalises and
    modulates each A tile as it is loaded, a = (x * rstd - mean * rstd) * (1 + scale[img, k]) +
    shift[img, k] in fp32, rounded to the MMA dtype (as the reference rounds LN's output before
    F.linear), so the modulated activations are never written to memory. Epilogue: + bias,
    tanh-GELU in fp32, one store in the output dtype. For large h the statistics are not computed
    inside the GEMM: each of the N / BLOCK_N tiles of a row block would re-read its A rows before
    the pipelined main loop, more than the statistics kernel's one read of h (that read disappears
    only if the producer of h emits per-tile partial (mean, M2) in its epilogue, an op-signature
    change). For small h (a batch of one or two, or where `fastlego.tune` measured it faster) they
    are: the re-reads hit L2 and cost less than the statistics kernel's launch, and a small-batch
    forward is a chain of launches (`stats_in_kernel` decides: `fastlego.tune`'s measurement,
    else a size rule).
(b) `modulated_linear_cublas`: one LN-modulate pass (`layernorm_modulate`) writes the modulated
    activations (M x K, MMA dtype), cuBLAS does matmul + bias (+ GELU through cublasLt's
    epilogue): 2 x M x K more elements moved than (a), but cuBLAS's GEMM. Where the prologue's
    normalise-and-modulate between the A loads and the MMAs costs more than that pass, (b) wins
    (bench/RESULTS.md has the measurements).

Precision: `kernels/policy.py` (fp32 dots IEEE or 3xTF32; under autocast the MMA runs in the
autocast dtype with W cast to it, as F.linear does; LN statistics and modulation stay fp32, as
autocast's layer_norm). Output dtype = the reference's: the compute dtype. The elementwise math
differs from the reference only by rounding fewer times (the reference rounds LN, the
modulation, F.linear's output and GELU's input each to the activation dtype).

The launchers are the forward: called directly with autograd recording a grad-requiring input they
refuse. Training runs them inside `fastlego.custom_ops`, whose backward recomputes A with
`layernorm_modulate` and uses `layernorm_modulate_backward` (and, for the MLP,
`gelu_tanh_backward`) with cuBLAS for dA and dW.

Cost (bf16, 2 bytes/element; minimum bytes = read h + write out + read W, the per-image tables
are kilobytes; path (a)'s statistics read h once more, 2 M K bytes). lego_S_PG_64 at B = 256,
64 x 64, D = 384, M = 262,144 rows in the r=4 and r=64 bricks:
    qkv  K 384 x N 1,152: 231.9 GFLOP, 806 MB, 288 FLOP/B;   statistics read of h: 201 MB
    fc1  K 384 x N 1,536: 309.2 GFLOP, 1008 MB, 307 FLOP/B
lego_XL_U_32 at B = 128, D = 1152, M = 32,768 in the r=32 and r=4 bricks:
    qkv  K 1,152 x N 3,456: 260.9 GFLOP, 310 MB, 842 FLOP/B; statistics read of h: 75 MB
    fc1  K 1,152 x N 4,608: 347.9 GFLOP, 388 MB, 896 FLOP/B
Against a Hopper ridge of ~200 FLOP/byte (bf16 tensor cores over HBM), XL's matmuls are firmly
compute bound (the prologue math must hide under the MMAs); S's are only ~1.5x above the ridge,
so every extra pass over h (the statistics read, or path (b)'s write + re-read of A) shows.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlego import tuning

from .gelu import gelu_tanh
from .gemm import gemm_variants, grouped_tile, launch_gemm, load_k_step, shape_key, tile_rows_cols, tuning_configs
from .layernorm_modulate import _layernorm_modulate, row_mean_m2
from .policy import (LN_EPS, cast_weight, cdiv, compute_dtype, dot_precision, launch_problems, linear_problems,
                     modulate_problems, next_power_of_2, out_problems, raise_if, rows, triton_reasons)
from .rows import stats_blocks

_ACTIVATIONS = {None: 0, "gelu_tanh": 1}
# Path (a) computes LN's row statistics inside the GEMM, untuned, for h up to this size (see
# stats_in_kernel); `fastlego.tune` times both ways for h up to STATS_IN_GEMM_TUNE_BYTES.
STATS_IN_GEMM_MAX_BYTES = 1 << 20
STATS_IN_GEMM_TUNE_BYTES = 16 << 20


@triton.jit
def _row_stats_kernel(x_ptr, mean_ptr, rstd_ptr, M, K, stride_xm, stride_xk, eps,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """mean[m], rstd[m] (fp32) of the M rows of x (M, K): the LayerNorm statistics of path (a)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    mean, m2 = row_mean_m2(x_ptr, rows.to(tl.int64) * stride_xm, row_mask, K, stride_xk, BLOCK_ROWS, BLOCK_K)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["M", "rows_per_image", "M_BUCKET"])
def _modulated_linear_kernel(
    h_ptr, mean_ptr, rstd_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, rows_per_image, eps,
    stride_hm, stride_hk,                        # h seen as (M, K)
    stride_shift_b, stride_shift_k, stride_scale_b, stride_scale_k,
    stride_wn, stride_wk,                        # W (N, K)
    stride_bias, stride_om, stride_on,           # out seen as (M, N)
    M_BUCKET,                                    # next power of two of M: an autotune key only
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TILE_IN_ONE_IMAGE: tl.constexpr, EVEN_K: tl.constexpr, STATS_IN_KERNEL: tl.constexpr,
):
    """out = act((LN(h) * (1 + scale[img]) + shift[img]) @ W^T + bias), LN from precomputed
    mean/rstd, or with STATS_IN_KERNEL from a first pass over the tile's rows (mean_ptr and
    rstd_ptr unused); the modulated A tile exists only in registers."""
    mma_dtype = w_ptr.dtype.element_ty
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tile_m = pid_m * BLOCK_M
    offs_m = tile_m + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_m, cols = tile_rows_cols(offs_m, offs_n, tile_m, M, N)
    rows = tile_m + local_m
    tile_base = tile_m.to(tl.int64)   # 64-bit row offset of the tile, 32-bit offsets inside it

    # Per-row LN statistics, folded so that LN(x) = x * rstd - mean * rstd (one FMA per element).
    if STATS_IN_KERNEL:   # the tile's rows (clamped: all valid) read once more, in BLOCK_K chunks
        mean, m2 = row_mean_m2(h_ptr + tile_base * stride_hm, local_m * stride_hm, local_m >= 0, K, stride_hk,
                               BLOCK_M, BLOCK_K)
        rstd = 1.0 / tl.sqrt(m2 / K + eps)
        mean_rstd = mean * rstd
    else:
        rstd = tl.load(rstd_ptr + rows)
        mean_rstd = tl.load(mean_ptr + rows) * rstd
    if TILE_IN_ONE_IMAGE:
        img = tile_m // rows_per_image                          # one image for the whole tile
        shift_base = shift_ptr + img * stride_shift_b
        scale_base = scale_ptr + img * stride_scale_b
    else:
        img = rows // rows_per_image                            # (BLOCK_M,) image of each row
        shift_base = shift_ptr + img[:, None] * stride_shift_b
        scale_base = scale_ptr + img[:, None] * stride_scale_b

    h_rows = h_ptr + tile_base * stride_hm + local_m[:, None] * stride_hm    # (BLOCK_M, 1)
    w_cols = w_ptr + cols[None, :] * stride_wn                                # (1, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # past K: x = 0 and W = 0, so whatever the modulation makes of x, the product is 0
        x, w = load_k_step(h_rows, w_cols, offs_k, K, stride_hk, stride_wk, EVEN_K)
        if TILE_IN_ONE_IMAGE:
            if EVEN_K:
                sc = tl.load(scale_base + offs_k * stride_scale_k)
                sh = tl.load(shift_base + offs_k * stride_shift_k)
            else:
                sc = tl.load(scale_base + offs_k * stride_scale_k, mask=offs_k < K, other=0.0)
                sh = tl.load(shift_base + offs_k * stride_shift_k, mask=offs_k < K, other=0.0)
            one_plus_scale = 1.0 + sc.to(tl.float32)[None, :]
            shift = sh.to(tl.float32)[None, :]
        else:
            if EVEN_K:
                sc = tl.load(scale_base + offs_k[None, :] * stride_scale_k)
                sh = tl.load(shift_base + offs_k[None, :] * stride_shift_k)
            else:
                sc = tl.load(scale_base + offs_k[None, :] * stride_scale_k, mask=(offs_k < K)[None, :], other=0.0)
                sh = tl.load(shift_base + offs_k[None, :] * stride_shift_k, mask=(offs_k < K)[None, :], other=0.0)
            one_plus_scale = 1.0 + sc.to(tl.float32)
            shift = sh.to(tl.float32)
        normed = x.to(tl.float32) * rstd[:, None] - mean_rstd[:, None]
        a = (normed * one_plus_scale + shift).to(mma_dtype)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = gelu_tanh(acc)
    out_ptrs = out_ptr + tile_base * stride_om + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_modulated_linear_fixed, _modulated_linear_tuned = gemm_variants(_modulated_linear_kernel)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _row_stats(x2d: torch.Tensor):
    M, K = x2d.shape
    mean = torch.empty(M, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2d.device)
    block_rows, block_k, warps = stats_blocks(K)
    _row_stats_kernel[(cdiv(M, block_rows),)](
        x2d, mean, rstd, M, K, x2d.stride(0), x2d.stride(1), LN_EPS,
        BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=warps)
    return mean, rstd


def _checked(op: str, h, shift, scale, weight, bias, activation, out) -> torch.dtype:
    """Raise on what `op` (either path) cannot take; the compute dtype."""
    raise_if(_modulated_linear_problems(h, shift, scale, weight, bias, activation), op)
    inputs = [h, shift, scale, weight, bias]
    raise_if(launch_problems(inputs), op)
    dtype = compute_dtype(h)
    raise_if(out_problems(out, tuple(h.shape[:-1]) + (weight.shape[0],), dtype, h.device, inputs, rows=True), op)
    return dtype


def stats_in_kernel(h: torch.Tensor, config=None) -> bool:
    """Whether path (a) computes the row statistics inside the GEMM (no statistics kernel): as a
    tuned config says (its STATS_IN_KERNEL, when `fastlego.tune` timed both ways), else when h is
    at most STATS_IN_GEMM_MAX_BYTES: the statistics pass doubles the A tiles' reads (from L2 for
    so small an h), less than the statistics kernel's launch at a batch of one or two. A function
    of the shape and the tuning table only: eager, a graph capture and every rank decide alike."""
    if config is not None and "STATS_IN_KERNEL" in config.kwargs:
        return bool(config.kwargs["STATS_IN_KERNEL"])
    return h.numel() * h.element_size() <= STATS_IN_GEMM_MAX_BYTES


def _tuning_candidates(args: tuple) -> list:
    """The configs `fastlego.tune` times for path (a): the tile configs that fit, each also with the
    statistics inside the GEMM when h is small enough for that to be worth timing."""
    h = args[0]
    base = tuning_configs(h, args[3])
    if h.numel() * h.element_size() > STATS_IN_GEMM_TUNE_BYTES:
        return base
    both = []
    for c in base:
        if c is None:   # the interpreter's fixed config: the rule decides
            both.append(c)
            continue
        for inline in (0, 1):
            both.append(triton.Config({**c.kwargs, "STATS_IN_KERNEL": inline}, num_warps=c.num_warps,
                                       num_stages=c.num_stages))
    return both


def _modulated_linear(h, shift, scale, weight, bias, activation=None, *, out=None, config=None,
                      stats_in_gemm: Optional[bool] = None):
    """Path (a), optionally with a fixed triton.Config (tuned, or given by tests and benchmarks)
    and the statistics forced inside the GEMM or in their own kernel (default: `stats_in_kernel`)."""
    dtype = _checked("modulated_linear", h, shift, scale, weight, bias, activation, out)
    return _fused_path(h, shift, scale, weight, bias, activation, out, config, dtype, stats_in_gemm)


def _fused_path(h, shift, scale, weight, bias, activation, out, config, dtype, stats_in_gemm=None):
    """Path (a) on checked arguments (`_checked` gave `dtype`)."""
    K, N = h.shape[-1], weight.shape[0]
    if out is None:
        out = torch.empty(tuple(h.shape[:-1]) + (N,), dtype=dtype, device=h.device)
    M = h.numel() // K
    if M == 0:
        return out
    x2d = rows(h)
    w = cast_weight(weight, dtype)   # a no-op unless autocast casts it (as F.linear does)
    out2d = out.view(M, N)
    inline = stats_in_kernel(h, config) if stats_in_gemm is None else stats_in_gemm
    carried = config is not None and "STATS_IN_KERNEL" in config.kwargs   # a tuned config says it itself
    if carried and bool(config.kwargs["STATS_IN_KERNEL"]) != inline:     # overridden (tests, benchmarks)
        config = triton.Config({k: v for k, v in config.kwargs.items() if k != "STATS_IN_KERNEL"},
                               num_warps=config.num_warps, num_stages=config.num_stages)
        carried = False
    mean, rstd = (x2d, x2d) if inline else _row_stats(x2d)   # inline: the kernel does not read them
    args = (x2d, mean, rstd, shift, scale, w, bias if bias is not None else w, out2d,
            M, N, K, M // shift.shape[0], LN_EPS,
            x2d.stride(0), x2d.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
            w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0, out2d.stride(0), out2d.stride(1),
            next_power_of_2(M))
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATIONS[activation], INPUT_PRECISION=dot_precision(dtype))
    if not carried:
        meta["STATS_IN_KERNEL"] = inline
    launch_gemm(_modulated_linear_fixed, _modulated_linear_tuned, M, N, args, meta, config)
    return out


def modulated_linear_cublas(h, shift, scale, weight, bias, activation: Optional[str] = None, *, out=None):
    """Path (b): one Triton LN-modulate pass writes the modulated activations in the compute
    dtype, cuBLAS(Lt) does matmul + bias (+ tanh-GELU epilogue)."""
    dtype = _checked("modulated_linear_cublas", h, shift, scale, weight, bias, activation, out)
    return _cublas_path(h, shift, scale, weight, bias, activation, out, dtype)


def _cublas_path(h, shift, scale, weight, bias, activation, out, dtype):
    """Path (b) on checked arguments (`_checked` gave `dtype`). Every operand is in the compute
    dtype already, so autocast (the compute dtype's source when on) casts nothing here."""
    a = _layernorm_modulate(h, shift, scale, dtype)
    w, b = cast_weight(weight, dtype), cast_weight(bias, dtype)
    if activation == "gelu_tanh" and b is not None and a.is_cuda:
        y = torch._addmm_activation(b, a, w.t(), use_gelu=True)   # cublasLt GELU (tanh) epilogue
    else:
        y = F.linear(a, w, b)
        if activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
    y = y.view(tuple(h.shape[:-1]) + (weight.shape[0],))
    if out is None:
        return y
    return out.copy_(y)


# The candidates `fastlego.tune` times (arguments as the public launcher takes them).
tuning.register_gemm("modulated_linear", fused=lambda *a, config: _modulated_linear(*a, config=config),
                     cublas=lambda *a: modulated_linear_cublas(*a), configs=_tuning_candidates)


def modulated_linear(h, shift, scale, weight, bias, activation: Optional[str] = None, *, out=None):
    """act(Linear(LN(h) * (1 + scale[img]) + shift[img])) by the path `fastlego.tuning.lookup`
    gives for this shape: (a) the fused GEMM or (b) LN-modulate + cuBLAS (see the module docstring).
    h (..., D); shift/scale (B, D) any strides; weight (N_out, D); bias (N_out,) or None;
    activation None or "gelu_tanh". Returns (..., N_out) in the compute dtype."""
    dtype = _checked("modulated_linear", h, shift, scale, weight, bias, activation, out)   # once, for either path
    return _routed(h, shift, scale, weight, bias, activation, out, dtype,
                   shape_key("modulated_linear", h, weight, shift, activation))


def modulated_linear_plan(h, shift, scale, weight, bias, activation: Optional[str] = None):
    """`modulated_linear` for every call like this one, checked once: the returned function takes
    calls whose arguments have these shapes, strides, dtypes and devices, under this autocast and
    grad state (the dispatcher's decision key), without checking them again (no `out=`). The path
    is still looked up per call, so a later `fastlego.tune` applies at once."""
    dtype = _checked("modulated_linear", h, shift, scale, weight, bias, activation, None)
    key = shape_key("modulated_linear", h, weight, shift, activation)
    return lambda h, shift, scale, weight, bias, activation=None: _routed(
        h, shift, scale, weight, bias, activation, None, dtype, key)


def _routed(h, shift, scale, weight, bias, activation, out, dtype, key):
    """Checked arguments down the path the tuning table gives for shape key `key`."""
    args = (h, shift, scale, weight, bias, activation)
    path, config = tuning.lookup("modulated_linear", key, args)
    if path == "fused":
        return _fused_path(*args, out, config, dtype)
    return _cublas_path(*args, out, dtype)


# --------------------------------------------------------------------------------------------
# Argument checks, and what the dispatcher asks before every call
# --------------------------------------------------------------------------------------------

def _modulated_linear_problems(h, shift, scale, weight, bias, activation) -> List[str]:
    if activation not in _ACTIVATIONS:
        return [f"unknown activation {activation!r}: expected None or 'gelu_tanh'"]
    return linear_problems("h", h, weight, bias) or modulate_problems(h, shift, scale)


def modulated_linear_not_supported_reasons(h, shift, scale, weight, bias, activation=None, *, out=None) -> List[str]:
    """Why `modulated_linear` cannot take this call (empty: it can)."""
    return _modulated_linear_problems(h, shift, scale, weight, bias, activation) or triton_reasons(
        [h, shift, scale, weight, bias])
