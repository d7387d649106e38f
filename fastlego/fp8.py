"""FP8 inference: e4m3 weights and activations with fp32 scales in the DiT blocks' Linears.

`quantize(model, "fp8")` (also `fastlego.quantize`) converts a copy of a `LegoBackbone` or
`EDMPrecond` for inference: in every DiT block, the four big Linears (attention qkv and output
projection, MLP fc1 and fc2) hold e4m3 weights (`torch.float8_e4m3fn`) with one fp32 scale per
output channel, made once; their inputs are quantized per row (per token) with one fp32 scale per
row; each GEMM returns bf16. Everything else keeps the model's precision: the residual stream,
LayerNorm statistics and the modulation (fp32), softmax attention (the activation dtype: bf16
under bf16 autocast), the adaLN conditioning, the embedders and the final layer.

Scales (`row_scales`), one rule for weights and activations, per row of a (..., K) tensor:
- scale = amax / 448 in fp32 (448: e4m3's largest finite value), q = e4m3(clamp(x / scale, +-448));
  the clamp makes huge finite values saturate at +-448 (never inf or NaN from finite input);
- an all-zero row gets scale 1 (q = 0, dequantized exactly 0);
- a row whose amax / 448 would be below fp32's smallest normal number (amax < 448 * 2^-126, about
  5.3e-36) gets scale 2^-126: no division by a subnormal scale (which loses precision and can be
  0); such a row's values are below 5.3e-36, its q use less of e4m3's range, and the rounding rule
  below still bounds their error (at most 16 * 2^-126, about 1.9e-37, absolutely);
- non-finite input: weights are refused (ValueError naming the tensor and rows) when quantized;
  activations: `quantize_rows(x)` refuses them too, but the model's own calls
  (`check_finite=False`) propagate instead: a row holding NaN or inf gets a NaN scale and
  dequantizes to an all-NaN row (other rows are untouched), as a NaN row does in the bf16 path.
  Checking would cost a device sync per GEMM and break CUDA-graph capture.
- e4m3 subnormals (|x / scale| < 2^-6, steps of 2^-9) are kept, not flushed: a value's error is
  at most half a step of e4m3 at x / scale, times the scale.

Where it runs: on a CUDA GPU with FP8 tensor cores (compute capability 8.9 or later: Ada,
Hopper, Blackwell), with triton installed. The activations are quantized inside the row passes
that read them (`fastlego.kernels.fp8_quantize`: the LN-modulate pass before qkv and fc1 writes
e4m3 and the row scales instead of bf16, the GELU pass before fc2 likewise; the attention output
has a quantizing pass of its own, as a token's row spans every head while the attention kernels
own one head of a region each). The GEMMs run on the path `fastlego.tune` measured fastest per
shape: `torch._scaled_mm` (cuBLASLt FP8 with row-wise scales, bf16 output; also the rule for
untuned shapes) or the Triton FP8 GEMM (`fastlego.kernels.fp8_linear`). The functions of this
module (`layernorm_modulate_quantize`, `gelu_quantize`, `quantize_rows`, `fp8_linear_reference`)
are those kernels' twins. Anywhere else the quantized model refuses to run
(`fastlego.BackendNotSupported` listing the reasons, as the dispatcher's forced backends do)
unless it was quantized with `emulate=True`: then the twins compute the same numerics with plain
PyTorch ops on any device (quantized operands dequantized, fp32 matmul, rounded to bf16). The
emulated path is for measuring accuracy (on a CPU too), not for speed: it is slower than the
fp32 model. Never a silent fallback either way.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import ops
from .dispatch import BackendNotSupported, autocast_dtype
from .model import own_modulation
from .reference import gated_residual, gelu_tanh, layernorm_modulate

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0                 # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 2.0 ** -126          # fp32's smallest normal number: the smallest scale used
MIN_CAPABILITY = (8, 9)          # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later
GEMM_MULTIPLE = 16               # cuBLASLt FP8 GEMMs need K and N multiples of 16
QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")   # per DiT block


# --------------------------------------------------------------------------------------------
# Quantize, dequantize
# --------------------------------------------------------------------------------------------

def _need_fp8() -> None:
    if E4M3 is None:
        raise BackendNotSupported(f"PyTorch {torch.__version__} has no torch.float8_e4m3fn: FP8 needs PyTorch 2.1 "
                                  f"or later (2.5 or later for row-wise scaled GEMMs)")


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """The fp32 scale of every row of x (..., K) -> (...,): amax / 448, 1 for all-zero rows, at
    least 2^-126 (see the module docstring); NaN for a row holding NaN or inf."""
    amax = x.float().abs().amax(dim=-1)
    scale = (amax / E4M3_MAX).clamp_min(MIN_SCALE)          # clamp_min keeps NaN
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))   # inf -> NaN too
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _refuse_non_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        rows = bad.reshape(-1).nonzero().flatten().tolist()
        raise ValueError(f"{what} holds NaN or inf in {len(rows)} row(s) (first: {rows[:8]}): e4m3 quantization "
                         f"takes finite values only; find where they come from (a diverged run, a bad checkpoint)")


def quantize_rows(x: torch.Tensor, check_finite: bool = True, what: str = "x") -> Tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) any float dtype -> (q (..., K) e4m3, scale (...,) fp32) with x ~ q * scale[..., None].

    `check_finite`: refuse NaN / inf with a ValueError (reads the values back: a device sync);
    False propagates them (the row dequantizes to NaN; see the module docstring)."""
    _need_fp8()
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{what} must be a floating-point tensor (..., K) with K > 0, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    x32 = x.float()
    if check_finite:
        _refuse_non_finite(x32, what)
    scale = row_scales(x32)
    q = (x32 / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (..., K) e4m3 with row scales (...,) -> fp32 (..., K)."""
    if q.dtype != E4M3 or scale.dtype != torch.float32 or tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"dequantize takes q (..., K) float8_e4m3fn and scale (...,) float32 of q's leading shape; "
                         f"got q {q.dtype} {tuple(q.shape)}, scale {scale.dtype} {tuple(scale.shape)}")
    return q.float() * scale[..., None]


def quantize_weight(weight: torch.Tensor, what: str = "weight") -> Tuple[torch.Tensor, torch.Tensor]:
    """An nn.Linear weight (N, K) -> (e4m3 (N, K), fp32 scales (N,)): one scale per output channel.
    Non-finite weights are refused."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{what} must be a 2-D (N, K) Linear weight, got {tuple(getattr(weight, 'shape', ()))}")
    q, scale = quantize_rows(weight.detach(), check_finite=True, what=what)
    return q.contiguous(), scale.contiguous()


# --------------------------------------------------------------------------------------------
# The FP8 linear: reference (the oracle and the emulated path) and torch._scaled_mm
# --------------------------------------------------------------------------------------------

def _linear_problems(x_q, x_scale, w_q, w_scale, bias) -> List[str]:
    problems = []
    if not isinstance(x_q, torch.Tensor) or x_q.dtype != E4M3 or x_q.dim() < 1:
        problems.append(f"x_q must be a float8_e4m3fn tensor (..., K), got {getattr(x_q, 'dtype', type(x_q).__name__)}")
    if not isinstance(w_q, torch.Tensor) or w_q.dtype != E4M3 or w_q.dim() != 2:
        problems.append(f"w_q must be a float8_e4m3fn (N, K) tensor, got {getattr(w_q, 'dtype', type(w_q).__name__)} "
                        f"{tuple(getattr(w_q, 'shape', ()))}")
    if problems:
        return problems
    if w_q.shape[1] != x_q.shape[-1]:
        problems.append(f"w_q is {tuple(w_q.shape)} but x_q's last dim is {x_q.shape[-1]}: expected (N, {x_q.shape[-1]})")
    if not isinstance(x_scale, torch.Tensor) or x_scale.dtype != torch.float32 or tuple(x_scale.shape) != tuple(x_q.shape[:-1]):
        problems.append(f"x_scale must be float32 of shape {tuple(x_q.shape[:-1])} (one per row of x_q), got "
                        f"{getattr(x_scale, 'dtype', None)} {tuple(getattr(x_scale, 'shape', ()))}")
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (w_q.shape[0],):
        problems.append(f"w_scale must be float32 of shape ({w_q.shape[0]},) (one per output channel), got "
                        f"{getattr(w_scale, 'dtype', None)} {tuple(getattr(w_scale, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (w_q.shape[0],)):
        problems.append(f"bias must be ({w_q.shape[0]},) or None, got {tuple(getattr(bias, 'shape', ()))}")
    return problems


def fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias=None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`dequantize(x_q, x_scale) @ dequantize(w_q, w_scale)^T + bias`, fp32 math, one rounding to
    `out_dtype`: the oracle of `torch._scaled_mm` and of a Triton FP8 GEMM, and the emulated
    path's GEMM on any device. x_q (..., K), x_scale (...,), w_q (N, K), w_scale (N,) -> (..., N).
    (The fp32 matmul follows PyTorch's TF32 switch on CUDA; off by default.)"""
    problems = _linear_problems(x_q, x_scale, w_q, w_scale, bias)
    if problems:
        raise ValueError("fp8_linear_reference: " + "; ".join(problems))
    y = dequantize(x_q, x_scale) @ dequantize(w_q, w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


_REASONS_CACHE: Dict[tuple, Tuple[str, ...]] = {}


def scaled_mm_not_supported_reasons(device, K: int, N: int, out_dtype: torch.dtype = torch.bfloat16) -> List[str]:
    """Why `torch._scaled_mm` (FP8 tensor cores, row-wise scales) cannot run a K -> N Linear on
    `device` (empty: it can). The dispatcher's convention: one line per reason, each with the fix."""
    device = torch.device(device)
    key = (device, int(K), int(N), out_dtype)
    hit = _REASONS_CACHE.get(key)
    if hit is not None:
        return list(hit)
    reasons = []
    if E4M3 is None or not hasattr(torch, "_scaled_mm"):
        reasons.append(f"PyTorch {torch.__version__} has no torch.float8_e4m3fn / torch._scaled_mm: FP8 GEMMs "
                       f"need PyTorch 2.5 or later (row-wise scaled _scaled_mm)")
    if device.type != "cuda":
        reasons.append(f"the model is on {device.type}: FP8 GEMMs need a CUDA GPU with FP8 tensor cores "
                       f"(compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later: Ada, Hopper, Blackwell)")
    elif getattr(torch.version, "hip", None):
        reasons.append("ROCm GPUs are not supported by this FP8 path (their FP8 formats are e4m3fnuz; "
                       "only NVIDIA's e4m3fn GEMMs are wired here)")
    else:
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < MIN_CAPABILITY:
            reasons.append(f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}: FP8 "
                           f"tensor cores need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later (Ada, Hopper, Blackwell)")
    if K % GEMM_MULTIPLE or N % GEMM_MULTIPLE:
        reasons.append(f"a Linear {K} -> {N}: cuBLASLt FP8 GEMMs need both sizes multiples of {GEMM_MULTIPLE}")
    if out_dtype != torch.bfloat16:
        reasons.append(f"output dtype {out_dtype}: row-wise scaled FP8 GEMMs write bfloat16")
    _REASONS_CACHE[key] = tuple(reasons)
    return reasons


def refusal(reasons: List[str]) -> BackendNotSupported:
    """The error a quantized model raises where its FP8 GEMMs cannot run (the reasons, then the fix)."""
    return BackendNotSupported(
        "fastlego FP8 inference cannot run here:\n  - " + "\n  - ".join(reasons)
        + "\nrun it on a GPU with FP8 tensor cores, or quantize with fastlego.quantize(model, 'fp8', emulate=True): "
          "the same numerics in plain PyTorch on any device (for measuring accuracy, not for speed); "
          "or sample the unquantized model in bf16")


def fp8_linear_scaled_mm(x_q, x_scale, w_q, w_scale, bias=None, out_dtype: torch.dtype = torch.bfloat16,
                         fast_accum: bool = False) -> torch.Tensor:
    """The FP8 GEMM on the tensor cores: `torch._scaled_mm` with row-wise scales (x_scale per row
    of x, w_scale per output channel), bias in its epilogue (cast to bf16), bf16 output. Same
    arguments and result as `fp8_linear_reference` (up to fp32 accumulation order); with
    `fast_accum` the tensor cores' own accumulator sums every K slice (see `quantize`)."""
    problems = _linear_problems(x_q, x_scale, w_q, w_scale, bias)
    if problems:
        raise ValueError("fp8_linear_scaled_mm: " + "; ".join(problems))
    reasons = scaled_mm_not_supported_reasons(x_q.device, w_q.shape[1], w_q.shape[0], out_dtype)
    if reasons:
        raise refusal(reasons)
    K, N = w_q.shape[1], w_q.shape[0]
    a = x_q.reshape(-1, K).contiguous()          # row-major (M, K)
    b = w_q.t()                                  # (K, N) column-major: w_q (N, K) is contiguous
    y = torch._scaled_mm(a, b, scale_a=x_scale.reshape(-1, 1), scale_b=w_scale.reshape(1, N),
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                         use_fast_accum=bool(fast_accum))
    return y.reshape(*x_q.shape[:-1], N)


def gemm_key(x_q, w_q, bias, out_dtype, fast_accum: bool = False) -> str:
    """The tuning key of an FP8 GEMM call (`fastlego.tuning`): rows M (next power of two), N, K,
    bias or not, output dtype, and fast accumulation when on."""
    M = x_q.numel() // max(x_q.shape[-1], 1)
    return (f"fp8_linear|M<={1 << max(M - 1, 0).bit_length()}|N={w_q.shape[0]}|K={w_q.shape[1]}"
            f"|bias={bias is not None}|{out_dtype}" + ("|fast_accum" if fast_accum else "")).replace("torch.", "")


def fp8_linear(x_q, x_scale, w_q, w_scale, bias=None, out_dtype: torch.dtype = torch.bfloat16,
               emulate: bool = False, fast_accum: bool = False) -> torch.Tensor:
    """The FP8 Linear on the tensor cores, by the path `fastlego.tune` measured fastest for this
    shape: the Triton FP8 GEMM (`fastlego.kernels.fp8_linear`) or `fp8_linear_scaled_mm`
    (cuBLASLt; also the rule for untuned shapes and deterministic mode); refused with the reasons
    where FP8 cannot run. `emulate=True`: `fp8_linear_reference`, asked for explicitly (it has no
    fast accumulation to emulate). `fast_accum`: see `quantize`."""
    if emulate:
        if fast_accum:
            raise ValueError("fp8_linear: fast accumulation is the tensor cores' own; emulate=True cannot "
                             "compute it (use fast_accum=False to emulate, or run on an FP8 GPU)")
        return fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if not x_q.is_cuda:
        return fp8_linear_scaled_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype)   # refuses with the reasons
    from . import tuning
    from .kernels import fp8_linear as triton_gemm   # registers its candidates with fastlego.tune

    args = (x_q, x_scale, w_q, w_scale, bias, out_dtype, bool(fast_accum))
    path, config = tuning.lookup("fp8_linear", gemm_key(x_q, w_q, bias, out_dtype, fast_accum), args)
    if path == "fused":
        return triton_gemm.fp8_linear(*args[:6], config=config, fast_accum=fast_accum)
    return fp8_linear_scaled_mm(*args)


# --------------------------------------------------------------------------------------------
# The activation quantizations of a DiT block: twins of the fused Triton passes
# (`fastlego.kernels.fp8_quantize`, which FP8DiTBlock runs unless emulated)
# --------------------------------------------------------------------------------------------

def layernorm_modulate_quantize(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """LN(h) * (1 + scale[img]) + shift[img] in fp32, quantized per row: the input of qkv and fc1.
    h tokens (N, T, D), per-image shift / scale (B, D) -> (q (M, D) e4m3, scales (M,) fp32)."""
    return quantize_rows(layernorm_modulate(h, shift, scale, torch.float32), check_finite=False)


def _propagating_quantize_rows(x: torch.Tensor):
    """`quantize_rows(x, check_finite=False)`: the attention output's quantization (NaN propagates)."""
    return quantize_rows(x, check_finite=False)


def gelu_quantize(y: torch.Tensor):
    """tanh-GELU of fc1's bf16 output in fp32, quantized per row: fc2's input."""
    return quantize_rows(gelu_tanh(y.float()), check_finite=False)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class FP8Linear(nn.Module):
    """A Linear(K, N) for inference: e4m3 weight (N, K) `weight_fp8`, fp32 per-output-channel
    `weight_scale` (N,), bias in bf16 (as the GEMM's epilogue adds it). Takes quantized input
    (q, row scales), returns bf16. `emulate`: compute with `fp8_linear_reference` (any device);
    `fast_accum`: the tensor cores' fast accumulation (see `quantize`)."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 emulate: bool = False, fast_accum: bool = False):
        super().__init__()
        if emulate and fast_accum:
            raise ValueError("FP8Linear: fast accumulation cannot be emulated (emulate=True takes fast_accum=False)")
        self.out_features, self.in_features = weight_fp8.shape
        self.emulate = bool(emulate)
        self.fast_accum = bool(fast_accum)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, emulate: bool = False, what: str = "weight",
                    fast_accum: bool = False) -> "FP8Linear":
        w_q, w_scale = quantize_weight(linear.weight, what)
        return cls(w_q, w_scale, linear.bias, emulate, fast_accum)

    def forward(self, x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x_q, x_scale, self.weight_fp8, self.weight_scale, self.bias, torch.bfloat16, self.emulate,
                          self.fast_accum)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .float() convert every floating buffer, e4m3 included (a cast
        # without the scales: wrong weights). Keep the quantized tensors' dtypes, follow the device.
        kept = {name: getattr(self, name) for name in ("weight_fp8", "weight_scale", "bias")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            now = getattr(self, name)
            if before is not None and now.dtype != before.dtype:
                setattr(self, name, before.to(now.device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, e4m3 weights with per-channel "
                f"scales, {'emulated' if self.emulate else 'torch._scaled_mm'}")


class FP8DiTBlock(nn.Module):
    """A DiT block whose qkv, proj, fc1 and fc2 are `FP8Linear`s (inference only); the adaLN
    conditioning, LayerNorm statistics, attention and residual stream are as in `DiTBlock`.
    Module names are DiTBlock's (`attn.qkv`, `mlp.fc1`, `adaLN_modulation.1`)."""

    def __init__(self, block: nn.Module, emulate: bool = False, name: str = "block", fast_accum: bool = False):
        super().__init__()
        self.adaLN_modulation = block.adaLN_modulation
        self.attn, self.mlp = block.attn, block.mlp
        for path in QUANTIZED_LINEARS:
            parent, child = path.split(".")
            owner = getattr(self, parent)
            setattr(owner, child, FP8Linear.from_linear(getattr(owner, child), emulate, f"{name}.{path}.weight",
                                                        fast_accum))

    def forward(self, h: torch.Tensor, c: torch.Tensor, mod: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`mod`: the block's adaLN parameters when the brick computed them (`Brick.modulations`)."""
        qkv_linear = self.attn.qkv
        if qkv_linear.emulate:        # the PyTorch twins
            ln_quantize, gelu_q, rows_q = layernorm_modulate_quantize, gelu_quantize, _propagating_quantize_rows
        else:                         # refuse before any work where FP8 cannot run; else the Triton passes
            reasons = not_supported_reasons(self)
            if reasons:
                raise refusal(reasons)
            from .kernels import fp8_quantize as K
            ln_quantize, gelu_q, rows_q = K.layernorm_modulate_quantize, K.gelu_quantize, K.quantize_rows
        if mod is None:
            mod = own_modulation(self, c)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        act = autocast_dtype(h) or h.dtype        # attention and the residual stream: the model's precision
        qkv = qkv_linear(*ln_quantize(h, shift1, scale1)).reshape(*h.shape[:-1], -1)
        a = ops.attention(qkv.to(act), self.attn.num_heads)
        y = self.attn.proj(*rows_q(a))
        h = gated_residual(h, gate1.to(h.dtype), y.to(h.dtype))
        m = self.mlp.fc1(*ln_quantize(h, shift2, scale2))
        y = self.mlp.fc2(*gelu_q(m)).reshape(h.shape)
        return gated_residual(h, gate2.to(h.dtype), y.to(h.dtype))


# --------------------------------------------------------------------------------------------
# quantize(model, "fp8")
# --------------------------------------------------------------------------------------------

def _backbone(model: nn.Module) -> nn.Module:
    from .edm import EDMPrecond
    from .model import LegoBackbone

    backbone = model.model if isinstance(model, EDMPrecond) else model
    if not isinstance(backbone, LegoBackbone):
        raise TypeError(f"quantize takes a LegoBackbone or an EDMPrecond, got {type(model).__name__}")
    return backbone


def fp8_linears(model: nn.Module) -> Dict[str, FP8Linear]:
    """Every `FP8Linear` of a model by its module name (empty for an unquantized model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def not_supported_reasons(model: nn.Module) -> List[str]:
    """Why a model quantized without `emulate` cannot run its FP8 GEMMs where its weights are
    (empty: it can, or it is emulated / not quantized). For checking before sampling."""
    reasons: List[str] = []
    for linear in fp8_linears(model).values():
        if not linear.emulate:
            for r in scaled_mm_not_supported_reasons(linear.weight_fp8.device, linear.in_features, linear.out_features):
                if r not in reasons:
                    reasons.append(r)
    if any(not linear.emulate for linear in fp8_linears(model).values()):
        reasons += triton_reasons()
    return reasons


def triton_reasons() -> List[str]:
    """Why the FP8 mode's Triton passes cannot run in this environment (empty: triton is there)."""
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed: FP8 inference quantizes its activations in Triton passes "
                "(pip install triton)"]
    return []


def quantize(model: nn.Module, mode: str = "fp8", *, emulate: bool = False, inplace: bool = False,
             fast_accumulation: bool = False) -> nn.Module:
    """An inference copy of `model` (a LegoBackbone or EDMPrecond; `inplace=True` converts it
    instead) whose DiT blocks run their qkv, proj, fc1 and fc2 in FP8 (see the module docstring);
    in eval mode, without gradients.

    Without `emulate`, running it needs a CUDA GPU with FP8 tensor cores (compute capability 8.9
    or later) and is refused elsewhere with the reasons (`not_supported_reasons(model)` tells in
    advance); the model may be quantized on the CPU and moved there. `emulate=True` runs the same
    numerics with plain PyTorch ops on any device: slow, for measuring accuracy.

    `fast_accumulation=True`: the GEMMs sum every K slice in the tensor cores' own accumulator
    (`torch._scaled_mm(use_fast_accum=True)`; the Triton FP8 GEMM without its fp32 promotion),
    which holds fewer bits than fp32: faster GEMMs, about twice their rounding error. Opt-in, not
    emulatable (refused with `emulate=True`); measure its effect on samples (bench/fp8_accuracy.py)."""
    if mode != "fp8":
        raise ValueError(f"quantize mode {mode!r} is not supported: expected 'fp8'")
    if emulate and fast_accumulation:
        raise ValueError("quantize: fast_accumulation=True is the tensor cores' own accumulation and cannot be "
                         "emulated; quantize with emulate=True alone to measure the precise path on any device")
    _need_fp8()
    backbone = _backbone(model)
    if fp8_linears(model):
        raise ValueError("this model is quantized already: quantize the original model")
    for name, p in backbone.named_parameters():   # refuse before anything is copied or changed
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} holds NaN or inf: a model with non-finite weights cannot be quantized")
    out = model if inplace else copy.deepcopy(model)
    backbone = _backbone(out)
    for i, brick in enumerate(backbone.model):
        brick.blocks = nn.ModuleList(FP8DiTBlock(block, emulate, f"model.{i}.blocks.{j}", fast_accumulation)
                                     for j, block in enumerate(brick.blocks))
    out.eval().requires_grad_(False)
    return out
