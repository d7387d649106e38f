"""LayerNorm + adaLN modulate as its own memory-bound pass, and its backward: the `layernorm_modulate`
and `layernorm_modulate_backward` ops (twins of `fastlego.reference.layernorm_modulate` and
`layernorm_modulate_backward`), and the LayerNorm statistics every LN kernel shares.

  a = LN(h) * (1 + scale[img]) + shift[img]      h (..., K) seen as M rows; shift/scale (B, K)

LayerNorm: no affine parameters, eps 1e-6, biased variance over the K features, fp32 statistics.
Row m belongs to image m // (M / B); shift/scale are chunks of the (B, 6D) adaLN output (any
strides, never copied).

- `row_mean_m2` (a @triton.jit helper, also used by `modulated_linear`'s statistics kernel and
  by `final_layer`): a row's mean and M2 = sum (x - mean)^2 in one pass over memory, chunk by
  chunk, merged with Chan's formula (as accurate as a two-pass variance: no E[x^2] - E[x]^2
  cancellation on rows with a large mean).
- `layernorm_modulate`: a written out as an (M, K) matrix in a chosen dtype, one rounding: the A
  operand of modulated_linear's cuBLAS path, and the recompute of the backward (nothing
  normalised is saved by the forward).
- `layernorm_modulate_backward`: given grad_a = dL/da, the gradients of h, shift and scale in one
  pass over h and grad_a (statistics recomputed from h in registers), per-image sums as fixed-order
  partials (no atomics: bitwise reproducible).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .policy import DTYPES, LN_EPS, cdiv, launch_problems, modulate_problems, raise_if, rows, triton_reasons
from .rows import image_rows, row_backward_blocks, row_backward_problems, stats_blocks


@triton.jit
def row_mean_m2(x_ptr, row_off, row_mask, K, stride_xk, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 mean and M2 = sum_k (x_k - mean)^2 of rows of x (row r's elements at
    x_ptr + row_off[r] + k * stride_xk; rows outside row_mask give 0, 0). LayerNorm's rstd is then
    1 / sqrt(M2 / K + eps) (biased variance).

    One pass over memory: each BLOCK_K chunk's mean and M2 are exact in registers, then merged
    into the running pair with Chan's formula
        delta = mean_c - mean,  mean += delta * n_c / n,  M2 += M2_c + delta^2 * n_old * n_c / n."""
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
    return mean, m2


@triton.jit
def _layernorm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, M, K, rows_per_image,
                               stride_xm, stride_xk, stride_shift_b, stride_shift_k,
                               stride_scale_b, stride_scale_k, stride_om, stride_ok, eps,
                               BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, K) = LN(x) * (1 + scale[img]) + shift[img], fp32 math, one rounding to out's dtype:
    a first pass over each row's chunks for the statistics, a second that normalises and stores."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < M
    x_row = rows.to(tl.int64) * stride_xm
    mean, m2 = row_mean_m2(x_ptr, x_row, row_mask, K, stride_xk, BLOCK_ROWS, BLOCK_K)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    img = rows // rows_per_image
    x_rows = x_ptr + x_row[:, None]
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
        rows, mask = image_rows(img, first, it, rows_per_image, col_mask, BLOCK_ROWS)
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


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def layernorm_modulate(h, shift, scale, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LN(h) * (1 + scale[img]) + shift[img] as an (M, K) matrix of `dtype` (default h's): one
    memory-bound Triton pass (fp32 math). The A operand of modulated_linear, written out."""
    raise_if(_layernorm_modulate_problems(h, shift, scale, dtype), "layernorm_modulate")
    raise_if(launch_problems([h, shift, scale], mixed_dtypes_ok=True, forward_only=False), "layernorm_modulate")
    return _layernorm_modulate(h, shift, scale, dtype)


def _layernorm_modulate(h, shift, scale, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`layernorm_modulate` on checked arguments (a caller that checked h, shift and scale)."""
    x2d = rows(h)
    M, K = x2d.shape
    a = torch.empty((M, K), dtype=dtype or h.dtype, device=h.device)
    if M:
        block_rows, block_k, warps = stats_blocks(K)
        _layernorm_modulate_kernel[(cdiv(M, block_rows),)](
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
    op = "layernorm_modulate_backward"
    raise_if(_layernorm_modulate_backward_problems(h, shift, scale, grad_a, grad_h), op)
    raise_if(launch_problems([h, shift, scale, grad_a, grad_h], mixed_dtypes_ok=True, forward_only=False)
             + row_backward_problems("h", h.shape[-1]), op)
    x2d, g2d = rows(h), rows(grad_a)
    gin = rows(grad_h) if grad_h is not None else g2d
    M, K = x2d.shape
    B = shift.shape[0]
    rpi = M // B if B else 0
    dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    block_rows, block_k, row_iters, bpi, warps = row_backward_blocks(K, rpi)
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


# --------------------------------------------------------------------------------------------
# Argument checks, and what the dispatcher asks before every call
# --------------------------------------------------------------------------------------------

def _layernorm_modulate_problems(h, shift, scale, dtype=None) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (h, shift, scale)):
        return ["h, shift and scale must be tensors"]
    problems = modulate_problems(h, shift, scale)
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"output dtype {dtype} not supported: expected float32, float16 or bfloat16")
    return problems


def _layernorm_modulate_backward_problems(h, shift, scale, grad_a, grad_h=None) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (h, shift, scale, grad_a)):
        return ["h, shift, scale and grad_a must be tensors"]
    problems = modulate_problems(h, shift, scale)
    for name, t in (("grad_a", grad_a), ("grad_h", grad_h)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(h.shape)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            problems.append(f"{name} must be a tensor of h's shape {tuple(h.shape)}; got {got}")
    return problems


def layernorm_modulate_not_supported_reasons(h, shift, scale, dtype=None) -> List[str]:
    """Why `layernorm_modulate` cannot take this call (empty: it can)."""
    return _layernorm_modulate_problems(h, shift, scale, dtype) or triton_reasons(
        [h, shift, scale], mixed_dtypes_ok=True, forward_only=False)


def layernorm_modulate_backward_not_supported_reasons(h, shift, scale, grad_a, grad_h=None) -> List[str]:
    """Why `layernorm_modulate_backward` cannot take this call (empty: it can)."""
    return _layernorm_modulate_backward_problems(h, shift, scale, grad_a, grad_h) or (
        row_backward_problems("h", h.shape[-1])
        + triton_reasons([h, shift, scale, grad_a, grad_h], mixed_dtypes_ok=True, forward_only=False))
