"""Attention inside each region, read straight from the fused qkv tensor: the `window_attention`
op (regions of <= 64 tokens), the Triton backend of `global_attention` (any token count), and
the gradient of the first, `window_attention_backward` (regions of <= 64 tokens); twins of
`fastlego.reference.window_attention`, `global_attention` and `window_attention_backward`.

Semantics (`fastlego.reference.attention`): qkv is (N, T, 3D) with the last dim laid out
(3, heads, head_dim); for every region n and head h, out[n, :, h] = softmax(q k^T * hd^-0.5) v,
written in merged-head layout (N, T, D). q, k and v are addressed by strides inside qkv (column
`s * D + h * hd + d` for s = q, k, v), so no permute or split copies are made, and the output
goes straight into (N, T, D): each qkv element is read once and each output element written once.

Two kernels:
- packed (T <= 64, the local bricks): one program takes one head of R = BLOCK_M // T whole
  regions, BLOCK_M rows in all, and computes the BLOCK_M x BLOCK_M score tile with a
  block-diagonal mask (row i may only see columns of its own region, i // T == j // T). A region
  never straddles two programs, so the softmax needs no second pass. (fp32 64-token regions with
  head_dim > 64 would spill registers: such calls go to the flash kernel.)
- flash (any T, the global bricks): one program takes BLOCK_M query rows of one (region, head)
  and streams the region's keys in BLOCK_N blocks with the online softmax (running max m, running
  sum l, rescaled accumulator), fp32 statistics.
Both launch a 1-D grid (grid axis 0 takes up to 2^31 - 1 programs; beyond that the launcher
splits the regions into several launches): 65,536 four-token regions x 6 heads (where PyTorch's kernels fail on grid y/z <= 65,535)
is 24,576 programs here.

Why block-diagonal packing, by bytes. The op is memory bound. lego_S_PG_64 at batch 256, brick 0
(region 4, patch 2 at 64x64): N = 65,536 regions x T = 4 tokens, D = 384 (6 heads x 64), bf16:
  reads  N*T*3D*2 B = 604 MB (qkv), writes N*T*D*2 B = 201 MB (out): 805 MB per block
  -> 0.20 ms at ~4 TB/s, 0.40 ms for the brick's 2 blocks (fp32: twice that).
  Useful FLOPs 4*T*T*hd per (region, head) = 1.6 GFLOP: 2 FLOP/byte.
  Packed with BLOCK_M = 64 (16 regions per program) the dots compute the full 64 x 64 tile, 16x
  the useful work: 4*BLOCK_M*hd FLOP per row = 25.8 GFLOP, 32 FLOP/byte, ~30 us of tensor-core
  time hidden under the 200 us of memory time (the bf16 ridge of an H100/H200 is ~250 FLOP/byte),
  while one program still moves a full 64-row tile (24 KB of q, k, v) with 128-byte row segments.
  For fp32 (IEEE dots run on the FMA units: ~20 FLOP/byte ridge) the tile shrinks to
  BLOCK_M = max(16, T): 4 regions of 4 tokens, 6.4 GFLOP over 1.6 GB, 4 FLOP/byte.
The region-16 brick of the same model has patch 8, so it too has T = 4 tokens: N = 4,096
regions, 50 MB per block (13 us at ~4 TB/s), 4 blocks. A 16-token window (e.g. region 8, patch
2) moves the same bytes per token, N*T*4D*elt in all, and packs 4 regions per program. The
bytes floor is independent of T; only the wasted (masked) FLOPs grow with BLOCK_M / T.

Precision: fp32 statistics (max, sum, exp2) always. bf16/fp16 inputs: P is rounded to the input
dtype before the P @ V dot, as flash attention does. fp32 dots and autocast follow
`kernels/policy.py` (IEEE fp32, or 3xTF32 when PyTorch's TF32 matmul switch is on; under autocast
of the tensor's device the kernel computes in the autocast dtype and returns that dtype, as
`scaled_dot_product_attention` does; CPU autocast applies under the interpreter).

Backward (`window_attention_backward`, T <= 64; `window_attention_backward_not_supported_reasons`
says when):
grad_qkv (N, T, 3D) from qkv and grad_out = dL/d out (N, T, D). Same packing as the forward: one
program per head of R = BLOCK_M // T whole regions, so every row of P is whole in one tile. It
recomputes S = q k^T * scale and P = softmax(S) (nothing is saved by the forward), then
  dV = P^T dO,  dP = dO V^T,  Delta_i = sum_j P_ij dP_ij (= rowsum(dO * O)),
  dS = P * (dP - Delta),  dQ = scale * dS K,  dK = scale * dS^T Q,
and writes dq, dk, dv straight into grad_qkv at the columns the forward reads q, k, v from. Each
grad_qkv element is written by exactly one program: no atomics, no zero-fill, bitwise
deterministic. fp32 P, dP, Delta and accumulators; for 16-bit inputs P and dS are rounded to the
input dtype before the dots that use them (as flash attention does). Cost for the brick above
(lego_S_PG_64, batch 256, brick 0, bf16):
  reads  N*T*3D*2 B = 604 MB (qkv) + N*T*D*2 B = 201 MB (grad_out), writes 604 MB (grad_qkv):
  1409 MB per block -> 0.35 ms at ~4 TB/s, 0.70 ms for the brick's 2 blocks (fp32: twice that).
  Useful FLOPs 10*T*T*hd per (region, head) (five T x T x hd products: S, dV, dP, dQ, dK) = 4.0
  GFLOP. Packed with BLOCK_M = 64 the five dots compute 10*BLOCK_M*hd FLOP per row = 64.4 GFLOP,
  46 FLOP/byte: under the bf16 ridge (~250), ~65 us of tensor-core time under 350 us of memory
  time. fp32 (BLOCK_M = 16): 16.1 GFLOP over 2.8 GB, 5.7 FLOP/byte (ridge ~20). The tile holds
  about twice the forward's registers (q, k, v, dO, fp32 dq, dk, dv, P, dP), so 16-bit tiles drop
  to 32 rows for head_dim 128 and 16 for 256, and head dims that would still spill go to the
  reference (SDPA) backward (`PACKED_BACKWARD_MAX_BLOCK_D`).
Autograd is wired outside this module (fastlego.custom_ops pairs the forward with this backward
through the `window_attention_backward` op); called directly, `window_attention` itself is
forward-only (`window_attention_not_supported_reasons` refuses qkv that requires grad while grad
mode is on).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .policy import (cdiv, compute_dtype, dot_precision, launch_problems, next_power_of_2, out_problems, raise_if,
                     triton_reasons)

# Regions of at most this many tokens go to the packed kernel, larger ones to the flash kernel.
PACKED_MAX_TOKENS = 64
# The packed kernel keeps whole BLOCK_M x BLOCK_D tiles of q, k and v (and BLOCK_M x BLOCK_M
# scores) in registers; above this many elements a tile it would spill (fp32 64-token regions with
# head_dim > 64), and the flash kernel's smaller tiles take the call instead. Keyed by element size.
PACKED_MAX_TILE_ELEMENTS = {2: 64 * 256, 4: 64 * 64}
# The packed backward holds about twice the forward's registers per tile (q, k, v, dO, fp32 dq, dk,
# dv, P, dP): the largest BLOCK_D it takes without spilling, per BLOCK_M, keyed by element size
# (ptxas -v for sm_90: 16-bit 64 x 256 and fp32 64 x 128 / 32 x 128 spill). Larger head dims go to
# the reference (SDPA) backward.
PACKED_BACKWARD_MAX_BLOCK_D = {2: {16: 256, 32: 256, 64: 128}, 4: {16: 256, 32: 64, 64: 64}}
# Head dims are padded to a power of two (72 -> 128) with masked loads; 256 is the largest tile.
MAX_HEAD_DIM = 256

_LOG2E = 1.4426950408889634
# CUDA's limit on grid axis 0.
_MAX_PROGRAMS = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _region_tile(pid, num_heads, num_regions,
                 TOKENS: tl.constexpr, REGIONS_PER_BLOCK: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The packed kernels' tile of program pid: head pid % heads of the R = REGIONS_PER_BLOCK
    regions of block pid // heads (the heads of one block are neighbouring programs, so those
    reading the same qkv rows run together: they share DRAM pages and L2). Row i of the tile is
    token i % T of region block * R + i // T; column d is element d of the head, at merged-head
    column h * hd + d. Rows past R * T or past the last region, and columns past hd, are padding:
    masked off (loaded as zeros, never stored).

    Returns (local_region, region, token) per row (BLOCK_M,), head_cols = h * hd + d as a
    (1, BLOCK_D) row, and mask (BLOCK_M, BLOCK_D)."""
    head = pid % num_heads
    block = pid // num_heads
    rows = tl.arange(0, BLOCK_M)
    local_region = rows // TOKENS
    token = rows % TOKENS
    region = block * REGIONS_PER_BLOCK + local_region
    row_ok = (local_region < REGIONS_PER_BLOCK) & (region < num_regions)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    mask = row_ok[:, None] & col_ok[None, :]
    head_cols = (head * HEAD_DIM + cols)[None, :]
    return local_region, region, token, head_cols, mask


@triton.jit
def _load_qkv(q_ptrs, width, stride_qkv_c, mask):
    """q, k, v tiles of one head: q at q_ptrs, k and v width D and 2D qkv columns further."""
    q = tl.load(q_ptrs, mask=mask, other=0.0)
    k = tl.load(q_ptrs + width * stride_qkv_c, mask=mask, other=0.0)
    v = tl.load(q_ptrs + 2 * width * stride_qkv_c, mask=mask, other=0.0)
    return q, k, v


@triton.jit
def _region_softmax_numerator(q, k, local_region, qk_scale, PRECISION: tl.constexpr):
    """exp2(S2 - rowmax S2), S2 = q k^T * qk_scale (base-2 scores), under the block-diagonal mask:
    row i sees column j only if both are tokens of the same region (masked entries are exactly 0).
    Each row sees at least itself, so its max is finite (padding rows form their own zero
    "regions" and stay finite too). Divided by its row sum: P = softmax(q k^T * hd^-0.5) per region."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    same_region = local_region[:, None] == local_region[None, :]
    s = tl.where(same_region, s, float("-inf"))
    m = tl.max(s, axis=1)
    return tl.exp2(s - m[:, None])


@triton.jit
def _packed_window_attention_kernel(
    qkv_ptr, out_ptr,
    num_regions, num_heads, width,            # width D = heads * head_dim: q at column 0, k at D, v at 2D
    stride_qkv_n, stride_qkv_t, stride_qkv_c,
    stride_out_n, stride_out_t, stride_out_c,
    qk_scale,                                 # head_dim^-0.5 * log2(e): the softmax runs in base 2
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, REGIONS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # program -> (block of REGIONS_PER_BLOCK regions, head); row i of the tile is token i % T of
    # region block * R + i // T (see _region_tile).
    local_region, region, token, head_cols, mask = _region_tile(
        tl.program_id(0), num_heads, num_regions, TOKENS, REGIONS_PER_BLOCK, BLOCK_M, BLOCK_D, HEAD_DIM)

    # q, k, v of this head: hd contiguous elements per row at columns h*hd, D + h*hd, 2D + h*hd.
    row_offset = region.to(tl.int64) * stride_qkv_n + token * stride_qkv_t
    q, k, v = _load_qkv(qkv_ptr + row_offset[:, None] + head_cols * stride_qkv_c, width, stride_qkv_c, mask)

    # Scores of every row against every column of the tile under the block-diagonal mask, then
    # the softmax: P V divided by P's row sums.
    p = _region_softmax_numerator(q, k, local_region, qk_scale, PRECISION)
    l = tl.sum(p, axis=1)
    o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l[:, None]

    out_offset = region.to(tl.int64) * stride_out_n + token * stride_out_t
    out_ptrs = out_ptr + out_offset[:, None] + head_cols * stride_out_c
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _flash_attention_kernel(
    qkv_ptr, out_ptr,
    num_heads, seq_len, width,
    stride_qkv_n, stride_qkv_t, stride_qkv_c,
    stride_out_n, stride_out_t, stride_out_c,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # program -> (region, head, block of BLOCK_M queries), queries fastest: the programs that
    # stream the same keys and values run together and find them in L2.
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(seq_len, BLOCK_M)
    m_block = pid % num_m_blocks
    region_head = pid // num_m_blocks
    head = region_head % num_heads
    region = region_head // num_heads

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    base = qkv_ptr + region.to(tl.int64) * stride_qkv_n + (head * HEAD_DIM + cols)[None, :] * stride_qkv_c

    q = tl.load(base + offs_m[:, None] * stride_qkv_t, mask=(offs_m < seq_len)[:, None] & col_ok[None, :], other=0.0)

    # Online softmax in base 2: m_i the running row max of the scaled scores, l_i the running sum
    # of exp2(s - m_i), acc the running sum of exp2(s - m_i) v. A new block with max m_new
    # rescales both by alpha = exp2(m_i - m_new) (0 on the first block, where m_i = -inf).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        keys = start_n + offs_n
        kv_mask = (keys < seq_len)[:, None] & col_ok[None, :]
        kv_ptrs = base + keys[:, None] * stride_qkv_t
        k = tl.load(kv_ptrs + width * stride_qkv_c, mask=kv_mask, other=0.0)
        v = tl.load(kv_ptrs + 2 * width * stride_qkv_c, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((keys < seq_len)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]

    out_ptrs = (out_ptr + region.to(tl.int64) * stride_out_n + offs_m[:, None] * stride_out_t
                + (head * HEAD_DIM + cols)[None, :] * stride_out_c)
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=(offs_m < seq_len)[:, None] & col_ok[None, :])


@triton.jit
def _packed_window_attention_backward_kernel(
    qkv_ptr, grad_out_ptr, grad_qkv_ptr,
    num_regions, num_heads, width,            # width D = heads * head_dim: q at column 0, k at D, v at 2D
    stride_qkv_n, stride_qkv_t, stride_qkv_c,
    stride_do_n, stride_do_t, stride_do_c,
    stride_dqkv_n, stride_dqkv_t, stride_dqkv_c,
    qk_scale,                                 # head_dim^-0.5 * log2(e): the softmax runs in base 2
    sm_scale,                                 # head_dim^-0.5: dS is the gradient of the natural-base S
    TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, REGIONS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # Same packing as the forward: program -> (block of R = REGIONS_PER_BLOCK whole regions, head),
    # tile row i = token i % T of region block * R + i // T. A region's rows are all in this tile,
    # so this program writes every gradient element of its (regions, head) and nothing else:
    # no atomics, no second pass, bitwise-deterministic.
    local_region, region, token, head_cols, mask = _region_tile(
        tl.program_id(0), num_heads, num_regions, TOKENS, REGIONS_PER_BLOCK, BLOCK_M, BLOCK_D, HEAD_DIM)

    # q, k, v (BLOCK_M x BLOCK_D) at qkv columns s*D + h*hd + d, dO at grad_out column h*hd + d.
    # Padding rows and columns load as zeros: their scores are 0 (finite softmax) and their dO is
    # 0, so they add nothing to the real rows' dP, dS or dV, and they are never stored.
    qkv_row = region.to(tl.int64) * stride_qkv_n + token * stride_qkv_t
    q, k, v = _load_qkv(qkv_ptr + qkv_row[:, None] + head_cols * stride_qkv_c, width, stride_qkv_c, mask)
    do_row = region.to(tl.int64) * stride_do_n + token * stride_do_t
    do = tl.load(grad_out_ptr + do_row[:, None] + head_cols * stride_do_c, mask=mask, other=0.0)

    # Recompute P like the forward (fp32 max, exp2, sum; no saved statistics needed: every row is
    # whole in the tile): S2 = q k^T * scale * log2(e) with the block-diagonal mask,
    # P = exp2(S2 - max) / sum, i.e. P = softmax(q k^T * scale) within each region.
    p = _region_softmax_numerator(q, k, local_region, qk_scale, PRECISION)
    p = p / tl.sum(p, axis=1)[:, None]            # masked entries are exactly 0

    # O = P V  =>  dV = P^T dO, dP = dO V^T. For 16-bit inputs P is rounded to the input dtype
    # before its dot (as in the forward and flash attention); accumulation is fp32.
    dv = tl.dot(tl.trans(p.to(v.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)

    # Softmax backward: dS_ij = P_ij (dP_ij - Delta_i), Delta_i = sum_j P_ij dP_ij (= rowsum(dO * O),
    # computed here from the fp32 P and dP of the tile; masked P_ij = 0 drop out of the sum).
    delta = tl.sum(p * dp, axis=1)
    ds = p * (dp - delta[:, None])

    # S = scale * q k^T  =>  dQ = scale * dS K, dK = scale * dS^T Q (dS rounded like P).
    ds_in = ds.to(q.dtype)
    dq = tl.dot(ds_in, k, input_precision=PRECISION) * sm_scale
    dk = tl.dot(tl.trans(ds_in), q, input_precision=PRECISION) * sm_scale

    # grad_qkv has qkv's column layout: dq, dk, dv at columns h*hd + d, D + h*hd + d, 2D + h*hd + d.
    dqkv_row = region.to(tl.int64) * stride_dqkv_n + token * stride_dqkv_t
    dq_ptrs = grad_qkv_ptr + dqkv_row[:, None] + head_cols * stride_dqkv_c
    out_ty = grad_qkv_ptr.dtype.element_ty
    tl.store(dq_ptrs, dq.to(out_ty), mask=mask)
    tl.store(dq_ptrs + width * stride_dqkv_c, dk.to(out_ty), mask=mask)
    tl.store(dq_ptrs + 2 * width * stride_dqkv_c, dv.to(out_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _shape_problems(qkv, num_heads) -> List[str]:
    """What is wrong with the shapes (empty: qkv is (N, T, 3 * heads * head_dim), head_dim supported)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        return [f"qkv must be a (N, T, 3D) tensor, got {tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}"]
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        return [f"num_heads must be a positive int, got {num_heads!r}"]
    N, T, three_d = qkv.shape
    if three_d % (3 * num_heads) or three_d == 0:
        return [f"qkv's last dim {three_d} is not 3 * num_heads * head_dim for num_heads={num_heads}: "
                f"it must be a positive multiple of {3 * num_heads}"]
    problems = []
    hd = three_d // (3 * num_heads)
    if hd > MAX_HEAD_DIM:
        problems.append(f"head_dim {hd} > {MAX_HEAD_DIM}: the kernels hold a whole head row in one tile")
    if T < 1:
        problems.append(f"qkv has T={T} tokens per region: expected at least 1")
    return problems


def window_attention_not_supported_reasons(qkv, num_heads) -> List[str]:
    """Why the Triton attention kernels cannot take this call (empty list: they can)."""
    problems = _shape_problems(qkv, num_heads)
    if problems and (not isinstance(qkv, torch.Tensor) or qkv.dim() != 3):
        return problems
    return triton_reasons([qkv]) + problems


def _packed_config(tokens: int, head_dim: int, fp32: bool):
    """(BLOCK_M, regions per program, BLOCK_D, num_warps) of the packed kernel (see the module
    docstring). Chosen so that no config spills registers on sm_90 (checked with cuobjdump)."""
    block_d = max(16, next_power_of_2(head_dim))
    if fp32:
        block_m = max(16, next_power_of_2(tokens))   # fp32 dots are slow: fewest wasted FLOPs
    else:
        block_m = max(64, next_power_of_2(tokens))   # tensor cores: waste is free, tiles big
    num_warps = 4 if block_m * block_d <= 2048 else 8
    return block_m, block_m // tokens, block_d, num_warps


def _flash_config(head_dim: int, fp32: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of the flash kernel; no register spills
    on sm_90 for head dims up to 256 in any dtype (checked with cuobjdump)."""
    block_d = max(16, next_power_of_2(head_dim))
    if fp32:
        return (64, 32, block_d, 8, 2) if block_d <= 128 else (16, 32, block_d, 8, 2)
    if block_d <= 128:
        return 128, 64, block_d, (8 if block_d >= 64 else 4), 3
    return 64, 16, block_d, 8, 2


def window_attention(qkv: torch.Tensor, num_heads: int, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention over the T tokens of each region: qkv (N, T, 3D) -> (N, T, D).

    Same result as `fastlego.reference.window_attention`. Regions of <= 64 tokens run the packed kernel,
    larger ones the flash kernel. `out`, if given, must be (N, T, D) of the compute dtype (the
    autocast dtype under autocast, else qkv's) on qkv's device; it is returned."""
    dtype = _checked(qkv, num_heads, out)
    return _run(qkv, num_heads, out, dtype, _tiling(qkv, num_heads, dtype))


def window_attention_plan(qkv: torch.Tensor, num_heads: int):
    """`window_attention` for every call like this one, checked and tiled once: the returned
    function takes calls whose qkv has this shape, strides, dtype and device under this
    autocast and grad state (the dispatcher's decision key), without checking them again (no `out=`)."""
    dtype = _checked(qkv, num_heads, None)
    tiling = _tiling(qkv, num_heads, dtype)
    return lambda qkv, num_heads: _run(qkv, num_heads, None, dtype, tiling)


def _checked(qkv, num_heads, out) -> torch.dtype:
    """Raise on what the kernels cannot take; the compute dtype."""
    raise_if(_shape_problems(qkv, num_heads), "window_attention")
    raise_if(launch_problems([qkv]), "window_attention")
    dtype = compute_dtype(qkv)
    N, T, three_d = qkv.shape
    raise_if(out_problems(out, (N, T, three_d // 3), dtype, qkv.device, [qkv]), "window_attention")
    return dtype


def _tiling(qkv, num_heads: int, dtype: torch.dtype) -> tuple:
    """(packed, block_m, regions per program or block_n, block_d, num_warps, num_stages, regions per
    launch) of a call: fixed by the shape and the compute dtype."""
    N, T, three_d = qkv.shape
    head_dim = three_d // 3 // num_heads
    fp32, elem = dtype == torch.float32, torch.empty((), dtype=dtype).element_size()
    packed = T <= PACKED_MAX_TOKENS
    if packed:
        block_m, regions_per_block, block_d, num_warps = _packed_config(T, head_dim, fp32)
        packed = block_m * block_d <= PACKED_MAX_TILE_ELEMENTS[elem]
        programs_per_region = num_heads / regions_per_block
        second, num_stages = regions_per_block, None
    if not packed:
        block_m, second, block_d, num_warps, num_stages = _flash_config(head_dim, fp32)
        programs_per_region = cdiv(T, block_m) * num_heads
    # The grid is 1-D (axis 0 takes up to 2^31 - 1 programs); beyond that, launch region chunks.
    chunk = max(1, int(_MAX_PROGRAMS // programs_per_region))
    if packed:
        chunk = max(second, chunk - chunk % second)
    return packed, block_m, second, block_d, num_warps, num_stages, chunk


def _run(qkv, num_heads: int, out, dtype: torch.dtype, tiling: tuple) -> torch.Tensor:
    """The kernels on checked arguments, tiled by `_tiling`."""
    packed, block_m, second, block_d, num_warps, num_stages, chunk = tiling
    N, T, three_d = qkv.shape
    width = three_d // 3
    head_dim = width // num_heads
    if dtype != qkv.dtype:
        qkv = qkv.to(dtype)
    if out is None:
        out = torch.empty((N, T, width), device=qkv.device, dtype=dtype)
    if N == 0:
        return out
    precision = dot_precision(dtype)
    qk_scale = head_dim ** -0.5 * _LOG2E
    for n0 in range(0, N, chunk):
        q_part, o_part = (qkv, out) if chunk >= N else (qkv[n0:n0 + chunk], out[n0:n0 + chunk])
        n = q_part.shape[0]
        strides = (q_part.stride(0), q_part.stride(1), q_part.stride(2),
                   o_part.stride(0), o_part.stride(1), o_part.stride(2), qk_scale)
        if packed:
            grid = (cdiv(n, second) * num_heads,)
            _packed_window_attention_kernel[grid](
                q_part, o_part, n, num_heads, width, *strides,
                TOKENS=T, HEAD_DIM=head_dim, REGIONS_PER_BLOCK=second,
                BLOCK_M=block_m, BLOCK_D=block_d, PRECISION=precision, num_warps=num_warps)
        else:
            grid = (cdiv(T, block_m) * num_heads * n,)
            _flash_attention_kernel[grid](
                q_part, o_part, num_heads, T, width, *strides,
                HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=second, BLOCK_D=block_d,
                PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return out


def global_attention(qkv: torch.Tensor, num_heads: int, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton backend of the `global_attention` op (regions of more than 64 tokens, where it
    runs the flash kernel): `window_attention`, which picks the kernel by the token count. The
    last resort of `auto` (forward only; flash-attn, xformers and SDPA come first)."""
    return window_attention(qkv, num_heads, out=out)


def global_attention_plan(qkv: torch.Tensor, num_heads: int):
    """`global_attention` for every call like this one (see `window_attention_plan`)."""
    return window_attention_plan(qkv, num_heads)


def global_attention_not_supported_reasons(qkv, num_heads) -> List[str]:
    """Why `global_attention` cannot take this call (empty list: it can)."""
    return window_attention_not_supported_reasons(qkv, num_heads)


# --------------------------------------------------------------------------------------------
# Backward (packed regions, T <= 64)
# --------------------------------------------------------------------------------------------

def _packed_backward_config(tokens: int, head_dim: int, fp32: bool):
    """(BLOCK_M, regions per program, BLOCK_D, num_warps) of the packed backward. It holds q, k,
    v, dO and the fp32 dq, dk, dv (BLOCK_M x BLOCK_D each) plus P, dP (BLOCK_M x BLOCK_M), about
    twice the forward's registers, so 16-bit tiles shrink to 32 rows at head_dim 128 and 16 at
    256 (never below one region's rows); fp32 takes the fewest rows that hold a region. Every
    config that `window_attention_backward_not_supported_reasons` accepts compiles without spills on sm_90
    (ptxas -v)."""
    block_d = max(16, next_power_of_2(head_dim))
    block_m = next_power_of_2(tokens)
    if fp32:
        block_m = max(16, block_m)
    else:
        block_m = max(64 * 64 // block_d if block_d >= 128 else 64, block_m)
    num_warps = 4 if block_m * max(block_m, block_d) <= 2048 else 8   # P, dP are BLOCK_M x BLOCK_M
    if fp32 and block_m == 64 and block_d == 32:
        num_warps = 16   # 8 warps need all 255 registers (and spill at T = 49); 16 use ~60
    return block_m, block_m // tokens, block_d, num_warps


def _backward_problems(qkv, grad_out, num_heads) -> List[str]:
    """Why the backward launcher cannot compute this call (empty: it can): qkv's shape, grad_out's
    shape and device, regions of more than PACKED_MAX_TOKENS tokens."""
    problems = _shape_problems(qkv, num_heads)
    if problems and (not isinstance(qkv, torch.Tensor) or qkv.dim() != 3):
        return problems
    N, T, three_d = qkv.shape
    expected = (N, T, three_d // 3)
    if not isinstance(grad_out, torch.Tensor):
        problems.append(f"grad_out must be a tensor of shape {expected}, got {type(grad_out).__name__}")
    elif tuple(grad_out.shape) != expected:
        problems.append(f"grad_out is {tuple(grad_out.shape)}, expected {expected} (the attention output's "
                        f"shape (N, T, D) for qkv {tuple(qkv.shape)})")
    elif grad_out.device != qkv.device:
        problems.append(f"grad_out is on {grad_out.device} but qkv on {qkv.device}: move them to one device")
    if T > PACKED_MAX_TOKENS:
        problems.append(f"qkv has T={T} tokens per region: the Triton attention backward covers regions of "
                        f"<= {PACKED_MAX_TOKENS} tokens; larger regions use the reference (SDPA) backward")
    return problems


def window_attention_backward_not_supported_reasons(qkv, grad_out, num_heads) -> List[str]:
    """Why `window_attention_backward` should not take this call (empty list: it can)."""
    problems = _backward_problems(qkv, grad_out, num_heads)
    if problems and (not isinstance(qkv, torch.Tensor) or qkv.dim() != 3):
        return problems
    dtype = compute_dtype(qkv)
    reasons = triton_reasons([qkv, grad_out], mixed_dtypes_ok=True,  # the launcher casts both to the compute dtype
                             forward_only=False) + problems
    if not problems and dtype in (torch.float32, torch.float16, torch.bfloat16):
        N, T, three_d = qkv.shape
        head_dim = three_d // (3 * num_heads)
        block_m, _, block_d, _ = _packed_backward_config(T, head_dim, dtype == torch.float32)
        max_block_d = PACKED_BACKWARD_MAX_BLOCK_D[dtype.itemsize][block_m]
        if block_d > max_block_d:
            reasons.append(f"head_dim {head_dim} with T={T} in {dtype}: the packed backward's {block_m} x {block_d} "
                           f"tile would spill registers (it holds head dims up to {max_block_d} at {block_m} rows); "
                           f"the reference (SDPA) backward takes it")
    return reasons


def window_attention_backward(qkv: torch.Tensor, grad_out: torch.Tensor, num_heads: int, *,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of `window_attention` (regions of <= 64 tokens) with respect to qkv.

    qkv (N, T, 3D) is the forward's input, grad_out (N, T, D) the gradient of its output; returns
    grad_qkv (N, T, 3D) in the compute dtype (the autocast dtype under autocast, else qkv's;
    grad_out is cast to it). Recomputes the softmax from qkv (nothing saved); deterministic (no
    atomics). `out`, if given, must be (N, T, 3D) of the compute dtype on qkv's device; it is
    returned."""
    op = "window_attention_backward"
    raise_if(_backward_problems(qkv, grad_out, num_heads), op)
    raise_if(launch_problems([qkv, grad_out], mixed_dtypes_ok=True, forward_only=False), op)
    dtype = compute_dtype(qkv)
    N, T, three_d = qkv.shape
    width = three_d // 3
    head_dim = width // num_heads
    raise_if(out_problems(out, (N, T, three_d), dtype, qkv.device, [qkv, grad_out]), op)
    qkv = qkv.to(dtype)
    grad_out = grad_out.to(dtype)
    if out is None:
        out = torch.empty((N, T, three_d), device=qkv.device, dtype=dtype)
    if N == 0:
        return out

    precision = dot_precision(dtype)
    block_m, regions_per_block, block_d, num_warps = _packed_backward_config(T, head_dim, dtype == torch.float32)
    # 1-D grid (axis 0 takes up to 2^31 - 1 programs); beyond that, launch whole-block region chunks.
    chunk = max(1, int(_MAX_PROGRAMS // (num_heads / regions_per_block)))
    chunk = max(regions_per_block, chunk - chunk % regions_per_block)
    for n0 in range(0, N, chunk):
        q_part, do_part, dq_part = qkv[n0:n0 + chunk], grad_out[n0:n0 + chunk], out[n0:n0 + chunk]
        n = q_part.shape[0]
        grid = (cdiv(n, regions_per_block) * num_heads,)
        _packed_window_attention_backward_kernel[grid](
            q_part, do_part, dq_part, n, num_heads, width,
            q_part.stride(0), q_part.stride(1), q_part.stride(2),
            do_part.stride(0), do_part.stride(1), do_part.stride(2),
            dq_part.stride(0), dq_part.stride(1), dq_part.stride(2),
            head_dim ** -0.5 * _LOG2E, head_dim ** -0.5,
            TOKENS=T, HEAD_DIM=head_dim, REGIONS_PER_BLOCK=regions_per_block,
            BLOCK_M=block_m, BLOCK_D=block_d, PRECISION=precision, num_warps=num_warps)
    return out
