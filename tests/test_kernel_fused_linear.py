"""kernels/fused_linear.py against the reference ops `modulated_linear` / `linear_gated_residual`.

Rule of every comparison: the kernel's output (written into a NaN-filled `out=`) against the
reference op in float64, with the error bound 2 x (error of the reference op run in the kernel's
dtype) + a small atol. Inputs: h with a non-zero mean (LN must remove it), per-image shift/scale/
gate ~ N(0, 1) taken as chunks of a (B, 6D) adaLN output (strided, never copied), weights
U(+-sqrt(3/K)), biases ~ N(0, 0.1^2), all non-zero.

Without a GPU the kernels run under Triton's interpreter (fixed 16x32x16 tiles, fp32/fp16 only):
shapes are tiny but cover tiles inside one image (rows per image a multiple of BLOCK_M), tiles
straddling images, K and N not multiples of the block, strided and non-contiguous inputs. The
`cuda` tests run real sizes (D = 384 / 1152, N = 3D / 4D, fc2's K = 4D), bf16/fp16/fp32, the
autotuned path and every config explicitly, autocast and TF32.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlego
from fastlego import dispatch
from fastlego import reference as R
from fastlego.kernels import fused_linear as FL
from fastlego.testing import assert_close_to_reference

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

CPU_DTYPES = [torch.float32, torch.float16]
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------
# Inputs and the comparison
# --------------------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear_weights(n_out, k, dtype, device, g):
    w = (torch.rand(n_out, k, generator=g) * 2 - 1) * math.sqrt(3.0 / k)
    b = torch.randn(n_out, generator=g) * 0.1
    return w.to(device, dtype), b.to(device, dtype)


def _adaln_chunks(B, D, dtype, device, g):
    """shift1, scale1, gate1, shift2, scale2, gate2: strided (B, D) views of one (B, 6D) tensor."""
    return (torch.randn(B, 6 * D, generator=g)).to(device, dtype).chunk(6, dim=1)


def modulated_inputs(B, L, T, D, n_out, dtype, device="cpu", seed=0):
    g = _gen(seed)
    h = (torch.randn(B * L, T, D, generator=g) * 1.5 + 0.7).to(device, dtype)
    shift, scale = _adaln_chunks(B, D, dtype, device, g)[:2]
    w, b = _linear_weights(n_out, D, dtype, device, g)
    return h, shift, scale, w, b


def gated_inputs(B, L, T, K, N, dtype, device="cpu", seed=0):
    g = _gen(seed)
    a = torch.randn(B * L, T, K, generator=g).to(device, dtype)
    residual = torch.randn(B * L, T, N, generator=g).to(device, dtype)
    gate = _adaln_chunks(B, N, dtype, device, g)[2]
    w, b = _linear_weights(N, K, dtype, device, g)
    return a, w, b, gate, residual


def _f64(args):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in args]


def _atol(ref, dtype):
    scale = max(1.0, ref.abs().max().item())
    return scale * (1e-5 if dtype == torch.float32 else 1e-3)


def nan_out(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def check_modulated(h, shift, scale, w, b, act, launcher=FL._modulated_linear, **kw):
    out = nan_out(h.shape[:-1] + (w.shape[0],), h.dtype, h.device)
    got = launcher(h, shift, scale, w, b, act, out=out, **kw)
    assert got is out
    ref = R.modulated_linear(*_f64([h, shift, scale, w, b]), act)
    same = R.modulated_linear(h, shift, scale, w, b, act)
    assert_close_to_reference(out, ref, same, atol=_atol(ref, h.dtype), what=f"modulated_linear {h.dtype} {act}")


def check_gated(a, w, b, gate, residual, launcher=FL._linear_gated_residual, **kw):
    out = nan_out(residual.shape, residual.dtype, residual.device)
    got = launcher(a, w, b, gate, residual, out=out, **kw)
    assert got is out
    ref = R.linear_gated_residual(*_f64([a, w, b, gate, residual]))
    same = R.linear_gated_residual(a, w, b, gate, residual)
    assert_close_to_reference(out, ref, same, atol=_atol(ref, a.dtype), what=f"linear_gated_residual {a.dtype}")


# (B, L, T): rows per image L * T vs the interpreter's BLOCK_M = 16
CPU_LAYOUTS = {
    "straddle": (2, 5, 4),     # 20 rows per image: tiles cross images (gathered shift/scale/gate)
    "aligned": (2, 2, 16),     # 32 rows per image: every tile in one image (vector loads)
    "one_image": (1, 1, 40),   # B = 1, M = 40 not a multiple of 16
}


# --------------------------------------------------------------------------------------------
# Interpreter (CPU) tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
@pytest.mark.parametrize("layout", list(CPU_LAYOUTS))
def test_modulated_linear_interpreter(dtype, act, layout):
    B, L, T = CPU_LAYOUTS[layout]
    check_modulated(*modulated_inputs(B, L, T, 32, 48, dtype), act)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_modulated_linear_uneven_k_and_n(dtype):
    # K = 40 is not a multiple of BLOCK_K = 16 (masked K loop), N = 40 not of BLOCK_N = 32
    check_modulated(*modulated_inputs(3, 2, 7, 40, 40, dtype, seed=1), "gelu_tanh")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(CPU_LAYOUTS))
@pytest.mark.parametrize("K,N", [(32, 48), (64, 16), (40, 24)], ids=["proj", "fc2", "uneven"])
def test_linear_gated_residual_interpreter(dtype, layout, K, N):
    B, L, T = CPU_LAYOUTS[layout]
    check_gated(*gated_inputs(B, L, T, K, N, dtype))


def test_no_bias():
    h, shift, scale, w, _ = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    check_modulated(h, shift, scale, w, None, "gelu_tanh")
    a, w, _, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    check_gated(a, w, None, gate, residual)


def test_non_contiguous_inputs():
    g = _gen(3)
    B, L, T, D = 2, 3, 8, 32
    # h with padded rows (a view: row stride 40) and h as a transposed view (needs a copy)
    padded = torch.randn(B * L, T, D + 8, generator=g)[..., :D] + 0.5
    transposed = (torch.randn(B * L, D, T, generator=g) + 0.5).transpose(1, 2)
    _, shift, scale, w, b = modulated_inputs(B, L, T, D, 48, torch.float32, seed=4)
    w_t = w.t().contiguous().t()                       # weight with strides (1, N_out)
    for h in (padded, transposed):
        check_modulated(h, shift, scale, w_t, b, None)
    a = torch.randn(B * L, T, 40, generator=g)[..., 4:36]    # K = 32, row stride 40
    residual = torch.randn(B * L, 48, T, generator=g).transpose(1, 2)
    gate = torch.randn(48, B, generator=g).t()               # strides (1, B)
    wg, bg = _linear_weights(48, 32, torch.float32, "cpu", g)
    check_gated(a, wg, bg, gate, residual)


def test_cublas_path_interpreter():
    """Path (b): LN-modulate kernel + torch matmul (on the CPU here)."""
    for dtype in CPU_DTYPES:
        for act in (None, "gelu_tanh"):
            check_modulated(*modulated_inputs(2, 5, 4, 40, 48, dtype, seed=5), act, launcher=FL.modulated_linear_cublas)
    check_gated(*gated_inputs(2, 5, 4, 32, 48, torch.float32), launcher=FL.linear_gated_residual_cublas)


def test_ln_statistics_survive_a_large_mean():
    # rows with mean 1000 and std 1: the one-pass sum-of-squares variance would lose every digit
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 40, 24, torch.float32, seed=6)
    check_modulated(h - 0.7 + 1000.0, shift, scale, w, b, None)


@pytest.mark.parametrize("launcher", [FL.modulated_linear, FL.modulated_linear_cublas], ids=["a", "b"])
def test_ln_statistics_over_several_chunks(monkeypatch, launcher):
    # 16-column chunks: K = 40 is merged from chunks of 16, 16 and 8 (Chan's formula)
    monkeypatch.setattr(FL, "STATS_MAX_BLOCK_K", 16)
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 40, 24, torch.float32, seed=7)
    h = h + torch.linspace(-3, 3, 40)          # chunk means differ from the row mean
    check_modulated(h, shift, scale, w, b, None, launcher=launcher)
    check_modulated(h - 0.7 + 1000.0, shift, scale, w, b, None, launcher=launcher)


def test_empty_rows():
    h, shift, scale, w, b = modulated_inputs(2, 0, 4, 32, 48, torch.float32)
    assert FL.modulated_linear(h, shift, scale, w, b).shape == (0, 4, 48)
    a, w, b, gate, residual = gated_inputs(2, 0, 4, 32, 48, torch.float32)
    assert FL.linear_gated_residual(a, w, b, gate, residual).shape == (0, 4, 48)


def test_dispatcher_runs_the_kernels():
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    a, wg, bg, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    with fastlego.use_backend("triton"), dispatch.record() as rec:
        y = fastlego.ops.modulated_linear(h, shift, scale, w, b, "gelu_tanh")
        z = fastlego.ops.linear_gated_residual(a, wg, bg, gate, residual)
    assert [d.chosen for d in rec] == ["triton", "triton"]
    ref = R.modulated_linear(*_f64([h, shift, scale, w, b]), "gelu_tanh")
    assert_close_to_reference(y, ref, R.modulated_linear(h, shift, scale, w, b, "gelu_tanh"), atol=1e-5)
    ref = R.linear_gated_residual(*_f64([a, wg, bg, gate, residual]))
    assert_close_to_reference(z, ref, R.linear_gated_residual(a, wg, bg, gate, residual), atol=1e-5)


def _forced_reasons(op, *args):
    """The reasons the forced triton backend gives (empty: it takes the call)."""
    with fastlego.use_backend("triton"):
        try:
            dispatch.choose(op, *args)
        except fastlego.BackendNotSupported as exc:
            return str(exc)
    return ""


def test_reasons():
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    a, wg, bg, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    # the interpreter serves CPU tensors only when the triton backend is forced
    assert any("interpreter" in r for r in FL.modulated_linear_not_supported_reasons(h, shift, scale, w, b))
    assert any("interpreter" in r for r in FL.linear_gated_residual_not_supported_reasons(a, wg, bg, gate, residual))
    ml, lgr = "modulated_linear", "linear_gated_residual"
    assert _forced_reasons(ml, h, shift, scale, w, b, "gelu_tanh") == ""
    assert _forced_reasons(lgr, a, wg, bg, gate, residual) == ""
    assert _forced_reasons(ml, h, shift[:1], scale[:1], w, b, None) == ""    # one image: any row count
    assert "unknown activation 'relu'" in _forced_reasons(ml, h, shift, scale, w, b, "relu")
    assert "shift must be a per-image (B, 32)" in _forced_reasons(ml, h, shift[:, :16], scale, w, b, None)
    three = shift[:1].expand(3, -1)
    assert "not a multiple of the 3 images" in _forced_reasons(ml, h[:7], three, three, w, b, None)
    assert "expected weight (N_out, 32)" in _forced_reasons(ml, h, shift, scale, w[:, :16], b, None)
    assert "bias must be (48,)" in _forced_reasons(ml, h, shift, scale, w, b[:5], None)
    assert "mixed dtypes" in _forced_reasons(ml, h.half(), shift, scale, w, b, None)
    assert "float64 not supported" in _forced_reasons(lgr, *[t.double() for t in (a, wg, bg, gate, residual)])
    assert "residual must have the output's shape" in _forced_reasons(lgr, a, wg, bg, gate, residual[..., :16])
    assert "gate must be a per-image (B, 48)" in _forced_reasons(lgr, a, wg, bg, gate[:, :3], residual)
    wr = w.clone().requires_grad_()
    assert "forward-only" in _forced_reasons(ml, h, shift, scale, wr, b, None)
    with torch.no_grad():
        assert _forced_reasons(ml, h, shift, scale, wr, b, None) == ""


def test_bad_calls_raise_before_compute():
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    a, wg, bg, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    with pytest.raises(ValueError, match=r"scale must be a per-image \(B, 32\)"):
        FL.modulated_linear(h, shift, scale[:, :8], w, b)
    with pytest.raises(ValueError, match="mixed dtypes"):
        FL.modulated_linear(h, shift.half(), scale, w, b)
    with pytest.raises(ValueError, match="forward-only"):
        FL.linear_gated_residual(a, wg.clone().requires_grad_(), bg, gate, residual)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(10, 4, 48\)"):
        FL.modulated_linear(h, shift, scale, w, b, out=torch.empty(10, 4, 47))
    with pytest.raises(ValueError, match="out overlaps an input"):
        FL.linear_gated_residual(a, wg, bg, gate, residual, out=residual)
    with pytest.raises(ValueError, match="viewable"):
        FL.modulated_linear(h, shift, scale, w, b, out=torch.empty(48, 4, 10).permute(2, 1, 0))


# --------------------------------------------------------------------------------------------
# CUDA tests (real sizes, every dtype, the autotuned path)
# --------------------------------------------------------------------------------------------

# (B, L, T): rows per image 300 / 20 / 256 / 64; M = 300 / 60 / 768 / 192
CUDA_LAYOUTS = {"B1_T300": (1, 1, 300), "B3_L5_T4": (3, 5, 4), "B3_T256": (3, 1, 256), "B3_L16_T4": (3, 16, 4)}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("D", [384, 1152])
@pytest.mark.parametrize("act", [None, "gelu_tanh"], ids=["qkv", "fc1"])
@pytest.mark.parametrize("layout", list(CUDA_LAYOUTS))
def test_modulated_linear_cuda(dtype, D, act, layout):
    B, L, T = CUDA_LAYOUTS[layout]
    n_out = 3 * D if act is None else 4 * D
    check_modulated(*modulated_inputs(B, L, T, D, n_out, dtype, "cuda"), act)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("D", [384, 1152])
@pytest.mark.parametrize("which", ["proj", "fc2"])
@pytest.mark.parametrize("layout", list(CUDA_LAYOUTS))
def test_linear_gated_residual_cuda(dtype, D, which, layout):
    B, L, T = CUDA_LAYOUTS[layout]
    K = D if which == "proj" else 4 * D
    check_gated(*gated_inputs(B, L, T, K, D, dtype, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["aligned", "straddle"])
@pytest.mark.parametrize("index", range(len(FL.GEMM_CONFIGS)))
def test_every_config_cuda(dtype, layout, index):
    """Each autotune config explicitly (autotuning alone would only ever run the fastest)."""
    from triton.runtime.errors import OutOfResources

    config = FL.GEMM_CONFIGS[index]
    if not FL.config_fits(config, dtype.itemsize, dtype.itemsize):
        pytest.skip("config pruned for this dtype (shared memory)")
    B, L, T = (2, 1, 512) if layout == "aligned" else (3, 21, 4)   # 512 or 84 rows per image
    check_gated(*gated_inputs(B, L, T, 4 * 384, 384, dtype, "cuda", seed=index),
                launcher=FL._linear_gated_residual, config=config)
    try:
        check_modulated(*modulated_inputs(B, L, T, 384, 1152 + 64, dtype, "cuda", seed=index), "gelu_tanh",
                        launcher=FL._modulated_linear, config=config)
    except OutOfResources as exc:   # the autotuner skips such configs the same way
        assert layout == "straddle", exc     # only the gathered shift/scale tiles may overflow
        pytest.skip(f"modulated_linear: shared memory: {exc}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_uneven_k_cuda(dtype):
    """K not a multiple of BLOCK_K (the masked K loop), N not a multiple of BLOCK_N."""
    config = FL.GEMM_CONFIGS[5]
    check_modulated(*modulated_inputs(3, 21, 4, 392, 1000, dtype, "cuda"), "gelu_tanh",
                    launcher=FL._modulated_linear, config=config)
    check_gated(*gated_inputs(3, 21, 4, 1544, 392, dtype, "cuda"), launcher=FL._linear_gated_residual, config=config)
    check_modulated(*modulated_inputs(2, 1, 512, 392, 1000, dtype, "cuda"), None)     # autotuned


@pytest.mark.cuda
def test_real_size_cuda():
    """lego_S_PG_64's first brick at B = 256: M = 262,144 rows, fc1 and fc2."""
    check_modulated(*modulated_inputs(256, 256, 4, 384, 1536, torch.bfloat16, "cuda"), "gelu_tanh")
    check_gated(*gated_inputs(256, 256, 4, 1536, 384, torch.bfloat16, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_autocast_cuda(act):
    """fp32 tokens and weights, bf16 adaLN chunks (autocast's Linear output), under bf16 autocast:
    the dtype the reference returns, the error of the reference under autocast as the bound."""
    h, _, _, w, b = modulated_inputs(3, 5, 4, 384, 1536, torch.float32, "cuda")
    shift, scale = _adaln_chunks(3, 384, torch.bfloat16, "cuda", _gen(1))[:2]
    a, wg, bg, _, residual = gated_inputs(3, 5, 4, 384, 384, torch.float32, "cuda")
    gate = _adaln_chunks(3, 384, torch.bfloat16, "cuda", _gen(2))[2]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        same = R.modulated_linear(h, shift, scale, w, b, act)
        got = FL.modulated_linear(h, shift, scale, w, b, act)
        same_g = R.linear_gated_residual(a, wg, bg, gate, residual)
        got_g = FL.linear_gated_residual(a, wg, bg, gate, residual)
        with fastlego.use_backend("triton"):
            got_d = fastlego.ops.modulated_linear(h, shift, scale, w, b, act)
    assert got.dtype == same.dtype == got_d.dtype == torch.bfloat16
    assert got_g.dtype == same_g.dtype == torch.float32      # fp32 residual promotes, as in the reference
    ref = R.modulated_linear(*_f64([h, shift, scale, w, b]), act)
    assert_close_to_reference(got, ref, same, atol=1e-3 * ref.abs().max().item())
    assert_close_to_reference(got_d, ref, same, atol=1e-3 * ref.abs().max().item())
    ref = R.linear_gated_residual(*_f64([a, wg, bg, gate, residual]))
    assert_close_to_reference(got_g, ref, same_g, atol=1e-3 * ref.abs().max().item())


@pytest.mark.cuda
def test_tf32_follows_torch_cuda():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert FL._input_precision(torch.float32) == "tf32x3"
        check_modulated(*modulated_inputs(3, 5, 4, 384, 1152, torch.float32, "cuda"), None)
        check_gated(*gated_inputs(3, 5, 4, 1536, 384, torch.float32, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert FL._input_precision(torch.float32) == ("tf32x3" if saved else "ieee")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_cublas_paths_cuda(dtype, act):
    check_modulated(*modulated_inputs(3, 16, 4, 384, 1536, dtype, "cuda"), act, launcher=FL.modulated_linear_cublas)
    check_gated(*gated_inputs(3, 16, 4, 1536, 384, dtype, "cuda"), launcher=FL.linear_gated_residual_cublas)


@pytest.mark.cuda
def test_dispatcher_auto_picks_triton_cuda():
    h, shift, scale, w, b = modulated_inputs(3, 5, 4, 384, 1152, torch.bfloat16, "cuda")
    a, wg, bg, gate, residual = gated_inputs(3, 5, 4, 384, 384, torch.bfloat16, "cuda")
    with fastlego.use_backend("auto"), torch.no_grad(), dispatch.record() as rec:
        fastlego.ops.modulated_linear(h, shift, scale, w, b)
        fastlego.ops.linear_gated_residual(a, wg, bg, gate, residual)
    assert [d.chosen for d in rec] == ["triton", "triton"], [d.refused for d in rec]
