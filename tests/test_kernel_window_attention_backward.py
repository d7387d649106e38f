"""kernels/window_attention.py's backward (`window_attention_backward`) against autograd of
fastlego.reference.attention_math (the op's reference twin, `fastlego.reference.window_attention_backward`,
is itself checked against autograd in tests/test_training_ops.py).

CPU: Triton's interpreter, fp32 and fp16, tiny shapes: several regions per program with a partial
last program, T not a power of two (9), one-token regions, odd head dims (12, padded to 16);
NaN-filled `out=` so unwritten elements show; strided inputs and output; the 1-D grid split into
several launches; bitwise determinism; bad input; the support reasons; autocast; gradcheck of the
reference op itself. CUDA-marked: fp32, bf16, fp16, T = 4 ... 64, head dims 32 ... 128, and the
65,536 four-token regions x 6 heads grid, against an fp64 reference; determinism; autocast.

Tolerance (fastlego.testing.assert_close_to_reference): |kernel - fp64 autograd| <= 2 x |PyTorch
autograd in the kernel's dtype - fp64 autograd| + a small atol (16-bit: 1e-3; fp32: 1e-5 times the
largest gradient).
"""

import pytest
import torch

from fastlego import reference
from fastlego.testing import assert_close_to_reference

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

wa = pytest.importorskip("fastlego.kernels.window_attention")
from fastlego.kernels.policy import dot_precision  # noqa: E402


def _qkv(N, T, heads, head_dim, dtype, device="cpu", scale=1.5, seed=0):
    """Random fused qkv (N, T, 3D); `scale` > 1 sharpens the softmax (scores ~ N(0, scale^4))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, 3 * heads * head_dim, generator=g) * scale
    return x.to(device=device, dtype=dtype)


def _grad_out(N, T, width, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, width, generator=g).to(device=device, dtype=dtype)


def _nan(shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _autograd(qkv, grad_out, heads, dtype):
    """d(attention_math(qkv) . grad_out)/d qkv by PyTorch autograd, everything in `dtype`."""
    x = qkv.detach().to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad(reference.attention_math(x, heads), x, grad_out.to(dtype))
    return grad


def _check(qkv, grad_out, heads, out=None, atol=None):
    """Run the backward (into a NaN-filled out unless given) and compare with fp64 autograd; the
    budget is 2x PyTorch's own autograd error in the kernel's dtype plus atol."""
    N, T, three_d = qkv.shape
    if out is None:
        out = _nan((N, T, three_d), qkv.dtype, qkv.device)
    got = wa.window_attention_backward(qkv, grad_out, heads, out=out)
    assert got is out and got.dtype == qkv.dtype
    ref = _autograd(qkv, grad_out, heads, torch.float64)
    same = _autograd(qkv, grad_out, heads, qkv.dtype)
    if atol is None:  # fp32: 1e-5 relative to the largest gradient (they reach ~10 to 100 here)
        atol = 1e-5 * max(1.0, ref.abs().max().item()) if qkv.dtype == torch.float32 else 1e-3
    assert_close_to_reference(got, ref, same, atol=atol,
                              what=f"attention backward {tuple(qkv.shape)} {qkv.dtype} heads={heads}")
    return got


# --------------------------------------------------------------------------------------------
# Interpreter (CPU)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,T,heads,head_dim", [
    (5, 4, 2, 8),      # fp32: 4 regions per 16-row program, the second partial; fp16: 16 per program
    (37, 4, 1, 16),    # fp16: 3 programs, the last partial
    (5, 9, 2, 12),     # T not a power of two (7 regions + 1 padding row at 64 rows), head_dim padded to 16
    (1, 16, 2, 16),    # one region, most of the tile padding
    (5, 1, 2, 8),      # one token per region
    (2, 64, 1, 8),     # one whole region per program
])
def test_backward_matches_reference(N, T, heads, head_dim, dtype):
    qkv = _qkv(N, T, heads, head_dim, dtype)
    _check(qkv, _grad_out(N, T, heads * head_dim, dtype), heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_is_deterministic(dtype):
    """No atomics: every grad element is written by one program, so two calls agree bitwise."""
    qkv, go = _qkv(37, 4, 2, 8, dtype), _grad_out(37, 4, 16, dtype)
    first = wa.window_attention_backward(qkv, go, 2, out=_nan((37, 4, 48), dtype))
    second = wa.window_attention_backward(qkv, go, 2)
    assert torch.equal(first, second)


def test_one_token_region_passes_grad_out_to_v():
    """Softmax over one key is exactly 1: dv = grad_out, dq = dk = 0, exactly."""
    qkv, go = _qkv(5, 1, 2, 16, torch.float32), _grad_out(5, 1, 32, torch.float32)
    grad = wa.window_attention_backward(qkv, go, 2, out=_nan((5, 1, 96), torch.float32))
    assert torch.equal(grad[:, :, 64:], go)
    assert torch.equal(grad[:, :, :64], torch.zeros_like(grad[:, :, :64]))


def test_regions_are_independent():
    """Changing one region's grad_out changes that region's grad only (the block-diagonal mask)."""
    qkv, go = _qkv(37, 4, 2, 16, torch.float32), _grad_out(37, 4, 32, torch.float32)
    base = wa.window_attention_backward(qkv, go, 2)
    go2 = go.clone()
    go2[17] += 1.0
    moved = wa.window_attention_backward(qkv, go2, 2)
    changed = (moved - base).abs().amax(dim=(1, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [17]


def test_reads_and_writes_by_strides():
    """qkv a column slice of a wider tensor, grad_out tokens-major, out a slice of a wider
    buffer: the columns around it stay untouched (NaN)."""
    N, T, heads, hd = 7, 9, 2, 8
    qkv = _qkv(N, T, heads, hd + 3, torch.float32)[:, :, : 3 * heads * hd]
    go = _grad_out(T, N, heads * hd, torch.float32).transpose(0, 1)
    assert not qkv.is_contiguous() and not go.is_contiguous()
    buf = _nan((N, T, 3 * heads * hd + 5), torch.float32)
    out = buf[:, :, 2: 2 + 3 * heads * hd]
    _check(qkv, go, heads, out=out)
    assert torch.isnan(buf[:, :, :2]).all() and torch.isnan(buf[:, :, 2 + 3 * heads * hd:]).all()


def test_grid_split_into_launches(monkeypatch):
    """Past the 1-D grid's limit the launcher runs region chunks (limit lowered to see it here)."""
    monkeypatch.setattr(wa, "_MAX_PROGRAMS", 5)
    N, T, heads, hd = 37, 4, 2, 8
    _check(_qkv(N, T, heads, hd, torch.float16), _grad_out(N, T, heads * hd, torch.float16), heads)


def test_empty_batch():
    qkv, go = _qkv(0, 4, 2, 16, torch.float32), _grad_out(0, 4, 32, torch.float32)
    assert wa.window_attention_backward(qkv, go, 2).shape == (0, 4, 96)


def test_bad_input_raises_before_compute():
    qkv, go = _qkv(3, 4, 2, 16, torch.float32), _grad_out(3, 4, 32, torch.float32)
    with pytest.raises(ValueError, match=r"grad_out is \(3, 4, 31\), expected \(3, 4, 32\)"):
        wa.window_attention_backward(qkv, go[:, :, :31], 2)
    with pytest.raises(ValueError, match=r"grad_out must be a tensor"):
        wa.window_attention_backward(qkv, None, 2)
    with pytest.raises(ValueError, match="T=65 .* <= 64 tokens; larger regions use the reference"):
        wa.window_attention_backward(_qkv(1, 65, 2, 16, torch.float32), _grad_out(1, 65, 32, torch.float32), 2)
    with pytest.raises(ValueError, match="multiple of 9"):
        wa.window_attention_backward(qkv, go, 3)
    with pytest.raises(ValueError, match=r"\(N, T, 3D\)"):
        wa.window_attention_backward(qkv[0], go, 2)
    with pytest.raises(ValueError, match=r"expected \(3, 4, 96\) torch.float32"):
        wa.window_attention_backward(qkv, go, 2, out=torch.empty(3, 4, 32))
    with pytest.raises(ValueError, match=r"expected \(3, 4, 96\) torch.float32"):
        wa.window_attention_backward(qkv, go, 2, out=torch.empty(3, 4, 96, dtype=torch.float16))


def test_not_supported_reasons():
    qkv, go = _qkv(3, 4, 2, 16, torch.float32), _grad_out(3, 4, 32, torch.float32)

    def reasons(*args):  # on CPU the interpreter reason is always there (used only when forced)
        return [r for r in wa.window_attention_backward_not_supported_reasons(*args) if "CPU" not in r]

    assert reasons(qkv, go, 2) == []
    assert any("CPU" in r for r in wa.window_attention_backward_not_supported_reasons(qkv, go, 2))
    # a backward takes tensors that require grad (no forward-only refusal)
    assert reasons(qkv.clone().requires_grad_(), go, 2) == []
    big = _qkv(1, 65, 2, 16, torch.float32)
    assert any("<= 64 tokens" in r and "reference (SDPA) backward" in r
               for r in reasons(big, _grad_out(1, 65, 32, torch.float32), 2))
    assert any("grad_out is (3, 4, 31)" in r for r in reasons(qkv, go[:, :, :31], 2))
    assert any("multiple of 9" in r for r in reasons(qkv, go, 3))
    assert any("(N, T, 3D)" in r for r in reasons(qkv[0], go, 2))
    assert any("float64" in r for r in reasons(qkv.double(), go.double(), 2))
    assert any("bfloat16" in r and "interpreter" in r for r in reasons(qkv.bfloat16(), go.bfloat16(), 2))
    # fp32 64-token regions with head_dim 128: a 64 x 128 fp32 tile would spill registers
    wide = _qkv(1, 64, 1, 128, torch.float32)
    assert any("spill" in r for r in reasons(wide, _grad_out(1, 64, 128, torch.float32), 1))
    assert reasons(wide.half(), _grad_out(1, 64, 128, torch.float16), 1) == []
    # grad_out in another dtype is cast by the launcher (autocast's forward returns 16-bit)
    assert reasons(qkv, go.half(), 2) == []


def test_mixed_dtype_grad_out_is_cast():
    qkv, go = _qkv(5, 4, 2, 8, torch.float32), _grad_out(5, 4, 16, torch.float16)
    got = wa.window_attention_backward(qkv, go, 2)
    assert got.dtype == torch.float32
    assert torch.equal(got, wa.window_attention_backward(qkv, go.float(), 2))


def test_autocast_computes_in_the_autocast_dtype():
    """Under autocast (here the CPU's, fp16) fp32 qkv is computed and returned in fp16."""
    qkv, go = _qkv(37, 4, 2, 8, torch.float32), _grad_out(37, 4, 16, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        grad = wa.window_attention_backward(qkv, go, 2)
    assert grad.dtype == torch.float16
    ref = _autograd(qkv, go, 2, torch.float64)
    same = _autograd(qkv, go, 2, torch.float16)
    assert_close_to_reference(grad, ref, same, atol=1e-3, what="autocast backward")


def test_gradcheck_of_the_reference_op():
    """The oracle's own gradient (PyTorch SDPA's backward) against finite differences, fp64."""
    qkv = _qkv(2, 3, 2, 4, torch.float64, scale=1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: reference.attention(x, 2), (qkv,))
    assert torch.autograd.gradcheck(lambda x: reference.attention_math(x, 2), (qkv,))


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

CUDA_SHAPES = [(4, 37), (4, 4096), (16, 1000), (49, 37), (49, 300), (64, 3), (64, 1024)]  # (T, N)


@pytest.fixture
def ieee_fp32():
    """PyTorch's TF32 matmul switch off for the test (fp32 kernels then use IEEE dots), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [(4, 32), (6, 64), (2, 72), (2, 128)])
@pytest.mark.parametrize("T,N", CUDA_SHAPES)
def test_cuda_matches_reference(ieee_fp32, T, N, heads, head_dim, dtype):
    qkv = _qkv(N, T, heads, head_dim, dtype, "cuda")
    _check(qkv, _grad_out(N, T, heads * head_dim, dtype, "cuda"), heads)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_big_grid(ieee_fp32, dtype):
    """65,536 four-token regions x 6 heads (lego_S_PG_64, batch 256, brick 0): correct and
    bitwise deterministic."""
    qkv = _qkv(65536, 4, 6, 64, dtype, "cuda")
    go = _grad_out(65536, 4, 384, dtype, "cuda")
    first = _check(qkv, go, 6)
    assert torch.equal(first, wa.window_attention_backward(qkv, go, 6))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,N,head_dim", [(4, 2048, 64), (49, 300, 72), (64, 64, 128)])
def test_cuda_deterministic(T, N, head_dim, dtype):
    qkv, go = _qkv(N, T, 2, head_dim, dtype, "cuda"), _grad_out(N, T, 2 * head_dim, dtype, "cuda")
    assert torch.equal(wa.window_attention_backward(qkv, go, 2), wa.window_attention_backward(qkv, go, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_cuda_autocast(grad_dtype):
    """fp32 qkv under bf16 autocast: computed and returned in bf16, like SDPA's backward there;
    grad_out bf16 (what the autocast forward returns) or fp32."""
    qkv, go = _qkv(256, 16, 6, 64, torch.float32, "cuda"), _grad_out(256, 16, 384, grad_dtype, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert [r for r in wa.window_attention_backward_not_supported_reasons(qkv, go, 6)] == []
        grad = wa.window_attention_backward(qkv, go, 6)
    assert grad.dtype == torch.bfloat16
    ref = _autograd(qkv, go, 6, torch.float64)
    same = _autograd(qkv, go, 6, torch.bfloat16)
    assert_close_to_reference(grad, ref, same, atol=1e-3, what="autocast backward")


@pytest.mark.cuda
def test_cuda_fp32_with_tf32():
    """TF32 switch on: fp32 dots run in 3xTF32 (kernels/policy.py; the budget is TF32's, ~1e-3
    relative); grads here reach ~10, 5e-2 absolute."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert dot_precision(torch.float32) == "tf32x3"
        qkv, go = _qkv(256, 16, 6, 64, torch.float32, "cuda"), _grad_out(256, 16, 384, torch.float32, "cuda")
        grad = wa.window_attention_backward(qkv, go, 6)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert_close_to_reference(grad, _autograd(qkv, go, 6, torch.float64), atol=5e-2, what="tf32 backward")


@pytest.mark.cuda
def test_cuda_reasons():
    """On CUDA the supported calls have no reasons; the spilling tile and T > 64 have one."""
    def args(N, T, heads, hd, dtype):
        return _qkv(N, T, heads, hd, dtype, "cuda"), _grad_out(N, T, heads * hd, dtype, "cuda"), heads

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert wa.window_attention_backward_not_supported_reasons(*args(8, 4, 6, 64, dtype)) == []
        assert wa.window_attention_backward_not_supported_reasons(*args(8, 64, 2, 64, dtype)) == []
    assert wa.window_attention_backward_not_supported_reasons(*args(8, 64, 2, 128, torch.bfloat16)) == []
    assert any("spill" in r for r in wa.window_attention_backward_not_supported_reasons(*args(8, 64, 2, 128, torch.float32)))
    assert any("<= 64 tokens" in r for r in wa.window_attention_backward_not_supported_reasons(*args(2, 80, 2, 64, torch.bfloat16)))
