"""kernels/linear_gated_residual.py against the reference op `linear_gated_residual` (comparison
rule and inputs: tests/kernel_cases.py).

Without a GPU the kernels run under Triton's interpreter (fixed 16x32x16 tiles, fp32/fp16 only):
tiles inside one image and straddling images, K and N not multiples of the block, strided and
non-contiguous inputs, both paths (the fused GEMM and matmul + one elementwise pass). The `cuda`
tests run real sizes (the projection's K = D and fc2's K = 4D, D = 384 / 1152), bf16/fp16/fp32,
the autotuned path and every config explicitly, autocast and TF32.
"""

from __future__ import annotations

import pytest
import torch

import fastlego
from fastlego import dispatch
from fastlego import reference as R
from fastlego.kernels import gemm
from fastlego.kernels import linear_gated_residual as LGR
from fastlego.kernels.policy import dot_precision
from fastlego.testing import assert_close_to_reference
from kernel_cases import (CPU_DTYPES, CPU_LAYOUTS, CUDA_DTYPES, CUDA_LAYOUTS, adaln_chunks, check_gated, config_case, f64,
                          forced_reasons, gated_inputs, gen, linear_weights)

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter


def check(a, w, b, gate, residual, launcher=LGR._linear_gated_residual, **kw):
    check_gated(a, w, b, gate, residual, launcher, **kw)


# --------------------------------------------------------------------------------------------
# Interpreter (CPU) tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(CPU_LAYOUTS))
@pytest.mark.parametrize("K,N", [(32, 48), (64, 16), (40, 24)], ids=["proj", "fc2", "uneven"])
def test_linear_gated_residual_interpreter(dtype, layout, K, N):
    B, L, T = CPU_LAYOUTS[layout]
    check(*gated_inputs(B, L, T, K, N, dtype))


def test_no_bias():
    a, w, _, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    check(a, w, None, gate, residual)


def test_non_contiguous_inputs():
    g = gen(3)
    B, L, T = 2, 3, 8
    a = torch.randn(B * L, T, 40, generator=g)[..., 4:36]    # K = 32, row stride 40
    residual = torch.randn(B * L, 48, T, generator=g).transpose(1, 2)
    gate = torch.randn(48, B, generator=g).t()               # strides (1, B)
    wg, bg = linear_weights(48, 32, torch.float32, "cpu", g)
    check(a, wg, bg, gate, residual)


def test_cublas_path_interpreter():
    """Path (b): torch matmul + one elementwise pass (on the CPU here)."""
    check(*gated_inputs(2, 5, 4, 32, 48, torch.float32), launcher=LGR.linear_gated_residual_cublas)


def test_empty_rows():
    a, w, b, gate, residual = gated_inputs(2, 0, 4, 32, 48, torch.float32)
    assert LGR.linear_gated_residual(a, w, b, gate, residual).shape == (0, 4, 48)


def test_dispatcher_runs_the_kernel():
    a, wg, bg, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    with fastlego.use_backend("triton"), dispatch.record() as rec:
        z = fastlego.ops.linear_gated_residual(a, wg, bg, gate, residual)
    assert [d.chosen for d in rec] == ["triton"]
    ref = R.linear_gated_residual(*f64([a, wg, bg, gate, residual]))
    assert_close_to_reference(z, ref, R.linear_gated_residual(a, wg, bg, gate, residual), atol=1e-5)


def test_plan_runs_calls_like_the_checked_one(monkeypatch):
    """The dispatcher's plan: checked once, it runs later calls of the same signature (new
    values) exactly as the launcher does, follows the tuning table at each call, and raises on
    a call it cannot take when it is made."""
    from fastlego import tuning
    a, wg, bg, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    run = LGR.linear_gated_residual_plan(a, wg, bg, gate, residual)
    args = gated_inputs(2, 5, 4, 32, 48, torch.float32, seed=7)
    got = run(*args)
    ref = R.linear_gated_residual(*f64(list(args)))
    assert_close_to_reference(got, ref, R.linear_gated_residual(*args), atol=1e-5)
    assert torch.equal(got, LGR.linear_gated_residual(*args))
    paths = []
    monkeypatch.setattr(LGR, "_fused_path", lambda *a: paths.append("fused"))
    monkeypatch.setattr(LGR, "_cublas_path", lambda *a: paths.append("cublas"))
    run(*args)
    tuning.install({LGR._shape_key(a, wg, gate, residual): tuning.Choice("cublas")})
    try:
        run(*args)
    finally:
        tuning.clear()
    assert paths == ["fused", "cublas"]     # under the interpreter the fixed rule is the fused path
    with pytest.raises(ValueError, match="mixed dtypes"):
        LGR.linear_gated_residual_plan(a, wg, bg, gate.half(), residual)


def test_reasons():
    a, wg, bg, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    # the interpreter serves CPU tensors only when the triton backend is forced
    assert any("interpreter" in r for r in LGR.linear_gated_residual_not_supported_reasons(a, wg, bg, gate, residual))
    lgr = "linear_gated_residual"
    assert forced_reasons(lgr, a, wg, bg, gate, residual) == ""
    assert "float64 not supported" in forced_reasons(lgr, *[t.double() for t in (a, wg, bg, gate, residual)])
    assert "residual must have the output's shape" in forced_reasons(lgr, a, wg, bg, gate, residual[..., :16])
    assert "gate must be a per-image (B, 48)" in forced_reasons(lgr, a, wg, bg, gate[:, :3], residual)
    assert "not a multiple of the 3 images" in forced_reasons(lgr, a, wg, bg, gate[:1].expand(3, -1), residual)
    assert "mixed dtypes" in forced_reasons(lgr, a.half(), wg, bg, gate, residual)


def test_bad_calls_raise_before_compute():
    a, wg, bg, gate, residual = gated_inputs(2, 5, 4, 32, 48, torch.float32)
    with pytest.raises(ValueError, match="forward-only"):
        LGR.linear_gated_residual(a, wg.clone().requires_grad_(), bg, gate, residual)
    with pytest.raises(ValueError, match="out overlaps an input"):
        LGR.linear_gated_residual(a, wg, bg, gate, residual, out=residual)
    with pytest.raises(ValueError, match=r"expected \(10, 4, 48\) torch.float32"):
        LGR.linear_gated_residual(a, wg, bg, gate, residual, out=torch.empty(10, 4, 48, dtype=torch.float16))
    with pytest.raises(ValueError, match="out overlaps an input"):   # path (b) checks out= alike
        LGR.linear_gated_residual_cublas(a, wg, bg, gate, residual, out=residual)


# --------------------------------------------------------------------------------------------
# CUDA tests (real sizes, every dtype, the autotuned path)
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("D", [384, 1152])
@pytest.mark.parametrize("which", ["proj", "fc2"])
@pytest.mark.parametrize("layout", list(CUDA_LAYOUTS))
def test_linear_gated_residual_cuda(dtype, D, which, layout):
    B, L, T = CUDA_LAYOUTS[layout]
    K = D if which == "proj" else 4 * D
    check(*gated_inputs(B, L, T, K, D, dtype, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["aligned", "straddle"])
@pytest.mark.parametrize("index", range(len(gemm.GEMM_CONFIGS)))
def test_every_config_cuda(dtype, layout, index):
    """Each autotune config explicitly (autotuning alone would only ever run the fastest)."""
    config, (B, L, T) = config_case(index, dtype, layout)
    check(*gated_inputs(B, L, T, 4 * 384, 384, dtype, "cuda", seed=index), config=config)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_uneven_k_cuda(dtype):
    """K not a multiple of BLOCK_K (the masked K loop), N not a multiple of BLOCK_N."""
    check(*gated_inputs(3, 21, 4, 1544, 392, dtype, "cuda"), config=gemm.GEMM_CONFIGS[5])


@pytest.mark.cuda
def test_real_size_cuda():
    """lego_S_PG_64's first brick at B = 256: M = 262,144 rows, fc2."""
    check(*gated_inputs(256, 256, 4, 1536, 384, torch.bfloat16, "cuda"))


@pytest.mark.cuda
def test_autocast_cuda():
    """fp32 activations, weights and residual, a bf16 gate (autocast's Linear output), under bf16
    autocast: the fp32 residual promotes the output to fp32, as in the reference."""
    a, wg, bg, _, residual = gated_inputs(3, 5, 4, 384, 384, torch.float32, "cuda")
    gate = adaln_chunks(3, 384, torch.bfloat16, "cuda", gen(2))[2]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        same = R.linear_gated_residual(a, wg, bg, gate, residual)
        got = LGR.linear_gated_residual(a, wg, bg, gate, residual)
    assert got.dtype == same.dtype == torch.float32
    ref = R.linear_gated_residual(*f64([a, wg, bg, gate, residual]))
    assert_close_to_reference(got, ref, same, atol=1e-3 * ref.abs().max().item())


@pytest.mark.cuda
def test_tf32_follows_torch_cuda():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert dot_precision(torch.float32) == "tf32x3"
        check(*gated_inputs(3, 5, 4, 1536, 384, torch.float32, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cublas_path_cuda(dtype):
    check(*gated_inputs(3, 16, 4, 1536, 384, dtype, "cuda"), launcher=LGR.linear_gated_residual_cublas)


@pytest.mark.cuda
def test_dispatcher_auto_picks_triton_cuda():
    a, wg, bg, gate, residual = gated_inputs(3, 5, 4, 384, 384, torch.bfloat16, "cuda")
    with fastlego.use_backend("auto"), torch.no_grad(), dispatch.record() as rec:
        fastlego.ops.linear_gated_residual(a, wg, bg, gate, residual)
    assert [d.chosen for d in rec] == ["triton"], [d.refused for d in rec]
