"""The DiT blocks' four matmuls with their elementwise neighbours fused in (70-85% of the FLOPs).

Two ops, semantics of the reference ops of the same names (`fastlego.reference`):

  modulated_linear(h, shift, scale, W, bias, act)  = act((LN(h) * (1 + scale[img]) + shift[img]) @ W^T + bias)
      qkv (N = 3D, no act) and fc1 (N = 4D, tanh-GELU); K = D.
  linear_gated_residual(a, W, bias, gate, residual) = residual + gate[img] * (a @ W^T + bias)
      attention output projection (K = D) and fc2 (K = 4D); N = D.

Layout. Tokens (..., K) are viewed as a row-major matrix of M rows (M = N_regions * T); the rows of
one image are contiguous, so row m belongs to image m // (M / B) for per-image (B, D) tensors
(shift/scale/gate are chunks of the (B, 6D) adaLN output: any strides, never copied). W is
(N, K) as nn.Linear stores it; out is (..., N), row-major.

Design of modulated_linear (the "(a)" path, `modulated_linear`):
  1. `_row_stats_kernel`: mean and rstd of every row of h in fp32 (M floats each; Chan's merge of
     per-chunk (mean, M2), exact as a two-pass variance, one read of h).
  2. `_modulated_linear_kernel`: a tiled GEMM whose prologue normalises and modulates each A tile
     as it is loaded: a = (x * rstd - mean * rstd) * (1 + scale[img, k]) + shift[img, k] in fp32,
     rounded to the MMA dtype (bf16/fp16, as the reference rounds LN's output before F.linear), so
     the modulated activations are never written to memory. Epilogue: + bias, tanh-GELU in fp32,
     one store in the activation dtype.
  When a tile's BLOCK_M rows all belong to one image (rows per image a multiple of BLOCK_M: the
  1024/256-row images of the big bricks; the 64-row images of S's r=16 brick with BLOCK_M = 64),
  shift/scale are loaded as one BLOCK_K vector per K step; otherwise (XL's 16-row images, or
  64-row images under BLOCK_M = 128) as a (BLOCK_M, BLOCK_K) gather from the small (B, D) tables
  (L1/L2 hits; it costs shared memory, so the autotuner weighs it against BLOCK_M = 64 tiles).
  For comparison, `modulated_linear_cublas` is the "(b)" path: one LN-modulate kernel writes the
  modulated activations (M x K, MMA dtype) and cuBLAS does the matmul (+ bias + GELU through
  cublasLt's epilogue): it moves 2 x M x K x 2 more bytes than (a) but gets cuBLAS's GEMM.
  Computing the row statistics inside the GEMM instead (a pre-pass over K per tile) was not
  chosen: every one of the N / BLOCK_N tiles of a row block would re-read its A rows before the
  pipelined main loop (estimated ~+30% per tile at K = 384, from L2 and not overlapped with the
  MMAs), more than the stats kernel's one read of h (+13-17% at S, see below).
  The stats read disappears entirely if the producer of h (linear_gated_residual / brick_embed)
  emits per-tile partial (mean, M2) in its epilogue: a later step, it changes the op signatures.

Design of linear_gated_residual: the same tiled GEMM; epilogue acc + bias, times gate[img, n]
(vector or gather, as above), plus residual (read once), one store. The epilogue runs in two
column halves so that only half a residual tile is live next to the accumulator (a whole
128 x 256 tile spills registers; ptxas for sm_90a: 536 -> 56 bytes of spill stores).

GEMM: grouped (GROUP_M) program order so that consecutive programs share A row blocks and W in
L2; fp32 accumulation; a 64-bit offset for the tile's first row and 32-bit offsets inside the
tile (M * K passes 2^31 at large batches); rows/columns past the edge are clamped onto valid ones
so that main-loop loads need no M/N masks (the store is masked). On the GPU,
`triton.autotune` over a few Hopper configs, keyed on (next power of two of M, N, K, rows per
image, dtypes); under Triton's interpreter one fixed small config. fp32 inputs: the dot runs in
3xTF32 (`tf32x3`, about fp32 accuracy on tensor cores) when `torch.backends.cuda.matmul.allow_tf32`
is on (F.linear runs plain TF32 then), otherwise in
exact IEEE fp32 (`input_precision="ieee"`: no tensor cores, ~15x slower than bf16). Autocast (CUDA inputs,
`torch.is_autocast_enabled('cuda')`): the MMA runs in the autocast dtype with W cast to it, as
F.linear does; LN statistics and modulation stay fp32 (autocast runs layer_norm in fp32). Output
dtype = the reference's under autocast: the autocast dtype for modulated_linear; for
linear_gated_residual the promotion of (autocast dtype, gate, residual).
Elementwise math differs from the reference only by rounding fewer times (the reference rounds
LN, the modulation, F.linear's output, GELU's input, gate * y, each to the activation dtype).

The launchers above are the forward: called directly with autograd recording a grad-requiring
input they refuse. Training runs them inside `fastlego.custom_ops` (autograd.Function in eager,
torch.library custom ops under torch.compile), whose backward uses the row-wise Triton kernels
below (`layernorm_modulate`, `layernorm_modulate_backward`, `gated_residual_backward`: whole rows
in registers, per-image sums as fixed-order partials, no atomics; `gelu_tanh_backward`: the MLP's
GELU backward, GELU recompute and fc1's bias gradient in one pass) and cuBLAS for dA / dW.
Backward cost per call (bf16, M rows, K = D): LN-modulate recompute reads h, writes A (2 M K x 2
bytes), its backward reads h + dA and writes dh (3 M K x 2 bytes); gated residual backward reads
g + y, writes dy (3 M N x 2 bytes). lego_S_PG_64 B = 256, K = 384: ~0.2 GB per LN pass, ~50 us
each at 4 TB/s, next to ~0.3-0.8 ms of backward GEMMs per matmul.

Cost (bf16, 2 bytes/element; floor = max(FLOPs / 790 TFLOP/s, bytes / 4 TB/s); minimum bytes =
read h + write out + read W; per-image tables are kilobytes; the stats kernel of path (a) reads h
once more, 2 M K bytes):
  lego_S_PG_64, B = 256, 64 x 64, D = 384 (M = 262,144 rows in the r=4 and r=64 bricks,
  8 of the 12 blocks; M = 16,384 in the r=16 brick):
    qkv  M 262,144 x K 384 x N 1,152: 231.9 GFLOP, 806 MB, 288 FLOP/B -> MMA 294 us, memory 202 us
    fc1  M 262,144 x K 384 x N 1,536: 309.2 GFLOP, 1008 MB, 307 FLOP/B -> MMA 391 us, memory 252 us
    stats read of h (path a): 201 MB -> +50 us per call (17% of qkv's floor, 13% of fc1's)
    (proj: 77.3 GFLOP, 604 MB with the residual read -> MMA 98 us, memory 151 us: memory bound;
     fc2: 309.2 GFLOP, 1209 MB -> MMA 391 us, memory 302 us)
    all four matmuls of all 12 blocks: 7.65 TFLOP -> floor ~10.1 ms; stats kernels 0.84 ms on top.
  lego_XL_U_32, B = 128, 4 x 32 x 32, D = 1152 (M = 32,768 in the r=32 and r=4 bricks,
  32 of the 52 blocks; M = 2,048 in the r=16 bricks):
    qkv  M 32,768 x K 1,152 x N 3,456: 260.9 GFLOP, 310 MB, 842 FLOP/B -> MMA 330 us, memory 78 us
    fc1  M 32,768 x K 1,152 x N 4,608: 347.9 GFLOP, 388 MB, 896 FLOP/B -> MMA 440 us, memory 97 us
    stats read of h: 75 MB -> +19 us per call (6% of qkv's floor)
    all four matmuls of all 52 blocks: 34.7 TFLOP -> floor ~43.9 ms; stats kernels 1.26 ms on top.
  (Per-op floors summed; BASELINE.md's measured cuBLAS matmul floor, which also counts the adaLN
  and embedding matmuls at cuBLAS's real rate, is 12.9 ms (S) and 48.2 ms (XL).)
  The ridge is 790 / 4 ~ 200 FLOP/byte: XL's matmuls are firmly compute bound (the prologue
  math must hide under the MMAs); S's qkv/fc1 are only ~1.5x above the ridge, so every extra
  pass over h (the stats read, or path (b)'s write + re-read of the modulated copy) shows.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlego import tuning
from fastlego.dispatch import autocast_dtype, forward_only_reasons, triton_interpreting, triton_reasons
from fastlego.reference import LN_EPS

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = {None: 0, "gelu_tanh": 1}


# --------------------------------------------------------------------------------------------
# Shared pieces of the kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: GROUP_M row blocks are swept across all column blocks
    before the next group starts, so W and the group's A rows stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile_rows_cols(offs_m, offs_n, tile_m, M, N):
    """Rows of the tile relative to its first row, and absolute columns, with the rows/columns
    past the edge clamped onto valid ones: the main-loop loads then need no M/N masks (their
    extra results are dropped by the masked store), and all offsets inside a tile fit 32 bits
    (the tile's first row carries the 64-bit part, M * K may pass 2^31)."""
    local_m = tl.minimum(offs_m, M - 1) - tile_m
    cols = tl.minimum(offs_n, N - 1)
    return local_m, cols


@triton.jit
def _row_mean_rstd(x_ptr, rows, row_mask, K, stride_xm, stride_xk, eps,
                   BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 mean and 1/sqrt(var + eps) (biased variance, as LayerNorm) of rows of x.

    One pass over memory: each BLOCK_K chunk's mean and M2 = sum (x - chunk_mean)^2 are exact in
    registers, then merged into the running pair with Chan's formula
        delta = mean_c - mean,  mean += delta * n_c / n,  M2 += M2_c + delta^2 * n_old * n_c / n,
    which is as accurate as a two-pass variance (no sum-of-squares cancellation)."""
    row_off = rows.to(tl.int64) * stride_xm
    mean = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        n_old = k0 * 1.0
        n_chunk = tl.minimum(K - k0, BLOCK_K) * 1.0
        n_new = n_old + n_chunk
        chunk_mean = tl.sum(x, axis=1) / n_chunk
        d = tl.where(mask, x - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(d * d, axis=1)
        delta = chunk_mean - mean
        mean += delta * (n_chunk / n_new)
        m2 += chunk_m2 + delta * delta * (n_old * n_chunk / n_new)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    return mean, rstd


@triton.jit
def _gelu_tanh_exponent(x):
    """-2 u log2(e), u = sqrt(2/pi) (x + 0.044715 x^3): tanh-GELU's sigmoid(2u) = 1 / (1 + exp2(this))."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return -2.0 * 1.4426950408889634 * u


@triton.jit
def _gelu_tanh(x):
    """0.5 x (1 + tanh(u)) = x * sigmoid(2u), in fp32 (u: `_gelu_tanh_exponent`).
    The sigmoid form has no cancellation and saturates cleanly (exp2 -> inf gives x / inf = 0)."""
    return x / (1.0 + tl.exp2(_gelu_tanh_exponent(x)))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _row_stats_kernel(x_ptr, mean_ptr, rstd_ptr, M, K, stride_xm, stride_xk, eps,
                      BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """mean[m], rstd[m] (fp32) of the M rows of x (M, K): the LayerNorm statistics."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    mean, rstd = _row_mean_rstd(x_ptr, rows, row_mask, K, stride_xm, stride_xk, eps, BLOCK_ROWS, BLOCK_K)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layernorm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, M, K, rows_per_image,
                               stride_xm, stride_xk, stride_shift_b, stride_shift_k,
                               stride_scale_b, stride_scale_k, stride_om, stride_ok, eps,
                               BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, K) = LN(x) * (1 + scale[img]) + shift[img], fp32 math, one rounding to out's dtype
    (path (b): the matmul that follows is cuBLAS's)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    mean, rstd = _row_mean_rstd(x_ptr, rows, row_mask, K, stride_xm, stride_xk, eps, BLOCK_ROWS, BLOCK_K)
    img = rows // rows_per_image
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_om
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + img[:, None] * stride_scale_b + cols[None, :] * stride_scale_k, mask=mask, other=0.0)
        sh = tl.load(shift_ptr + img[:, None] * stride_shift_b + cols[None, :] * stride_shift_k, mask=mask, other=0.0)
        y = (x - mean[:, None]) * rstd[:, None] * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
        tl.store(out_rows + cols[None, :] * stride_ok, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_modulate_backward_kernel(
        x_ptr, scale_ptr, ga_ptr, gin_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
        K, rows_per_image, blocks_per_image,
        stride_xm, stride_xk, stride_scale_b, stride_scale_k, stride_gm, stride_gk, stride_im, stride_ik,
        stride_dm, stride_dk, eps,
        HAS_GIN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ROW_ITERS: tl.constexpr):
    """Backward of a = LN(x) * (1 + scale[img]) + shift[img] for the rows of one image block.

    Program p takes ROW_ITERS x BLOCK_ROWS rows of image img = p // blocks_per_image (a block never
    straddles two images) and whole rows (BLOCK_K >= K). Per row, with xhat = (x - mean) * rstd
    recomputed from x (nothing was saved by the forward; the row is in registers anyway) and the
    incoming gradient ga = dL/da:
        dxhat = ga * (1 + scale[img])
        dx    = rstd * (dxhat - mean_k(dxhat) - xhat * mean_k(dxhat * xhat))     (LN, no affine)
    and the per-image parameter gradients are column sums over the image's rows,
        dshift[img, k] = sum_rows ga,   dscale[img, k] = sum_rows ga * xhat,
    accumulated over this program's rows in fp32 registers and stored as one partial row per
    program (dshift_part / dscale_part are (B * blocks_per_image, K)); the launcher sums the
    partials of each image in a fixed order. No atomics: the result is bitwise reproducible.
    With HAS_GIN, gin (a gradient already flowing to x: the residual branch's) is added to dx in
    fp32 before its one rounding, which saves autograd's separate read-read-write sum."""
    pid = tl.program_id(0)
    img = pid // blocks_per_image
    blk = pid % blocks_per_image
    cols = tl.arange(0, BLOCK_K)
    col_mask = cols < K
    sc1 = 1.0 + tl.load(scale_ptr + img * stride_scale_b + cols * stride_scale_k, mask=col_mask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = blk * (BLOCK_ROWS * ROW_ITERS)
    for it in range(ROW_ITERS):
        local = first + it * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rows = img.to(tl.int64) * rows_per_image + local
        mask = (local < rows_per_image)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / K
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)
        xhat = d * rstd[:, None]
        ga = tl.load(ga_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gk, mask=mask, other=0.0).to(tl.float32)
        acc_shift += tl.sum(ga, axis=0)
        acc_scale += tl.sum(ga * xhat, axis=0)
        dxhat = ga * sc1[None, :]
        c1 = tl.sum(dxhat, axis=1) / K
        c2 = tl.sum(dxhat * xhat, axis=1) / K
        dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
        if HAS_GIN:
            dx += tl.load(gin_ptr + rows[:, None] * stride_im + cols[None, :] * stride_ik, mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dk, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dshift_part_ptr + pid.to(tl.int64) * K + cols, acc_shift, mask=col_mask)
    tl.store(dscale_part_ptr + pid.to(tl.int64) * K + cols, acc_scale, mask=col_mask)


@triton.jit
def _gated_residual_backward_kernel(
        g_ptr, y_ptr, gate_ptr, dy_ptr, dgate_part_ptr, dbias_part_ptr,
        N, rows_per_image, blocks_per_image,
        stride_gm, stride_gn, stride_ym, stride_yn, stride_gate_b, stride_gate_n, stride_dm, stride_dn,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ITERS: tl.constexpr):
    """Backward of out = residual + gate[img] * y, the elementwise part: dy = g * gate[img]
    (stored in dy's dtype, the matmul dtype of the backward GEMMs), dgate[img, n] = sum_rows
    g * y and the Linear's bias gradient dbias[n] = sum_rows dy (of dy as stored, i.e. rounded, as
    a sum over the stored dy would see it), each as one fp32 partial row per program (rows of one
    image; summed by the launcher in a fixed order: no atomics). d residual = g needs no kernel."""
    pid = tl.program_id(0)
    img = pid // blocks_per_image
    blk = pid % blocks_per_image
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    gate = tl.load(gate_ptr + img * stride_gate_b + cols * stride_gate_n, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = blk * (BLOCK_ROWS * ROW_ITERS)
    for it in range(ROW_ITERS):
        local = first + it * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rows = img.to(tl.int64) * rows_per_image + local
        mask = (local < rows_per_image)[:, None] & col_mask[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * y, axis=0)
        dy = (g * gate[None, :]).to(dy_ptr.dtype.element_ty)
        acc_bias += tl.sum(dy.to(tl.float32), axis=0)
        tl.store(dy_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn, dy, mask=mask)
    tl.store(dgate_part_ptr + pid.to(tl.int64) * N + cols, acc, mask=col_mask)
    tl.store(dbias_part_ptr + pid.to(tl.int64) * N + cols, acc_bias, mask=col_mask)


@triton.jit
def _gelu_tanh_backward_kernel(
        g_ptr, a_ptr, act_ptr, dbias_part_ptr, M, N,
        stride_gm, stride_gn, stride_am, stride_an, stride_xm, stride_xn,
        BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ROW_ITERS: tl.constexpr):
    """The MLP's GELU between fc1 and fc2, backward, one pass over its M x 4D tensors: given the
    pre-activation a and g = dL/d gelu(a) (fc2's dA), writes in place g <- g * gelu'(a), writes
    act = gelu(a) (fc2's input, for its dW), and one fp32 partial row per program of fc1's bias
    gradient sum_rows g * gelu'(a) (of the stored, rounded values; summed by the launcher in a fixed
    order). Program (i, j) owns ROW_ITERS x BLOCK_ROWS rows and BLOCK_N columns.
    tanh-GELU: with u = sqrt(2/pi) (a + 0.044715 a^3) and s = sigmoid(2u) = (1 + tanh u) / 2,
        gelu(a) = a s,   gelu'(a) = s + 2 a s (1 - s) u'(a),   u' = sqrt(2/pi) (1 + 3 * 0.044715 a^2)
    (1 - tanh^2 u = 4 s (1 - s)); the exponent is capped so that s saturates at 2^-126 or 1, no inf or NaN."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid_m.to(tl.int64) * (BLOCK_ROWS * ROW_ITERS)
    for it in range(ROW_ITERS):
        rows = first + it * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows < M)[:, None] & col_mask[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :] * stride_an, mask=mask, other=0.0).to(tl.float32)
        g_ptrs = g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp2(tl.minimum(_gelu_tanh_exponent(a), 126.0)))   # no inf: s >= 2^-126
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        da = (g * (s + 2.0 * a * s * (1.0 - s) * du)).to(g_ptr.dtype.element_ty)
        tl.store(g_ptrs, da, mask=mask)
        tl.store(act_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                 (a * s).to(act_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(da.to(tl.float32), axis=0)
    tl.store(dbias_part_ptr + pid_m.to(tl.int64) * N + cols, acc, mask=col_mask)


@triton.jit(do_not_specialize=["M", "rows_per_image", "M_BUCKET"])
def _modulated_linear_kernel(
    h_ptr, mean_ptr, rstd_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, rows_per_image,
    stride_hm, stride_hk,                        # h seen as (M, K)
    stride_shift_b, stride_shift_k, stride_scale_b, stride_scale_k,
    stride_wn, stride_wk,                        # W (N, K)
    stride_bias, stride_om, stride_on,           # out seen as (M, N)
    M_BUCKET,                                    # next power of two of M: an autotune key only
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TILE_IN_ONE_IMAGE: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out = act((LN(h) * (1 + scale[img]) + shift[img]) @ W^T + bias), LN from precomputed
    mean/rstd; the modulated A tile exists only in registers."""
    mma_dtype = w_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tile_m = pid_m * BLOCK_M
    offs_m = tile_m + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_m, cols = _tile_rows_cols(offs_m, offs_n, tile_m, M, N)
    rows = tile_m + local_m
    tile_base = tile_m.to(tl.int64)   # 64-bit row offset of the tile, 32-bit offsets inside it

    # Per-row LN statistics, folded so that LN(x) = x * rstd - mean * rstd (one FMA per element).
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
        if EVEN_K:
            x = tl.load(h_rows + offs_k[None, :] * stride_hk)
            w = tl.load(w_cols + offs_k[:, None] * stride_wk)
        else:
            # Past K: x = 0 and W = 0, so whatever the modulation makes of x, the product is 0.
            k_ok = offs_k < K
            x = tl.load(h_rows + offs_k[None, :] * stride_hk, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)
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
        acc = _gelu_tanh(acc)
    out_ptrs = out_ptr + tile_base * stride_om + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["M", "rows_per_image", "M_BUCKET"])
def _linear_gated_residual_kernel(
    a_ptr, w_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
    M, N, K, rows_per_image,
    stride_am, stride_ak,                        # a seen as (M, K)
    stride_wn, stride_wk,                        # W (N, K)
    stride_bias, stride_gate_b, stride_gate_n,
    stride_rm, stride_rn, stride_om, stride_on,  # residual and out seen as (M, N)
    M_BUCKET,                                    # next power of two of M: an autotune key only
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TILE_IN_ONE_IMAGE: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out = residual + gate[img] * (a @ W^T + bias): fp32 epilogue, residual read once, one store."""
    mma_dtype = w_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tile_m = pid_m * BLOCK_M
    offs_m = tile_m + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_m, cols = _tile_rows_cols(offs_m, offs_n, tile_m, M, N)
    tile_base = tile_m.to(tl.int64)   # 64-bit row offset of the tile, 32-bit offsets inside it

    a_rows = a_ptr + tile_base * stride_am + local_m[:, None] * stride_am
    w_cols = w_ptr + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(a_rows + offs_k[None, :] * stride_ak)
            w = tl.load(w_cols + offs_k[:, None] * stride_wk)
        else:
            k_ok = offs_k < K
            x = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x.to(mma_dtype), w, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    # The epilogue in two column halves: the residual tile of one half at a time is live next
    # to the accumulator (a whole 128 x 256 residual tile would spill registers).
    HALF_N: tl.constexpr = BLOCK_N // 2
    acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF_N]), [0, 2, 1]))
    n_lo = pid_n * BLOCK_N + tl.arange(0, HALF_N)
    _gated_residual_store(acc_lo, n_lo, tile_m, local_m, M, N, rows_per_image, gate_ptr, res_ptr, out_ptr,
                          stride_gate_b, stride_gate_n, stride_rm, stride_rn, stride_om, stride_on,
                          BLOCK_M, TILE_IN_ONE_IMAGE)
    _gated_residual_store(acc_hi, n_lo + HALF_N, tile_m, local_m, M, N, rows_per_image, gate_ptr, res_ptr, out_ptr,
                          stride_gate_b, stride_gate_n, stride_rm, stride_rn, stride_om, stride_on,
                          BLOCK_M, TILE_IN_ONE_IMAGE)


@triton.jit
def _gated_residual_store(acc, offs_n, tile_m, local_m, M, N, rows_per_image, gate_ptr, res_ptr, out_ptr,
                          stride_gate_b, stride_gate_n, stride_rm, stride_rn, stride_om, stride_on,
                          BLOCK_M: tl.constexpr, TILE_IN_ONE_IMAGE: tl.constexpr):
    """out[tile rows, offs_n] = residual + gate[img] * acc (acc already holds the bias)."""
    cols = tl.minimum(offs_n, N - 1)
    if TILE_IN_ONE_IMAGE:
        img = tile_m // rows_per_image
        gate = tl.load(gate_ptr + img * stride_gate_b + cols * stride_gate_n).to(tl.float32)[None, :]
    else:
        img = (tile_m + local_m) // rows_per_image
        gate = tl.load(gate_ptr + img[:, None] * stride_gate_b + cols[None, :] * stride_gate_n).to(tl.float32)
    tile_base = tile_m.to(tl.int64)
    offs_m = tile_m + tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    in_tile_m = tl.arange(0, BLOCK_M)[:, None]
    residual = tl.load(res_ptr + tile_base * stride_rm + in_tile_m * stride_rm + offs_n[None, :] * stride_rn,
                       mask=mask, other=0.0)
    y = residual.to(tl.float32) + gate * acc
    tl.store(out_ptr + tile_base * stride_om + in_tile_m * stride_om + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configs: autotuned on the GPU, one fixed config under the interpreter
# --------------------------------------------------------------------------------------------

def _cfg(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


# Hopper (H100/H200, 228 KB shared memory per SM). The first five are 16-bit configs (wgmma
# tiles 128x256 / 256x128 / 128x128 / 64x256 / 64x128); the last two suit fp32 operands
# (BLOCK_K 32 keeps the staged tiles within shared memory).
GEMM_CONFIGS = [
    _cfg(128, 256, 64, 3, 8),
    _cfg(256, 128, 64, 3, 8),
    _cfg(128, 128, 64, 4, 8),
    _cfg(64, 256, 32, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 32, 3, 8),
    _cfg(64, 128, 32, 4, 4),
]
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
_SMEM_BUDGET = 200 * 1024   # bytes of staged A + W tiles; the rest is left for the epilogue


def config_fits(config: triton.Config, a_bytes: int, w_bytes: int) -> bool:
    """Whether the pipelined A and W tiles of `config` fit the shared-memory budget, for A and W
    elements of these sizes (fp32 takes twice bf16's bytes; under autocast A may be fp32 while W
    is bf16). The gathered shift/scale tiles of straddling modulated_linear tiles are not counted:
    a config that overflows with them fails to launch and the autotuner skips it."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return config.num_stages * (bm * bk * a_bytes + bk * bn * w_bytes) <= _SMEM_BUDGET


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: keep the configs that fit shared memory (at least one)."""
    a = named_args["h_ptr"] if "h_ptr" in named_args else named_args["a_ptr"]
    w = named_args["w_ptr"]
    kept = [c for c in configs if config_fits(c, a.element_size(), w.element_size())]
    return kept or [configs[-1]]


_HEURISTICS = {
    # every tile lies in one image when rows per image is a multiple of BLOCK_M
    "TILE_IN_ONE_IMAGE": lambda args: args["rows_per_image"] % args["BLOCK_M"] == 0,
    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
}
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "rows_per_image"]

_modulated_linear_fixed = triton.heuristics(_HEURISTICS)(_modulated_linear_kernel)
_modulated_linear_tuned = triton.autotune(
    configs=GEMM_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs},
)(_modulated_linear_fixed)
_linear_gated_residual_fixed = triton.heuristics(_HEURISTICS)(_linear_gated_residual_kernel)
_linear_gated_residual_tuned = triton.autotune(
    configs=GEMM_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs},
)(_linear_gated_residual_fixed)


def _launch_gemm(fixed, tuned, M, N, args, meta, config: Optional[triton.Config]):
    """Run a GEMM kernel: autotuned, or with `config` (a triton.Config, for tests and benchmarks),
    or with the fixed interpreter config under TRITON_INTERPRET."""
    if triton_interpreting() and config is None:
        kw = dict(INTERPRETER_CONFIG)
        launch_kw = {}
    elif config is not None:
        kw = dict(config.kwargs)
        launch_kw = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    else:
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
        tuned[grid](*args, **meta)
        return
    grid = (triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]),)
    fixed[grid](*args, **meta, **kw, **launch_kw)


STATS_MAX_BLOCK_K = 512


def _stats_blocks(K: int):
    """(BLOCK_ROWS, BLOCK_K, num_warps) for the row-wise kernels: chunks of up to
    STATS_MAX_BLOCK_K columns, ~4K elements per program (memory bound: many small programs keep
    HBM busy)."""
    block_k = min(triton.next_power_of_2(K), STATS_MAX_BLOCK_K)
    return max(1, 4096 // block_k), block_k, 4


# --------------------------------------------------------------------------------------------
# Argument checks (shared by the launchers and the dispatcher's not_supported_reasons)
# --------------------------------------------------------------------------------------------

def _autocast_dtype(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.dtype]:
    """The CUDA autocast dtype if autocast is on and the inputs are CUDA tensors, else None."""
    ts = [t for t in tensors if t is not None]
    if not ts or not all(t.is_cuda for t in ts):
        return None
    return autocast_dtype(ts[0])


def _span(t: torch.Tensor):
    """[first, last) byte addresses that a tensor's elements occupy."""
    if t.numel() == 0:
        return (0, 0)
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def _overlaps(a: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    if b is None:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1 and a.device == b.device


def _per_image_problems(name: str, t, B_expected: Optional[int], width: int) -> List[str]:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != width:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        return [f"{name} must be a per-image (B, {width}) tensor; got {got}"]
    if B_expected is not None and t.shape[0] != B_expected:
        return [f"{name} has {t.shape[0]} images but the other per-image tensors have {B_expected}"]
    return []


def _linear_problems(x_name: str, x, weight, bias) -> List[str]:
    problems = []
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return [f"{x_name} must be a tensor (..., K)"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return [f"weight must be a 2-D (N_out, K) tensor; got {getattr(weight, 'shape', type(weight).__name__)}"]
    if weight.shape[1] != x.shape[-1]:
        problems.append(f"weight is {tuple(weight.shape)} but {x_name}'s last dim is {x.shape[-1]}: "
                        f"expected weight (N_out, {x.shape[-1]})")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        problems.append(f"bias must be ({weight.shape[0]},) or None; got {getattr(bias, 'shape', type(bias).__name__)}")
    if weight.shape[0] == 0 or x.shape[-1] == 0:
        problems.append(f"empty matmul dimension (weight {tuple(weight.shape)})")
    return problems


def _rows_per_image_problems(x_name: str, x: torch.Tensor, B: int) -> List[str]:
    rows = x.numel() // max(1, x.shape[-1])
    if B == 0 or rows % B:
        return [f"{x_name} has {rows} token rows, not a multiple of the {B} images of the per-image tensors "
                f"(tokens (B * L, T, D) with per-image (B, D) conditioning)"]
    return []


def _dtype_problems(tensors: Sequence[Optional[torch.Tensor]], autocast: Optional[torch.dtype]) -> List[str]:
    ts = [t for t in tensors if t is not None]
    bad = sorted({str(t.dtype) for t in ts if t.dtype not in _DTYPES})
    if bad:
        return [f"dtype {', '.join(bad)} not supported: expected float32, float16 or bfloat16"]
    if autocast is None and len({t.dtype for t in ts}) > 1:
        return [f"mixed dtypes {sorted({str(t.dtype) for t in ts})}: pass every tensor in one dtype "
                f"(or run under torch.autocast('cuda'))"]
    return []


def _out_problems(out, shape, dtype, device, inputs) -> List[str]:
    if out is None:
        return []
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        return [f"out must be a {dtype} tensor of shape {tuple(shape)} on {device}; got "
                f"{getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))} on {getattr(out, 'device', None)}"]
    problems = []
    try:
        out.view(-1, shape[-1])
    except RuntimeError:
        problems.append("out must be viewable as (rows, N_out) (e.g. contiguous); pass out.contiguous() or no out")
    if any(_overlaps(out, t) for t in inputs):
        problems.append("out overlaps an input: pass a separate output tensor (the kernels are not in-place)")
    return problems


def _modulated_linear_problems(h, shift, scale, weight, bias, activation) -> List[str]:
    if activation not in _ACTIVATIONS:
        return [f"unknown activation {activation!r}: expected None or 'gelu_tanh'"]
    return _linear_problems("h", h, weight, bias) or _modulate_problems(h, shift, scale)


def _modulate_problems(h, shift, scale) -> List[str]:
    """shift/scale must be per-image (B, K) tables for tokens h (..., K) whose rows split evenly
    into the B images (LN-modulate's arguments, in every op that has it)."""
    problems = _per_image_problems("shift", shift, None, h.shape[-1])
    problems += _per_image_problems("scale", scale, shift.shape[0] if isinstance(shift, torch.Tensor) else None, h.shape[-1])
    if not problems:
        problems += _rows_per_image_problems("h", h, shift.shape[0])
    return problems


def _linear_gated_residual_problems(a, weight, bias, gate, residual) -> List[str]:
    problems = _linear_problems("a", a, weight, bias)
    if problems:
        return problems
    out_shape = tuple(a.shape[:-1]) + (weight.shape[0],)
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != out_shape:
        problems.append(f"residual must have the output's shape {out_shape}; got {getattr(residual, 'shape', None)}")
    problems += _per_image_problems("gate", gate, None, weight.shape[0])
    if not problems:
        problems += _rows_per_image_problems("a", a, gate.shape[0])
    return problems


def _raise_if(problems: List[str], op: str) -> None:
    if problems:
        raise ValueError(f"fastlego.kernels.fused_linear.{op}: " + "; ".join(problems))


def _kernel_reasons(tensors) -> List[str]:
    """triton_reasons; under CUDA autocast mixed dtypes are fine (cast like F.linear)."""
    return triton_reasons(tensors, mixed_dtypes_ok=_autocast_dtype(tensors) is not None)


def _check_device(tensors, op: str) -> None:
    ts = [t for t in tensors if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"fastlego.kernels.fused_linear.{op}: tensors on several devices {sorted(map(str, devices))}; "
                         f"move them to one CUDA device")
    dev = next(iter(devices))
    if dev.type != "cuda" and not (dev.type == "cpu" and triton_interpreting()):
        raise ValueError(f"fastlego.kernels.fused_linear.{op}: tensors are on {dev}; Triton kernels need a CUDA "
                         f"device (or TRITON_INTERPRET=1 for CPU testing)")
    if ts[0].dtype == torch.bfloat16 and triton_interpreting():
        raise ValueError(f"fastlego.kernels.fused_linear.{op}: bfloat16 under Triton's interpreter gives wrong "
                         f"tl.dot results; use float32/float16 there")


def _input_precision(mma_dtype: torch.dtype) -> str:
    """fp32 dots follow torch's TF32 switch for matmuls (what F.linear does); 16-bit use tensor cores."""
    if mma_dtype == torch.float32 and not (torch.backends.cuda.matmul.allow_tf32 and not triton_interpreting()):
        return "ieee"
    # "tf32x3": three TF32 MMAs per product (split operands), about fp32's accuracy on tensor cores.
    # Plain "tf32" truncates the LN-normalised A tile and misses the 2x-of-cuBLAS-TF32 budget
    # (measured on an H200: 6.3e-3 vs cuBLAS 2.3e-3 on a 384 -> 1152 modulated_linear).
    return "tf32x3"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as an (M, K) matrix: a view when the strides allow it, otherwise a copy."""
    return x.reshape(-1, x.shape[-1])


def _row_stats(x2d: torch.Tensor):
    M, K = x2d.shape
    mean = torch.empty(M, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2d.device)
    block_rows, block_k, warps = _stats_blocks(K)
    _row_stats_kernel[(triton.cdiv(M, block_rows),)](
        x2d, mean, rstd, M, K, x2d.stride(0), x2d.stride(1), LN_EPS,
        BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=warps)
    return mean, rstd


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _modulated_linear(h, shift, scale, weight, bias, activation=None, *, out=None, config=None):
    """modulated_linear, optionally with a fixed triton.Config (tests, benchmarks)."""
    _raise_if(_modulated_linear_problems(h, shift, scale, weight, bias, activation), "modulated_linear")
    inputs = [h, shift, scale, weight, bias]
    _check_device(inputs, "modulated_linear")
    autocast = _autocast_dtype(inputs)
    _raise_if(_dtype_problems(inputs, autocast) + forward_only_reasons(inputs), "modulated_linear")
    compute_dtype = autocast or h.dtype
    K, N = h.shape[-1], weight.shape[0]
    out_shape = tuple(h.shape[:-1]) + (N,)
    _raise_if(_out_problems(out, out_shape, compute_dtype, h.device, inputs), "modulated_linear")
    if out is None:
        out = torch.empty(out_shape, dtype=compute_dtype, device=h.device)
    M = h.numel() // K
    if M == 0:
        return out
    x2d = _rows(h)
    w = weight.to(compute_dtype)          # a no-op unless autocast casts it (as F.linear does)
    out2d = out.view(M, N)
    mean, rstd = _row_stats(x2d)
    args = (x2d, mean, rstd, shift, scale, w, bias if bias is not None else w, out2d,
            M, N, K, M // shift.shape[0],
            x2d.stride(0), x2d.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
            w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0, out2d.stride(0), out2d.stride(1),
            triton.next_power_of_2(M))
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATIONS[activation],
                INPUT_PRECISION=_input_precision(compute_dtype))
    _launch_gemm(_modulated_linear_fixed, _modulated_linear_tuned, M, N, args, meta, config)
    return out


# --------------------------------------------------------------------------------------------
# Path choice: looked up, never measured inside a call. On an H200 (bench/RESULTS.md, 2026-11-27)
# the fused GEMM above reached 230-400 TFLOP/s where cuBLAS reaches ~600+: the prologue's
# normalise-and-modulate sits between the A loads and the MMAs and the pipeliner cannot hide it.
# Path (b) moves LN-modulate into one memory-bound pass (read h, write A: 2 * M * K elements,
# ~0.1 ms at S_PG_64's qkv) and leaves the matmul to cuBLAS. Which is faster depends on the shape
# and the card: `fastlego.tune` (fastlego/tuning.py) measures both paths, the fused GEMM in each
# tile config below, outside any model call, and the launchers look the shape up here. Untuned
# shapes and deterministic mode take the fixed rule (`tuning.fixed_path`: cuBLAS on CUDA, the fused
# GEMM under the interpreter). Nothing here times or syncs, so a call is the same in eager, in a
# CUDA-graph capture and on every DDP rank.
# --------------------------------------------------------------------------------------------

def _shape_key(op, x, weight, per_image, extra) -> str:
    """The tuning key of a call: op, rows M (as the next power of two, the autotuner's bucket),
    N, K, rows per image, the dtypes (input, weight, autocast's) and the op's extra (activation,
    or residual and gate dtypes)."""
    M = x.numel() // x.shape[-1]
    amp = _autocast_dtype([x, weight])
    return (f"{op}|M<={triton.next_power_of_2(max(M, 1))}|N={weight.shape[0]}|K={x.shape[-1]}"
            f"|rows={M // max(per_image.shape[0], 1)}|{x.dtype}|{weight.dtype}|amp={amp}|{extra}").replace("torch.", "")


def _tuning_configs(x: torch.Tensor, weight: torch.Tensor) -> list:
    """The fused GEMM's tile configs worth timing for A = x and W = weight: those whose staged
    tiles fit shared memory (A in x's dtype, W in the compute dtype, as `_prune_configs` counts);
    under the interpreter only its fixed config (None)."""
    if triton_interpreting() or not x.is_cuda:
        return [None]
    w_bytes = torch.empty((), dtype=_autocast_dtype([x, weight]) or x.dtype).element_size()
    kept = [c for c in GEMM_CONFIGS if config_fits(c, x.element_size(), w_bytes)]
    return kept or [GEMM_CONFIGS[-1]]


# The candidates `fastlego.tune` times (arguments as the public launchers take them).
tuning.register_gemm("modulated_linear", fused=lambda *a, config: _modulated_linear(*a, config=config),
                     cublas=lambda *a: modulated_linear_cublas(*a), configs=lambda a: _tuning_configs(a[0], a[3]))
tuning.register_gemm("linear_gated_residual", fused=lambda *a, config: _linear_gated_residual(*a, config=config),
                     cublas=lambda *a: linear_gated_residual_cublas(*a), configs=lambda a: _tuning_configs(a[0], a[1]))


def modulated_linear(h, shift, scale, weight, bias, activation: Optional[str] = None, *, out=None):
    """act(Linear(LN(h) * (1 + scale[img]) + shift[img])), by the path `fastlego.tune` measured
    fastest for this shape (else the fixed rule, see above) of
    (a) an LN statistics kernel + one GEMM whose prologue normalises and modulates A, and
    (b) one LN-modulate kernel + cuBLAS(Lt) with the bias (+ GELU) epilogue.
    h (..., D); shift/scale (B, D) any strides; weight (N_out, D); bias (N_out,) or None;
    activation None or "gelu_tanh". Returns (..., N_out)."""
    _raise_if(_modulated_linear_problems(h, shift, scale, weight, bias, activation), "modulated_linear")
    args = (h, shift, scale, weight, bias, activation)
    path, config = tuning.lookup("modulated_linear", _shape_key("modulated_linear", h, weight, shift, activation), args)
    if path == "fused":
        return _modulated_linear(*args, out=out, config=config)
    return modulated_linear_cublas(*args, out=out)


def modulated_linear_cublas(h, shift, scale, weight, bias, activation: Optional[str] = None, *, out=None):
    """Path (b), for timing against `modulated_linear`: one Triton LN-modulate kernel writes the
    modulated activations in the MMA dtype, cuBLAS(Lt) does matmul + bias (+ tanh-GELU epilogue)."""
    _raise_if(_modulated_linear_problems(h, shift, scale, weight, bias, activation), "modulated_linear_cublas")
    inputs = [h, shift, scale, weight, bias]
    _check_device(inputs, "modulated_linear_cublas")
    autocast = _autocast_dtype(inputs)
    _raise_if(_dtype_problems(inputs, autocast) + forward_only_reasons(inputs), "modulated_linear_cublas")
    compute_dtype = autocast or h.dtype
    N = weight.shape[0]
    out_shape = tuple(h.shape[:-1]) + (N,)
    _raise_if(_out_problems(out, out_shape, compute_dtype, h.device, inputs), "modulated_linear_cublas")
    a = layernorm_modulate(h, shift, scale, compute_dtype)
    w = weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    # the operands are already in the compute dtype: keep autocast from re-casting them
    with torch.autocast("cuda", enabled=False) if a.is_cuda else contextlib.nullcontext():
        if activation == "gelu_tanh" and b is not None and a.is_cuda:
            y = torch._addmm_activation(b, a, w.t(), use_gelu=True)   # cublasLt GELU (tanh) epilogue
        else:
            y = F.linear(a, w, b)
            if activation == "gelu_tanh":
                y = F.gelu(y, approximate="tanh")
    y = y.view(out_shape)
    if out is None:
        return y
    return out.copy_(y)


def _linear_gated_residual(a, weight, bias, gate, residual, *, out=None, config=None):
    """linear_gated_residual, optionally with a fixed triton.Config (tests, benchmarks)."""
    _raise_if(_linear_gated_residual_problems(a, weight, bias, gate, residual), "linear_gated_residual")
    inputs = [a, weight, bias, gate, residual]
    _check_device(inputs, "linear_gated_residual")
    autocast = _autocast_dtype(inputs)
    _raise_if(_dtype_problems(inputs, autocast) + forward_only_reasons(inputs), "linear_gated_residual")
    compute_dtype = autocast or a.dtype
    # the reference's dtype: F.linear gives compute_dtype, then gate * y + residual promote
    out_dtype = torch.promote_types(torch.promote_types(compute_dtype, gate.dtype), residual.dtype)
    K, N = a.shape[-1], weight.shape[0]
    out_shape = tuple(residual.shape)
    _raise_if(_out_problems(out, out_shape, out_dtype, a.device, inputs), "linear_gated_residual")
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=a.device)
    M = a.numel() // K
    if M == 0:
        return out
    a2d, res2d = _rows(a), _rows(residual)
    w = weight.to(compute_dtype)
    out2d = out.view(M, N)
    args = (a2d, w, bias if bias is not None else w, gate, res2d, out2d,
            M, N, K, M // gate.shape[0],
            a2d.stride(0), a2d.stride(1), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0,
            gate.stride(0), gate.stride(1), res2d.stride(0), res2d.stride(1), out2d.stride(0), out2d.stride(1),
            triton.next_power_of_2(M))
    meta = dict(HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(compute_dtype))
    _launch_gemm(_linear_gated_residual_fixed, _linear_gated_residual_tuned, M, N, args, meta, config)
    return out


def linear_gated_residual(a, weight, bias, gate, residual, *, out=None):
    """residual + gate[img] * (a @ W^T + bias), by the path `fastlego.tune` measured fastest for
    this shape (else the fixed rule, see above) of one GEMM with a fused bias + gate + residual
    epilogue and cuBLAS + one fused elementwise pass.
    a (..., K); weight (N, K); bias (N,) or None; gate (B, N) any strides; residual (..., N).
    out must not overlap the inputs. Returns (..., N)."""
    _raise_if(_linear_gated_residual_problems(a, weight, bias, gate, residual), "linear_gated_residual")
    args = (a, weight, bias, gate, residual)
    key = _shape_key("linear_gated_residual", a, weight, gate, f"residual={residual.dtype},gate={gate.dtype}")
    path, config = tuning.lookup("linear_gated_residual", key, args)
    if path == "fused":
        return _linear_gated_residual(*args, out=out, config=config)
    return linear_gated_residual_cublas(*args, out=out)


def linear_gated_residual_cublas(a, weight, bias, gate, residual, *, out=None):
    """For timing against `linear_gated_residual`: cuBLAS matmul + bias, then one fused
    elementwise kernel (torch.addcmul) for residual + gate[img] * y."""
    _raise_if(_linear_gated_residual_problems(a, weight, bias, gate, residual), "linear_gated_residual_cublas")
    y = F.linear(a, weight, bias)
    B = gate.shape[0]
    res3 = residual.reshape(B, -1, residual.shape[-1])
    out3 = torch.addcmul(res3, gate[:, None, :], y.reshape(B, -1, y.shape[-1]))
    if out is None:
        return out3.view(residual.shape)
    return out.copy_(out3.view(residual.shape))


# --------------------------------------------------------------------------------------------
# Backward pieces (used by fastlego.custom_ops; the GEMMs of the backward are cuBLAS's)
# --------------------------------------------------------------------------------------------

# The row-wise backward kernels hold whole rows (K or N features) in registers.
BACKWARD_MAX_WIDTH = 4096
# Rows per program of the row-wise backward kernels: the per-image partial sums are one fp32 row
# per program, so more rows per program means fewer partials to sum (M / 64 rows of K floats).
_BACKWARD_ROWS_PER_PROGRAM = 64


def _row_backward_blocks(width: int, rows_per_image: int):
    """(BLOCK_ROWS, BLOCK_W, ROW_ITERS, blocks_per_image, num_warps) of the row-wise backward
    kernels: ~4K elements per row tile, up to 64 rows of one image per program. Fixed by the
    shape alone (no autotuning), so the summation order, hence the result, is reproducible."""
    block_w = triton.next_power_of_2(width)
    block_rows = max(1, min(16, 4096 // block_w))
    rows = min(_BACKWARD_ROWS_PER_PROGRAM, max(rows_per_image, 1))
    row_iters = triton.cdiv(rows, block_rows)
    blocks_per_image = triton.cdiv(max(rows_per_image, 1), block_rows * row_iters)
    return block_rows, block_w, row_iters, blocks_per_image, (8 if block_w >= 2048 else 4)


def _row_backward_problems(x_name: str, x, width: int) -> List[str]:
    if width > BACKWARD_MAX_WIDTH:
        return [f"{x_name} rows have {width} features: the Triton backward kernels hold whole rows of at most "
                f"{BACKWARD_MAX_WIDTH} (the reference backward takes wider ones)"]
    return []


def layernorm_modulate(h, shift, scale, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LN(h) * (1 + scale[img]) + shift[img] as an (M, K) matrix of `dtype` (default h's): one
    memory-bound Triton pass (fp32 math). The A operand of modulated_linear, written out."""
    _raise_if(_modulate_problems(h, shift, scale), "layernorm_modulate")
    _check_device([h, shift, scale], "layernorm_modulate")
    x2d = _rows(h)
    M, K = x2d.shape
    a = torch.empty((M, K), dtype=dtype or h.dtype, device=h.device)
    if M:
        block_rows, block_k, warps = _stats_blocks(K)
        _layernorm_modulate_kernel[(triton.cdiv(M, block_rows),)](
            x2d, shift, scale, a, M, K, M // shift.shape[0], x2d.stride(0), x2d.stride(1),
            shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1), a.stride(0), a.stride(1), LN_EPS,
            BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=warps)
    return a


def layernorm_modulate_backward(h, shift, scale, grad_a, grad_h=None):
    """Gradients of a = LN(h) * (1 + scale[img]) + shift[img] given grad_a = dL/da (..., K):
    (grad_h in h's dtype and shape, grad_shift in shift's dtype, grad_scale in scale's dtype).
    `grad_h` (optional, h's shape) is a gradient already flowing to h (a residual branch's): it is
    added to the LN gradient in fp32 before the one rounding. One Triton pass over h and grad_a
    (the LN statistics are recomputed from h in registers), per-image sums as per-program partial
    rows summed in a fixed order: deterministic."""
    _raise_if(_layernorm_modulate_backward_problems(h, shift, scale, grad_a, grad_h), "layernorm_modulate_backward")
    _check_device([h, shift, scale, grad_a, grad_h], "layernorm_modulate_backward")
    _raise_if(_row_backward_problems("h", h, h.shape[-1]), "layernorm_modulate_backward")
    x2d, g2d = _rows(h), _rows(grad_a)
    gin = _rows(grad_h) if grad_h is not None else g2d
    M, K = x2d.shape
    B = shift.shape[0]
    rpi = M // B if B else 0
    dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    block_rows, block_k, row_iters, bpi, warps = _row_backward_blocks(K, rpi)
    parts = torch.empty((2, B * bpi, K), dtype=torch.float32, device=h.device)
    if M:
        _layernorm_modulate_backward_kernel[(B * bpi,)](
            x2d, scale, g2d, gin, dx, parts[0], parts[1], K, rpi, bpi,
            x2d.stride(0), x2d.stride(1), scale.stride(0), scale.stride(1), g2d.stride(0), g2d.stride(1),
            gin.stride(0), gin.stride(1), dx.stride(0), dx.stride(1), LN_EPS,
            HAS_GIN=grad_h is not None, BLOCK_ROWS=block_rows, BLOCK_K=block_k, ROW_ITERS=row_iters,
            num_warps=warps)
    else:
        parts.zero_()
    dshift, dscale = (part.view(B, bpi, K).sum(1) for part in parts)   # two separate buffers
    return dx.view(h.shape), dshift.to(shift.dtype), dscale.to(scale.dtype)


def gated_residual_backward(grad_out, y, gate, dy_dtype: Optional[torch.dtype] = None):
    """The elementwise part of the backward of out = residual + gate[img] * (y = Linear(a)):
    (dy = grad_out * gate[img] in `dy_dtype` (default y's), dgate = sum over each image's rows of
    grad_out * y in gate's dtype, dbias = the Linear's bias gradient sum_rows dy in fp32). d
    residual is grad_out itself. One Triton pass; deterministic sums."""
    _raise_if(_gated_residual_backward_problems(grad_out, y, gate), "gated_residual_backward")
    _check_device([grad_out, y, gate], "gated_residual_backward")
    _raise_if(_row_backward_problems("y", y, y.shape[-1]), "gated_residual_backward")
    g2d, y2d = _rows(grad_out), _rows(y)
    M, N = y2d.shape
    B = gate.shape[0]
    rpi = M // B if B else 0
    dy = torch.empty((M, N), dtype=dy_dtype or y.dtype, device=y.device)
    block_rows, block_n, row_iters, bpi, warps = _row_backward_blocks(N, rpi)
    parts = torch.empty((2, B * bpi, N), dtype=torch.float32, device=y.device)
    if M:
        _gated_residual_backward_kernel[(B * bpi,)](
            g2d, y2d, gate, dy, parts[0], parts[1], N, rpi, bpi,
            g2d.stride(0), g2d.stride(1), y2d.stride(0), y2d.stride(1), gate.stride(0), gate.stride(1),
            dy.stride(0), dy.stride(1),
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, ROW_ITERS=row_iters, num_warps=warps)
    else:
        parts.zero_()
    return dy.view(y.shape), parts[0].view(B, bpi, N).sum(1).to(gate.dtype), parts[1].sum(0)


# Rows per program of the GELU backward: one fp32 partial row of N per program, i.e. 1/128 of the
# M x N bf16 tensors it passes over.
_GELU_BACKWARD_ROWS = 256


def gelu_tanh_backward(grad, pre, act_into_pre: bool = False):
    """The MLP's GELU backward, fused: given the pre-activation `pre` (M.., N) and grad = dL/d
    gelu(pre) (same shape), returns (grad_pre, act, grad_bias) where grad_pre = grad * gelu'(pre) is
    written IN PLACE into `grad` (which is returned; its old values are gone), act = gelu(pre) in
    pre's dtype (fc2's input, for fc2's dW) and grad_bias = sum over rows of grad_pre (as stored) in
    fp32: fc1's bias gradient. One Triton pass (reads grad + pre, writes grad_pre + act) instead of
    three; deterministic sums. With `act_into_pre`, act is written over `pre` itself (each element
    is read before it is overwritten, by the same program) and `pre` is returned as act: no new
    M x N buffer, for a caller that needs pre no more."""
    _raise_if(_gelu_backward_problems(grad, pre, act_into_pre), "gelu_tanh_backward")
    _check_device([grad, pre], "gelu_tanh_backward")
    g2d, a2d = grad.view(-1, grad.shape[-1]), _rows(pre)
    M, N = g2d.shape
    act = a2d if act_into_pre else torch.empty((M, N), dtype=pre.dtype, device=pre.device)
    block_n = min(128, triton.next_power_of_2(max(N, 1)))
    block_rows = max(1, min(32, 4096 // block_n))
    rows = min(_GELU_BACKWARD_ROWS, max(M, 1))
    row_iters = triton.cdiv(rows, block_rows)
    row_blocks = triton.cdiv(M, block_rows * row_iters)
    parts = torch.empty((row_blocks, N), dtype=torch.float32, device=grad.device)
    if M and N:
        _gelu_tanh_backward_kernel[(row_blocks, triton.cdiv(N, block_n))](
            g2d, a2d, act, parts, M, N, g2d.stride(0), g2d.stride(1), a2d.stride(0), a2d.stride(1),
            act.stride(0), act.stride(1), BLOCK_ROWS=block_rows, BLOCK_N=block_n, ROW_ITERS=row_iters,
            num_warps=4)
    else:
        parts.zero_()
    return grad, act.view(pre.shape), parts.sum(0)


def _gelu_backward_problems(grad, pre, act_into_pre=False) -> List[str]:
    if not (isinstance(grad, torch.Tensor) and isinstance(pre, torch.Tensor)):
        return ["grad and pre must be tensors"]
    problems = []
    if act_into_pre and not pre.is_contiguous():
        problems.append("act_into_pre writes act over pre, which must then be contiguous: pass pre.contiguous()")
    if tuple(grad.shape) != tuple(pre.shape):
        problems.append(f"grad must have pre's shape {tuple(pre.shape)}; got {tuple(grad.shape)}")
    if grad.dim() == 0:
        problems.append("grad and pre must have at least one dimension (rows x features)")
    elif not grad.is_contiguous():
        problems.append("grad is written in place and must be contiguous: pass grad.contiguous()")
    for name, t in (("grad", grad), ("pre", pre)):
        if t.dtype not in _DTYPES:
            problems.append(f"{name} dtype {t.dtype} not supported: expected float32, float16 or bfloat16")
    return problems


def gelu_tanh_backward_not_supported_reasons(grad, pre, act_into_pre: bool = False) -> List[str]:
    """Why `gelu_tanh_backward` cannot take this call (empty: it can)."""
    return _gelu_backward_problems(grad, pre, act_into_pre) or triton_reasons(
        [grad, pre], mixed_dtypes_ok=True, forward_only=False)


def _layernorm_modulate_backward_problems(h, shift, scale, grad_a, grad_h=None) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (h, shift, scale, grad_a)):
        return ["h, shift, scale and grad_a must be tensors"]
    problems = _modulate_problems(h, shift, scale)
    for name, t in (("grad_a", grad_a), ("grad_h", grad_h)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(h.shape)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            problems.append(f"{name} must be a tensor of h's shape {tuple(h.shape)}; got {got}")
    return problems


def _gated_residual_backward_problems(grad_out, y, gate) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (grad_out, y, gate)):
        return ["grad_out, y and gate must be tensors"]
    problems = _per_image_problems("gate", gate, None, y.shape[-1])
    if tuple(grad_out.shape) != tuple(y.shape):
        problems.append(f"grad_out must have y's shape {tuple(y.shape)}; got {tuple(grad_out.shape)}")
    if not problems:
        problems += _rows_per_image_problems("y", y, gate.shape[0])
    return problems


def layernorm_modulate_backward_not_supported_reasons(h, shift, scale, grad_a, grad_h=None) -> List[str]:
    """Why `layernorm_modulate_backward` cannot take this call (empty: it can)."""
    return _layernorm_modulate_backward_problems(h, shift, scale, grad_a, grad_h) or (
        _row_backward_problems("h", h, h.shape[-1])
        + triton_reasons([h, shift, scale, grad_a, grad_h], mixed_dtypes_ok=True, forward_only=False))


def layernorm_modulate_not_supported_reasons(h, shift, scale, dtype=None) -> List[str]:
    """Why `layernorm_modulate` cannot take this call (empty: it can)."""
    if not all(isinstance(t, torch.Tensor) for t in (h, shift, scale)):
        return ["h, shift and scale must be tensors"]
    problems = _modulate_problems(h, shift, scale)
    if dtype is not None and dtype not in _DTYPES:
        problems.append(f"output dtype {dtype} not supported: expected float32, float16 or bfloat16")
    return problems or triton_reasons([h, shift, scale], mixed_dtypes_ok=True, forward_only=False)


def gated_residual_backward_not_supported_reasons(grad_out, y, gate, dy_dtype=None) -> List[str]:
    """Why `gated_residual_backward` cannot take this call (empty: it can)."""
    return _gated_residual_backward_problems(grad_out, y, gate) or (
        _row_backward_problems("y", y, y.shape[-1])
        + triton_reasons([grad_out, y, gate], mixed_dtypes_ok=True, forward_only=False))


# --------------------------------------------------------------------------------------------
# What the dispatcher asks before every call
# --------------------------------------------------------------------------------------------

def modulated_linear_not_supported_reasons(h, shift, scale, weight, bias, activation=None, *, out=None) -> List[str]:
    """Why `modulated_linear` cannot take this call (empty: it can)."""
    problems = _modulated_linear_problems(h, shift, scale, weight, bias, activation)
    if problems:
        return problems
    inputs = [h, shift, scale, weight, bias]
    return _kernel_reasons(inputs)


def linear_gated_residual_not_supported_reasons(a, weight, bias, gate, residual, *, out=None) -> List[str]:
    """Why `linear_gated_residual` cannot take this call (empty: it can)."""
    problems = _linear_gated_residual_problems(a, weight, bias, gate, residual)
    if problems:
        return problems
    inputs = [a, weight, bias, gate, residual]
    return _kernel_reasons(inputs)
