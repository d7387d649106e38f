"""kernels/modulated_linear.py against the reference op `modulated_linear` (comparison rule and
inputs: tests/kernel_cases.py).

Without a GPU the kernels run under Triton's interpreter (fixed 16x32x16 tiles, fp32/fp16 only):
shapes are tiny but cover tiles inside one image (rows per image a multiple of BLOCK_M), tiles
straddling images, K and N not multiples of the block, strided and non-contiguous inputs, both
paths (the fused GEMM and LN-modulate + matmul). The `cuda` tests run real sizes (D = 384 / 1152,
N = 3D / 4D), bf16/fp16/fp32, the autotuned path and every config explicitly, autocast and TF32.
"""

from __future__ import annotations

import pytest
import torch
import triton

import fastlego
from fastlego import dispatch
from fastlego import reference as R
from fastlego.kernels import gemm, rows
from fastlego.kernels import modulated_linear as ML
from fastlego.kernels.policy import dot_precision
from fastlego.testing import assert_close_to_reference
from kernel_cases import (CPU_DTYPES, CPU_LAYOUTS, CUDA_DTYPES, CUDA_LAYOUTS, adaln_chunks, check_modulated, config_case,
                          f64, forced_reasons, gen, modulated_inputs)

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter


def check(h, shift, scale, w, b, act, launcher=ML._modulated_linear, **kw):
    check_modulated(h, shift, scale, w, b, act, launcher, **kw)


# --------------------------------------------------------------------------------------------
# Interpreter (CPU) tests
# --------------------------------------------------------------------------------------------

# the row statistics inside the GEMM (the default for small h) or in their own kernel
STATS = pytest.mark.parametrize("stats_in_gemm", [True, False], ids=["stats_in_gemm", "stats_kernel"])


@STATS
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
@pytest.mark.parametrize("layout", list(CPU_LAYOUTS))
def test_modulated_linear_interpreter(dtype, act, layout, stats_in_gemm):
    B, L, T = CPU_LAYOUTS[layout]
    check(*modulated_inputs(B, L, T, 32, 48, dtype), act, stats_in_gemm=stats_in_gemm)


def test_small_h_has_its_statistics_in_the_gemm(monkeypatch):
    """Path (a) launches no statistics kernel for h up to STATS_IN_GEMM_MAX_BYTES, one above it;
    both give the reference's values."""
    launched = []
    real = ML._row_stats
    monkeypatch.setattr(ML, "_row_stats", lambda x2d: launched.append(x2d.shape) or real(x2d))
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    assert ML.stats_in_kernel(h)
    check(h, shift, scale, w, b, "gelu_tanh")
    assert launched == []
    monkeypatch.setattr(ML, "STATS_IN_GEMM_MAX_BYTES", h.numel() * h.element_size() - 1)
    assert not ML.stats_in_kernel(h)
    check(h, shift, scale, w, b, "gelu_tanh")
    assert launched == [(40, 32)]
    # a tuned config's STATS_IN_KERNEL overrides the size rule, both ways
    for inline in (1, 0):
        launched.clear()
        config = triton.Config({**gemm.INTERPRETER_CONFIG, "STATS_IN_KERNEL": inline}, num_warps=4, num_stages=1)
        assert ML.stats_in_kernel(h, config) == bool(inline)
        check(h, shift, scale, w, b, "gelu_tanh", config=config)
        assert launched == ([] if inline else [(40, 32)])


def test_tune_times_both_ways_for_small_h(monkeypatch):
    """`fastlego.tune`'s candidates for path (a): every tile config, and for h up to
    STATS_IN_GEMM_TUNE_BYTES each also with the statistics inside the GEMM."""
    tiles = [gemm.GEMM_CONFIGS[0], gemm.GEMM_CONFIGS[1]]
    monkeypatch.setattr(ML, "tuning_configs", lambda x, w: list(tiles))
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    both = ML._tuning_candidates((h, shift, scale, w, b, None))
    assert [c.kwargs.get("STATS_IN_KERNEL") for c in both] == [0, 1, 0, 1]
    assert all({k: v for k, v in c.kwargs.items() if k != "STATS_IN_KERNEL"} == tiles[i // 2].kwargs
               and c.num_warps == tiles[i // 2].num_warps for i, c in enumerate(both))
    monkeypatch.setattr(ML, "STATS_IN_GEMM_TUNE_BYTES", h.numel() * h.element_size() - 1)
    assert ML._tuning_candidates((h, shift, scale, w, b, None)) == tiles


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_modulated_linear_uneven_k_and_n(dtype):
    # K = 40 is not a multiple of BLOCK_K = 16 (masked K loop), N = 40 not of BLOCK_N = 32
    for stats_in_gemm in (True, False):
        check(*modulated_inputs(3, 2, 7, 40, 40, dtype, seed=1), "gelu_tanh", stats_in_gemm=stats_in_gemm)


def test_no_bias():
    h, shift, scale, w, _ = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    check(h, shift, scale, w, None, "gelu_tanh")


def test_non_contiguous_inputs():
    g = gen(3)
    B, L, T, D = 2, 3, 8, 32
    # h with padded rows (a view: row stride 40) and h as a transposed view (needs a copy)
    padded = torch.randn(B * L, T, D + 8, generator=g)[..., :D] + 0.5
    transposed = (torch.randn(B * L, D, T, generator=g) + 0.5).transpose(1, 2)
    _, shift, scale, w, b = modulated_inputs(B, L, T, D, 48, torch.float32, seed=4)
    w_t = w.t().contiguous().t()                       # weight with strides (1, N_out)
    for h in (padded, transposed):
        check(h, shift, scale, w_t, b, None)


def test_cublas_path_interpreter():
    """Path (b): LN-modulate kernel + torch matmul (on the CPU here)."""
    for dtype in CPU_DTYPES:
        for act in (None, "gelu_tanh"):
            check(*modulated_inputs(2, 5, 4, 40, 48, dtype, seed=5), act, launcher=ML.modulated_linear_cublas)


@STATS
def test_ln_statistics_survive_a_large_mean(stats_in_gemm):
    # rows with mean 1000 and std 1: the one-pass sum-of-squares variance would lose every digit
    # (inside the GEMM the statistics merge BLOCK_K = 16 chunks: 16, 16 and 8 columns)
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 40, 24, torch.float32, seed=6)
    check(h - 0.7 + 1000.0, shift, scale, w, b, None, stats_in_gemm=stats_in_gemm)
    h = h + torch.linspace(-3, 3, 40)          # chunk means differ from the row mean
    check(h - 0.7 + 1000.0, shift, scale, w, b, None, stats_in_gemm=stats_in_gemm)


@pytest.mark.parametrize("launcher", [ML.modulated_linear, ML.modulated_linear_cublas], ids=["a", "b"])
def test_ln_statistics_over_several_chunks(monkeypatch, launcher):
    # 16-column chunks: K = 40 is merged from chunks of 16, 16 and 8 (Chan's formula), in the
    # statistics kernel of path (a) (small h: statistics forced out of the GEMM) and in path (b)
    monkeypatch.setattr(rows, "STATS_MAX_BLOCK_K", 16)
    monkeypatch.setattr(ML, "STATS_IN_GEMM_MAX_BYTES", 0)
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 40, 24, torch.float32, seed=7)
    h = h + torch.linspace(-3, 3, 40)          # chunk means differ from the row mean
    check(h, shift, scale, w, b, None, launcher=launcher)
    check(h - 0.7 + 1000.0, shift, scale, w, b, None, launcher=launcher)


def test_empty_rows():
    h, shift, scale, w, b = modulated_inputs(2, 0, 4, 32, 48, torch.float32)
    assert ML.modulated_linear(h, shift, scale, w, b).shape == (0, 4, 48)


def test_dispatcher_runs_the_kernel():
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    with fastlego.use_backend("triton"), dispatch.record() as rec:
        y = fastlego.ops.modulated_linear(h, shift, scale, w, b, "gelu_tanh")
    assert [d.chosen for d in rec] == ["triton"]
    ref = R.modulated_linear(*f64([h, shift, scale, w, b]), "gelu_tanh")
    assert_close_to_reference(y, ref, R.modulated_linear(h, shift, scale, w, b, "gelu_tanh"), atol=1e-5)


def test_plan_runs_calls_like_the_checked_one(monkeypatch):
    """The dispatcher's plan: checked once, it runs later calls of the same signature (new
    values) exactly as the launcher does, follows the tuning table at each call, and raises on
    a call it cannot take when it is made."""
    from fastlego import tuning
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    run = ML.modulated_linear_plan(h, shift, scale, w, b, "gelu_tanh")
    h2, shift2, scale2, w2, b2 = modulated_inputs(2, 5, 4, 32, 48, torch.float32, seed=7)
    got = run(h2, shift2, scale2, w2, b2, "gelu_tanh")
    ref = R.modulated_linear(*f64([h2, shift2, scale2, w2, b2]), "gelu_tanh")
    assert_close_to_reference(got, ref, R.modulated_linear(h2, shift2, scale2, w2, b2, "gelu_tanh"), atol=1e-5)
    assert torch.equal(got, ML.modulated_linear(h2, shift2, scale2, w2, b2, "gelu_tanh"))
    paths = []
    monkeypatch.setattr(ML, "_fused_path", lambda *a: paths.append("fused"))
    monkeypatch.setattr(ML, "_cublas_path", lambda *a: paths.append("cublas"))
    key = gemm.shape_key("modulated_linear", h, w, shift, "gelu_tanh")
    run(h2, shift2, scale2, w2, b2, "gelu_tanh")
    tuning.install({key: tuning.Choice("cublas")})
    try:
        run(h2, shift2, scale2, w2, b2, "gelu_tanh")
    finally:
        tuning.clear()
    assert paths == ["fused", "cublas"]     # under the interpreter the fixed rule is the fused path
    with pytest.raises(ValueError, match="mixed dtypes"):
        ML.modulated_linear_plan(h, shift.half(), scale, w, b)


def test_reasons():
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    # the interpreter serves CPU tensors only when the triton backend is forced
    assert any("interpreter" in r for r in ML.modulated_linear_not_supported_reasons(h, shift, scale, w, b))
    ml = "modulated_linear"
    assert forced_reasons(ml, h, shift, scale, w, b, "gelu_tanh") == ""
    assert forced_reasons(ml, h, shift[:1], scale[:1], w, b, None) == ""    # one image: any row count
    assert "unknown activation 'relu'" in forced_reasons(ml, h, shift, scale, w, b, "relu")
    assert "shift must be a per-image (B, 32)" in forced_reasons(ml, h, shift[:, :16], scale, w, b, None)
    three = shift[:1].expand(3, -1)
    assert "not a multiple of the 3 images" in forced_reasons(ml, h[:7], three, three, w, b, None)
    assert "expected weight (N_out, 32)" in forced_reasons(ml, h, shift, scale, w[:, :16], b, None)
    assert "bias must be (48,)" in forced_reasons(ml, h, shift, scale, w, b[:5], None)
    assert "mixed dtypes" in forced_reasons(ml, h.half(), shift, scale, w, b, None)
    assert "float64 not supported" in forced_reasons(ml, *[t.double() for t in (h, shift, scale, w, b)], None)
    wr = w.clone().requires_grad_()
    assert "forward-only" in forced_reasons(ml, h, shift, scale, wr, b, None)
    with torch.no_grad():
        assert forced_reasons(ml, h, shift, scale, wr, b, None) == ""


def test_bad_calls_raise_before_compute():
    h, shift, scale, w, b = modulated_inputs(2, 5, 4, 32, 48, torch.float32)
    with pytest.raises(ValueError, match=r"scale must be a per-image \(B, 32\)"):
        ML.modulated_linear(h, shift, scale[:, :8], w, b)
    with pytest.raises(ValueError, match="mixed dtypes"):
        ML.modulated_linear(h, shift.half(), scale, w, b)
    with pytest.raises(ValueError, match="forward-only"):
        ML.modulated_linear(h, shift, scale, w.clone().requires_grad_(), b)
    with pytest.raises(ValueError, match=r"expected \(10, 4, 48\) torch.float32"):
        ML.modulated_linear(h, shift, scale, w, b, out=torch.empty(10, 4, 47))
    storage = torch.empty(64 + 10 * 4 * 48)
    h_in = storage[:10 * 4 * 32].view(10, 4, 32).copy_(h)       # out's memory starts inside h's
    with pytest.raises(ValueError, match="out overlaps an input"):
        ML.modulated_linear(h_in, shift, scale, w, b, out=storage[64:].view(10, 4, 48))
    with pytest.raises(ValueError, match="viewable"):
        ML.modulated_linear(h, shift, scale, w, b, out=torch.empty(48, 4, 10).permute(2, 1, 0))


# --------------------------------------------------------------------------------------------
# CUDA tests (real sizes, every dtype, the autotuned path)
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("D", [384, 1152])
@pytest.mark.parametrize("act", [None, "gelu_tanh"], ids=["qkv", "fc1"])
@pytest.mark.parametrize("layout", list(CUDA_LAYOUTS))
def test_modulated_linear_cuda(dtype, D, act, layout):
    B, L, T = CUDA_LAYOUTS[layout]
    n_out = 3 * D if act is None else 4 * D
    check(*modulated_inputs(B, L, T, D, n_out, dtype, "cuda"), act)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, stats_in_gemm", [(dt, True) for dt in CUDA_DTYPES] + [(torch.bfloat16, False)],
                         ids=[f"{dt}-stats_in_gemm" for dt in CUDA_DTYPES] + ["torch.bfloat16-stats_kernel"])
@pytest.mark.parametrize("layout", ["aligned", "straddle"])
@pytest.mark.parametrize("index", range(len(gemm.GEMM_CONFIGS)))
def test_every_config_cuda(dtype, stats_in_gemm, layout, index):
    """Each autotune config explicitly (autotuning alone would only ever run the fastest), with the
    row statistics inside the GEMM (every dtype: its registers differ per config) and in their own
    kernel (bf16)."""
    from triton.runtime.errors import OutOfResources

    config, (B, L, T) = config_case(index, dtype, layout)
    try:
        check(*modulated_inputs(B, L, T, 384, 1152 + 64, dtype, "cuda", seed=index), "gelu_tanh", config=config,
              stats_in_gemm=stats_in_gemm)
    except OutOfResources as exc:   # the autotuner skips such configs the same way
        assert layout == "straddle", exc     # only the gathered shift/scale tiles may overflow
        pytest.skip(f"modulated_linear: shared memory: {exc}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_uneven_k_cuda(dtype):
    """K not a multiple of BLOCK_K (the masked K loop), N not a multiple of BLOCK_N."""
    check(*modulated_inputs(3, 21, 4, 392, 1000, dtype, "cuda"), "gelu_tanh", config=gemm.GEMM_CONFIGS[5])
    check(*modulated_inputs(2, 1, 512, 392, 1000, dtype, "cuda"), None)     # autotuned


@pytest.mark.cuda
def test_real_size_cuda():
    """lego_S_PG_64's first brick at B = 256: M = 262,144 rows, fc1."""
    check(*modulated_inputs(256, 256, 4, 384, 1536, torch.bfloat16, "cuda"), "gelu_tanh")


@pytest.mark.cuda
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_autocast_cuda(act):
    """fp32 tokens and weights, bf16 adaLN chunks (autocast's Linear output), under bf16 autocast:
    the dtype the reference returns, the error of the reference under autocast as the bound."""
    h, _, _, w, b = modulated_inputs(3, 5, 4, 384, 1536, torch.float32, "cuda")
    shift, scale = adaln_chunks(3, 384, torch.bfloat16, "cuda", gen(1))[:2]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        same = R.modulated_linear(h, shift, scale, w, b, act)
        got = ML.modulated_linear(h, shift, scale, w, b, act)
        with fastlego.use_backend("triton"):
            got_d = fastlego.ops.modulated_linear(h, shift, scale, w, b, act)
    assert got.dtype == same.dtype == got_d.dtype == torch.bfloat16
    ref = R.modulated_linear(*f64([h, shift, scale, w, b]), act)
    assert_close_to_reference(got, ref, same, atol=1e-3 * ref.abs().max().item())
    assert_close_to_reference(got_d, ref, same, atol=1e-3 * ref.abs().max().item())


@pytest.mark.cuda
def test_tf32_follows_torch_cuda():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert dot_precision(torch.float32) == "tf32x3"
        check(*modulated_inputs(3, 5, 4, 384, 1152, torch.float32, "cuda"), None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert dot_precision(torch.float32) == ("tf32x3" if saved else "ieee")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu_tanh"])
def test_cublas_path_cuda(dtype, act):
    check(*modulated_inputs(3, 16, 4, 384, 1536, dtype, "cuda"), act, launcher=ML.modulated_linear_cublas)


@pytest.mark.cuda
def test_dispatcher_auto_picks_triton_cuda():
    h, shift, scale, w, b = modulated_inputs(3, 5, 4, 384, 1152, torch.bfloat16, "cuda")
    with fastlego.use_backend("auto"), torch.no_grad(), dispatch.record() as rec:
        fastlego.ops.modulated_linear(h, shift, scale, w, b)
    assert [d.chosen for d in rec] == ["triton"], [d.refused for d in rec]
