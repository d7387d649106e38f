"""The Triton final_layer kernel (kernels/final_layer.py) against `fastlego.reference.final_layer`.

Without a GPU the kernel runs under Triton's interpreter on tiny shapes (fp32, fp16); the
cuda-marked tests take real widths (384, 1152), regions 4..64 and fp32 (IEEE and 3xTF32), bf16,
fp16 and autocast. The oracle is the reference op in float64 on the same inputs; the tolerance is
twice the error of the same-dtype PyTorch path plus a small atol (`assert_close_to_reference`).
"""

import math

import pytest
import torch

import fastlego
from fastlego import dispatch, reference
from fastlego.testing import assert_close_to_reference

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

pytest.importorskip("triton")
from fastlego.kernels.final_layer import final_layer, final_layer_not_supported_reasons  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _nonzero(v):
    return torch.where(v.abs() < 1e-4, torch.full_like(v, 1e-3), v)


def make_inputs(B, C, H, W, region, patch, D, dtype=torch.float32, device=DEVICE, seed=0, mean=0.5, std=2.0):
    """Tokens h (B*L, T, D) with a non-zero mean, shift/scale as chunks of one (B, 2D) adaLN output
    (strided views), a random non-zero Linear(D, p*p*C) with bias."""
    g = torch.Generator().manual_seed(seed)
    L, T, N = (H // region) * (W // region), (region // patch) ** 2, patch * patch * C
    h = torch.randn(B * L, T, D, generator=g) * std + mean
    h = h + torch.randn(1, 1, D, generator=g)  # per-feature offsets, as a residual stream has
    mod = _nonzero(torch.randn(B, 2 * D, generator=g) * 0.3)
    weight = _nonzero((torch.rand(N, D, generator=g) * 2 - 1) * math.sqrt(3.0 / D))
    bias = _nonzero(torch.randn(N, generator=g) * 0.1)
    to = lambda t: t.to(device, dtype)  # noqa: E731
    shift, scale = to(mod).chunk(2, dim=1)
    return to(h), shift, scale, to(weight), to(bias)


def nan_out(shape, dtype, device=DEVICE):
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def f64(t):
    return None if t is None else t.double()


def check_against_reference(args, region, shape, dtype, what):
    """Run the kernel into a NaN-filled out= and compare with the float64 reference."""
    out = nan_out(shape, dtype, args[0].device)
    got = final_layer(*args, region, shape, out=out)
    assert got is out and got.dtype == dtype
    ref64 = reference.final_layer(*map(f64, args), region, shape)
    same = reference.final_layer(*args, region, shape)
    assert same.abs().max() > 0.1, "random weights must give a non-trivial output"
    assert_close_to_reference(got, ref64, same, atol=ATOL[dtype], what=what)


@pytest.fixture
def tf32(request):
    """Set PyTorch's TF32 switches (the kernel follows the matmul one for fp32, kernels/policy.py),
    then restore."""
    saved = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    on = getattr(request, "param", False)
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")
    yield on
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


@pytest.fixture
def forcing():
    """Ask for reasons as the dispatcher does for a forced backend (CPU interpreter allowed)."""
    dispatch._config.forcing = True
    yield
    dispatch._config.forcing = False


# ------------------------------------------------------------------------------------------------
# Interpreter (or GPU) on tiny shapes
# ------------------------------------------------------------------------------------------------

SMALL_CASES = [
    # B, C, H, W, region, patch, D
    (1, 3, 8, 8, 4, 2, 32),         # N = 12 outputs (padded to 16), batch 1
    (3, 3, 8, 16, 4, 2, 48),        # non-square 8x16, batch 3: rows of 3 images per tile
    (2, 4, 16, 16, 16, 8, 32),      # patch 8, C = 4: N = 256
    (1, 3, 16, 32, 16, 8, 48),      # non-square, N = 192 (padded to 256)
    (1, 4, 32, 32, 32, 2, 40),      # region 32, D = 40: masked K chunk, N = 16
    (3, 3, 16, 8, 4, 2, 80),        # tall image, D = 80: two K chunks, the last one partial
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,C,H,W,region,patch,D", SMALL_CASES)
def test_matches_reference_small(B, C, H, W, region, patch, D, dtype, tf32):
    args = make_inputs(B, C, H, W, region, patch, D, dtype, seed=B * 7 + H)
    check_against_reference(args, region, (B, C, H, W), dtype,
                            f"final_layer {B}x{C}x{H}x{W} r{region} p{patch} D{D} {dtype}")


def test_layernorm_statistics_are_stable(tf32):
    """A large common offset (mean 300, std 0.5): E[x^2] - E[x]^2 in fp32 would lose the variance;
    the chunked mean/M2 merge must not."""
    args = make_inputs(2, 3, 8, 16, 4, 2, 80, torch.float32, mean=300.0, std=0.5)
    check_against_reference(args, 4, (2, 3, 8, 16), torch.float32, "LN with mean 300")


def test_strided_inputs_and_out(tf32):
    """h a non-contiguous view, weight transposed storage, out a strided view of a bigger image."""
    B, C, H, W, r, p, D = 2, 3, 8, 16, 4, 2, 32
    h, shift, scale, weight, bias = make_inputs(B, C, H, W, r, p, D)
    h = torch.cat([h, torch.zeros_like(h)], dim=2)[..., :D]       # row stride 2D
    weight = weight.t().contiguous().t()                         # (N, D) with strides (1, N)
    big = nan_out((B, C + 1, H, W + 3), torch.float32)
    out = big[:, :C, :, :W]
    got = final_layer(h, shift, scale, weight, bias, r, (B, C, H, W), out=out)
    assert got is out and torch.isnan(big[:, C:]).all() and torch.isnan(big[..., W:]).all()
    args = (h, shift, scale, weight, bias)
    assert_close_to_reference(got, reference.final_layer(*map(f64, args), r, (B, C, H, W)),
                              reference.final_layer(*args, r, (B, C, H, W)), atol=1e-5, what="strided")


def test_no_bias(tf32):
    h, shift, scale, weight, _ = make_inputs(1, 3, 8, 8, 4, 2, 32)
    got = final_layer(h, shift, scale, weight, None, 4, (1, 3, 8, 8), out=nan_out((1, 3, 8, 8), torch.float32))
    ref = reference.final_layer(h.double(), shift.double(), scale.double(), weight.double(), None, 4, (1, 3, 8, 8))
    assert_close_to_reference(got, ref, reference.final_layer(h, shift, scale, weight, None, 4, (1, 3, 8, 8)),
                              atol=1e-5, what="no bias")


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.float16])
def test_autocast_fp16_small(h_dtype, tf32):
    """Under autocast (CPU autocast under the interpreter, CUDA autocast on a GPU): fp32 weights,
    fp16 shift/scale, h fp32 (residual stream) or fp16; fp16 result like the reference's."""
    h, shift, scale, weight, bias = make_inputs(3, 3, 8, 16, 4, 2, 48, torch.float32)
    args = (h.to(h_dtype), shift.half(), scale.half(), weight, bias)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        same = reference.final_layer(*args, 4, (3, 3, 8, 16))
        with fastlego.use_backend("triton"), dispatch.record() as rec:
            got = fastlego.ops.final_layer(*args, 4, (3, 3, 8, 16))
        direct = final_layer(*args, 4, (3, 3, 8, 16), out=nan_out((3, 3, 8, 16), torch.float16))
    assert rec[0].chosen == "triton" and torch.equal(direct, got)
    assert got.dtype == same.dtype == torch.float16
    ref64 = reference.final_layer(*map(f64, args), 4, (3, 3, 8, 16))
    assert_close_to_reference(got, ref64, same, atol=ATOL[torch.float16], what=f"autocast fp16, h {h_dtype}")


# ------------------------------------------------------------------------------------------------
# Dispatcher and refusals
# ------------------------------------------------------------------------------------------------

def test_dispatcher_forced_triton_runs_this_kernel(tf32):
    args = make_inputs(3, 3, 8, 16, 4, 2, 32)
    with torch.no_grad(), fastlego.use_backend("triton"), dispatch.record() as rec:
        via_ops = fastlego.ops.final_layer(*args, 4, torch.Size((3, 3, 8, 16)))
    assert [d.chosen for d in rec] == ["triton"]
    assert torch.equal(via_ops, final_layer(*args, 4, (3, 3, 8, 16)))
    assert_close_to_reference(via_ops, reference.final_layer(*map(f64, args), 4, (3, 3, 8, 16)),
                              reference.final_layer(*args, 4, (3, 3, 8, 16)), atol=1e-5, what="forced triton via ops")


def test_auto_picks_triton_on_gpu_and_reference_otherwise():
    args = make_inputs(1, 3, 8, 8, 4, 2, 32)
    with torch.no_grad(), fastlego.use_backend("auto"), dispatch.record() as rec:
        fastlego.ops.final_layer(*args, 4, (1, 3, 8, 8))
    assert rec[0].chosen == ("triton" if ON_GPU else "reference"), rec[0].refused


def _call(**changes):
    h, shift, scale, weight, bias = make_inputs(2, 3, 8, 8, 4, 2, 32)
    kw = dict(h=h, shift=shift, scale=scale, weight=weight, bias=bias, region=4, image_shape=(2, 3, 8, 8))
    kw.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in changes.items()})
    return kw


def test_valid_call_has_no_reasons(forcing):
    with torch.no_grad():
        assert final_layer_not_supported_reasons(**_call()) == []


@pytest.mark.parametrize("change,expect", [
    (dict(weight=torch.randn(12, 32, dtype=torch.float16)), "mixed dtypes"),
    (dict(h=torch.randn(8, 4, 32, dtype=torch.float64)), "dtype torch.float64 not supported"),
    (dict(h=torch.randn(8, 16, 32)), "h must be (8, 4, 32)"),
    (dict(h=torch.randn(32, 32)), "h must be tokens (B * L, T, D)"),
    (dict(image_shape=(2, 3, 8, 6)), "multiples of the region size 4"),
    (dict(image_shape=(3, 3, 8, 8)), "h must be (12, 4, 32)"),
    (dict(shift=torch.randn(1, 32)), "shift must be per image (2, 32)"),
    (dict(scale=torch.randn(2, 16)), "scale must be per image (2, 32)"),
    (dict(weight=torch.randn(10, 32)), "weight has 10 outputs: expected p * p * C"),
    (dict(region=3), "region must be a positive multiple of the patch size 2"),
    (dict(bias=torch.randn(16)), "bias must be None or (12,)"),
])
def test_bad_inputs_are_refused_with_a_reason(change, expect, forcing):
    kw = _call(**change)
    with torch.no_grad():
        reasons = final_layer_not_supported_reasons(**kw)
    assert any(expect in r for r in reasons), reasons
    dispatch._config.forcing = False
    if "dtype" not in expect:  # shape problems: the launcher raises before any compute
        with pytest.raises(ValueError, match="final_layer: "):
            final_layer(**kw)
    with torch.no_grad(), fastlego.use_backend("triton"):
        with pytest.raises(fastlego.BackendNotSupported):
            fastlego.ops.final_layer(*kw.values())


def test_requires_grad_is_refused(forcing):
    kw = _call()
    kw["h"].requires_grad_(True)
    assert any("requires grad" in r for r in final_layer_not_supported_reasons(**kw))
    with torch.no_grad():
        assert final_layer_not_supported_reasons(**kw) == []


def test_out_of_the_wrong_dtype_or_shape_raises():
    kw = _call()
    with pytest.raises(ValueError, match=r"expected \(2, 3, 8, 8\) torch.float32"):
        final_layer(**kw, out=nan_out((2, 3, 8, 8), torch.float16))
    with pytest.raises(ValueError, match=r"expected \(2, 3, 8, 8\)"):
        final_layer(**kw, out=nan_out((2, 3, 8, 9), torch.float32))


# ------------------------------------------------------------------------------------------------
# GPU: real widths, every region size, bf16 / fp16 / fp32 (IEEE and TF32), autocast
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, C, H, W, region, patch, D
    (3, 3, 64, 64, 4, 2, 384),      # lego_S brick 0: N = 12
    (1, 3, 64, 64, 16, 8, 384),     # lego_S brick 1: N = 192
    (3, 3, 64, 128, 64, 2, 384),    # region 64, non-square panorama
    (1, 4, 32, 32, 32, 2, 1152),    # lego_XL_U brick 0: N = 16
    (3, 4, 32, 64, 16, 8, 1152),    # XL patch 8: N = 256, non-square
    (1, 4, 32, 32, 4, 2, 1152),     # XL region 4
    (3, 3, 8, 16, 4, 2, 384),       # tiny non-square
    (2, 3, 96, 64, 32, 2, 1024),    # lego_L width, H != W
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,C,H,W,region,patch,D", GPU_CASES)
def test_matches_reference_cuda(B, C, H, W, region, patch, D, dtype, tf32):
    args = make_inputs(B, C, H, W, region, patch, D, dtype, "cuda", seed=B + H + D)
    check_against_reference(args, region, (B, C, H, W), dtype,
                            f"final_layer {B}x{C}x{H}x{W} r{region} p{patch} D{D} {dtype}")


def tf32_truncate(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the TF32 value a tensor-core dot may use (10-bit mantissa, low bits dropped)."""
    return (t.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [True], indirect=True)
@pytest.mark.parametrize("B,C,H,W,region,patch,D", GPU_CASES[:5])
def test_fp32_with_tf32_matches_reference_cuda(B, C, H, W, region, patch, D, tf32):
    """With TF32 matmuls on, the fp32 kernel uses 3xTF32 dots and F.linear TF32. The error budget is
    accounted explicitly: twice the error of the exact Linear of the TF32-truncated operands (the
    modulated LN output and the weight), plus atol."""
    h, shift, scale, weight, bias = args = make_inputs(B, C, H, W, region, patch, D, torch.float32, "cuda", seed=3)
    got = final_layer(*args, region, (B, C, H, W), out=nan_out((B, C, H, W), torch.float32, "cuda"))
    ref64 = reference.final_layer(*map(f64, args), region, (B, C, H, W))
    a = tf32_truncate(reference.modulate(reference.layernorm(h.double()), shift.double(), scale.double())).double()
    y = torch.nn.functional.linear(a, tf32_truncate(weight).double(), bias.double())
    tf32_path = reference.fold_regions(reference.unpatchify(y, patch, C), B, H, W)
    assert_close_to_reference(got, ref64, tf32_path, atol=1e-5, what=f"tf32 r{region} p{patch} D{D}")


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h_dtype", [torch.float32, "amp"])
def test_autocast_matches_reference_cuda(amp_dtype, h_dtype, tf32):
    """Under autocast: fp32 weights, shift/scale in the autocast dtype (adaLN Linear output), h the
    fp32 residual stream or in the autocast dtype; the result is in the autocast dtype, as the
    reference's (LayerNorm in fp32, Linear in the autocast dtype) is."""
    B, C, H, W, r, p, D = 3, 4, 32, 64, 16, 8, 1152
    h, shift, scale, weight, bias = make_inputs(B, C, H, W, r, p, D, torch.float32, "cuda", seed=11)
    h = h.to(amp_dtype if h_dtype == "amp" else h_dtype)
    shift, scale = shift.to(amp_dtype), scale.to(amp_dtype)
    args = (h, shift, scale, weight, bias)
    with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype):
        same = reference.final_layer(*args, r, (B, C, H, W))
        assert final_layer_not_supported_reasons(*args, r, (B, C, H, W)) == []
        got = final_layer(*args, r, (B, C, H, W), out=nan_out((B, C, H, W), amp_dtype))
        with fastlego.use_backend("auto"), dispatch.record() as rec:
            via_auto = fastlego.ops.final_layer(*args, r, (B, C, H, W))
    assert rec[0].chosen == "triton" and torch.equal(via_auto, got)
    assert got.dtype == same.dtype == amp_dtype
    ref64 = reference.final_layer(*map(f64, args), r, (B, C, H, W))
    assert_close_to_reference(got, ref64, same, atol=ATOL[amp_dtype], what=f"autocast {amp_dtype} h {h_dtype}")


@pytest.mark.cuda
def test_large_batch_cuda(tf32):
    """lego_S_PG_64 brick 0 at batch 256: 262,144 token rows."""
    args = make_inputs(256, 3, 64, 64, 4, 2, 384, torch.bfloat16, "cuda", seed=9)
    check_against_reference(args, 4, (256, 3, 64, 64), torch.bfloat16, "batch 256")
