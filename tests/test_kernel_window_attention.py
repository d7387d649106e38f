"""kernels/window_attention.py's forward (`window_attention`, and `global_attention`, the same
launcher) against the reference ops of the same names (`fastlego.reference.attention`).

CPU: Triton's interpreter, fp32 and fp16, tiny shapes. The packed kernel (T <= 64) with many
regions per program and a partial last program (N = 37); the flash kernel (T > 64) with partial
query and key blocks; odd head dims (24, padded to 32); NaN-filled `out=` so unwritten elements
show; strided qkv / out; the 1-D grid split into several launches. CUDA-marked: fp32 (IEEE and
3xTF32), bf16, fp16, head dims 64 and 72, T = 4 ... 1024, and the release's crash case (65,536
four-token regions x 6 heads), against an fp64 reference.
"""

import pytest
import torch

import fastlego
from fastlego import dispatch, reference
from fastlego.testing import assert_close_to_reference

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

wa = pytest.importorskip("fastlego.kernels.window_attention")
from fastlego.kernels.policy import compute_dtype, dot_precision  # noqa: E402


def _qkv(N, T, heads, head_dim, dtype, device="cpu", scale=1.5, seed=0):
    """Random fused qkv (N, T, 3D); `scale` > 1 sharpens the softmax (scores ~ N(0, scale^4))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, 3 * heads * head_dim, generator=g) * scale
    return x.to(device=device, dtype=dtype)


def _nan_out(N, T, width, dtype, device="cpu"):
    return torch.full((N, T, width), float("nan"), dtype=dtype, device=device)


def _check(qkv, heads, out=None, atol=None):
    """Run the kernel (into a NaN-filled out unless given) and compare with the reference in fp32
    (fp64 on CUDA); 16-bit kernels get 2x the error of the reference op in the same dtype."""
    N, T, three_d = qkv.shape
    if out is None:
        out = _nan_out(N, T, three_d // 3, qkv.dtype, qkv.device)
    got = wa.window_attention(qkv, heads, out=out)
    assert got is out
    ref_dtype = torch.float64 if qkv.is_cuda else torch.float32
    ref = reference.attention(qkv.to(ref_dtype), heads)
    # fp32 on CUDA: PyTorch's own fp32 path (vs the fp64 reference) sets the error budget too
    same = None if (qkv.dtype == torch.float32 and not qkv.is_cuda) else reference.attention(qkv, heads)
    if atol is None:
        atol = 1e-5 if qkv.dtype == torch.float32 else 1e-4
    assert_close_to_reference(got, ref, same, atol=atol, what=f"attention {tuple(qkv.shape)} {qkv.dtype} heads={heads}")
    return got


# --------------------------------------------------------------------------------------------
# Interpreter (CPU)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,N,heads,head_dim", [
    (4, 37, 3, 24),    # 16 regions per program (fp16) / 4 (fp32): 3 or 10 programs per head, the last partial
    (16, 37, 2, 16),   # 4 regions per program (fp16) / 1 (fp32)
    (64, 5, 2, 8),     # one region per program
    (9, 11, 2, 16),    # T not a power of two: 7 regions per 64-row tile, 1 padding row
    (1, 6, 2, 16),     # one token: the output is v
])
def test_packed_kernel(T, N, heads, head_dim, dtype):
    _check(_qkv(N, T, heads, head_dim, dtype), heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,N,heads,head_dim", [
    (80, 2, 2, 24),    # partial query block and partial key block, odd head dim
    (256, 2, 3, 16),   # several query and key blocks
    (65, 3, 2, 8),     # just past the packed kernel's limit: a 1-token last key block
    (64, 2, 1, 136),   # fp32: a 64 x 256 fp32 tile is too big for the packed kernel -> flash
])
def test_flash_kernel(T, N, heads, head_dim, dtype):
    _check(_qkv(N, T, heads, head_dim, dtype), heads)


def test_one_token_region_returns_v():
    qkv = _qkv(5, 1, 2, 16, torch.float32)
    out = wa.window_attention(qkv, 2, out=_nan_out(5, 1, 32, torch.float32))
    assert torch.equal(out, qkv[:, :, 64:])  # softmax over one key is 1: exactly v


def test_regions_are_independent():
    """Changing one region's keys changes that region's output only (the block-diagonal mask)."""
    qkv = _qkv(37, 4, 2, 16, torch.float32)
    base = wa.window_attention(qkv, 2)
    qkv2 = qkv.clone()
    qkv2[17, :, 32:64] += 3.0   # region 17's keys, both heads
    moved = wa.window_attention(qkv2, 2)
    changed = (moved - base).abs().amax(dim=(1, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [17]


def test_reads_and_writes_by_strides():
    """qkv a column slice of a wider tensor, out a slice of a wider buffer: no copies needed."""
    N, T, heads, hd = 13, 16, 2, 16
    wide = _qkv(N, T, heads, hd + 5, torch.float32)          # rows longer than 3D
    qkv = wide[:, :, : 3 * heads * hd]
    assert not qkv.is_contiguous()
    buf = torch.full((N, T, heads * hd + 7), float("nan"))
    out = buf[:, :, 3: 3 + heads * hd]
    _check(qkv, heads, out=out)
    assert torch.isnan(buf[:, :, :3]).all() and torch.isnan(buf[:, :, 3 + heads * hd:]).all()

    # tokens-major storage (T, N, 3D) viewed as (N, T, 3D): region stride smaller than token stride
    tmajor = _qkv(T, N, heads, hd, torch.float32).transpose(0, 1)
    _check(tmajor, heads)


@pytest.mark.parametrize("T,N", [(4, 37), (80, 7)])
def test_grid_split_into_launches(monkeypatch, T, N):
    """Past the 1-D grid's limit the launcher runs region chunks (limit lowered to see it here)."""
    monkeypatch.setattr(wa, "_MAX_PROGRAMS", 5)
    _check(_qkv(N, T, 2, 16, torch.float16), 2)


@pytest.mark.parametrize("T", [4, 80])
def test_plan_runs_calls_like_the_checked_one(T):
    """The dispatcher's plan: checked and tiled once (packed kernel for 4 tokens, flash for 80), it
    runs a later call of the same signature (new values) as the launcher does; a call the
    kernels cannot take raises when the plan is made."""
    run = wa.window_attention_plan(_qkv(7, T, 2, 16, torch.float16), 2)
    qkv = _qkv(7, T, 2, 16, torch.float16, seed=5)
    got = run(qkv, 2)
    assert torch.equal(got, wa.window_attention(qkv, 2))
    assert_close_to_reference(got, reference.attention(qkv.float(), 2), reference.attention(qkv, 2), atol=1e-4)
    assert torch.equal(wa.global_attention_plan(qkv, 2)(qkv, 2), got)
    with pytest.raises(ValueError, match="multiple of 6"):
        wa.window_attention_plan(_qkv(7, T, 2, 16, torch.float16)[..., :-1], 2)


def test_empty_batch():
    qkv = _qkv(0, 4, 2, 16, torch.float32)
    assert wa.window_attention(qkv, 2).shape == (0, 4, 32)


def test_bad_input_raises_before_compute():
    qkv = _qkv(3, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of 9"):
        wa.window_attention(qkv, 3)
    with pytest.raises(ValueError, match="positive int"):
        wa.window_attention(qkv, 0)
    with pytest.raises(ValueError, match=r"\(N, T, 3D\)"):
        wa.window_attention(qkv[0], 2)
    with pytest.raises(ValueError, match=r"expected \(3, 4, 32\) torch.float32"):
        wa.window_attention(qkv, 2, out=torch.empty(3, 4, 31))
    with pytest.raises(ValueError, match="expected .* torch.float32"):
        wa.window_attention(qkv, 2, out=torch.empty(3, 4, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="head_dim 300 > 256"):
        wa.window_attention(torch.zeros(1, 4, 900), 1)


def _forced_reasons(qkv, heads):
    """The kernel's reasons as the dispatcher gathers them with the triton backend forced (where
    the interpreter may take CPU tensors); [] if it takes the call."""
    with fastlego.use_backend("triton"):
        try:
            backend, _ = dispatch.choose("window_attention", qkv, heads)
        except fastlego.BackendNotSupported as exc:
            return str(exc).split("\n")[1:]
    assert backend.name == "triton"
    return []


def test_not_supported_reasons():
    qkv = _qkv(3, 4, 2, 16, torch.float32)
    assert _forced_reasons(qkv, 2) == []
    assert any("multiple of 9" in r for r in _forced_reasons(qkv, 3))
    assert any("bfloat16" in r and "interpreter" in r for r in _forced_reasons(qkv.bfloat16(), 2))
    assert any("float64" in r for r in _forced_reasons(qkv.double(), 2))
    assert any("head_dim 300" in r for r in _forced_reasons(torch.zeros(1, 4, 900), 1))
    assert any("(N, T, 3D)" in r for r in wa.window_attention_not_supported_reasons(qkv[0], 2))
    grad = qkv.clone().requires_grad_()
    assert any("forward-only" in r for r in _forced_reasons(grad, 2))
    with torch.no_grad():
        assert _forced_reasons(grad, 2) == []
    # in auto, CPU tensors are refused (the interpreter is for tests only)
    assert any("CPU" in r for r in wa.window_attention_not_supported_reasons(qkv, 2))


def test_dispatch_routes_both_attention_ops_to_the_kernel():
    """ops.attention: T <= 64 -> window_attention, else global_attention; forced triton runs the kernel
    on both, auto on CPU picks the reference."""
    small, large = _qkv(6, 4, 2, 16, torch.float32), _qkv(2, 80, 2, 16, torch.float32)
    with fastlego.use_backend("triton"), dispatch.record() as rec:
        a = fastlego.ops.attention(small, 2)
        b = fastlego.ops.attention(large, 2)
    assert [(d.op, d.chosen) for d in rec] == [("window_attention", "triton"), ("global_attention", "triton")]
    assert_close_to_reference(a, reference.attention(small, 2), atol=1e-5)
    assert_close_to_reference(b, reference.attention(large, 2), atol=1e-5)
    with dispatch.record() as rec:
        fastlego.ops.attention(small, 2)
    assert rec[0].chosen == "reference" and any("CPU" in r for r in rec[0].refused["triton"])


def test_autocast_computes_in_the_autocast_dtype():
    """Under autocast (here the CPU's, fp16) fp32 qkv is computed and returned in fp16, like SDPA."""
    qkv = _qkv(37, 4, 2, 16, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_dtype(qkv) == torch.float16
        out = wa.window_attention(qkv, 2)
    assert out.dtype == torch.float16
    ref = reference.attention(qkv, 2)
    same = reference.attention(qkv.half(), 2)
    assert_close_to_reference(out, ref, same, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert any("bfloat16 under Triton's interpreter" in r for r in wa.window_attention_not_supported_reasons(qkv, 2))


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

CUDA_SHAPES = [  # (T, N): local windows at batch 1 and 3 (x 256 or 16 regions), global at batch 1 and 3
    (4, 256), (4, 768), (4, 48), (16, 37), (16, 1000), (64, 37), (64, 3),
    (256, 4), (256, 12), (1024, 1), (1024, 3), (100, 5),
]


@pytest.fixture(params=[False])
def tf32(request):
    """PyTorch's TF32 matmul switch for the test (off unless parametrized), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [(6, 64), (16, 72), (3, 24), (2, 128), (1, 256)])
@pytest.mark.parametrize("T,N", CUDA_SHAPES)
def test_cuda_matches_reference(tf32, T, N, heads, head_dim, dtype):
    _check(_qkv(N, T, heads, head_dim, dtype, "cuda"), heads)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [True], indirect=True)
@pytest.mark.parametrize("T,N", [(4, 256), (64, 37), (256, 4), (1024, 1)])
def test_cuda_fp32_with_tf32(tf32, T, N):
    """With TF32 on, fp32 dots run in 3xTF32 (kernels/policy.py); the tolerance is TF32's (10-bit
    mantissa: ~1e-3 relative; outputs here reach ~5 in size, so 1e-2 absolute)."""
    qkv = _qkv(N, T, 6, 64, torch.float32, "cuda")
    assert dot_precision(torch.float32) == "tf32x3"
    _check(qkv, 6, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_release_crash_case(tf32, dtype):
    """65,536 four-token regions x 6 heads (lego_S_PG_64, batch 256, brick 0): where PyTorch's
    kernels fail on the grid limit. One launch of 24,576 programs (bf16) here."""
    qkv = _qkv(65536, 4, 6, 64, dtype, "cuda")
    _check(qkv, 6)


@pytest.mark.cuda
def test_cuda_autocast():
    qkv = _qkv(256, 4, 6, 64, torch.float32, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = wa.window_attention(qkv, 6)
        sdpa = reference.attention(qkv, 6)
    assert out.dtype == sdpa.dtype == torch.bfloat16
    assert_close_to_reference(out, reference.attention(qkv.double(), 6), sdpa, atol=1e-4)


@pytest.mark.cuda
def test_cuda_auto_dispatch_picks_the_kernel_for_windows():
    qkv = _qkv(256, 4, 6, 64, torch.bfloat16, "cuda")
    with dispatch.record() as rec:
        fastlego.ops.attention(qkv, 6)
    assert rec[0].op == "window_attention" and rec[0].chosen == "triton", rec[0].refused
    qkv.requires_grad_()
    with dispatch.record() as rec:   # training: the custom op runs the same kernel, with a backward
        out = fastlego.ops.attention(qkv, 6)
        out.float().square().sum().backward()
    assert out.requires_grad and qkv.grad is not None
    assert [(r.op, r.chosen) for r in rec] == [("window_attention", "triton"), ("window_attention_backward", "triton")]
