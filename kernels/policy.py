"""What every kernel of fastlego.kernels shares: one rule each for the dtypes a kernel takes and
the dtype it computes in, the precision of fp32 dots, the LayerNorm eps, the `out=` buffer, and
the checks a launcher and the dispatcher's `not_supported_reasons` run.

- dtypes: fp32, fp16, bf16 (`DTYPES`). A kernel computes in `compute_dtype(t)`: the autocast
  dtype when autocast is on for the device of its leading tensor t (as F.linear, F.conv2d and
  scaled_dot_product_attention cast under autocast), else t's dtype. Mixed operand dtypes are
  taken under autocast (every operand is cast, as the reference's are), or by a kernel that casts
  each operand as it loads it (`mixed_dtypes_ok`). A launcher casts a weight to the compute dtype
  with `cast_weight` (`fastlego.weight_cache`: made once per weight version inside
  `fastlego.frozen_weights()`, as sampling runs; `w.to(dtype)` elsewhere).
- fp32 dots (`dot_precision`): exact IEEE fp32, unless PyTorch allows TF32 for fp32 matmuls
  (`torch.backends.cuda.matmul.allow_tf32`, which `torch.set_float32_matmul_precision("high")`
  turns on); then 3xTF32 (three TF32 MMAs per product on split operands, about fp32's accuracy on
  tensor cores). Plain TF32 is never used: on LayerNorm-normalised operands it misses the
  2x-of-PyTorch error budget. 16-bit operands ignore the setting (their MMA is 16-bit).
  `tf32(enabled)` sets PyTorch's switches for a block.
- LayerNorm: no affine parameters, eps `LN_EPS` (1e-6, as DiT and LEGO use), the reference's.
- `out=`: a tensor of the output's shape, the compute dtype and the inputs' device, overlapping
  no input (`out_problems`); the GEMMs also need it viewable as rows.
- Checks: `triton_reasons` is what the dispatcher asks a Triton backend before a call (empty: it
  takes it); `launch_problems` is what a launcher called directly raises before any compute. Shape
  problems are each op's own (in its module); the per-image and Linear checks shared by several
  ops are here.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

from fastlego import reference
from fastlego.dispatch import autocast_dtype, forcing, triton_interpreting
from fastlego.weight_cache import cast_weight   # noqa: F401  (the one weight-cast rule; see there)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LN_EPS = reference.LN_EPS   # the one LayerNorm eps (1e-6): the reference's


# --------------------------------------------------------------------------------------------
# Host arithmetic of the launchers (plain Python: triton.cdiv / triton.next_power_of_2 are
# constexpr functions whose Python call costs microseconds, hundreds of times a forward)
# --------------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers a >= 0, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


# --------------------------------------------------------------------------------------------
# dtypes and precision
# --------------------------------------------------------------------------------------------

def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a kernel computes in and returns for leading tensor `t`: the autocast dtype under
    autocast of t's device (floating t other than fp64), else t's dtype."""
    return autocast_dtype(t) or t.dtype


def tf32_enabled() -> bool:
    """PyTorch's TF32 switch for fp32 matmuls (`torch.backends.cuda.matmul.allow_tf32`)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot for operands of `dtype` (see the module docstring): "ieee" for
    fp32 unless `tf32_enabled()` on a GPU, else "tf32x3" (16-bit operands ignore it)."""
    if dtype == torch.float32 and not (tf32_enabled() and not triton_interpreting()):
        return "ieee"
    return "tf32x3"


@contextlib.contextmanager
def tf32(enabled: bool = True):
    """PyTorch's TF32 switches for fp32 matmuls and cuDNN convolutions set to `enabled` inside the
    block, restored after: the reference ops follow them, the kernels follow the matmul one."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


# --------------------------------------------------------------------------------------------
# What a Triton kernel takes: the dispatcher's reasons and a launcher's checks
# --------------------------------------------------------------------------------------------

def _tensors(tensors: Sequence) -> List[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def device_problems(tensors: Sequence[Optional[torch.Tensor]]) -> List[str]:
    """One problem if the tensors are not all on one device."""
    devices = {t.device for t in _tensors(tensors)}
    if len(devices) > 1:
        return [f"tensors on several devices {sorted(map(str, devices))}: move them to one"]
    return []


def forward_only_reasons(tensors: Sequence[Optional[torch.Tensor]]) -> List[str]:
    """Why a kernel without a backward cannot take a call that autograd records."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(tensors)):
        return ["an input requires grad and autograd is recording: this Triton launcher is forward-only "
                "(fastlego.ops runs the fused ops as custom ops with a Triton backward when autograd "
                "records; call those, or run under torch.no_grad() / torch.inference_mode())"]
    return []


def _dtype_reasons(ts: List[torch.Tensor], compute: Optional[torch.dtype], mixed_dtypes_ok: bool,
                   uses_dot: bool = True) -> List[str]:
    reasons = []
    bad = sorted({str(t.dtype) for t in ts if t.dtype not in DTYPES})
    if bad:
        reasons.append(f"dtype {', '.join(bad)} not supported (expected one of {', '.join(str(d) for d in DTYPES)})")
    if ts and not mixed_dtypes_ok and any(t.dtype != ts[0].dtype for t in ts):
        reasons.append(f"mixed dtypes {sorted({str(t.dtype) for t in ts})}: the kernel takes one dtype "
                       f"(pass every tensor in one dtype, or run under torch.autocast)")
    if compute is not None and compute not in DTYPES:
        reasons.append(f"autocast dtype {compute} not supported (expected float16 or bfloat16)")
    if uses_dot and triton_interpreting() and torch.bfloat16 in {compute} | {t.dtype for t in ts[:1]}:
        reasons.append("bfloat16 under Triton's interpreter (the input's or autocast's): its tl.dot returns "
                       "wrong results for bf16 operands")
    return reasons


def _mixed_ok(ts: List[torch.Tensor], mixed_dtypes_ok: Optional[bool]) -> bool:
    """Mixed operand dtypes: as the kernel says, else taken under autocast only."""
    return (bool(ts) and autocast_dtype(ts[0]) is not None) if mixed_dtypes_ok is None else mixed_dtypes_ok


def triton_reasons(tensors: Sequence[Optional[torch.Tensor]], *, mixed_dtypes_ok: Optional[bool] = None,
                   forward_only: bool = True, uses_dot: bool = True) -> List[str]:
    """Reasons a Triton kernel cannot take these tensors (the first is the leading one, whose
    device's autocast sets the compute dtype): device, dtype, mixed dtypes (default: taken under
    autocast only; `mixed_dtypes_ok` True for a kernel that casts every operand), the compute
    dtype, and for kernels without a backward (`forward_only`) autograd recording a tensor that
    requires grad. CPU tensors run on Triton's interpreter, for tests, only when the triton backend
    is forced. `uses_dot=False`: a kernel without tl.dot, which takes bf16 under the interpreter."""
    ts = _tensors(tensors)
    reasons = device_problems(ts)
    for dev in {t.device for t in ts}:
        if dev.type == "cpu" and not triton_interpreting():
            reasons.append("tensors are on the CPU: Triton kernels need a CUDA device "
                           "(or TRITON_INTERPRET=1, Triton's interpreter, for testing)")
        elif dev.type == "cpu" and not forcing():
            reasons.append("tensors are on the CPU: Triton's interpreter (TRITON_INTERPRET=1) is for "
                           "testing and is used only when the triton backend is forced")
        elif dev.type not in ("cuda", "cpu"):
            reasons.append(f"device {dev} is not supported (CUDA only)")
    reasons += _dtype_reasons(ts, autocast_dtype(ts[0]) if ts else None, _mixed_ok(ts, mixed_dtypes_ok), uses_dot)
    if forward_only:
        reasons += forward_only_reasons(ts)
    return reasons


def launch_problems(tensors: Sequence[Optional[torch.Tensor]], *, mixed_dtypes_ok: Optional[bool] = None,
                    forward_only: bool = True, uses_dot: bool = True) -> List[str]:
    """What a launcher called directly refuses before any compute: `triton_reasons` with CPU
    tensors taken whenever Triton's interpreter is on (a direct call is as forced)."""
    ts = _tensors(tensors)
    problems = device_problems(ts)
    if not problems and ts and ts[0].device.type != "cuda" and not (ts[0].device.type == "cpu" and triton_interpreting()):
        problems.append(f"tensors are on {ts[0].device}: Triton kernels need a CUDA device "
                        f"(or TRITON_INTERPRET=1 for CPU testing)")
    problems += _dtype_reasons(ts, autocast_dtype(ts[0]) if ts else None, _mixed_ok(ts, mixed_dtypes_ok), uses_dot)
    if forward_only:
        problems += forward_only_reasons(ts)
    return problems


def raise_if(problems: List[str], op: str) -> None:
    """ValueError "op: problem; problem" when there are problems."""
    if problems:
        raise ValueError(f"{op}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------------------------

def _span(t: torch.Tensor):
    """[first, last) byte addresses that a tensor's elements occupy."""
    if t.numel() == 0:
        return (0, 0)
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def overlaps(a: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    """Whether two tensors' element spans share memory (a conservative test on address ranges)."""
    if not isinstance(b, torch.Tensor) or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def out_problems(out, shape, dtype: torch.dtype, device, inputs: Sequence = (), *, rows: bool = False) -> List[str]:
    """What is wrong with an `out=` buffer (empty: nothing, or no buffer): it must be a `dtype`
    tensor of `shape` on `device` that overlaps none of `inputs` (the kernels are not in place);
    with `rows` also viewable as (rows, shape[-1]) (the GEMMs store through such a view)."""
    if out is None:
        return []
    shape = tuple(int(s) for s in shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype or out.device != torch.device(device):
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        return [f"out is {got}, expected {shape} {dtype} on {device}: allocate it with "
                f"torch.empty({shape}, dtype={dtype}, device='{device}') or pass out=None"]
    problems = []
    if rows:
        try:
            out.view(-1, shape[-1])
        except RuntimeError:
            problems.append("out must be viewable as (rows, N_out) (e.g. contiguous); pass out.contiguous() or no out")
    if any(overlaps(out, t) for t in inputs):
        problems.append("out overlaps an input: pass a separate output tensor (the kernels are not in-place)")
    return problems


# --------------------------------------------------------------------------------------------
# Shape checks shared by several ops: tokens (B * L, T, D) with per-image (B, D) tensors
# --------------------------------------------------------------------------------------------

def per_image_problems(name: str, t, B_expected: Optional[int], width: int) -> List[str]:
    """`t` must be a per-image (B, width) tensor, with B_expected images when given."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != width:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        return [f"{name} must be a per-image (B, {width}) tensor; got {got}"]
    if B_expected is not None and t.shape[0] != B_expected:
        return [f"{name} has {t.shape[0]} images but the other per-image tensors have {B_expected}"]
    return []


def rows_per_image_problems(x_name: str, x: torch.Tensor, B: int) -> List[str]:
    """The token rows of x (..., K) must split evenly into the B images."""
    rows = x.numel() // max(1, x.shape[-1])
    if B == 0 or rows % B:
        return [f"{x_name} has {rows} token rows, not a multiple of the {B} images of the per-image tensors "
                f"(tokens (B * L, T, D) with per-image (B, D) conditioning)"]
    return []


def modulate_problems(h, shift, scale) -> List[str]:
    """shift/scale must be per-image (B, K) tables for tokens h (..., K) whose rows split evenly
    into the B images (LN-modulate's arguments, in every op that has it)."""
    problems = per_image_problems("shift", shift, None, h.shape[-1])
    problems += per_image_problems("scale", scale, shift.shape[0] if isinstance(shift, torch.Tensor) else None,
                                   h.shape[-1])
    if not problems:
        problems += rows_per_image_problems("h", h, shift.shape[0])
    return problems


def linear_problems(x_name: str, x, weight, bias) -> List[str]:
    """x (..., K) times an nn.Linear weight (N_out, K) with bias (N_out,) or None."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return [f"{x_name} must be a tensor (..., K)"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return [f"weight must be a 2-D (N_out, K) tensor; got {getattr(weight, 'shape', type(weight).__name__)}"]
    problems = []
    if weight.shape[1] != x.shape[-1]:
        problems.append(f"weight is {tuple(weight.shape)} but {x_name}'s last dim is {x.shape[-1]}: "
                        f"expected weight (N_out, {x.shape[-1]})")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        problems.append(f"bias must be ({weight.shape[0]},) or None; got {getattr(bias, 'shape', type(bias).__name__)}")
    if weight.shape[0] == 0 or x.shape[-1] == 0:
        problems.append(f"empty matmul dimension (weight {tuple(weight.shape)})")
    return problems


def rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as an (M, K) matrix: a view when the strides allow it, otherwise a copy."""
    return x.reshape(-1, x.shape[-1])
