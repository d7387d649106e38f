"""FP8 activation quantization fused into the row passes of a DiT block (FP8 inference mode): the
`layernorm_modulate_quantize`, `gelu_quantize` and `quantize_rows` ops, twins of the functions of
the same names in `fastlego.fp8` (the oracles: same arguments, same scale rule).

Every pass reads a row once, holds it whole in registers, and writes it back as e4m3
(torch.float8_e4m3fn, one byte per element) with one fp32 scale per row (per token):

  layernorm_modulate_quantize(h, shift, scale)   a = LN(h) * (1 + scale[img]) + shift[img]
                                                 (the input of qkv and of fc1)
  gelu_quantize(y)                               a = gelu_tanh(y)   (fc1's output -> fc2's input)
  quantize_rows(x)                               a = x              (attention output -> proj)

then, per row, in fp32 (`fastlego.fp8`'s rule, `row_scales`):
  amax = max_k |a_k|,   s = amax / 448 (IEEE division), at least 2^-126; s = 1 for an all-zero row;
  s = NaN for a row holding NaN or inf (its q are NaN: the row dequantizes to NaN, other rows are
  untouched; nothing is checked on the host: no device sync, CUDA-graph safe);
  q_k = e4m3(clamp(a_k / s, -448, 448))   (IEEE division, round to nearest, ties to even; e4m3
  subnormals kept), so that a_k ~ q_k * s with an error of at most half an e4m3 step at a_k / s,
  times s.

LayerNorm: no affine parameters, eps 1e-6 (`policy.LN_EPS`), biased variance, fp32 statistics
from the row in registers (mean, then M2 = sum (x - mean)^2: exact two-pass, no cancellation on
rows with a large mean). tanh-GELU: `kernels.gelu.gelu_tanh` in fp32.

Rounding to e4m3 (`round_to_e4m3`, `e4m3_bits`): done in fp32 / int32 arithmetic, and the kernels
store the e4m3 bit pattern as a byte (through a uint8 view of q), never with Triton's fp32 ->
fp8 cast: Triton's interpreter mis-rounds values whose rounding carries into the exponent
(-125.08 -> -64 instead of -128) and turns NaN into 384, so one integer code path serves the GPU
and the interpreter alike, bit for bit equal to PyTorch's `.to(torch.float8_e4m3fn)`.

Memory layout: tokens (..., K) seen as M rows of any row and column strides (viewed as (M, K)
without a copy whenever the leading dims merge, e.g. a slice of wider rows); for the LN pass row
m belongs to image m // (M / B) (rows of one image are contiguous), and shift/scale are per-image
(B, K) chunks of the (B, 6K) adaLN output (any strides, never copied). Outputs: q contiguous rows
(M, K) e4m3 (the row-major A operand of the row-wise scaled FP8 GEMM) and s (M,) fp32;
`gelu_quantize` and `quantize_rows` return them shaped like their input, (..., K) and (...,), as
their twins do. A program owns BLOCK_ROWS whole rows of BLOCK = next_pow2(K) columns, about 4K
elements (one row of 8K at the widest), 16 per thread (`row_tiles`); rows are at most
`LN_MAX_WIDTH` (4096) features for the LN pass and `ROW_MAX_WIDTH` (8192) for the other two (the
presets: D = 384..1152, 4D = 1536..4608); wider rows are refused with the reason (the PyTorch
twins take them).

Cost per row of K elements, HBM bytes, for bf16 input (2 bytes an element; fp32 input: the fused
passes read 4K, the twins skip their cast, 6K less):
  each fused pass: reads 2K, writes K + 4 (the q row and its fp32 scale): 3K + 4. The LN pass also
  reads its image's shift and scale rows, shared by all the image's rows (L2 hits after the first).
  the PyTorch twins, one kernel per op, every intermediate an fp32 (M, K) tensor (plus a few
  small per-row and per-image ops):
  - layernorm_modulate_quantize: cast to fp32 (r 2K, w 4K), layer_norm (r 4K, w 4K), x (1 + scale)
    (r 4K, w 4K), + shift (r 4K, w 4K), abs (r 4K, w 4K), amax (r 4K), / s (r 4K, w 4K), clamp
    (r 4K, w 4K), to e4m3 (r 4K, w K): 34K read + 29K written = 63K;
  - gelu_quantize: cast (r 2K, w 4K), gelu (r 4K, w 4K), then abs, amax, / s, clamp, to e4m3 as
    above: 26K read + 21K written = 47K;
  - quantize_rows: cast, abs, amax, / s, clamp, to e4m3: 22K read + 17K written = 39K.
  Two Triton passes instead of one (write a in bf16, then quantize it): 2K + 2K, then 2K + K + 4:
  7K + 4.

Why the attention output gets a pass of its own (`quantize_rows`) rather than being quantized in
the attention kernel's epilogue: a token's row (K = D features) spans all heads, while the
attention kernels own one (region, head) per program and write D / heads columns of a row; a
per-token scale needs the amax over every head's output, which no program holds. (A per-(token,
head) scale would fit the epilogue, but the row-wise scaled GEMM takes one scale per row of A.)

Forward only (inference): the launchers refuse a call that autograd records. No tl.dot anywhere,
so bf16 input runs under Triton's interpreter too (the policy's bf16 refusal is about tl.dot;
the interpreter does convert bf16 subnormals to fp32 wrongly on loading, the GPU exactly).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .gelu import gelu_tanh
from .policy import (LN_EPS, cdiv, launch_problems, modulate_problems, next_power_of_2, out_problems, overlaps,
                     raise_if, rows, triton_reasons)

# e4m3 (float8_e4m3fn) constants, as in fastlego.fp8 (E4M3_MAX, MIN_SCALE): 448 is its largest
# finite value, 2^-126 fp32's smallest normal number (the smallest scale used).
E4M3_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(2.0 ** -126)
FP32_MAX = tl.constexpr(3.4028234663852886e38)

# Widest rows the passes hold in registers (see the module docstring).
LN_MAX_WIDTH = 4096
ROW_MAX_WIDTH = 8192


# --------------------------------------------------------------------------------------------
# e4m3 rounding and encoding (fp32 / int32 arithmetic: the same bits on the GPU and the interpreter)
# --------------------------------------------------------------------------------------------

@triton.jit
def round_to_e4m3(v):
    """The e4m3 value nearest fp32 v (ties to even), as an exact fp32; |v| > 448 saturates to +-448
    (the quantizer clamps first anyway); NaN stays NaN; the sign of zero is kept.

    On the magnitude's fp32 bits (sign 1 | exponent 8 | mantissa 23):
    - normal e4m3 range, |v| >= 2^-6: keep 3 mantissa bits, round to nearest even by adding
      0x7FFFF + (bit 20, the lowest kept bit) and clearing the low 20 bits; a carry out of the
      mantissa moves into the exponent, which is the right answer (1.111|1 * 2^e -> 2^(e+1));
    - subnormal range, |v| < 2^-6: e4m3 steps are 2^-9; (|v| + c) - c with c = 1.5 * 2^14 (fp32's ulp
      there is 2^-9, and c an even multiple of it) rounds |v| to a multiple of 2^-9, ties to even,
      by fp32's own round-to-nearest-even. 2^-6 itself (8 * 2^-9) comes out exact too."""
    bits = v.to(tl.int32, bitcast=True)
    mag = tl.minimum(bits & 0x7FFFFFFF, 0x43E00000)          # |v| bits, at most 448's (NaN: restored below)
    normal = (mag + (0x7FFFF + ((mag >> 20) & 1))) & -1048576   # -1048576 = 0xFFF00000: exponent, 3 mantissa bits
    magf = mag.to(tl.float32, bitcast=True)
    subnormal = (magf + 24576.0) - 24576.0
    r = tl.where(mag < 0x3C800000, subnormal, normal.to(tl.float32, bitcast=True))   # 0x3C800000 = 2^-6
    # v's sign bit onto the magnitude (a bit operation: compiled, -r can be 0 - r, which loses -0)
    r = (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def e4m3_bits(r):
    """The float8_e4m3fn bit pattern (uint8: sign 1 | exponent 4, bias 7 | mantissa 3) of r, an
    exact e4m3 value in fp32 (`round_to_e4m3`'s output) or NaN (-> sign | 0x7F, PyTorch's NaN).
    Normal: fp32 exponent E, e4m3 exponent E - 120, so the top 12 magnitude bits (E | 3 mantissa
    bits) minus 120 << 3 are the code; subnormal: the count of 2^-9 steps, r * 512 (0..7)."""
    bits = r.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    below = tl.minimum(mag, 0x3C800000).to(tl.float32, bitcast=True)   # |r| capped at 2^-6: no NaN cast
    code = tl.where(mag >= 0x3C800000, (mag >> 20) - 960, (below * 512.0).to(tl.int32))
    code = tl.where(r != r, 0x7F, code)
    code = tl.where(bits < 0, code | 0x80, code)
    return code.to(tl.uint8)


@triton.jit
def quantize_row_tile(a, mask):
    """Rows a (BLOCK_ROWS, BLOCK) fp32 (elements outside `mask` ignored) -> (e4m3 codes (uint8,
    a's shape), scales (BLOCK_ROWS,) fp32) by fastlego.fp8's rule (module docstring). A non-finite
    element counts as inf in the amax, which makes the row's scale NaN and so its q NaN."""
    mag = tl.abs(a)
    mag = tl.where(mask, tl.where(mag <= FP32_MAX, mag, float("inf")), 0.0)   # NaN -> inf; outside -> 0
    amax = tl.max(mag, axis=1)
    s = tl.maximum(tl.math.div_rn(amax, E4M3_MAX), MIN_SCALE)
    s = tl.where(amax == 0.0, 1.0, s)
    s = tl.where(amax == float("inf"), float("nan"), s)
    v = tl.math.div_rn(a, s[:, None])
    v = tl.where(v > E4M3_MAX, E4M3_MAX, tl.where(v < -E4M3_MAX, -E4M3_MAX, v))   # the clamp keeps NaN
    return e4m3_bits(round_to_e4m3(v)), s


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _layernorm_modulate_quantize_kernel(
        x_ptr, shift_ptr, scale_ptr, q_ptr, s_ptr, M, K, rows_per_image,
        stride_xm, stride_xk, stride_shift_b, stride_shift_k, stride_scale_b, stride_scale_k,
        stride_qm, stride_qk, stride_s, eps,
        BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_ROWS whole rows of x (BLOCK_K >= K) per program, one read: statistics from the row in
    registers, a = (x - mean) * rstd * (1 + scale[img]) + shift[img], then its amax, scale and q."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(tl.sum(x, axis=1), K * 1.0)
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(d * d, axis=1), K * 1.0) + eps))
    img = (rows // rows_per_image).to(tl.int64)
    sc = tl.load(scale_ptr + img[:, None] * stride_scale_b + cols[None, :] * stride_scale_k, mask=mask, other=0.0)
    sh = tl.load(shift_ptr + img[:, None] * stride_shift_b + cols[None, :] * stride_shift_k, mask=mask, other=0.0)
    a = d * rstd[:, None] * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
    codes, s = quantize_row_tile(a, mask)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :] * stride_qk, codes, mask=mask)
    tl.store(s_ptr + rows64 * stride_s, s, mask=row_mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_xm, stride_xn, stride_qm, stride_qn, stride_s,
                          GELU: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_ROWS whole rows of x (BLOCK_N >= N) per program, one read: a = gelu_tanh(x) (GELU) or
    x, in fp32, then its amax, scale and q."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    a = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        a = gelu_tanh(a)
    codes, s = quantize_row_tile(a, mask)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :] * stride_qn, codes, mask=mask)
    tl.store(s_ptr + rows64 * stride_s, s, mask=row_mask)


def row_tiles(width: int) -> Tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK, num_warps): whole rows of BLOCK = next_pow2(width) columns, ~4K
    elements per program (one row when wider), about 16 fp32 values per thread."""
    block = next_power_of_2(max(width, 1))
    block_rows = max(1, min(16, 4096 // block))
    warps = min(16, max(2, block_rows * block // 512))
    return block_rows, block, warps


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _e4m3() -> torch.dtype:
    from fastlego import fp8    # at call time: fastlego.fp8 may import this module
    fp8._need_fp8()
    return fp8.E4M3


def layernorm_modulate_quantize(h, shift, scale, *, out=None, out_scale=None):
    """LN(h) * (1 + scale[img]) + shift[img] in fp32, quantized per row to e4m3 in the same pass:
    h tokens (..., K) (M rows), per-image shift / scale (B, K) -> (q (M, K) float8_e4m3fn, scales
    (M,) fp32). `out` / `out_scale`: buffers of those shapes and dtypes to write into."""
    op = "layernorm_modulate_quantize"
    raise_if(_layernorm_modulate_quantize_problems(h, shift, scale, out, out_scale), op)
    raise_if(_launch_problems([h, shift, scale]), op)
    e4m3 = _e4m3()
    x2d = rows(h)                                    # (M, K): a view whenever h's rows merge (strided too)
    M, K = x2d.shape
    q = torch.empty((M, K), dtype=e4m3, device=h.device) if out is None else out
    s = torch.empty((M,), dtype=torch.float32, device=h.device) if out_scale is None else out_scale
    if M:
        codes = q.view(torch.uint8)
        block_rows, block_k, warps = row_tiles(K)
        _layernorm_modulate_quantize_kernel[(cdiv(M, block_rows),)](
            x2d, shift, scale, codes, s, M, K, M // shift.shape[0], x2d.stride(0), x2d.stride(1),
            shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
            codes.stride(0), codes.stride(1), s.stride(0), LN_EPS,
            BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=warps)
    return q, s


def _rows_quantize(x, out, out_scale, gelu: bool, op: str):
    raise_if(_rows_problems(x, out, out_scale, op), op)
    raise_if(_launch_problems([x]), op)
    e4m3 = _e4m3()
    x2d = rows(x)
    M, N = x2d.shape
    q = torch.empty(x.shape, dtype=e4m3, device=x.device) if out is None else out
    s = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if out_scale is None else out_scale
    if M:
        codes = q.view(torch.uint8).view(M, N)       # out_problems made sure this is a view
        s1d = s.view(M)
        block_rows, block_n, warps = row_tiles(N)
        _quantize_rows_kernel[(cdiv(M, block_rows),)](
            x2d, codes, s1d, M, N, x2d.stride(0), x2d.stride(1), codes.stride(0), codes.stride(1), s1d.stride(0),
            GELU=gelu, BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps)
    return q, s


def gelu_quantize(y, *, out=None, out_scale=None):
    """tanh-GELU of y (..., N) (fc1's output) in fp32, quantized per row to e4m3 in the same pass:
    -> (q (..., N) float8_e4m3fn, scales (...,) fp32), fc2's input. `out` / `out_scale`: buffers of
    those shapes and dtypes to write into."""
    return _rows_quantize(y, out, out_scale, True, "gelu_quantize")


def quantize_rows(x, *, out=None, out_scale=None):
    """x (..., K) quantized per row to e4m3 -> (q (..., K) float8_e4m3fn, scales (...,) fp32):
    the attention output before the proj GEMM. NaN / inf propagate (a NaN scale; the row
    dequantizes to NaN), as `fastlego.fp8.quantize_rows(x, check_finite=False)`."""
    return _rows_quantize(x, out, out_scale, False, "quantize_rows")


# --------------------------------------------------------------------------------------------
# Argument checks, and what the dispatcher asks before every call
# --------------------------------------------------------------------------------------------

def _launch_problems(inputs: Sequence[torch.Tensor]) -> List[str]:
    # No tl.dot in these kernels (uses_dot=False): bf16 loads and fp32 math are right under the
    # interpreter, whose tl.dot is what is wrong for bf16.
    return launch_problems(inputs, mixed_dtypes_ok=True, forward_only=True, uses_dot=False)


def _reasons(inputs: Sequence[torch.Tensor]) -> List[str]:
    return triton_reasons(inputs, mixed_dtypes_ok=True, forward_only=True, uses_dot=False)


def _width_problems(name: str, width: int, limit: int, op: str) -> List[str]:
    if width > limit:
        return [f"{name} rows have {width} features: the Triton pass holds a whole row in registers, at most "
                f"{limit}; use fastlego.fp8.{op} (PyTorch) for wider rows"]
    return []


def _buffer_problems(out, out_scale, q_shape, s_shape, device, inputs: Sequence[torch.Tensor]) -> List[str]:
    """out: float8_e4m3fn of q_shape, rows viewable, overlapping no input; out_scale: float32 of
    s_shape, viewable as one row of scales, overlapping no input and not out."""
    from fastlego import fp8

    problems = out_problems(out, q_shape, fp8.E4M3, device, inputs, rows=True) if fp8.E4M3 is not None else []
    if out_scale is None:
        return problems
    s_shape = tuple(int(n) for n in s_shape)
    if (not isinstance(out_scale, torch.Tensor) or tuple(out_scale.shape) != s_shape
            or out_scale.dtype != torch.float32 or out_scale.device != torch.device(device)):
        got = (f"{tuple(out_scale.shape)} {out_scale.dtype} on {out_scale.device}"
               if isinstance(out_scale, torch.Tensor) else type(out_scale).__name__)
        return problems + [f"out_scale is {got}, expected {s_shape} torch.float32 on {device}: allocate it with "
                           f"torch.empty({s_shape}, dtype=torch.float32, device='{device}') or pass out_scale=None"]
    try:
        out_scale.view(-1)
    except RuntimeError:
        problems.append("out_scale must be viewable as one row of scales (e.g. contiguous); pass "
                        "out_scale.contiguous() or no out_scale")
    if any(overlaps(out_scale, t) for t in list(inputs) + [out]):
        problems.append("out_scale overlaps an input or out: pass a separate tensor (the kernels are not in-place)")
    return problems


def _layernorm_modulate_quantize_problems(h, shift, scale, out=None, out_scale=None) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (h, shift, scale)):
        return ["h, shift and scale must be tensors"]
    if h.dim() < 1 or h.shape[-1] == 0:
        return [f"h must be tokens (..., K) with K > 0; got {tuple(h.shape)}"]
    problems = modulate_problems(h, shift, scale)
    problems += _width_problems("h", h.shape[-1], LN_MAX_WIDTH, "layernorm_modulate_quantize")
    M, K = h.numel() // h.shape[-1], h.shape[-1]
    return problems + _buffer_problems(out, out_scale, (M, K), (M,), h.device, [h, shift, scale])


def _rows_problems(x, out=None, out_scale=None, op: str = "quantize_rows") -> List[str]:
    name = "y" if op == "gelu_quantize" else "x"
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        return [f"{name} must be a tensor (..., K) with K > 0; got {got}"]
    problems = _width_problems(name, x.shape[-1], ROW_MAX_WIDTH, op)
    return problems + _buffer_problems(out, out_scale, tuple(x.shape), tuple(x.shape[:-1]), x.device, [x])


def _fp8_reasons() -> List[str]:
    from fastlego import fp8

    if fp8.E4M3 is None:
        return [f"PyTorch {torch.__version__} has no torch.float8_e4m3fn: FP8 needs PyTorch 2.1 or later"]
    return []


def layernorm_modulate_quantize_not_supported_reasons(h, shift, scale, *, out=None, out_scale=None) -> List[str]:
    """Why `layernorm_modulate_quantize` cannot take this call (empty: it can)."""
    return _fp8_reasons() or _layernorm_modulate_quantize_problems(h, shift, scale, out, out_scale) or _reasons(
        [h, shift, scale])


def gelu_quantize_not_supported_reasons(y, *, out=None, out_scale=None) -> List[str]:
    """Why `gelu_quantize` cannot take this call (empty: it can)."""
    return _fp8_reasons() or _rows_problems(y, out, out_scale, "gelu_quantize") or _reasons([y])


def quantize_rows_not_supported_reasons(x, *, out=None, out_scale=None) -> List[str]:
    """Why `quantize_rows` cannot take this call (empty: it can)."""
    return _fp8_reasons() or _rows_problems(x, out, out_scale, "quantize_rows") or _reasons([x])
