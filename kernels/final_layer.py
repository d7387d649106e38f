"""A brick's final layer in one kernel: LayerNorm + adaLN modulate + Linear(D, p*p*C) + bias,
each output stored straight into its pixel of the (B, C, H, W) image (unpatchify + region fold).

Semantics of `fastlego.reference.final_layer`. For token row m of h (M = B * L * T rows, row m is
h[m // T, m % T, :], any strides) with image b = m // (L * T):
  a[m, k]   = (h[m, k] - mean_m) * rstd_m * (1 + scale[b, k]) + shift[b, k]   (LN: no affine,
              eps 1e-6, mean/var over the D features in fp32; shift/scale (B, D), any strides:
              they are chunks of one (B, 2D) tensor)
  y[m, f]   = sum_k a[m, k] * weight[f, k] + bias[f]                       f < N = p * p * C
  f = (pr, pc, c) row-major (pr = f // (p C), pc = (f // C) % p, c = f % C), token m = (n, t),
  n = (b, rh, rw) over the region grid, t = (ph, pw) over the patch grid:
  out[b, c, rh * r + ph * p + pr, rw * r + pw * p + pc] = y[m, f].
Every output pixel is written by exactly one (m, f), so the fold needs no atomics and no copy.

Tiling: one program takes BLOCK_M token rows and ALL N outputs (N is 12..256: the whole weight
column block, padded to a power of two >= 16, fits one tile), so h is never re-read per N tile.
LayerNorm statistics: computed inside the kernel in a first pass over K (chunked mean/M2 merged
with Chan's formula: one read of each chunk, no E[x^2] - E[x]^2 cancellation), then a second
pass normalises, modulates and feeds tl.dot. Why not a prologue kernel: it would read all of
h from HBM twice for certain (statistics, then matmul), plus a launch and an (M, 2) fp32 round trip.
Here pass 2 re-reads the BLOCK_M x D tile this same program has just read; BLOCK_M is picked so
that the tile is ~32 KB (16-32 rows), and while the tiles of the resident programs fit the 50 MB
L2 the re-read costs no HBM traffic. Worst case (L2 thrashed) h is read twice: another 436 MB
(0.14 ms at 3 TB/s) per lego_S_PG_64 forward at B = 256. A single-pass variant (fold the
mean into the epilogue: y = rstd * (sum_k h_k (1 + s_k) W_fk - mean * sum_k (1 + s_k) W_fk) + ...)
would cancel catastrophically when |mean| >> std (massive-activation rows), so it is not used.

Precision: statistics, normalisation and modulation in fp32; the modulated row is rounded once
to the compute dtype for the dot (the reference rounds LN's output, the product and the sum
separately); fp32 accumulation; + bias in fp32; one rounding to the output dtype. fp32 dots and
autocast follow `kernels/policy.py`: under autocast the reference's LayerNorm runs in fp32 and its
Linear in the autocast dtype, returning that dtype, and so does this kernel (h, shift, scale and
weight may then have different dtypes).

Cost (bf16, 2 bytes/element). FLOPs = 2 M D N (the Linear) + ~8 M D (LN + modulate); minimum
bytes = read h once + write the image + shift/scale/weight (kilobytes):
  lego_S_PG_64, B = 256 (C = 3, 64 x 64, D = 384):
    brick 0 (r 4,  p 2): M = 262,144, N = 12   3.22 GFLOP  208.0 MB
    brick 1 (r 16, p 8): M =  16,384, N = 192  2.47 GFLOP   19.4 MB
    brick 2 (r 64, p 2): M = 262,144, N = 12   3.22 GFLOP  208.0 MB
    all: 8.9 GFLOP, 436 MB -> 0.145 ms at 3 TB/s
  lego_XL_U_32, B = 128 (C = 4, 32 x 32 latents, D = 1152), N = 16 / 256 / 16 / 256 / 16,
    M = 32,768 / 2,048 / 32,768 / 2,048 / 32,768: 7.0 GFLOP, 245 MB -> 0.082 ms at 3 TB/s.
  (Under autocast h is the fp32 residual stream: +415 MB (S) / +236 MB (XL) of reads.)
Reading h is ~95% of the bytes. N = 12..16: ~16 FLOP/byte, memory bound (these bricks hold 95% of
the bytes); N = 192..256: ~250 FLOP/byte, near the bf16 ridge, but only ~7-20 MB per brick.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from fastlego.dispatch import triton_interpreting

from .layernorm_modulate import row_mean_m2
from .policy import (LN_EPS, cdiv, compute_dtype, dot_precision, launch_problems, next_power_of_2, out_problems,
                     raise_if, triton_reasons)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _final_layer_kernel(
    h_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, out_ptr,
    M, D, L, REGIONS_PER_ROW, eps,
    stride_hn, stride_ht, stride_hd,            # h (B * L, T, D)
    stride_shift_b, stride_shift_d,             # shift (B, D)
    stride_scale_b, stride_scale_d,             # scale (B, D)
    stride_wn, stride_wk,                       # weight (N, D)
    stride_ob, stride_oc, stride_oh, stride_ow, # out (B, C, H, W)
    REGION: tl.constexpr, PATCH: tl.constexpr, CHANNELS: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    GRID: tl.constexpr = REGION // PATCH
    TOKENS: tl.constexpr = GRID * GRID
    N_OUT: tl.constexpr = PATCH * PATCH * CHANNELS
    compute_dtype = out_ptr.dtype.element_ty

    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    region_idx = offs_m // TOKENS
    t = offs_m % TOKENS
    img = region_idx // L                                      # image of each token row
    h_row = region_idx.to(tl.int64) * stride_hn + t * stride_ht

    # Pass 1: per-row mean and M2 (sum of squared deviations), chunk by chunk (Chan's merge).
    mean, m2 = row_mean_m2(h_ptr, h_row, row_ok, D, stride_hd, BLOCK_M, BLOCK_K)
    rstd = tl.math.rsqrt(m2 / D + eps)                       # biased variance, as LayerNorm

    # Pass 2: a = LN(h) * (1 + scale[img]) + shift[img] (fp32, one rounding), y = a @ W^T.
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        mask = row_ok[:, None] & k_ok[None, :]
        hv = tl.load(h_ptr + h_row[:, None] + offs_k[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + img[:, None] * stride_scale_b + offs_k[None, :] * stride_scale_d,
                        mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + img[:, None] * stride_shift_b + offs_k[None, :] * stride_shift_d,
                        mask=mask, other=0.0).to(tl.float32)
        a = (hv - mean[:, None]) * rstd[:, None] * (1.0 + scale) + shift
        # W^T tile [k, f] = weight[f, k]; rows past D and columns past N are zero.
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(compute_dtype), w.to(compute_dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]

    # Fold: feature f = (pr, pc, c) of token (region (rh, rw), patch (ph, pw)) -> out[b, c, y, x].
    l = region_idx % L
    y0 = (l // REGIONS_PER_ROW) * REGION + (t // GRID) * PATCH
    x0 = (l % REGIONS_PER_ROW) * REGION + (t % GRID) * PATCH
    pr = offs_n // (PATCH * CHANNELS)
    pc = (offs_n // CHANNELS) % PATCH
    c = offs_n % CHANNELS
    out_off = (img.to(tl.int64) * stride_ob)[:, None] + (c * stride_oc)[None, :] \
        + (y0[:, None] + pr[None, :]) * stride_oh + (x0[:, None] + pc[None, :]) * stride_ow
    tl.store(out_ptr + out_off, acc.to(compute_dtype), mask=row_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _shape_problems(h, shift, scale, weight, bias, region, image_shape) -> List[str]:
    """What is wrong with the shapes (empty: they are what `reference.final_layer` takes)."""
    tensors = {"h": h, "shift": shift, "scale": scale, "weight": weight}
    bad = [f"{name} is {type(t).__name__}" for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        return [f"expected tensors: {', '.join(bad)}"]
    try:
        B, C, H, W = (int(s) for s in image_shape)
    except (TypeError, ValueError):
        return [f"image_shape must be (B, C, H, W), got {image_shape!r}"]
    if h.dim() != 3:
        return [f"h must be tokens (B * L, T, D), got shape {tuple(h.shape)}"]
    if weight.dim() != 2:
        return [f"weight must be the final Linear's (p * p * C, D), got shape {tuple(weight.shape)}"]
    if B < 0 or C < 1 or H < 1 or W < 1:
        return [f"image_shape {tuple(image_shape)} must have B >= 0 and positive C, H, W"]
    N, D = weight.shape
    p = math.isqrt(N // C)
    problems = []
    if p * p * C != N:
        return [f"weight has {N} outputs: expected p * p * C for C = {C} channels (e.g. {4 * C} for patch 2)"]
    if not isinstance(region, int) or isinstance(region, bool) or region < 1 or region % p:
        return [f"region must be a positive multiple of the patch size {p}, got {region!r}"]
    if H % region or W % region:
        problems.append(f"image is {H}x{W}: H and W must be multiples of the region size {region}")
    L, T = (H // region) * (W // region), (region // p) ** 2
    if tuple(h.shape) != (B * L, T, D):
        problems.append(f"h must be ({B * L}, {T}, {D}) for a {B}x{C}x{H}x{W} image, region {region}, patch {p}, "
                        f"width {D}; got {tuple(h.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        if tuple(t.shape) != (B, D):
            problems.append(f"{name} must be per image ({B}, {D}), got {tuple(t.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        problems.append(f"bias must be None or ({N},), got {got}")
    return problems


def final_layer_not_supported_reasons(h, shift, scale, weight, bias, region, image_shape) -> List[str]:
    """Why the Triton final_layer kernel cannot take this call (empty list: it can)."""
    problems = _shape_problems(h, shift, scale, weight, bias, region, image_shape)
    if problems and any(not isinstance(t, torch.Tensor) for t in (h, shift, scale, weight)):
        return problems
    # Under autocast LN runs in fp32 and the Linear in the autocast dtype whatever the operands'
    # dtypes, as in the reference, so mixed dtypes are fine there (the policy's default).
    return triton_reasons([h, shift, scale, weight, bias]) + problems


def _config(D: int, n_out: int, h_bytes: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).

    BLOCK_N is all of N, padded to a power of two >= 16. BLOCK_M keeps one program's h tile
    (BLOCK_M x D, re-read by pass 2) near 32 KB so that the tiles of all resident programs
    (a few per SM x 132 SMs) stay well inside the 50 MB L2 between the two passes: 32 rows at
    D = 384 in bf16, 16 in fp32 (h is the fp32 residual stream under autocast) and at D >= 1024.
    Warps: 4 when N <= 64, 8 for the 64 x 256 fp32 accumulator of the patch-8 bricks. Checked
    by compiling for sm_90 (Triton 3.9, no GPU at hand; not timed): no spills for 16-bit,
    autocast (fp32 h and weight) or fp32 operands, shared memory well under the 227 KB limit.
    Under the interpreter: big tiles, few (slow, serial) programs.
    """
    block_n = max(16, next_power_of_2(n_out))
    block_k = max(16, min(64, next_power_of_2(D)))
    if triton_interpreting():
        return 64, block_n, block_k, 4, 1
    rows = max(1, (32 * 1024) // (D * h_bytes))
    block_m = max(16, min(64, 1 << (rows.bit_length() - 1)))    # power of two <= rows, in [16, 64]
    return block_m, block_n, block_k, (4 if block_n <= 64 else 8), 2


def final_layer(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], region: int, image_shape: Sequence[int], *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LN(h) * (1 + scale[img]) + shift[img] -> Linear(D, p*p*C) -> folded (B, C, H, W) image.

    Same result as `fastlego.reference.final_layer`. `out`, if given, must be image_shape of the
    compute dtype (the autocast dtype under autocast, else h's) on h's device; it is returned."""
    inputs = [h, shift, scale, weight, bias]
    raise_if(_shape_problems(h, shift, scale, weight, bias, region, image_shape), "final_layer")
    raise_if(launch_problems(inputs), "final_layer")
    dtype = compute_dtype(h)
    B, C, H, W = (int(s) for s in image_shape)
    N, D = weight.shape
    p = math.isqrt(N // C)
    raise_if(out_problems(out, (B, C, H, W), dtype, h.device, inputs), "final_layer")
    if out is None:
        out = torch.empty((B, C, H, W), device=h.device, dtype=dtype)
    M = h.shape[0] * h.shape[1]
    if M == 0:
        return out

    L = (H // region) * (W // region)
    bias_t = bias if bias is not None else weight
    precision = dot_precision(dtype)
    block_m, block_n, block_k, num_warps, num_stages = _config(D, N, h.element_size())
    args = (
        h, shift, scale, weight, bias_t, out,
        M, D, L, W // region, LN_EPS,
        *h.stride(), *shift.stride(), *scale.stride(), *weight.stride(), *out.stride(),
    )
    _final_layer_kernel[(cdiv(M, block_m),)](
        *args, REGION=region, PATCH=p, CHANNELS=C, HAS_BIAS=bias is not None, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out
