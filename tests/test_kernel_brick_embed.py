"""kernels/brick_embed.py against the reference ops `brick_embed` and `brick_embed_input_grad`.

Without a GPU the kernels run under Triton's interpreter on tiny shapes (fp32, fp16); the
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
from fastlego.kernels.brick_embed import (brick_embed, brick_embed_input_grad,  # noqa: E402
                                          brick_embed_not_supported_reasons)
import kernel_cases as kc  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _nonzero(v):
    return torch.where(v.abs() < 1e-4, torch.full_like(v, 1e-3), v)


def make_inputs(B, C, H, W, region, patch, D, with_prev, dtype=torch.float32, device=DEVICE, seed=0,
                channels_last=False):
    """Random image(s), previous-brick output and random non-zero patch conv / bias / position table."""
    g = torch.Generator().manual_seed(seed)
    cin = (2 * C if with_prev else C) + 2
    K = cin * patch * patch
    T = (region // patch) ** 2
    if channels_last:  # NCHW view of an NHWC tensor: exercises the strided gather
        x = torch.randn(B, H, W, C, generator=g).permute(0, 3, 1, 2)
    else:
        x = torch.randn(B, C, H, W, generator=g)
    prev = torch.randn(B, C, H, W, generator=g) if with_prev else None
    weight = _nonzero((torch.rand(D, cin, patch, patch, generator=g) * 2 - 1) * math.sqrt(3.0 / K))
    bias = _nonzero(torch.randn(D, generator=g) * 0.1)
    pos = _nonzero(torch.randn(1, T, D, generator=g) * 0.5)
    to = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return to(x), to(prev), to(weight), to(bias), to(pos)


def nan_out(B, H, W, region, patch, D, dtype, device=DEVICE):
    L, T = (H // region) * (W // region), (region // patch) ** 2
    return torch.full((B * L, T, D), float("nan"), dtype=dtype, device=device)


def f64(t):
    return None if t is None else t.double()


def check_against_reference(args, region, dtype, what):
    """Run the kernel into a NaN-filled out= and compare with the float64 reference."""
    x, prev, weight, bias, pos = args
    B, C, H, W = x.shape
    out = nan_out(B, H, W, region, weight.shape[-1], weight.shape[0], dtype, x.device)
    got = brick_embed(x, prev, weight, bias, pos, region, out=out)
    assert got is out and got.dtype == dtype
    ref64 = reference.brick_embed(*map(f64, args), region)
    same = reference.brick_embed(*args, region)
    assert same.abs().max() > 0.1, "random weights must give a non-trivial output"
    assert_close_to_reference(got, ref64, same, atol=ATOL[dtype], what=what)


@pytest.fixture
def tf32(request):
    """Set PyTorch's TF32 switches (the reference conv follows cudnn.allow_tf32, the kernel the
    matmul switch, kernels/policy.py), then restore."""
    saved = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    on = getattr(request, "param", False)
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")
    yield on
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


# ------------------------------------------------------------------------------------------------
# Interpreter (or GPU) on tiny shapes
# ------------------------------------------------------------------------------------------------

SMALL_CASES = [
    # B, C, H, W, region, patch, D, prev
    (1, 3, 8, 8, 4, 2, 32, False),      # brick 0 shape, batch 1
    (3, 3, 8, 16, 4, 2, 48, True),      # non-square 8x16, batch 3, previous brick given
    (2, 4, 16, 16, 16, 8, 32, True),    # patch 8, C = 4: K = 640 (10 K steps)
    (1, 4, 16, 32, 16, 8, 48, False),   # non-square, patch 8 without prev
    (1, 3, 32, 32, 32, 2, 32, True),    # region 32: T = 256 tokens
    (3, 3, 16, 8, 4, 2, 40, False),     # tall image, D not a multiple of 16 (masked N)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,C,H,W,region,patch,D,with_prev", SMALL_CASES)
def test_matches_reference_small(B, C, H, W, region, patch, D, with_prev, dtype, tf32):
    args = make_inputs(B, C, H, W, region, patch, D, with_prev, dtype, seed=B * 7 + H)
    check_against_reference(args, region, dtype, f"brick_embed {B}x{C}x{H}x{W} r{region} p{patch} D{D} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_prev", [False, True])
def test_gather_and_coordinates_are_exact(with_prev, dtype, tf32):
    """Identity patch weights: every token must equal its unfolded [prev, x, rows, cols] patch
    (coordinates bit-exact) + bias + pos, with the bias and pos sums rounded once as fp32."""
    B, C, H, W, r, p = 2, 3, 8, 16, 4, 2
    x, prev, _, bias, _ = make_inputs(B, C, H, W, r, p, 16, with_prev, dtype, channels_last=True)
    cin = (2 * C if with_prev else C) + 2
    K, T = cin * p * p, (r // p) ** 2
    weight = torch.eye(K, dtype=dtype, device=DEVICE).reshape(K, cin, p, p)
    g = torch.Generator().manual_seed(5)
    bias = _nonzero(torch.randn(K, generator=g) * 0.1).to(DEVICE, dtype)
    pos = _nonzero(torch.randn(1, T, K, generator=g)).to(DEVICE, dtype)
    # out= a strided view (last dim padded) to exercise output strides
    out = torch.full((B * (H // r) * (W // r), T, K + 5), float("nan"), dtype=dtype, device=DEVICE)[..., :K]
    got = brick_embed(x, prev, weight, bias, pos[0], r, out=out)   # pos_embed given as (T, D)
    regions = reference.unfold_regions(reference.brick_input(x, prev), r)          # (N, cin, r, r)
    N, g_ = regions.shape[0], r // p
    patches = regions.reshape(N, cin, g_, p, g_, p).permute(0, 2, 4, 1, 3, 5).reshape(N, T, K)
    expected = ((patches.float() + bias.float()) + pos.float()).to(dtype)
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_mixed_dtypes_follow_the_reference(tf32):
    """fp32 x with an fp16 previous output and fp16 weights: the reference casts all to x's dtype."""
    x, prev, weight, bias, pos = make_inputs(2, 3, 8, 8, 4, 2, 32, True, torch.float32)
    prev, weight = prev.half(), weight.half()
    args = (x, prev, weight, bias, pos)
    with torch.no_grad():
        reasons, _ = _reasons_for(x=x, prev=prev, weight=weight)
    assert reasons == []
    got = brick_embed(*args, 4, out=nan_out(2, 8, 8, 4, 2, 32, torch.float32))
    ref64 = reference.brick_embed(*map(f64, args), 4)
    same = reference.brick_embed(*args, 4)
    assert got.dtype == same.dtype == torch.float32
    assert_close_to_reference(got, ref64, same, atol=1e-5, what="mixed dtypes")


def test_autocast_fp16_small(tf32):
    """Under autocast (CPU autocast under the interpreter, CUDA autocast on a GPU): fp32 x and
    weights, prev in fp16; result in fp16 like the reference's F.conv2d, through forced dispatch."""
    x, prev, weight, bias, pos = make_inputs(3, 3, 8, 16, 4, 2, 48, True, torch.float32)
    args = (x, prev.half(), weight, bias, pos)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        same = reference.brick_embed(*args, 4)
        with fastlego.use_backend("triton"), dispatch.record() as rec:
            got = fastlego.ops.brick_embed(*args, 4)
        direct = brick_embed(*args, 4, out=nan_out(3, 8, 16, 4, 2, 48, torch.float16))
    assert rec[0].chosen == "triton" and torch.equal(direct, got)
    assert got.dtype == same.dtype == torch.float16
    ref64 = reference.brick_embed(*map(f64, args), 4)
    assert_close_to_reference(got, ref64, same, atol=ATOL[torch.float16], what="autocast fp16")


# ------------------------------------------------------------------------------------------------
# Dispatcher and refusals
# ------------------------------------------------------------------------------------------------

def test_dispatcher_forced_triton_runs_this_kernel(tf32):
    args = make_inputs(3, 3, 8, 16, 4, 2, 32, True)
    with torch.no_grad(), fastlego.use_backend("triton"), dispatch.record() as rec:
        via_ops = fastlego.ops.brick_embed(*args, 4)
    assert [d.chosen for d in rec] == ["triton"]
    assert torch.equal(via_ops, brick_embed(*args, 4))
    assert_close_to_reference(via_ops, reference.brick_embed(*map(f64, args), 4),
                              reference.brick_embed(*args, 4), atol=1e-5, what="forced triton via ops")


def test_auto_picks_triton_on_gpu_and_reference_otherwise():
    args = make_inputs(1, 3, 8, 8, 4, 2, 32, False)
    with torch.no_grad(), fastlego.use_backend("auto"), dispatch.record() as rec:
        fastlego.ops.brick_embed(*args, 4)
    # On the CPU the interpreter is only used when triton is forced.
    assert rec[0].chosen == ("triton" if ON_GPU else "reference"), rec[0].refused


def _reasons_for(**changes):
    """Reasons for a valid call with some arguments replaced (and the forced-CPU rule applied)."""
    x, prev, weight, bias, pos = make_inputs(2, 3, 8, 8, 4, 2, 32, True)
    kw = dict(x=x, prev=prev, weight=weight, bias=bias, pos_embed=pos, region=4)
    kw.update(changes)
    dispatch._config.forcing = True   # as the dispatcher does while asking a forced backend
    try:
        return brick_embed_not_supported_reasons(**kw), kw
    finally:
        dispatch._config.forcing = False


def test_valid_call_has_no_reasons():
    with torch.no_grad():
        reasons, _ = _reasons_for()
    assert reasons == []


@pytest.mark.parametrize("change,expect", [
    (dict(weight=torch.randn(32, 5, 2, 2)), "weight has 5 input channels but [prev, x, rows, cols] has 8"),
    (dict(prev=None), "weight has 8 input channels but [prev, x, rows, cols] has 5"),
    (dict(prev=torch.randn(2, 3, 8, 4)), "prev must be None or the previous brick's output of x's shape"),
    (dict(x=torch.randn(2, 3, 8, 6), prev=torch.randn(2, 3, 8, 6)), "multiples of the region size 4"),
    (dict(region=3), "region must be a positive multiple of the patch size 2"),
    (dict(pos_embed=torch.randn(1, 16, 32)), "pos_embed must be (1, 4, 32)"),
    (dict(bias=torch.randn(31)), "bias must be None or (32,)"),
    (dict(x=torch.randn(2, 3, 8, 8, dtype=torch.float64)), "dtype torch.float64 not supported"),
    (dict(x=torch.randn(2, 8, 8)), "x must be (B, C, H, W)"),
])
def test_bad_inputs_are_refused_with_a_reason(change, expect):
    change = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()}
    with torch.no_grad():
        reasons, kw = _reasons_for(**change)
    assert any(expect in r for r in reasons), reasons
    if "dtype" not in expect:  # shape problems: the launcher raises before any compute
        with pytest.raises(ValueError, match="brick_embed: "):
            brick_embed(**kw)
    with torch.no_grad(), fastlego.use_backend("triton"):
        with pytest.raises(fastlego.BackendNotSupported):
            fastlego.ops.brick_embed(kw["x"], kw["prev"], kw["weight"], kw["bias"], kw["pos_embed"], kw["region"])


def test_requires_grad_is_refused():
    x, prev, weight, bias, pos = make_inputs(1, 3, 8, 8, 4, 2, 32, False)
    weight.requires_grad_(True)
    reasons, _ = _reasons_for(weight=weight, prev=None)
    assert any("requires grad" in r for r in reasons), reasons
    with torch.no_grad():
        reasons, _ = _reasons_for(weight=weight, prev=None)
    assert reasons == []


def test_out_of_the_wrong_dtype_or_shape_raises():
    args = make_inputs(1, 3, 8, 8, 4, 2, 32, False)
    with pytest.raises(ValueError, match=r"expected \(4, 4, 32\) torch.float32"):
        brick_embed(*args, 4, out=nan_out(1, 8, 8, 4, 2, 32, torch.float16))
    with pytest.raises(ValueError, match=r"expected \(4, 4, 32\)"):
        brick_embed(*args, 4, out=torch.empty(4, 4, 33, device=DEVICE))


# ------------------------------------------------------------------------------------------------
# GPU: real widths, every region size, bf16 / fp16 / fp32 (IEEE and TF32), autocast
# ------------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, C, H, W, region, patch, D, prev
    (3, 3, 64, 64, 4, 2, 384, False),     # lego_S brick 0
    (1, 3, 64, 64, 16, 8, 384, True),     # lego_S brick 1
    (3, 3, 64, 128, 64, 2, 384, True),    # region 64, non-square panorama
    (1, 4, 32, 32, 32, 2, 1152, False),   # lego_XL_U brick 0
    (3, 4, 32, 64, 16, 8, 1152, True),    # XL patch 8, non-square
    (1, 4, 32, 32, 4, 2, 1152, True),     # XL region 4
    (3, 3, 8, 16, 4, 2, 384, True),       # tiny non-square
    (2, 3, 96, 64, 32, 2, 1024, True),    # lego_L width, H != W, 6 regions per image
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,C,H,W,region,patch,D,with_prev", GPU_CASES)
def test_matches_reference_cuda(B, C, H, W, region, patch, D, with_prev, dtype, tf32):
    args = make_inputs(B, C, H, W, region, patch, D, with_prev, dtype, "cuda", seed=B + H + D)
    check_against_reference(args, region, dtype, f"brick_embed {B}x{C}x{H}x{W} r{region} p{patch} D{D} {dtype}")


def tf32_truncate(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the TF32 value a tensor-core dot may use (10-bit mantissa, low bits dropped)."""
    return (t.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [True], indirect=True)
@pytest.mark.parametrize("B,C,H,W,region,patch,D,with_prev", GPU_CASES[:5])
def test_fp32_with_tf32_matches_reference_cuda(B, C, H, W, region, patch, D, with_prev, tf32):
    """With the TF32 switches on the fp32 kernel uses 3xTF32 dots and the conv may use TF32. The error budget is accounted explicitly: twice the error of the exact conv of the
    TF32-truncated operands ([prev, x, rows, cols] and the weight), plus atol."""
    args = make_inputs(B, C, H, W, region, patch, D, with_prev, torch.float32, "cuda", seed=3)
    x, prev, weight, bias, pos = args
    out = nan_out(B, H, W, region, patch, D, torch.float32, "cuda")
    got = brick_embed(*args, region, out=out)
    ref64 = reference.brick_embed(*map(f64, args), region)
    z = tf32_truncate(reference.brick_input(x, prev)).double()
    tf32_path = reference.patch_embed(reference.unfold_regions(z, region), tf32_truncate(weight).double(),
                                      bias.double()) + pos.double()
    assert_close_to_reference(got, ref64, tf32_path, atol=1e-5, what=f"tf32 r{region} p{patch} D{D}")


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_prev", [False, True])
def test_autocast_matches_reference_cuda(amp_dtype, with_prev, tf32):
    """Under autocast: fp32 x and weights, prev in the autocast dtype (a previous brick's output);
    the kernel computes in the autocast dtype and returns it, as the reference (F.conv2d) does."""
    x, prev, weight, bias, pos = make_inputs(3, 4, 32, 64, 16, 8, 1152, with_prev, torch.float32, "cuda")
    if prev is not None:
        prev = prev.to(amp_dtype)
    args = (x, prev, weight, bias, pos)
    with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype):
        same = reference.brick_embed(*args, 16)
        assert brick_embed_not_supported_reasons(*args, 16) == []
        got = brick_embed(*args, 16, out=nan_out(3, 32, 64, 16, 8, 1152, amp_dtype))
        with fastlego.use_backend("auto"), dispatch.record() as rec:
            via_auto = fastlego.ops.brick_embed(*args, 16)
    assert rec[0].chosen == "triton" and torch.equal(via_auto, got)
    assert got.dtype == same.dtype == amp_dtype
    ref64 = reference.brick_embed(*map(f64, args), 16)
    assert_close_to_reference(got, ref64, same, atol=ATOL[amp_dtype], what=f"autocast {amp_dtype}")


@pytest.mark.cuda
def test_large_batch_cuda(tf32):
    """lego_S_PG_64 brick 0 at batch 256: 262,144 token rows (a 2,048 x 3 program grid)."""
    args = make_inputs(256, 3, 64, 64, 4, 2, 384, False, torch.bfloat16, "cuda", seed=9)
    check_against_reference(args, 4, torch.bfloat16, "batch 256")


# ------------------------------------------------------------------------------------------------
# brick_embed_input_grad: the gradient to the images (interpreter: fp32, fp16; bf16 too on a GPU)
# ------------------------------------------------------------------------------------------------

poisoned_empty = kc.poisoned_empty   # the fixture


def embed_inputs(B=2, C=3, H=8, W=16, region=4, patch=2, D=32, prev=True, seed=3):
    g = kc.gen(seed)
    cin = (2 * C if prev else C) + 2
    return dict(x=kc.rand64((B, C, H, W), g), prev=kc.rand64((B, C, H, W), g) if prev else None,
                weight=kc.rand64((D, cin, patch, patch), g, (cin * patch * patch) ** -0.5))


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.float16),
                                          pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("cfg", [dict(prev=True), dict(prev=False), dict(prev=True, region=8, patch=4, H=16, W=8, C=4)])
def test_brick_embed_input_grad_kernel(poisoned_empty, device, dtype, cfg):
    e = embed_inputs(**cfg)
    B, C, H, W = e["x"].shape
    region, patch = cfg.get("region", 4), cfg.get("patch", 2)
    M = B * (H // region) * (W // region) * (region // patch) ** 2
    gout = kc.rand64((M // (region // patch) ** 2, (region // patch) ** 2, 32), kc.gen(22))
    ref = reference.brick_embed_input_grad(gout, e["weight"], (B, C, H, W), cfg["prev"], region)
    cast = [t.to(device, dtype) for t in (gout, e["weight"])]
    same = reference.brick_embed_input_grad(*cast, (B, C, H, W), cfg["prev"], region)
    got = brick_embed_input_grad(*cast, (B, C, H, W), cfg["prev"], region)
    assert (got[0] is None) == (not cfg["prev"])
    for o, r, s in zip(got, ref, same):
        if r is not None:
            kc.check_piece(o, r.to(device), s, dtype, f"brick_embed_input_grad {dtype} {cfg}")


def test_brick_embed_input_grad_refuses_bad_calls():
    e = embed_inputs()
    with pytest.raises(ValueError, match="input channels"):
        brick_embed_input_grad(torch.zeros(16, 4, 32), e["weight"], (2, 3, 8, 16), False, 4)


# ------------------------------------------------------------------------------------------------
# External coordinates (Patch Diffusion crops): `coords` read instead of the grid of x's size
# ------------------------------------------------------------------------------------------------

def crop_coords(B, size, resolution, seed, device=DEVICE, aligned=1):
    """(B, 2, size, size) fp32 coordinates of crops at random per-image offsets (multiples of
    `aligned`) of a resolution x resolution image, as Patch Diffusion training makes them."""
    from fastlego.patch_diffusion import crop_coordinates
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint((resolution - size) // aligned + 1, (B, 2), generator=g) * aligned
    return crop_coordinates(offsets, size, resolution).to(device), offsets


CROP_CASES = [
    # B, C, size, resolution, region, patch, D, prev
    (3, 3, 8, 32, 4, 2, 32, False),     # brick 0 on a res/4 crop
    (2, 3, 16, 32, 4, 2, 48, True),     # brick 0 on a res/2 crop, previous output given
    (2, 4, 16, 32, 16, 8, 40, True),    # a patch-8 brick whose region is the crop (K = 640)
    (1, 3, 8, 16, 8, 4, 32, False),     # one region per image
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,C,size,res,region,patch,D,with_prev", CROP_CASES)
def test_crop_with_coords_matches_reference(B, C, size, res, region, patch, D, with_prev, dtype, tf32):
    """A crop with its slice of the full grid as `coords`: the kernel (NaN-filled out=) against the
    float64 reference with the same coords; every weight random and non-zero."""
    x, prev, weight, bias, pos = make_inputs(B, C, size, size, region, patch, D, with_prev, dtype, seed=size + D)
    coords, _ = crop_coords(B, size, res, seed=B + size)
    out = nan_out(B, size, size, region, patch, D, dtype)
    got = brick_embed(x, prev, weight, bias, pos, region, coords, out=out)
    assert got is out
    args = (x, prev, weight, bias, pos)
    ref64 = reference.brick_embed(*map(f64, args), region, coords.double())
    same = reference.brick_embed(*args, region, coords)
    assert not torch.equal(same, reference.brick_embed(*args, region)), "the crop's coordinates must matter"
    assert_close_to_reference(got, ref64, same, atol=ATOL[dtype], what=f"crop {size} of {res} r{region} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_prev", [False, True])
def test_coords_equal_to_the_built_grid_are_bit_identical(with_prev, dtype, tf32):
    """At full size, coords equal to `coordinate_channels` (fp32, as training passes them) give
    the tokens of the kernel's own grid bit for bit, and so does the reference."""
    B, C, H, W, r, p = 2, 3, 8, 16, 4, 2
    args = make_inputs(B, C, H, W, r, p, 32, with_prev, dtype, seed=11)
    grid = reference.coordinate_channels(B, H, W, torch.float32, DEVICE)
    built = brick_embed(*args, r, out=nan_out(B, H, W, r, p, 32, dtype))
    given = brick_embed(*args, r, grid, out=nan_out(B, H, W, r, p, 32, dtype))
    given_x_dtype = brick_embed(*args, r, grid.to(dtype).contiguous(), out=nan_out(B, H, W, r, p, 32, dtype))
    assert torch.equal(built, given) and torch.equal(built, given_x_dtype)
    assert torch.equal(reference.brick_embed(*args, r), reference.brick_embed(*args, r, grid))


def test_identity_weights_gather_the_coords_exactly(tf32):
    """Identity patch weights: each token holds its patch of [x, coords] exactly (strided coords:
    a channels-last view), plus bias and pos rounded once."""
    B, C, size, res, r, p = 2, 3, 8, 32, 4, 2
    x, _, _, _, _ = make_inputs(B, C, size, size, r, p, 16, False, torch.float32)
    coords, _ = crop_coords(B, size, res, seed=4)
    coords = coords.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)   # NHWC memory, NCHW view
    cin = C + 2
    K, T = cin * p * p, (r // p) ** 2
    weight = torch.eye(K, device=DEVICE).reshape(K, cin, p, p)
    bias = torch.zeros(K, device=DEVICE)
    pos = torch.zeros(1, T, K, device=DEVICE)
    got = brick_embed(x, None, weight, bias, pos, r, coords, out=nan_out(B, size, size, r, p, K, torch.float32))
    regions = reference.unfold_regions(torch.cat([x, coords], 1), r)
    g_ = r // p
    expected = regions.reshape(-1, cin, g_, p, g_, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, T, K)
    assert torch.equal(got, expected)


def test_crops_take_the_triton_path_not_the_reference(tf32):
    """The dispatcher never sends a crop to the reference: the kernel reports no reason against a
    crop with coords (of every crop size), and a forced-Triton call runs it (interpreter)."""
    for size, region, patch in ((8, 4, 2), (16, 4, 2), (16, 16, 8), (32, 4, 2)):
        args = make_inputs(2, 3, size, size, region, patch, 32, True, seed=size)
        coords, _ = crop_coords(2, size, 32, seed=size)
        with torch.no_grad():
            reasons, _ = _reasons_for(x=args[0], prev=args[1], weight=args[2], bias=args[3], pos_embed=args[4],
                                      region=region, coords=coords)
        assert reasons == [], (size, reasons)
    with torch.no_grad(), fastlego.use_backend("triton"), dispatch.record() as rec:
        via_ops = fastlego.ops.brick_embed(*args, region, coords)
    assert [d.chosen for d in rec] == ["triton"]
    assert torch.equal(via_ops, brick_embed(*args, region, coords))


@pytest.mark.parametrize("bad,expect", [
    (lambda c: c[:, :1], "coords must be None or float coordinate channels (B, 2, H, W) = (2, 2, 8, 8)"),
    (lambda c: c[:1], "coords must be None or float coordinate channels"),
    (lambda c: c.long(), "coords must be None or float coordinate channels"),
])
def test_bad_coords_are_refused(bad, expect):
    args = make_inputs(2, 3, 8, 8, 4, 2, 32, True)
    coords = bad(crop_coords(2, 8, 32, seed=1)[0])
    with torch.no_grad():
        reasons, kw = _reasons_for(coords=coords)
    assert any(expect in r for r in reasons), reasons
    with pytest.raises(ValueError, match="brick_embed: coords must be"):
        brick_embed(*args, 4, coords)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,C,size,res,region,patch,D,with_prev", [
    (64, 3, 16, 64, 4, 2, 384, False),    # lego_S_PG_64 brick 0 on res/4 crops
    (32, 3, 32, 64, 16, 8, 384, True),    # brick 1 on res/2 crops
    (16, 4, 8, 32, 4, 2, 1152, True),     # XL width, res/4 crop of 32x32 latents
    (5, 3, 16, 32, 16, 2, 1024, True),    # the crop is one region, odd batch
])
def test_crop_with_coords_matches_reference_cuda(B, C, size, res, region, patch, D, with_prev, dtype, tf32):
    x, prev, weight, bias, pos = make_inputs(B, C, size, size, region, patch, D, with_prev, dtype, "cuda", seed=D)
    coords, _ = crop_coords(B, size, res, seed=B, device="cuda")
    got = brick_embed(x, prev, weight, bias, pos, region, coords, out=nan_out(B, size, size, region, patch, D, dtype,
                                                                               "cuda"))
    args = (x, prev, weight, bias, pos)
    ref64 = reference.brick_embed(*map(f64, args), region, coords.double())
    same = reference.brick_embed(*args, region, coords)
    assert_close_to_reference(got, ref64, same, atol=ATOL[dtype], what=f"crop {size} of {res} D{D} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_crop_autocast_auto_picks_triton_cuda(amp_dtype, tf32):
    """Under autocast (how training runs), `auto` takes the Triton kernel for a crop with fp32
    coords, and its tokens match the reference's; full-size coords equal to the grid are bit-exact."""
    x, prev, weight, bias, pos = make_inputs(8, 3, 16, 16, 4, 2, 384, True, torch.float32, "cuda")
    prev = prev.to(amp_dtype)
    coords, _ = crop_coords(8, 16, 64, seed=2, device="cuda")
    args = (x, prev, weight, bias, pos)
    with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype):
        same = reference.brick_embed(*args, 4, coords)
        with fastlego.use_backend("auto"), dispatch.record() as rec:
            got = fastlego.ops.brick_embed(*args, 4, coords)
        grid = reference.coordinate_channels(8, 16, 16, torch.float32, "cuda")
        assert torch.equal(brick_embed(*args, 4, grid), brick_embed(*args, 4))
    assert rec[0].chosen == "triton", rec[0].refused
    ref64 = reference.brick_embed(*map(f64, args), 4, coords.double())
    assert_close_to_reference(got, ref64, same, atol=ATOL[amp_dtype], what=f"crop autocast {amp_dtype}")
