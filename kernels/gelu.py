"""tanh-GELU: the @triton.jit forward helpers the kernels share (`gelu_tanh`, in modulated_linear's
epilogue) and the MLP's GELU backward, the `gelu_tanh_backward` op (twin of
`fastlego.reference.gelu_tanh_backward`).

  gelu(a) = 0.5 a (1 + tanh u) = a * sigmoid(2u),   u = sqrt(2/pi) (a + 0.044715 a^3)

All in fp32. The sigmoid form has no cancellation and saturates cleanly.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .policy import DTYPES, cdiv, launch_problems, next_power_of_2, raise_if, rows, triton_reasons


@triton.jit
def gelu_tanh_exponent(x):
    """-2 u log2(e), u = sqrt(2/pi) (x + 0.044715 x^3): tanh-GELU's sigmoid(2u) = 1 / (1 + exp2(this))."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return -2.0 * 1.4426950408889634 * u


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(u)) = x * sigmoid(2u), in fp32 (u: `gelu_tanh_exponent`): exp2 -> inf
    gives x / inf = 0, no NaN."""
    return x / (1.0 + tl.exp2(gelu_tanh_exponent(x)))


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
    With s = sigmoid(2u) = (1 + tanh u) / 2,
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
        s = 1.0 / (1.0 + tl.exp2(tl.minimum(gelu_tanh_exponent(a), 126.0)))   # no inf: s >= 2^-126
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        da = (g * (s + 2.0 * a * s * (1.0 - s) * du)).to(g_ptr.dtype.element_ty)
        tl.store(g_ptrs, da, mask=mask)
        tl.store(act_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                 (a * s).to(act_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(da.to(tl.float32), axis=0)
    tl.store(dbias_part_ptr + pid_m.to(tl.int64) * N + cols, acc, mask=col_mask)


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
    raise_if(_gelu_tanh_backward_problems(grad, pre, act_into_pre), "gelu_tanh_backward")
    raise_if(launch_problems([grad, pre], mixed_dtypes_ok=True, forward_only=False), "gelu_tanh_backward")
    g2d, a2d = grad.view(-1, grad.shape[-1]), rows(pre)
    M, N = g2d.shape
    act = a2d if act_into_pre else torch.empty((M, N), dtype=pre.dtype, device=pre.device)
    block_n = min(128, next_power_of_2(max(N, 1)))
    block_rows = max(1, min(32, 4096 // block_n))
    row_count = min(_GELU_BACKWARD_ROWS, max(M, 1))
    row_iters = cdiv(row_count, block_rows)
    row_blocks = cdiv(M, block_rows * row_iters)
    parts = torch.empty((row_blocks, N), dtype=torch.float32, device=grad.device)
    if M and N:
        _gelu_tanh_backward_kernel[(row_blocks, cdiv(N, block_n))](
            g2d, a2d, act, parts, M, N, g2d.stride(0), g2d.stride(1), a2d.stride(0), a2d.stride(1),
            act.stride(0), act.stride(1), BLOCK_ROWS=block_rows, BLOCK_N=block_n, ROW_ITERS=row_iters,
            num_warps=4)
    else:
        parts.zero_()
    return grad, act.view(pre.shape), parts.sum(0)


def _gelu_tanh_backward_problems(grad, pre, act_into_pre=False) -> List[str]:
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
        if t.dtype not in DTYPES:
            problems.append(f"{name} dtype {t.dtype} not supported: expected float32, float16 or bfloat16")
    return problems


def gelu_tanh_backward_not_supported_reasons(grad, pre, act_into_pre: bool = False) -> List[str]:
    """Why `gelu_tanh_backward` cannot take this call (empty: it can)."""
    return _gelu_tanh_backward_problems(grad, pre, act_into_pre) or triton_reasons(
        [grad, pre], mixed_dtypes_ok=True, forward_only=False)
