"""kernels/fp8_quantize.py against its twins in fastlego.fp8 (`layernorm_modulate_quantize`,
`gelu_quantize`, `quantize_rows`) and an fp64 truth, and its e4m3 rounding against PyTorch's cast.

Comparison rule (`check_like_twin`): scales equal to the twin's within rtol 1e-6 (the kernels'
LayerNorm / GELU fp32 arithmetic differs from PyTorch's in the last bits); q equal to the twin's
except where the value sits at an e4m3 tie (then one e4m3 step apart, the fp64 truth within a
rounding of the tie, and under 1% of the elements); the dequantized error against the fp64 truth
at most half an e4m3 step times the scale, plus the fp32 arithmetic's own error. `quantize_rows`
does no arithmetic but the divisions, so it must equal the rule computed with IEEE divisions bit
for bit (`exact_quantization`). Outputs go into poisoned buffers (NaN-filled out / out_scale, or
NaN-filled launcher allocations) so an unwritten element shows. fp32 / fp16 / bf16 inputs under
the interpreter (no tl.dot here), and on a GPU with the presets' sizes (cuda-marked)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fastlego import dispatch, fp8
from fastlego import reference as R
from fastlego.kernels import fp8_quantize as FQ
from fastlego.kernels.fp8_quantize import e4m3_bits, round_to_e4m3
import kernel_cases as kc
from kernel_cases import gen

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

E4M3 = torch.float8_e4m3fn
NAN_BYTE = 0x7F                     # float8_e4m3fn NaN
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = pytest.mark.cuda


# --------------------------------------------------------------------------------------------
# Buffers and comparisons
# --------------------------------------------------------------------------------------------

def nan_q(shape, device="cpu"):
    """An e4m3 tensor full of NaN (byte 0x7F)."""
    return torch.full(shape, NAN_BYTE, dtype=torch.uint8, device=device).view(E4M3)


def nan_scales(shape, device="cpu"):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float and e4m3 tensors, so an element a launcher's output
    misses shows up as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype == E4M3:
            t.view(torch.uint8).fill_(NAN_BYTE)
        elif t.dtype in kc.FLOATS:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def ordinal(q):
    """e4m3 values as signed integers in value order (adjacent e4m3 values differ by 1; +-0 -> 0)."""
    codes = q.view(torch.uint8).long()
    mag = codes & 0x7F
    return torch.where(codes >= 0x80, -mag, mag)


def half_step(v):
    """Half the spacing of e4m3 values around |v| (|v| <= 448): 2^-10 below 2^-6 (subnormals),
    2^(e-4) in the binade [2^e, 2^(e+1)) (3 mantissa bits)."""
    a = v.abs().double()
    e = torch.floor(torch.log2(a.clamp_min(2.0 ** -6)))
    return torch.where(a < 2.0 ** -6, torch.full_like(a, 2.0 ** -10), 2.0 ** (e - 4))


# The fp32 arithmetic's own error against the fp64 truth, relative to the row's amax (LayerNorm
# + modulate in fp32; GELU's fp32 exp2): a few 1e-7 for PyTorch's fp32 ops.
ARITH_REL = 2e-6
# How far from an e4m3 tie a value v = a / scale may be and still round differently in the kernel
# and the twin: their scales differ by a few ulps (relative, TIE_REL) and their fp32 values of a by
# the arithmetic error (absolute: ARITH_REL * amax, i.e. 448 * ARITH_REL in units of v).
TIE_REL = 2e-5


def exact_quantization(a32):
    """fastlego.fp8's rule on fp32 values a32 (..., K), every division IEEE: s = amax / 448
    correctly rounded (an fp32 quotient computed in fp64 and rounded once is), q by PyTorch's
    tensor division and cast. (The twin's `amax / 448` divides by a Python scalar, which PyTorch's
    CUDA kernels do as a multiplication by 1 / 448: not always the IEEE quotient.)"""
    amax = a32.abs().amax(-1)
    s = (amax.double() / 448.0).float().clamp_min(fp8.MIN_SCALE)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return (a32 / s[..., None]).clamp(-448.0, 448.0).to(E4M3), s


def check_like_twin(q, s, qt, st, truth, what, exact=None):
    """Kernel output (q, s) against the twin's (qt, st) and the fp64 truth of the quantized values
    (q's shape); every row finite (see the comparison rule in the module docstring). `exact`: the
    fp32 values quantized (quantize_rows' input), which q and s must match bit for bit."""
    assert q.dtype == E4M3 and s.dtype == torch.float32, f"{what}: dtypes {q.dtype}, {s.dtype}"
    assert q.shape == qt.shape and s.shape == st.shape, f"{what}: shapes {tuple(q.shape)} {tuple(s.shape)}"
    q, s, qt, st, truth = (t.cpu() for t in (q, s, qt, st, truth))
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all(), f"{what}: NaN / inf in the output"
    if exact is not None:
        qe, se = exact_quantization(exact.cpu().float())
        assert torch.equal(s, se), f"{what}: scales differ from amax / 448 (IEEE)"
        assert torch.equal(q.view(torch.uint8), qe.view(torch.uint8)), f"{what}: q differs from e4m3(x / s) (IEEE)"
    torch.testing.assert_close(s, st, rtol=1e-6, atol=0, msg=lambda m: f"{what}: scales: {m}")
    s64, st64 = s.double()[..., None], st.double()[..., None]
    flips = ordinal(q) != ordinal(qt)
    assert flips.double().mean().item() < 0.01, f"{what}: {int(flips.sum())} of {q.numel()} q differ from the twin's"
    assert ((ordinal(q) - ordinal(qt)).abs()[flips] == 1).all(), f"{what}: q more than one e4m3 step from the twin's"
    v = (truth / st64)[flips]
    mid = ((q.double() + qt.double()) / 2)[flips]
    assert ((v - mid).abs() <= TIE_REL * mid.abs() + 448 * ARITH_REL).all(), \
        f"{what}: q differ from the twin's away from a tie"
    dq, dqt = q.double() * s64, qt.double() * st64
    same = ~flips
    assert ((dq - dqt).abs()[same] <= 2e-6 * dqt.abs()[same]).all(), \
        f"{what}: dequantized values differ from the twin's"
    amax = truth.abs().amax(-1, keepdim=True)
    bound = half_step(truth / s64) * s64 * (1 + 1e-6) + ARITH_REL * amax
    assert ((dq - truth).abs() <= bound).all(), (f"{what}: dequantized error {(dq - truth).abs().max().item():.3e} "
                                                 f"above half an e4m3 step")


# --------------------------------------------------------------------------------------------
# The e4m3 rounding helpers against PyTorch's cast
# --------------------------------------------------------------------------------------------

@triton.jit
def _e4m3_kernel(x_ptr, r_ptr, code_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    r = round_to_e4m3(v)
    tl.store(r_ptr + offs, r, mask=mask)
    tl.store(code_ptr + offs, e4m3_bits(r), mask=mask)


def _kernel_e4m3(x):
    """fp32 x -> (round_to_e4m3(x) fp32, e4m3_bits(that) uint8) through the Triton helpers."""
    r, codes = torch.full_like(x, float("nan")), torch.full(x.shape, 0xAA, dtype=torch.uint8, device=x.device)
    _e4m3_kernel[(triton.cdiv(x.numel(), 8192),)](x, r, codes, x.numel(), BLOCK=8192)
    return r, codes


def _check_e4m3(x):
    """The helpers on fp32 x against PyTorch's x.clamp(+-448).to(float8_e4m3fn): bitwise."""
    r, codes = _kernel_e4m3(x)
    want = x.clamp(-448.0, 448.0).to(E4M3)
    nan = torch.isnan(x)
    bad = (codes != want.view(torch.uint8)) & ~nan
    want_codes = want.view(torch.uint8)
    assert not bad.any(), (f"e4m3_bits differ from PyTorch's cast for {int(bad.sum())} values, e.g. "
                           f"{x[bad][:4].tolist()}: {codes[bad][:4].tolist()} vs {want_codes[bad][:4].tolist()}")
    assert ((codes[nan] & 0x7F) == NAN_BYTE).all(), "NaN must encode as e4m3 NaN (0x7F, either sign)"
    assert torch.equal(r[~nan].view(torch.int32), want.float()[~nan].view(torch.int32)), \
        "round_to_e4m3 differs from PyTorch"
    assert torch.isnan(r[nan]).all()


def every_bf16_value():
    """The fp32 values of all 2^16 bf16 bit patterns but +-inf (NaN patterns included)."""
    x = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return x[~torch.isinf(x)]


def e4m3_values_and_ties():
    """(the e4m3 values 0 .. 448 in fp64, the ties: midpoints of neighbours, exact in fp32)."""
    values = torch.arange(0, 0x7F, dtype=torch.uint8).view(E4M3).double().unique()
    ties = ((values[1:] + values[:-1]) / 2).float()
    assert ties.numel() == values.numel() - 1 and (ties.double() * 2 == values[1:] + values[:-1]).all()
    return values, ties


def tie_sweep():
    """Every e4m3 tie (2^-10 and 432 included) and its 16 fp32 neighbours on each side, the e4m3
    values themselves, NaN, values past 448, fp32 subnormals; both signs."""
    values, ties = e4m3_values_and_ties()
    sweep = [ties]
    below, above = ties.clone(), ties.clone()
    for _ in range(16):
        below = torch.nextafter(below, torch.zeros_like(below))
        above = torch.nextafter(above, torch.full_like(above, 1e3))
        sweep += [below, above]
    x = torch.cat(sweep + [values.float(), torch.tensor([float("nan"), 500.0, 3e38, 1e-45, 2.0 ** -127])])
    return torch.cat([x, -x])


def test_round_to_e4m3_every_bf16_value():
    """All bf16 values (clamped to +-448 by the reference cast): the same e4m3 bits as PyTorch's
    cast, -0 stays -0, NaN stays NaN."""
    _check_e4m3(every_bf16_value())


def test_round_to_e4m3_around_every_tie():
    _check_e4m3(tie_sweep())
    # each tie itself rounds to the even neighbour (even codes: 0, 2, 4, ...)
    values, ties = e4m3_values_and_ties()
    r, _ = _kernel_e4m3(ties)
    lo, hi = values[:-1].float(), values[1:].float()
    assert torch.equal(r, torch.where((torch.arange(lo.numel()) % 2) == 0, lo, hi))


def test_constants_match_fastlego_fp8():
    assert FQ.E4M3_MAX.value == fp8.E4M3_MAX and FQ.MIN_SCALE.value == fp8.MIN_SCALE
    assert FQ.FP32_MAX.value == torch.finfo(torch.float32).max


# --------------------------------------------------------------------------------------------
# layernorm_modulate_quantize
# --------------------------------------------------------------------------------------------

LN_SHAPES = [(2, 3, 5, 96), (3, 1, 7, 200), (1, 4, 3, 384), (2, 2, 2, 33)]   # (B, L, T, K)


def _ln_inputs(shape, dtype, device="cpu", seed=0, layout="strided_rows"):
    """h tokens (B * L, T, K) with non-zero-mean rows, as a slice of a wider tensor (strided rows)
    or every other column (strided columns); shift, scale: chunks of a (B, 6K) adaLN output."""
    B, L, T, K = shape
    g = gen(seed)
    if layout == "strided_rows":
        h = (torch.randn(B * L, T, K + 5, generator=g) * 1.5 + 0.7).to(device, dtype)[..., :K]
    else:
        h = (torch.randn(B * L, T, 2 * K, generator=g) * 1.5 + 0.7).to(device, dtype)[..., ::2]
    ada = torch.randn(B, 6 * K, generator=g).to(device, dtype)
    return h, ada[:, 3 * K:4 * K], ada[:, 4 * K:5 * K], ada       # shift2, scale2: strided chunks


def _ln_truth(h, shift, scale):
    return R.layernorm_modulate(h.double(), shift.double(), scale.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layernorm_modulate_quantize(poisoned_empty, dtype, shape):
    layout = "strided_rows" if shape[-1] % 2 == 0 else "strided_columns"
    h, shift, scale, _ = _ln_inputs(shape, dtype, layout=layout)
    assert not h.is_contiguous() and (shape[0] == 1 or not shift.is_contiguous())
    q, s = FQ.layernorm_modulate_quantize(h, shift, scale)
    M, K = h.numel() // shape[-1], shape[-1]
    assert q.shape == (M, K) and s.shape == (M,) and q.is_contiguous()
    qt, st = fp8.layernorm_modulate_quantize(h, shift, scale)
    check_like_twin(q, s, qt, st, _ln_truth(h, shift, scale), f"layernorm_modulate_quantize {dtype} {shape}")


def test_layernorm_modulate_quantize_into_poisoned_out():
    h, shift, scale, _ = _ln_inputs((2, 3, 5, 96), torch.float16)
    out, out_scale = nan_q((30, 96)), nan_scales((30,))
    q, s = FQ.layernorm_modulate_quantize(h, shift, scale, out=out, out_scale=out_scale)
    assert q is out and s is out_scale
    qt, st = fp8.layernorm_modulate_quantize(h, shift, scale)
    check_like_twin(q, s, qt, st, _ln_truth(h, shift, scale), "layernorm_modulate_quantize out=")


def test_layernorm_modulate_quantize_special_rows(poisoned_empty):
    """Image 1: 1 + scale = 0 and shift = 0 -> a = 0 (scale 1, q 0); image 2: 1 + scale = 0 and
    shift ~ 1e-37 -> a = shift, below 448 * 2^-126 (scale 2^-126); then a NaN in one row
    of image 0 and an inf in another: those rows' scales NaN, their q all NaN, the others unchanged."""
    B, L, T, K = 3, 2, 3, 96
    h, _, _, ada = _ln_inputs((B, L, T, K), torch.float32)
    shift, scale = ada[:, :K], ada[:, K:2 * K]
    scale[1:] = -1.0
    shift[1] = 0.0
    shift[2] = torch.randn(K, generator=gen(3)) * 1e-37
    q, s = FQ.layernorm_modulate_quantize(h, shift, scale)
    rpi = L * T
    assert (s[rpi:2 * rpi] == 1).all() and (q[rpi:2 * rpi].float() == 0).all()
    assert (s[2 * rpi:] == fp8.MIN_SCALE).all()
    want = (shift[2] * 2.0 ** 126).to(E4M3).view(torch.uint8)          # a = shift: q = e4m3(shift * 2^126)
    assert torch.equal(q.view(torch.uint8)[2 * rpi:], want.expand(rpi, K))
    qt, st = fp8.layernorm_modulate_quantize(h, shift, scale)
    assert torch.equal(q.view(torch.uint8)[rpi:], qt.view(torch.uint8)[rpi:]) and torch.equal(s[rpi:], st[rpi:])
    check_like_twin(q, s, qt, st, _ln_truth(h, shift, scale), "layernorm_modulate_quantize special images")

    bad = h.clone()
    bad[0, 1, 7] = float("nan")
    bad[1, 0, 2] = float("inf")       # row 3 (T = 3)
    qb, sb = FQ.layernorm_modulate_quantize(bad, shift, scale)
    for row in (1, 3):
        assert torch.isnan(sb[row]) and torch.isnan(qb[row].float()).all()
        assert torch.isnan(fp8.dequantize(qb, sb)[row]).all()
    keep = [r for r in range(q.shape[0]) if r not in (1, 3)]
    assert torch.equal(qb.view(torch.uint8)[keep], q.view(torch.uint8)[keep]) and torch.equal(sb[keep], s[keep])


def test_layernorm_modulate_quantize_mixed_dtypes_and_flat_h(poisoned_empty):
    """bf16 tokens with fp32 tables (the residual stream and adaLN output may differ), and h given
    as an (M, K) matrix with one image."""
    h, shift, scale, _ = _ln_inputs((2, 2, 4, 200), torch.bfloat16)
    shift32, scale32 = shift.float(), scale.float()
    q, s = FQ.layernorm_modulate_quantize(h, shift32, scale32)
    qt, st = fp8.layernorm_modulate_quantize(h, shift32, scale32)
    check_like_twin(q, s, qt, st, _ln_truth(h, shift32, scale32), "layernorm_modulate_quantize bf16 + fp32 tables")
    flat = h.reshape(-1, 200)[:8]
    q, s = FQ.layernorm_modulate_quantize(flat, shift[:1], scale[:1])
    qt, st = fp8.layernorm_modulate_quantize(flat, shift[:1], scale[:1])
    check_like_twin(q, s, qt, st, _ln_truth(flat, shift[:1], scale[:1]), "layernorm_modulate_quantize (M, K)")


# --------------------------------------------------------------------------------------------
# gelu_quantize and quantize_rows
# --------------------------------------------------------------------------------------------

ROW_SHAPES = [(3, 5, 200), (2, 96), (2, 2, 3, 384), (7, 33)]


def _rows_input(shape, dtype, device="cpu", seed=1, scale=3.0):
    """(..., N) values ~ N(0.3, scale^2), as a slice of a wider tensor (strided rows)."""
    g = gen(seed)
    wide = torch.randn(*shape[:-1], shape[-1] + 3, generator=g) * scale + 0.3
    return wide.to(device, dtype)[..., :shape[-1]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_gelu_quantize(poisoned_empty, dtype, shape):
    y = _rows_input(shape, dtype)
    q, s = FQ.gelu_quantize(y)
    assert q.shape == y.shape and s.shape == y.shape[:-1] and q.is_contiguous()
    qt, st = fp8.gelu_quantize(y)
    check_like_twin(q, s, qt, st, R.gelu_tanh(y.double()), f"gelu_quantize {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_quantize_rows(poisoned_empty, dtype, shape):
    x = _rows_input(shape, dtype)
    q, s = FQ.quantize_rows(x)
    assert q.shape == x.shape and s.shape == x.shape[:-1] and q.is_contiguous()
    qt, st = fp8.quantize_rows(x, check_finite=False)
    check_like_twin(q, s, qt, st, x.double(), f"quantize_rows {dtype} {shape}", exact=x)


def _special_rows(dtype, N=200, device="cpu", op="quantize_rows"):
    """Rows: 0 random, 1 all zero, 2 huge (1e30; 6e4 in fp16), 3 tiny (1e-37, some fp32
    subnormals; fp32 / bf16 only), 4 random with large and small parts (e4m3 subnormals).
    Triton's interpreter converts bf16 subnormals to fp32 wrongly (on loading, before any kernel
    code; the GPU converts them exactly), and GELU's fp32 arithmetic (exp2, division) is not
    promised for subnormals on the GPU: there the tiny row stays above 2^-125 (GELU halves it)."""
    g = gen(5)
    x = torch.randn(5, N, generator=g) * 2
    x[1] = 0.0
    x[2] = torch.randn(N, generator=g) * (6e4 / 4 if dtype == torch.float16 else 1e30)
    x[3] = torch.randn(N, generator=g) * (1e-37 if dtype != torch.float16 else 1e-3)
    if dtype != torch.float16 and (op == "gelu_quantize" or (dtype == torch.bfloat16 and device == "cpu")):
        x[3] = x[3].sign() * x[3].abs().clamp_min(2.0 ** -125)
    x[4, : N // 2] *= 1e-4
    x = x.clamp(-6e4, 6e4) if dtype == torch.float16 else x
    return x.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["gelu_quantize", "quantize_rows"])
def test_special_rows(poisoned_empty, dtype, op):
    x = _special_rows(dtype, op=op)
    kernel = getattr(FQ, op)
    twin = fp8.gelu_quantize if op == "gelu_quantize" else (lambda t: fp8.quantize_rows(t, check_finite=False))
    truth = R.gelu_tanh(x.double()) if op == "gelu_quantize" else x.double()
    q, s = kernel(x)
    qt, st = twin(x)
    check_like_twin(q, s, qt, st, truth, f"{op} special rows {dtype}", exact=x if op == "quantize_rows" else None)
    assert s[1] == 1 and (q[1].float() == 0).all()
    assert torch.isfinite(q[2].float()).all() and q[2].float().abs().max() == 448.0     # saturates, never inf / NaN
    if dtype != torch.float16:
        assert s[3] == fp8.MIN_SCALE, "a row below 448 * 2^-126 takes the smallest scale"

    # NaN and inf in rows 0 and 4: NaN scales and all-NaN dequantized rows; rows 1..3 unchanged
    bad = x.clone()
    bad[0, 3] = float("nan")
    bad[4, 0] = float("inf")
    qb, sb = kernel(bad)
    for row in (0, 4):
        assert torch.isnan(sb[row]) and torch.isnan(fp8.dequantize(qb, sb)[row]).all()
        assert torch.isnan(fp8.dequantize(*twin(bad))[row]).all()       # as the twin's dequantize
    assert torch.equal(qb.view(torch.uint8)[1:4], q.view(torch.uint8)[1:4]) and torch.equal(sb[1:4], s[1:4])


@pytest.mark.parametrize("op", ["gelu_quantize", "quantize_rows"])
def test_rows_into_poisoned_out(op):
    x = _rows_input((3, 4, 96), torch.float32)
    out, out_scale = nan_q((3, 4, 96)), nan_scales((3, 4))
    q, s = getattr(FQ, op)(x, out=out, out_scale=out_scale)
    assert q is out and s is out_scale
    qt, st = getattr(FQ, op)(x)
    assert torch.equal(q.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(s, st)
    # a single row (K,) gives a 0-dim scale
    q1, s1 = getattr(FQ, op)(x[0, 0], out=nan_q((96,)), out_scale=nan_scales(()))
    assert s1.shape == () and torch.equal(q1.view(torch.uint8), qt.view(torch.uint8)[0, 0]) and s1 == st[0, 0]


# --------------------------------------------------------------------------------------------
# Refusals: clear messages, before any compute
# --------------------------------------------------------------------------------------------

@pytest.fixture
def forcing():
    dispatch._config.forcing = True   # as the dispatcher does while asking a forced backend
    yield
    dispatch._config.forcing = False


def test_bad_calls_are_refused_before_compute():
    h, shift, scale, _ = _ln_inputs((2, 3, 5, 96), torch.float32)
    M, K = 30, 96
    out, out_scale = nan_q((M, K)), nan_scales((M,))

    def refused(match, *args, **kwargs):
        with pytest.raises(ValueError, match=match):
            FQ.layernorm_modulate_quantize(*args, **kwargs)
        assert torch.isnan(out.float()).all() and torch.isnan(out_scale).all(), "out written before refusing"

    refused(r"shift must be a per-image \(B, 96\) tensor", h, shift[0], scale, out=out, out_scale=out_scale)
    refused(r"scale has 1 images but the other per-image tensors have 2", h, shift, scale[:1], out=out)
    refused(r"h has 30 token rows, not a multiple of the 4 images", h, shift.repeat(2, 1), scale.repeat(2, 1), out=out)
    refused(r"h must be tokens \(\.\.\., K\) with K > 0", h[..., :0], shift[:, :0], scale[:, :0])
    refused(r"out is \(30, 96\) torch.float16 on cpu, expected \(30, 96\) torch.float8_e4m3fn",
            h, shift, scale, out=torch.zeros(M, K, dtype=torch.float16), out_scale=out_scale)
    refused(r"out_scale is \(30, 1\) torch.float32 on cpu, expected \(30,\)", h, shift, scale, out=out,
            out_scale=torch.zeros(M, 1))
    refused(r"dtype torch.float64 not supported", h.double(), shift.double(), scale.double(), out=out)
    with torch.enable_grad():
        refused("forward-only", h.clone().requires_grad_(), shift, scale, out=out, out_scale=out_scale)
    # out (or out_scale) sharing memory with h
    buf = torch.randn(M * K).view(M, K)
    ln = (buf, torch.randn(2, K), torch.randn(2, K))
    refused("out overlaps an input", *ln, out=buf.view(torch.uint8)[:, :K].view(E4M3), out_scale=out_scale)
    refused("out_scale overlaps an input or out", *ln, out=out, out_scale=buf.view(-1)[:M])
    refused("out_scale overlaps an input or out", *ln, out=out, out_scale=out.view(torch.uint8).view(-1)[:4 * M]
            .view(torch.float32))
    # rows wider than the pass holds: the reason names the PyTorch twin
    wide = torch.zeros(2, 4097)
    refused(r"h rows have 4097 features.*at most 4096; use fastlego.fp8.layernorm_modulate_quantize",
            wide, torch.zeros(2, 4097), torch.zeros(2, 4097))

    for op, limit in (("gelu_quantize", 8192), ("quantize_rows", 8192)):
        launcher = getattr(FQ, op)
        with pytest.raises(ValueError, match=rf"rows have {limit + 1} features.*use fastlego.fp8.{op}"):
            launcher(torch.zeros(2, limit + 1))
        with pytest.raises(ValueError, match=r"must be a tensor \(\.\.\., K\) with K > 0"):
            launcher(torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"out is \(2, 3\) torch.float8_e4m3fn on cpu, expected \(2, 4\)"):
            launcher(torch.ones(2, 4), out=nan_q((2, 3)))
        with pytest.raises(ValueError, match="dtype torch.int64 not supported"):
            launcher(torch.ones(2, 4, dtype=torch.int64))
        x = torch.randn(4, 8)
        with pytest.raises(ValueError, match="out overlaps an input"):
            launcher(x, out=x.view(torch.uint8)[:, :8].view(E4M3))


def test_not_supported_reasons(forcing):
    h, shift, scale, _ = _ln_inputs((2, 3, 5, 96), torch.bfloat16)
    assert FQ.layernorm_modulate_quantize_not_supported_reasons(h, shift, scale) == []   # bf16 under the interpreter
    assert FQ.gelu_quantize_not_supported_reasons(h) == [] and FQ.quantize_rows_not_supported_reasons(h) == []
    reasons = FQ.layernorm_modulate_quantize_not_supported_reasons(torch.zeros(2, 5000), torch.zeros(2, 5000),
                                                                   torch.zeros(2, 5000))
    assert len(reasons) == 1 and "at most 4096" in reasons[0]
    assert any("at most 8192" in r for r in FQ.gelu_quantize_not_supported_reasons(torch.zeros(3, 9000)))
    assert any("out is" in r for r in FQ.quantize_rows_not_supported_reasons(h, out=nan_q((1, 96))))
    with torch.enable_grad():
        assert any("forward-only" in r for r in FQ.quantize_rows_not_supported_reasons(h.float().requires_grad_()))


def test_empty_batch():
    q, s = FQ.quantize_rows(torch.zeros(0, 3, 64))
    assert q.shape == (0, 3, 64) and s.shape == (0, 3)
    q, s = FQ.layernorm_modulate_quantize(torch.zeros(0, 64), torch.zeros(2, 64), torch.zeros(2, 64))
    assert q.shape == (0, 64) and s.shape == (0,)


# --------------------------------------------------------------------------------------------
# On the GPU: the presets' sizes, bf16 included
# --------------------------------------------------------------------------------------------

CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(4, 32, 32, 1152), (2, 8, 64, 384), (3, 5, 7, 200), (1, 2, 8, 4096)])
def test_layernorm_modulate_quantize_cuda(poisoned_empty, dtype, shape):
    """M = B * L * T rows (4096 at D = 1152), the widest row the pass holds (4096), an odd width."""
    layout = "strided_rows" if shape[-1] != 200 else "strided_columns"
    h, shift, scale, _ = _ln_inputs(shape, dtype, "cuda", layout=layout)
    q, s = FQ.layernorm_modulate_quantize(h, shift, scale)
    qt, st = fp8.layernorm_modulate_quantize(h, shift, scale)
    check_like_twin(q, s, qt, st, _ln_truth(h, shift, scale), f"layernorm_modulate_quantize cuda {dtype} {shape}")
    out, out_scale = nan_q(q.shape, "cuda"), nan_scales(s.shape, "cuda")
    FQ.layernorm_modulate_quantize(h, shift, scale, out=out, out_scale=out_scale)
    assert torch.equal(out.view(torch.uint8), q.view(torch.uint8)) and torch.equal(out_scale, s)   # deterministic


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(4096, 4608), (2, 1024, 1536), (300, 8192), (37, 200)])
def test_gelu_quantize_cuda(poisoned_empty, dtype, shape):
    y = _rows_input(shape, dtype, "cuda")
    q, s = FQ.gelu_quantize(y)
    qt, st = fp8.gelu_quantize(y)
    check_like_twin(q, s, qt, st, R.gelu_tanh(y.double()), f"gelu_quantize cuda {dtype} {shape}")


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", [(4096, 1152), (4, 1024, 384), (300, 8192), (37, 200)])
def test_quantize_rows_cuda(poisoned_empty, dtype, shape):
    x = _rows_input(shape, dtype, "cuda")
    q, s = FQ.quantize_rows(x)
    qt, st = fp8.quantize_rows(x, check_finite=False)
    check_like_twin(q, s, qt, st, x.double(), f"quantize_rows cuda {dtype} {shape}", exact=x)


@CUDA
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("op", ["gelu_quantize", "quantize_rows"])
def test_special_rows_cuda(poisoned_empty, dtype, op):
    x = _special_rows(dtype, N=1152, device="cuda", op=op)
    kernel = getattr(FQ, op)
    twin = fp8.gelu_quantize if op == "gelu_quantize" else (lambda t: fp8.quantize_rows(t, check_finite=False))
    truth = R.gelu_tanh(x.double()) if op == "gelu_quantize" else x.double()
    q, s = kernel(x)
    check_like_twin(q, s, *twin(x), truth, f"{op} special rows cuda {dtype}",
                    exact=x if op == "quantize_rows" else None)
    assert s[1] == 1 and q[2].float().abs().max() == 448.0
    if dtype != torch.float16:
        assert s[3] == fp8.MIN_SCALE
    bad = x.clone()
    bad[0, 3] = float("nan")
    bad[4, 0] = float("inf")
    qb, sb = kernel(bad)
    assert torch.isnan(sb[[0, 4]]).all() and torch.isnan(fp8.dequantize(qb, sb)[[0, 4]]).all()
    assert torch.equal(qb.view(torch.uint8)[1:4], q.view(torch.uint8)[1:4]) and torch.equal(sb[1:4], s[1:4])


@CUDA
def test_e4m3_helpers_cuda():
    """The rounding helpers compiled for the GPU: every bf16 value and the tie sweep, bitwise."""
    _check_e4m3(torch.cat([every_bf16_value(), tie_sweep()]).cuda())
