"""Linear + bias + per-image gate + residual, the forward of the `linear_gated_residual` op (twin of
`fastlego.reference.linear_gated_residual`): a DiT block's attention output projection (K = D)
and fc2 (K = 4D), N = D.

  linear_gated_residual(a, W, bias, gate, residual) = residual + gate[img] * (a @ W^T + bias)

Layout and tiles: see `kernels/gemm.py` (a seen as M rows, gate a (B, N) chunk of the adaLN
output, any strides). Two paths, chosen per shape by `fastlego.tuning.lookup` as for
`modulated_linear`: (a) the tiled GEMM with an epilogue acc + bias, times gate[img, n] (vector or
gather), plus residual (read once), one store; the epilogue runs in two column halves so that only
half a residual tile is live next to the accumulator (a whole 128 x 256 residual tile spills
registers); (b) `linear_gated_residual_cublas`: cuBLAS matmul + bias, then one fused elementwise
pass (torch.addcmul).

Precision: `kernels/policy.py`. Output dtype = the reference's: F.linear gives the compute dtype,
then gate * y + residual promote (the promotion of compute dtype, gate's and residual's dtypes).
The launchers are the forward; the backward is `gated_residual_backward` with cuBLAS for dA and
dW (`fastlego.custom_ops`).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlego import tuning

from .gemm import gemm_variants, grouped_tile, launch_gemm, load_k_step, shape_key, tile_rows_cols, tuning_configs
from .policy import (cast_weight, compute_dtype, dot_precision, launch_problems, linear_problems, next_power_of_2,
                     out_problems, per_image_problems, raise_if, rows, rows_per_image_problems, triton_reasons)


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
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tile_m = pid_m * BLOCK_M
    offs_m = tile_m + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_m, cols = tile_rows_cols(offs_m, offs_n, tile_m, M, N)
    tile_base = tile_m.to(tl.int64)   # 64-bit row offset of the tile, 32-bit offsets inside it

    a_rows = a_ptr + tile_base * stride_am + local_m[:, None] * stride_am
    w_cols = w_ptr + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w = load_k_step(a_rows, w_cols, k0 + tl.arange(0, BLOCK_K), K, stride_ak, stride_wk, EVEN_K)
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


_linear_gated_residual_fixed, _linear_gated_residual_tuned = gemm_variants(_linear_gated_residual_kernel)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _checked(op: str, a, weight, bias, gate, residual, out):
    """Raise on what `op` (either path) cannot take; (compute dtype, output dtype)."""
    raise_if(_linear_gated_residual_problems(a, weight, bias, gate, residual), op)
    inputs = [a, weight, bias, gate, residual]
    raise_if(launch_problems(inputs), op)
    dtype = compute_dtype(a)
    out_dtype = torch.promote_types(torch.promote_types(dtype, gate.dtype), residual.dtype)
    raise_if(out_problems(out, residual.shape, out_dtype, a.device, inputs, rows=True), op)
    return dtype, out_dtype


def _linear_gated_residual(a, weight, bias, gate, residual, *, out=None, config=None):
    """Path (a), optionally with a fixed triton.Config (tuned, or given by tests and benchmarks)."""
    dtype, out_dtype = _checked("linear_gated_residual", a, weight, bias, gate, residual, out)
    return _fused_path(a, weight, bias, gate, residual, out, config, dtype, out_dtype)


def _fused_path(a, weight, bias, gate, residual, out, config, dtype, out_dtype):
    """Path (a) on checked arguments (`_checked` gave the dtypes)."""
    if out is None:
        out = torch.empty(residual.shape, dtype=out_dtype, device=a.device)
    K, N = a.shape[-1], weight.shape[0]
    M = a.numel() // K
    if M == 0:
        return out
    a2d, res2d = rows(a), rows(residual)
    w = cast_weight(weight, dtype)
    out2d = out.view(M, N)
    args = (a2d, w, bias if bias is not None else w, gate, res2d, out2d,
            M, N, K, M // gate.shape[0],
            a2d.stride(0), a2d.stride(1), w.stride(0), w.stride(1), bias.stride(0) if bias is not None else 0,
            gate.stride(0), gate.stride(1), res2d.stride(0), res2d.stride(1), out2d.stride(0), out2d.stride(1),
            next_power_of_2(M))
    meta = dict(HAS_BIAS=bias is not None, INPUT_PRECISION=dot_precision(dtype))
    launch_gemm(_linear_gated_residual_fixed, _linear_gated_residual_tuned, M, N, args, meta, config)
    return out


def linear_gated_residual_cublas(a, weight, bias, gate, residual, *, out=None):
    """Path (b): cuBLAS matmul + bias, then one fused elementwise pass (torch.addcmul) for
    residual + gate[img] * y."""
    dtype, _ = _checked("linear_gated_residual_cublas", a, weight, bias, gate, residual, out)
    return _cublas_path(a, weight, bias, gate, residual, out, dtype)


def _cublas_path(a, weight, bias, gate, residual, out, dtype):
    """Path (b) on checked arguments (`_checked` gave `dtype`)."""
    y = F.linear(a.to(dtype), cast_weight(weight, dtype), cast_weight(bias, dtype))
    B = gate.shape[0]
    res3 = residual.reshape(B, -1, residual.shape[-1])
    out3 = torch.addcmul(res3, gate[:, None, :], y.reshape(B, -1, y.shape[-1]))
    if out is None:
        return out3.view(residual.shape)
    return out.copy_(out3.view(residual.shape))


# The candidates `fastlego.tune` times (arguments as the public launcher takes them).
tuning.register_gemm("linear_gated_residual", fused=lambda *a, config: _linear_gated_residual(*a, config=config),
                     cublas=lambda *a: linear_gated_residual_cublas(*a), configs=lambda a: tuning_configs(a[0], a[1]))


def linear_gated_residual(a, weight, bias, gate, residual, *, out=None):
    """residual + gate[img] * (a @ W^T + bias) by the path `fastlego.tuning.lookup` gives for this
    shape: (a) one GEMM with a fused bias + gate + residual epilogue or (b) cuBLAS + one fused
    elementwise pass. a (..., K); weight (N, K); bias (N,) or None; gate (B, N) any strides;
    residual (..., N). out must not overlap the inputs. Returns (..., N)."""
    dtypes = _checked("linear_gated_residual", a, weight, bias, gate, residual, out)   # once, for either path
    return _routed(a, weight, bias, gate, residual, out, dtypes, _shape_key(a, weight, gate, residual))


def linear_gated_residual_plan(a, weight, bias, gate, residual):
    """`linear_gated_residual` for every call like this one, checked once (see
    `modulated_linear_plan`: same shapes, strides, dtypes, devices, autocast and grad state; no
    `out=`; the path looked up per call)."""
    dtypes = _checked("linear_gated_residual", a, weight, bias, gate, residual, None)
    key = _shape_key(a, weight, gate, residual)
    return lambda a, weight, bias, gate, residual: _routed(a, weight, bias, gate, residual, None, dtypes, key)


def _shape_key(a, weight, gate, residual) -> str:
    return shape_key("linear_gated_residual", a, weight, gate, f"residual={residual.dtype},gate={gate.dtype}")


def _routed(a, weight, bias, gate, residual, out, dtypes, key):
    """Checked arguments down the path the tuning table gives for shape key `key`."""
    args = (a, weight, bias, gate, residual)
    path, config = tuning.lookup("linear_gated_residual", key, args)
    if path == "fused":
        return _fused_path(*args, out, config, *dtypes)
    return _cublas_path(*args, out, dtypes[0])


# --------------------------------------------------------------------------------------------
# Argument checks, and what the dispatcher asks before every call
# --------------------------------------------------------------------------------------------

def _linear_gated_residual_problems(a, weight, bias, gate, residual) -> List[str]:
    problems = linear_problems("a", a, weight, bias)
    if problems:
        return problems
    out_shape = tuple(a.shape[:-1]) + (weight.shape[0],)
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != out_shape:
        problems.append(f"residual must have the output's shape {out_shape}; got {getattr(residual, 'shape', None)}")
    problems += per_image_problems("gate", gate, None, weight.shape[0])
    if not problems:
        problems += rows_per_image_problems("a", a, gate.shape[0])
    return problems


def linear_gated_residual_not_supported_reasons(a, weight, bias, gate, residual, *, out=None) -> List[str]:
    """Why `linear_gated_residual` cannot take this call (empty: it can)."""
    return _linear_gated_residual_problems(a, weight, bias, gate, residual) or triton_reasons(
        [a, weight, bias, gate, residual])
