"""The gated residual's backward: the `gated_residual_backward` op (twin of
`fastlego.reference.gated_residual_backward`), the elementwise part of the backward of
linear_gated_residual and of the MLP's fc2.

  out = residual + gate[img] * y,  y = Linear(a):   dy = g * gate[img],  dgate[img] = sum_rows g * y,
                                                    dbias = sum_rows dy,  d residual = g

g (..., N) seen as M rows, row m of image m // (M / B); gate (B, N), any strides. One pass over
g and y; per-image and per-column sums are fixed-order partials (no atomics). The matmuls of the
backward (dA = dy W, dW = dy^T a) are cuBLAS's, in `fastlego.custom_ops`.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .policy import launch_problems, per_image_problems, raise_if, rows, rows_per_image_problems, triton_reasons
from .rows import image_rows, row_backward_blocks, row_backward_problems


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
        rows, mask = image_rows(img, first, it, rows_per_image, col_mask, BLOCK_ROWS)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * y, axis=0)
        dy = (g * gate[None, :]).to(dy_ptr.dtype.element_ty)
        acc_bias += tl.sum(dy.to(tl.float32), axis=0)
        tl.store(dy_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn, dy, mask=mask)
    tl.store(dgate_part_ptr + pid.to(tl.int64) * N + cols, acc, mask=col_mask)
    tl.store(dbias_part_ptr + pid.to(tl.int64) * N + cols, acc_bias, mask=col_mask)


def gated_residual_backward(grad_out, y, gate, dy_dtype: Optional[torch.dtype] = None):
    """The elementwise part of the backward of out = residual + gate[img] * (y = Linear(a)):
    (dy = grad_out * gate[img] in `dy_dtype` (default y's), dgate = sum over each image's rows of
    grad_out * y in gate's dtype, dbias = the Linear's bias gradient sum_rows dy in fp32). d
    residual is grad_out itself. One Triton pass; deterministic sums."""
    op = "gated_residual_backward"
    raise_if(_gated_residual_backward_problems(grad_out, y, gate), op)
    raise_if(launch_problems([grad_out, y, gate], mixed_dtypes_ok=True, forward_only=False)
             + row_backward_problems("y", y.shape[-1]), op)
    g2d, y2d = rows(grad_out), rows(y)
    M, N = y2d.shape
    B = gate.shape[0]
    rpi = M // B if B else 0
    dy = torch.empty((M, N), dtype=dy_dtype or y.dtype, device=y.device)
    block_rows, block_n, row_iters, bpi, warps = row_backward_blocks(N, rpi)
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


def _gated_residual_backward_problems(grad_out, y, gate) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (grad_out, y, gate)):
        return ["grad_out, y and gate must be tensors"]
    problems = per_image_problems("gate", gate, None, y.shape[-1])
    if tuple(grad_out.shape) != tuple(y.shape):
        problems.append(f"grad_out must have y's shape {tuple(y.shape)}; got {tuple(grad_out.shape)}")
    if not problems:
        problems += rows_per_image_problems("y", y, gate.shape[0])
    return problems


def gated_residual_backward_not_supported_reasons(grad_out, y, gate, dy_dtype=None) -> List[str]:
    """Why `gated_residual_backward` cannot take this call (empty: it can)."""
    return _gated_residual_backward_problems(grad_out, y, gate) or (
        row_backward_problems("y", y.shape[-1])
        + triton_reasons([grad_out, y, gate], mixed_dtypes_ok=True, forward_only=False))
