"""kernels/fp8_linear.py (the Triton FP8 GEMM) against `fastlego.fp8.fp8_linear_reference` and an
fp64 truth, and (cuda tests) against `torch._scaled_mm` (`fastlego.fp8.fp8_linear_scaled_mm`).

Inputs: random non-zero data with rows and output channels of very different magnitudes,
quantized with `quantize_rows` / `quantize_weight` (so every e4m3 range and scale is exercised).
The truth is the quantized operands dequantized and multiplied in float64, plus the bias; the bound
is 2x the error of the reference in the output dtype (fp32 math, one rounding) plus a tiny atol.
Outputs go to NaN-filled buffers (or a NaN-filling torch.empty) so unwritten elements show.
Without a GPU the kernel runs under Triton's interpreter (fixed 16x32x32 tiles): odd M, K and N
multiples of 16 and not, 3-D x, strided operands, bias dtypes, every output dtype. The cuda tests
run real sizes, every autotune config explicitly, and the capability refusal.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

from fastlego import dispatch
from fastlego.fp8 import E4M3, fp8_linear_reference, fp8_linear_scaled_mm, quantize_rows, quantize_weight
from fastlego.kernels import fp8_linear as FL
from fastlego.kernels.policy import tf32
from fastlego.testing import assert_close_to_reference
import kernel_cases as kc
from kernel_cases import gen, nan_out

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

poisoned_empty = kc.poisoned_empty   # the fixture
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def fp8_inputs(lead, K, N, bias_dtype=torch.float32, device="cpu", seed=0):
    """(x_q, x_scale, w_q, w_scale, bias): x (*lead, K) with row magnitudes spread over 1e-2..1e2
    and a non-zero mean, W (N, K) ~ U(+-sqrt(3/K)) with channel magnitudes over 1e-1..1e1, bias
    ~ N(0, 0.1^2) in `bias_dtype` (None: no bias); all non-zero, quantized as FP8 inference does."""
    g = gen(seed)
    M = math.prod(lead)
    x = torch.randn(M, K, generator=g) + 0.3
    x = x * torch.logspace(-2, 2, max(M, 1))[torch.randperm(max(M, 1), generator=g)[:M], None]
    w = (torch.rand(N, K, generator=g) * 2 - 1) * math.sqrt(3.0 / K)
    w = w * torch.logspace(-1, 1, N)[torch.randperm(N, generator=g), None]
    x = torch.where(x.abs() < 1e-4, torch.full_like(x, 1e-3), x).reshape(*lead, K)
    w = torch.where(w.abs() < 1e-5, torch.full_like(w, 1e-4), w)
    x_q, x_scale = quantize_rows(x)
    w_q, w_scale = quantize_weight(w)
    bias = None if bias_dtype is None else (torch.randn(N, generator=g) * 0.1).to(bias_dtype)
    return [t if t is None else t.to(device) for t in (x_q, x_scale, w_q, w_scale, bias)]


def truth64(x_q, x_scale, w_q, w_scale, bias):
    """The FP8 Linear in float64: dequantized operands, exact-ish products and sums."""
    y = (x_q.double() * x_scale.double()[..., None]) @ (w_q.double() * w_scale.double()[:, None]).t()
    return y if bias is None else y + bias.double()


def check(args, out_dtype=torch.bfloat16, *, out=None, what="fp8_linear", reference=None, **kw):
    """The kernel into a NaN-filled out (or `out`) against the fp64 truth, within 2x the error
    of `reference` (default: fp8_linear_reference in out_dtype) plus a tiny atol."""
    x_q, x_scale, w_q, w_scale, bias = args
    shape = tuple(x_q.shape[:-1]) + (w_q.shape[0],)
    if out is None:
        out = nan_out(shape, out_dtype, x_q.device)
    got = FL.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype, out=out, **kw)
    assert got is out and got.dtype == out_dtype and tuple(got.shape) == shape
    truth = truth64(*args)
    if reference is None:
        with tf32(False):
            reference = fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    atol = 1e-6 * max(1.0, truth.abs().max().item())
    if x_q.is_cuda and out_dtype == torch.float32:
        # FP8 tensor cores add each BLOCK_K slice's products in less than fp32's precision before
        # the fp32 accumulator takes the slice's sum: errors of a few 2^-14 of the sum of |products|
        # on an H100 (bench/RESULTS.md), which an fp32 output shows and bf16 / fp16 outputs round away
        terms = (x_q.double().abs() * x_scale.double()[..., None]) @ (w_q.double().abs() * w_scale.double()[:, None]).t()
        atol = max(atol, 2.0 ** -12 * terms.max().item())
    assert_close_to_reference(got, truth, reference, atol=atol, what=f"{what} {out_dtype}")
    return got


# --------------------------------------------------------------------------------------------
# Interpreter (CPU) tests
# --------------------------------------------------------------------------------------------

# (leading shape of x, K, N): odd M; K and N multiples of 16 and not; K spanning several BLOCK_K
SHAPES = {
    "M1_K48_N24": ((1,), 48, 24),
    "M37_K200_N96": ((37,), 200, 96),
    "M130_K64_N32": ((130,), 64, 32),
    "3d_M38_K96_N40": ((2, 19), 96, 40),
}


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_fp8_linear_interpreter(name, out_dtype):
    lead, K, N = SHAPES[name]
    check(fp8_inputs(lead, K, N), out_dtype, what=name)


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bias_dtypes(bias_dtype, out_dtype):
    """The bias is read in its own dtype and added in fp32, as the reference adds bias.float()."""
    check(fp8_inputs((21,), 80, 48, bias_dtype), out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_allocated_output(poisoned_empty, out_dtype):
    """Without out= the launcher allocates (NaN-filled here): every element must be written."""
    args = fp8_inputs((3, 11), 64, 40)
    got = FL.fp8_linear(*args, out_dtype=out_dtype)
    assert got.shape == (3, 11, 40) and got.dtype == out_dtype
    truth = truth64(*args)
    with tf32(False):
        same = fp8_linear_reference(*args, out_dtype)
    assert_close_to_reference(got, truth, same, atol=1e-6 * max(1.0, truth.abs().max().item()))


def test_default_out_dtype_is_bf16():
    args = fp8_inputs((5,), 32, 16)
    assert FL.fp8_linear(*args).dtype == torch.bfloat16


def test_strided_operands():
    """x_q a K-slice of a wider tensor, x_scale strided, w_q the transpose of a (K, N) tensor
    (K stride N), out a column slice of a wider buffer: the kernel follows every stride."""
    x_q, x_scale, w_q, w_scale, bias = fp8_inputs((4, 9), 48, 40)
    wide = torch.zeros(4, 9, 64, dtype=torch.uint8).view(E4M3)
    wide[..., 8:56] = x_q
    x_strided = wide[..., 8:56]
    xs_strided = torch.stack([x_scale, torch.zeros_like(x_scale)], dim=-1)[..., 0]
    w_t = w_q.t().contiguous().t()                      # (N, K) with strides (1, N)
    bias_strided = torch.stack([bias, bias], dim=-1)[:, 1]
    buf = torch.full((4, 9, 72), float("nan"))
    out = buf[..., 16:56]
    args = [x_strided, xs_strided, w_t, w_scale, bias_strided]
    assert not x_strided.is_contiguous() and w_t.stride() == (1, 40) and not out.is_contiguous()
    check(args, torch.float32, out=out)
    assert torch.isnan(buf[..., :16]).all() and torch.isnan(buf[..., 56:]).all()   # nothing outside out


@pytest.mark.parametrize("cfg", [(16, 16, 32, 1), (32, 16, 64, 2), (16, 64, 128, 4), (64, 32, 32, 8)],
                         ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("fast_accum", [False, True], ids=["precise", "fast"])
def test_tile_configs_interpreter(cfg, fast_accum):
    """Other tile shapes given explicitly (the K tail masked or not, GROUP_M orders, tiles wider
    than the matrix), both accumulation modes."""
    bm, bn, bk, group_m = cfg
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=4, num_stages=1)
    for lead, K, N in [((70,), 128, 48), ((33,), 200, 24)]:
        check(fp8_inputs(lead, K, N), torch.float32, config=config, fast_accum=fast_accum)


def test_nan_scales_propagate_to_their_row_or_column():
    """A NaN x_scale (what a quantized row holding NaN/inf gets) makes that output row NaN and
    only it; a NaN w_scale likewise its column."""
    x_q, x_scale, w_q, w_scale, bias = fp8_inputs((37,), 48, 40)
    x_scale = x_scale.clone()
    x_scale[5] = float("nan")
    out = torch.zeros(37, 40, dtype=torch.bfloat16)
    FL.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out=out)
    assert torch.isnan(out[5]).all()
    keep = torch.arange(37) != 5
    assert not torch.isnan(out[keep]).any()
    args = [x_q[keep], x_scale[keep], w_q, w_scale, bias]
    truth = truth64(*args)
    assert_close_to_reference(out[keep], truth, fp8_linear_reference(*args), atol=1e-6 * truth.abs().max().item())

    w_scale = w_scale.clone()
    w_scale[7] = float("nan")
    out = FL.fp8_linear(x_q, x_scale.nan_to_num(1.0), w_q, w_scale, bias, torch.float32)
    assert torch.isnan(out[:, 7]).all() and not torch.isnan(out[:, :7]).any() and not torch.isnan(out[:, 8:]).any()


def test_empty_rows():
    x_q, x_scale, w_q, w_scale, bias = fp8_inputs((3,), 32, 16)
    got = FL.fp8_linear(x_q[:0], x_scale[:0], w_q, w_scale, bias)
    assert got.shape == (0, 16) and got.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Refusals: bad input before any compute, and where the kernel cannot run
# --------------------------------------------------------------------------------------------

# (edit of valid arguments, expected message)
BAD_CALLS = {
    "x_q float32": (lambda a: dict(a, x_q=a["x_q"].float()),
                    r"x_q must be a float8_e4m3fn tensor \(\.\.\., K\), got torch.float32"),
    "w_q e5m2": (lambda a: dict(a, w_q=a["w_q"].float().to(torch.float8_e5m2)),
                 r"w_q must be a float8_e4m3fn \(N, K\) tensor"),
    "K mismatch": (lambda a: dict(a, w_q=a["w_q"][:, :32]),
                   r"w_q is \(24, 32\) but x_q's last dim is 48: expected \(N, 48\)"),
    "x_scale shape": (lambda a: dict(a, x_scale=a["x_scale"][:-1]),
                      r"x_scale must be float32 of shape \(37,\) \(one per row"),
    "x_scale dtype": (lambda a: dict(a, x_scale=a["x_scale"].half()), r"x_scale must be float32 of shape \(37,\)"),
    "w_scale shape": (lambda a: dict(a, w_scale=a["w_scale"][None]),
                      r"w_scale must be float32 of shape \(24,\) \(one per output"),
    "bias shape": (lambda a: dict(a, bias=a["bias"][:3]), r"bias must be \(24,\) or None"),
    "bias dtype": (lambda a: dict(a, bias=a["bias"].to(torch.int32)),
                   r"bias must be a floating-point tensor, got torch.int32"),
    "out_dtype": (lambda a: dict(a, out_dtype=torch.float64), r"out_dtype torch.float64 not supported: expected one of"),
    "grad": (lambda a: dict(a, w_scale=a["w_scale"].clone().requires_grad_()), r"forward-only"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_before_compute(case, monkeypatch):
    x_q, x_scale, w_q, w_scale, bias = fp8_inputs((37,), 48, 24)
    edit, message = BAD_CALLS[case]
    a = edit(dict(x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias, out_dtype=torch.bfloat16))
    monkeypatch.setattr(FL, "launch_gemm", lambda *args, **kw: pytest.fail("launched a kernel on bad input"))
    with pytest.raises(ValueError, match="fp8_linear: .*" + message):
        FL.fp8_linear(a["x_q"], a["x_scale"], a["w_q"], a["w_scale"], a["bias"], a["out_dtype"])
    assert FL.fp8_linear_not_supported_reasons(a["x_q"], a["x_scale"], a["w_q"], a["w_scale"], a["bias"], a["out_dtype"])


def test_bad_out_raises_before_compute():
    args = fp8_inputs((37,), 48, 24)
    for out, message in [(torch.zeros(37, 24, dtype=torch.float32), r"expected \(37, 24\) torch.bfloat16"),
                         (torch.zeros(36, 24, dtype=torch.bfloat16), r"expected \(37, 24\) torch.bfloat16")]:
        with pytest.raises(ValueError, match=message):
            FL.fp8_linear(*args, out=out)
        assert (out == 0).all()   # untouched
    out = torch.zeros(2, 24, 19, dtype=torch.bfloat16).transpose(1, 2)   # (2, 19, 24), not viewable as rows
    with pytest.raises(ValueError, match="out must be viewable as"):
        FL.fp8_linear(*fp8_inputs((2, 19), 48, 24), out=out)
    buf = torch.zeros(37 * 24)
    buf[:37] = args[1]            # x_scale inside out's memory
    with pytest.raises(ValueError, match="out overlaps an input"):
        FL.fp8_linear(args[0], buf[:37], *args[2:], torch.float32, out=buf.view(37, 24))


def test_cpu_without_interpreter_refused(monkeypatch):
    args = fp8_inputs((5,), 32, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="tensors are on the CPU: Triton kernels need a CUDA device"):
        FL.fp8_linear(*args)
    assert any("need a CUDA device" in r for r in FL.fp8_linear_not_supported_reasons(*args))


def test_reasons_follow_the_dispatcher_convention():
    """CPU tensors through the interpreter: taken only when the triton backend is forced (the
    launcher called directly always takes them); devices must match."""
    args = fp8_inputs((5,), 32, 16)
    assert any("only when the triton backend is forced" in r for r in FL.fp8_linear_not_supported_reasons(*args))
    dispatch._config.forcing = True   # as the dispatcher does while asking a forced backend
    try:
        assert FL.fp8_linear_not_supported_reasons(*args) == []
        assert "out_dtype" in " ".join(FL.fp8_linear_not_supported_reasons(*args, out_dtype=torch.int8))
    finally:
        dispatch._config.forcing = False


def test_capability_reasons(monkeypatch):
    """A CUDA device below compute capability 8.9 is refused, naming the card and its capability
    (simulated: no GPU needed); 8.9 and 9.0 are taken; ROCm is refused."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    [reason] = FL.capability_reasons(torch.device("cuda", 0))
    assert "NVIDIA A100-SXM4-80GB has compute capability 8.0" in reason and "8.9 or later" in reason
    for cap in [(8, 9), (9, 0), (10, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert FL.capability_reasons(torch.device("cuda", 0)) == []
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert "ROCm" in FL.capability_reasons(torch.device("cuda", 0))[0]
    assert FL.capability_reasons(torch.device("cpu")) == []


def test_configs_fit_shared_memory():
    """Every GPU config's staged e4m3 tiles fit gemm.py's shared-memory budget, and each has
    BLOCK_K >= 32 (FP8 wgmma's K step)."""
    from fastlego.kernels.gemm import config_fits

    assert all(config_fits(c, 1, 1) and c.kwargs["BLOCK_K"] >= 32 for c in FL.FP8_CONFIGS)
    assert FL._prune_configs(FL.FP8_CONFIGS, {}) == FL.FP8_CONFIGS


# --------------------------------------------------------------------------------------------
# CUDA tests (real sizes, every config, torch._scaled_mm, the capability refusal)
# --------------------------------------------------------------------------------------------

def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability()) >= (8, 9)


needs_fp8_gpu = pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with FP8 tensor cores (capability >= 8.9)")


def scaled_mm_fast(x_q, x_scale, w_q, w_scale, bias):
    """torch._scaled_mm with row-wise scales and fast (tensor-core only) accumulation, bf16 out."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :],
                            bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                            use_fast_accum=True)


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("fast_accum", [False, True], ids=["precise", "fast"])
def test_real_size_against_scaled_mm_cuda(fast_accum):
    """M 4096, K 1152, N 4608 (lego_XL's fc1), bf16 out with a bf16 bias: within 2x the error
    of torch._scaled_mm with the same accumulation mode (and, precise, of the fp32 reference)."""
    args = fp8_inputs((4096,), 1152, 4608, torch.bfloat16, "cuda")
    smm = scaled_mm_fast(*args) if fast_accum else fp8_linear_scaled_mm(*args)
    got = check(args, torch.bfloat16, reference=smm, what="vs _scaled_mm", fast_accum=fast_accum)
    if not fast_accum:
        check(args, torch.bfloat16, what="vs reference")
        # the same fp32 sums in another order: nearly every element rounds to the same bf16
        same = (got == smm).double().mean().item()
        assert same >= 0.9, f"only {same:.1%} of the outputs equal torch._scaled_mm's"


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("out_dtype,bias_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.bfloat16), (torch.float32, torch.float16)],
                         ids=str)
@pytest.mark.parametrize("lead,K,N", [((1,), 1152, 4608), ((37,), 384, 1152), ((130,), 200, 96), ((3, 77), 48, 24),
                                      ((2, 300), 4608, 1152)])
def test_shapes_and_dtypes_cuda(lead, K, N, bias_dtype, out_dtype):
    """Odd M, K and N multiples of 16 and not, 3-D x, every output dtype and bias dtype, on one
    fixed config (every config: test_every_config_cuda; autotuning: the real-size tests)."""
    check(fp8_inputs(lead, K, N, bias_dtype, "cuda"), out_dtype, config=FL.FP8_CONFIGS[3])


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("fast_accum", [False, True], ids=["precise", "fast"])
@pytest.mark.parametrize("index", range(len(FL.FP8_CONFIGS)))
def test_every_config_cuda(index, fast_accum):
    """Each autotune config explicitly (autotuning alone only ever runs the fastest): K a
    multiple of BLOCK_K and not, N and M not multiples of the tile."""
    config = FL.FP8_CONFIGS[index]
    for lead, K, N in [((1000,), 1536, 400), ((300,), 1552, 1152)]:   # K, N multiples of 16 (_scaled_mm's rule)
        args = fp8_inputs(lead, K, N, torch.bfloat16, "cuda", seed=index)
        if fast_accum:   # held to torch._scaled_mm's own fast accumulation
            check(args, torch.bfloat16, reference=scaled_mm_fast(*args), config=config, fast_accum=True)
        else:
            check(args, torch.bfloat16, config=config)


@pytest.mark.cuda
@needs_fp8_gpu
def test_real_model_rows_cuda():
    """The autotuned path at lego_S_PG_64's fc2 size (B = 256: M = 262,144 rows, K 1536, N 384),
    checked on the first and last 4096 rows against the truth."""
    args = fp8_inputs((262144,), 1536, 384, torch.bfloat16, "cuda")
    got = FL.fp8_linear(*args)
    for rows_ in (slice(0, 4096), slice(-4096, None)):
        part = [args[0][rows_], args[1][rows_], args[2], args[3], args[4]]
        truth = truth64(*part)
        with tf32(False):
            same = fp8_linear_reference(*part)
        assert_close_to_reference(got[rows_], truth, same, atol=1e-6 * truth.abs().max().item())


@pytest.mark.cuda
def test_capability_refusal_cuda(monkeypatch):
    """A GPU below 8.9 (simulated) is refused with its name and capability, before compute."""
    args = fp8_inputs((37,), 48, 32, torch.float32, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    reasons = FL.fp8_linear_not_supported_reasons(*args)
    name = torch.cuda.get_device_name(args[0].device)
    assert len(reasons) == 1 and f"{name} has compute capability 8.6" in reasons[0] and "8.9 or later" in reasons[0]
    out = torch.full((37, 32), 7.0, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="compute capability 8.6"):
        FL.fp8_linear(*args, out=out)
    assert (out == 7.0).all()
