"""The FP8 Linear of FP8 inference as a Triton GEMM: the alternative to `torch._scaled_mm`
(`fastlego.fp8.fp8_linear_scaled_mm`) with the same arguments and numerics. `fastlego.tune` times
both per shape (this kernel in each tile config) and `fastlego.fp8.fp8_linear` runs the faster;
bench/fp8_gemm.py times both at the presets' shapes against the FP8 and bf16 peaks.

  y[m, n] = (sum_k x_q[m, k] * w_q[n, k]) * x_scale[m] * w_scale[n] + bias[n]

x_q (..., K) e4m3 (`torch.float8_e4m3fn`) with one fp32 scale per row x_scale (...,); w_q (N, K)
e4m3 as nn.Linear stores its weight, with one fp32 scale per output channel w_scale (N,); bias
(N,) in any float dtype or None. The products of e4m3 values are exact in fp32 and the sum is
accumulated in fp32; the scales and the bias are applied in the epilogue in fp32 and the result
is rounded once to `out_dtype` (bf16 by default; fp16 and fp32 too). The oracle is
`fastlego.fp8.fp8_linear_reference` (dequantize, fp32 matmul, + bias, one rounding); the two
differ only by fp32 rounding order (the reference scales each operand before the products).

Layout and tiles: x seen as a row-major (M, K) matrix A (any strides; unit K stride is the fast
case), W (N, K) row-major is read as the (K, N) operand of the dot, K-major: the layout FP8 wgmma
needs for both operands (FP8 MMAs take K-major A and B only), so no transpose is staged. The tile
machinery is `kernels/gemm.py`'s (grouped program order, rows/columns past the edge clamped onto
valid ones so the main loop needs no M/N masks, a 64-bit offset for the tile's first row, the K
tail masked unless K is a multiple of BLOCK_K). FP8 tiles: BLOCK_K 128 (wgmma's FP8 K step is 32;
128 bytes of K a row are one 128-byte swizzle line), 128 x 128 or 128 x 256 output tiles, 3-5
stages, 4-8 warps; autotuned on the GPU (pruned by shared memory as gemm.py does), one fixed small
config under Triton's interpreter. (The interpreter rounds fp32 -> bf16 toward zero, a GPU to
nearest even: there a bf16 output is stored as fp32 and rounded by PyTorch.)

Accumulation (`fast_accum`): Hopper's FP8 tensor cores add their products into the accumulator
with fewer bits than fp32 (about 14 bits of precision kept); over a long K that loses accuracy. By
default (`fast_accum=False`, as `torch._scaled_mm`'s default) each BLOCK_K-long dot is summed on
the tensor cores and then added to the fp32 accumulator with ordinary fp32 adds (Triton's
`max_num_imprecise_acc=BLOCK_K`): the accuracy of fp32 accumulation, at the cost of a second
accumulator's registers (128 x 256 tiles with 8 warps spill; the autotuner weighs it).
`fast_accum=True` keeps everything on the tensor cores (Triton's default on Hopper).

What the presets' FP8 GEMMs cost (bench batches; the bricks of 2 x 2 patches: lego_S_PG_64 D=384 at
B=256, M = 262,144 tokens; lego_L_PG_64 D=1024 at B=128, M = 131,072; lego_XL_U_32 D=1152 at B=128,
M = 32,768; their 16-pixel-region bricks have 16x fewer rows), per call, bytes = x_q + W (1 B an
element) + bf16 output + scales. Floor on an H100 SXM: FP8 dense peak 989 TFLOP/s (1979 is with
2:4 sparsity, not used here) and HBM 3.35 TB/s, a ridge at 295 FLOP/B:

  preset  Linear    M x K x N              GFLOP    MB   FLOP/B  compute / memory floor (us)
  S       qkv   262144 x  384 x 1152       231.9   706     328   235 / 211   compute (barely)
  S       proj  262144 x  384 x  384        77.3   303     255    78 /  91   memory
  S       fc1   262144 x  384 x 1536       309.2   908     341   313 / 271   compute (barely)
  S       fc2   262144 x 1536 x  384       309.2   606     511   313 / 181   compute
  L       qkv   131072 x 1024 x 3072       824.6   943     874   834 / 282   compute
  L       proj  131072 x 1024 x 1024       274.9   404     680   278 / 121   compute
  L       fc1   131072 x 1024 x 4096      1099.5  1213     907  1112 / 362   compute
  L       fc2   131072 x 4096 x 1024      1099.5   810    1357  1112 / 242   compute
  XL      qkv    32768 x 1152 x 3456       260.9   268     972   264 /  80   compute
  XL      proj   32768 x 1152 x 1152        87.0   115     758    88 /  34   compute
  XL      fc1    32768 x 1152 x 4608       347.9   345    1008   352 / 103   compute
  XL      fc2    32768 x 4608 x 1152       347.9   232    1500   352 /  69   compute

So L and XL are compute bound with room (the FP8 peak sets their floor, twice bf16's); lego_S's
D = 384 sits at the ridge (proj below it: the bytes set its floor), where FP8's halved input
bytes help as much as its doubled peak.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from fastlego import fp8 as F8
from fastlego import tuning
from fastlego.dispatch import forcing, triton_interpreting

from .gemm import config_fits, grouped_tile, launch_gemm, load_k_step, tile_config, tile_rows_cols
from .policy import device_problems, forward_only_reasons, next_power_of_2, out_problems, raise_if, rows

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _fp8_linear_kernel(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk,                  # x_q seen as (M, K)
    stride_wn, stride_wk,                  # w_q (N, K)
    stride_xs, stride_ws, stride_bias,     # x_scale (M,), w_scale (N,), bias (N,)
    stride_om, stride_on,                  # out seen as (M, N)
    M_BUCKET,                              # next power of two of M: an autotune key only
    HAS_BIAS: tl.constexpr, PRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out = (x_q @ w_q^T) * x_scale[m] * w_scale[n] + bias[n]: e4m3 dots into an fp32
    accumulator, scales and bias in an fp32 epilogue, one rounding at the store."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tile_m = pid_m * BLOCK_M
    offs_m = tile_m + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_m, cols = tile_rows_cols(offs_m, offs_n, tile_m, M, N)
    tile_base = tile_m.to(tl.int64)   # 64-bit row offset of the tile, 32-bit offsets inside it

    # A tile (BLOCK_M, BLOCK_K) row-major; W^T tile (BLOCK_K, BLOCK_N) read from W (N, K) with K
    # contiguous: both operands K-major, as FP8 MMAs take them.
    x_rows = x_ptr + tile_base * stride_xm + local_m[:, None] * stride_xm
    w_cols = w_ptr + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w = load_k_step(x_rows, w_cols, k0 + tl.arange(0, BLOCK_K), K, stride_xk, stride_wk, EVEN_K)
        if PRECISE_ACC:
            # each BLOCK_K-long dot summed on the tensor cores, then added in fp32
            acc = tl.dot(x, w, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(x, w, acc)

    # Epilogue in fp32: per-row and per-column scales (clamped rows/columns read valid entries;
    # their results are dropped by the masked store), then the bias.
    x_scale = tl.load(x_scale_ptr + (tile_base + local_m) * stride_xs)
    w_scale = tl.load(w_scale_ptr + cols * stride_ws)
    y = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    in_tile_m = tl.arange(0, BLOCK_M)[:, None]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + tile_base * stride_om + in_tile_m * stride_om + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configs: autotuned on the GPU, one fixed config under the interpreter
# --------------------------------------------------------------------------------------------

# Hopper FP8 (1-byte operands; staged bytes = stages * (BM + BN) * BK). A 128 x 256 tile's fp32
# accumulator takes 128 registers a thread with 8 warps: fine for fast accumulation, but precise
# accumulation adds a second one (spills), so the 128 x 128 tiles are precise accumulation's; a
# 64 x 128 tile for small M or N, and BLOCK_K 64 variants with more stages.
FP8_CONFIGS = [
    tile_config(128, 256, 128, 3, 8),
    tile_config(256, 128, 128, 3, 8),
    tile_config(128, 128, 128, 4, 8),
    tile_config(128, 128, 128, 3, 4),
    tile_config(128, 256, 64, 4, 8),
    tile_config(128, 128, 64, 5, 8),
    tile_config(64, 128, 128, 4, 4),
]
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
                                   num_stages=1, num_warps=4)


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: the configs whose staged e4m3 tiles fit shared memory."""
    kept = [c for c in configs if config_fits(c, 1, 1)]
    return kept or [configs[-1]]


_fp8_linear_fixed = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_fp8_linear_kernel)
_fp8_linear_tuned = triton.autotune(configs=FP8_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS", "PRECISE_ACC"],
                                    prune_configs_by={"early_config_prune": _prune_configs})(_fp8_linear_fixed)


# --------------------------------------------------------------------------------------------
# Checks: argument problems (raised by the launcher) and where it can run (reasons)
# --------------------------------------------------------------------------------------------

def _argument_problems(x_q, x_scale, w_q, w_scale, bias, out_dtype) -> List[str]:
    """Dtype and shape problems (fastlego.fp8's, plus the output dtype and the bias dtype)."""
    if F8.E4M3 is None:
        return [f"PyTorch {torch.__version__} has no torch.float8_e4m3fn: FP8 needs PyTorch 2.1 or later"]
    problems = F8._linear_problems(x_q, x_scale, w_q, w_scale, bias)
    if out_dtype not in OUT_DTYPES:
        problems.append(f"out_dtype {out_dtype} not supported: expected one of "
                        f"{', '.join(str(d) for d in OUT_DTYPES)}")
    if isinstance(bias, torch.Tensor) and not bias.is_floating_point():
        problems.append(f"bias must be a floating-point tensor, got {bias.dtype}")
    if not problems and (w_q.shape[0] == 0 or w_q.shape[1] == 0):
        problems.append(f"empty matmul dimension (w_q {tuple(w_q.shape)}): K and N must be at least 1")
    return problems


def capability_reasons(device) -> List[str]:
    """Why the GPU `device` has no FP8 tensor cores for this kernel (empty: it has)."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    if getattr(torch.version, "hip", None):
        return ["ROCm GPUs are not supported by this FP8 GEMM (their FP8 formats are e4m3fnuz; only "
                "NVIDIA's e4m3fn is wired here)"]
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap < F8.MIN_CAPABILITY:
        major, minor = F8.MIN_CAPABILITY
        return [f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}: FP8 tensor cores "
                f"need {major}.{minor} or later (Ada, Hopper, Blackwell); use fastlego.fp8.fp8_linear_reference "
                f"(emulated) or the bf16 model there"]
    return []


def _device_problems(tensors, *, launching: bool) -> List[str]:
    """One device, CUDA with FP8 tensor cores, or the CPU through Triton's interpreter: always
    for a direct launch (`launching`), only when the backend is forced for the reasons."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    problems = device_problems(ts)
    if problems or not ts:
        return problems
    dev = ts[0].device
    if dev.type == "cpu":
        if not triton_interpreting():
            return ["tensors are on the CPU: Triton kernels need a CUDA device (or TRITON_INTERPRET=1, Triton's "
                    "interpreter, for testing)"]
        if not launching and not forcing():
            return ["tensors are on the CPU: Triton's interpreter (TRITON_INTERPRET=1) is for testing and is used "
                    "only when the triton backend is forced"]
        return []
    if dev.type != "cuda":
        return [f"device {dev} is not supported (CUDA only)"]
    return capability_reasons(dev)


def _checks(x_q, x_scale, w_q, w_scale, bias, out_dtype, out, *, launching: bool) -> List[str]:
    problems = _argument_problems(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if problems:
        return problems
    inputs = [x_q, x_scale, w_q, w_scale, bias]
    problems = _device_problems(inputs, launching=launching) + forward_only_reasons(inputs)
    if not problems:
        shape = tuple(x_q.shape[:-1]) + (w_q.shape[0],)
        problems += out_problems(out, shape, out_dtype, x_q.device, inputs, rows=True)
    return problems


def fp8_linear_not_supported_reasons(x_q, x_scale, w_q, w_scale, bias=None, out_dtype: torch.dtype = torch.bfloat16,
                                     *, out=None) -> List[str]:
    """Why `fp8_linear` cannot take this call (empty: it can), the dispatcher's convention: shape
    and dtype problems, the device (a CUDA GPU of compute capability 8.9 or later; CPU tensors
    through the interpreter only when the triton backend is forced), forward-only, `out=`."""
    return _checks(x_q, x_scale, w_q, w_scale, bias, out_dtype, out, launching=False)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def fp8_linear(x_q, x_scale, w_q, w_scale, bias=None, out_dtype: torch.dtype = torch.bfloat16, *,
               out=None, config: Optional[triton.Config] = None, fast_accum: bool = False) -> torch.Tensor:
    """(x_q @ w_q^T) * x_scale[..., None] * w_scale + bias, rounded once to `out_dtype`: the
    semantics of `fastlego.fp8.fp8_linear_reference`. x_q (..., K) e4m3; x_scale (...,) fp32;
    w_q (N, K) e4m3; w_scale (N,) fp32; bias (N,) any float dtype or None -> (..., N).

    `out`: an (..., N) `out_dtype` tensor viewable as rows, overlapping no input. `config`: a
    fixed triton.Config (tests, benchmarks) instead of autotuning. `fast_accum`: accumulate on
    the tensor cores only (see the module docstring). Bad input raises ValueError before any
    compute."""
    raise_if(_checks(x_q, x_scale, w_q, w_scale, bias, out_dtype, out, launching=True), "fp8_linear")
    K, N = w_q.shape[1], w_q.shape[0]
    shape = tuple(x_q.shape[:-1]) + (N,)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=x_q.device)
    M = x_q.numel() // K
    if M == 0:
        return out
    # Triton's interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest even): there
    # the kernel stores fp32 and PyTorch rounds, so that tests hold the rest of the kernel to the
    # GPU's rounding. (cuda tests check the kernel's own bf16 store.)
    interpreted_bf16 = triton_interpreting() and out_dtype == torch.bfloat16
    target = torch.empty(shape, dtype=torch.float32, device=x_q.device) if interpreted_bf16 else out
    x2d, xs, out2d = rows(x_q), x_scale.reshape(-1), target.view(M, N)
    args = (x2d, w_q, xs, w_scale, bias if bias is not None else w_scale, out2d,
            M, N, K,
            x2d.stride(0), x2d.stride(1), w_q.stride(0), w_q.stride(1),
            xs.stride(0), w_scale.stride(0), bias.stride(0) if bias is not None else 0,
            out2d.stride(0), out2d.stride(1),
            next_power_of_2(M))
    meta = dict(HAS_BIAS=bias is not None, PRECISE_ACC=not fast_accum)
    if config is None and triton_interpreting():
        config = INTERPRETER_CONFIG   # FP8-sized (BLOCK_K 32), not gemm.py's 16-bit one
    launch_gemm(_fp8_linear_fixed, _fp8_linear_tuned, M, N, args, meta, config)
    if interpreted_bf16:
        out.copy_(target)
    return out


def tuning_configs(x_q: torch.Tensor) -> list:
    """The tile configs `fastlego.tune` times for this call: those whose staged e4m3 tiles fit
    shared memory on the GPU; the interpreter's one config (None) on the CPU."""
    if triton_interpreting() or not x_q.is_cuda:
        return [None]
    return [c for c in FP8_CONFIGS if config_fits(c, 1, 1)] or [FP8_CONFIGS[-1]]


# The candidates `fastlego.tune` times per shape (arguments as `fastlego.fp8.fp8_linear` takes
# them): this kernel in each tile config ("fused") against torch._scaled_mm ("cublas").
# The arguments: (x_q, x_scale, w_q, w_scale, bias, out_dtype, fast_accum).
tuning.register_gemm("fp8_linear", fused=lambda *a, config: fp8_linear(*a[:6], config=config, fast_accum=a[6]),
                     cublas=lambda *a: F8.fp8_linear_scaled_mm(*a), configs=lambda a: tuning_configs(a[0]))
