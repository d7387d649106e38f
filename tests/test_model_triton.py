"""The whole LegoBackbone on the Triton kernels against the reference ops.

Without a GPU this runs through Triton's interpreter on small custom bricks (width 32); on a GPU
(cuda mark) it runs real presets in fp32/bf16/fp16."""

import pytest
import torch

import fastlego
from fastlego.testing import assert_close_to_reference, randomize_

# Triton kernels on CPU tensors, through the interpreter; the `cuda` tests run on the GPU
# (tests/conftest.py says which process runs which)
pytestmark = pytest.mark.interpreter

pytest.importorskip("triton")

KERNEL_OPS = {"brick_embed", "modulated_linear", "window_attention", "global_attention",
              "linear_gated_residual", "final_layer"}


def small_model(label_dim=5):
    # regions 4 / 8 / 32 with patches 2 / 4 / 2: 4, 4 and 256 tokens per region, so both the
    # window (<= 64 tokens) and the global attention paths run.
    m = fastlego.LegoBackbone([4, 8, 32], 3, label_dim=label_dim, model_type=[(32, 2, 2), (32, 4, 2), (32, 2, 2)],
                              depths=[1, 2, 1])
    return randomize_(m, seed=1).eval()


def _inputs(model, B, H, W, dtype, device="cpu", labels=True):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, model.in_channels, H, W, generator=g).to(device, dtype)
    t = torch.randn(B, generator=g).to(device)
    y = None
    if labels and model.label_dim:
        y = torch.nn.functional.one_hot(torch.arange(B) % model.label_dim, model.label_dim).to(device, dtype)
    return x, t, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backbone_triton_matches_reference_interpreter(dtype):
    model = small_model()
    x, t, y = _inputs(model, 2, 32, 64, torch.float32)  # non-square, batch 2
    with torch.no_grad(), fastlego.use_backend("reference"):
        ref32 = model(x, t, y)
    assert ref32.abs().max() > 0.1, "random weights must give a non-trivial output"
    m = model.to(dtype)
    xd, yd = x.to(dtype), y.to(dtype)
    with torch.no_grad():
        with fastlego.use_backend("triton"):
            out = m(xd, t, yd)
        with fastlego.use_backend("reference"):
            ref_same = m(xd, t, yd) if dtype != torch.float32 else None
    assert out.dtype == dtype
    assert_close_to_reference(out.float(), ref32, None if ref_same is None else ref_same.float(),
                              atol=2e-4 if dtype == torch.float32 else 2e-3, what=f"backbone {dtype}")


def test_explain_shows_triton_for_every_kernel_op():
    model = small_model(label_dim=0)
    x, t, _ = _inputs(model, 1, 32, 32, torch.float32, labels=False)
    with fastlego.use_backend("triton"):
        rows = fastlego.explain(model, x, t)
    assert {r.op for r in rows} == KERNEL_OPS
    assert all(r.chosen == "triton" for r in rows), [(r.site, r.op, r.chosen) for r in rows]


def test_cfg_and_skipping_on_triton():
    model = small_model()
    x, t, y = _inputs(model, 1, 32, 32, torch.float32)
    with torch.no_grad():
        with fastlego.use_backend("reference"):
            ref = model.forward_with_cfg(x, t, y, 2.0, return_stage_idx=1)
        with fastlego.use_backend("triton"):
            out = model.forward_with_cfg(x, t, y, 2.0, return_stage_idx=1)
    assert_close_to_reference(out, ref, atol=2e-4, what="cfg + return_stage_idx=1")


# ------------------------------------------------------------------------------------------------
# On a GPU: real presets, bf16/fp16/fp32, auto and forced triton
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("preset,B,C,H,W,label_dim", [
    ("lego_S_PG_64", 3, 3, 64, 64, 0),
    ("lego_S_PR_64", 1, 3, 64, 128, 10),
    ("lego_XL_U_32", 2, 4, 32, 32, 1000),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backbone_triton_matches_reference_cuda(preset, B, C, H, W, label_dim, dtype):
    model = randomize_(fastlego.LegoBackbone.from_preset(preset, in_channels=C, label_dim=label_dim), seed=2)
    model = model.cuda().eval()
    x, t, y = _inputs(model, B, H, W, torch.float32, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad(), fastlego.use_backend("reference"):
        ref32 = model(x, t, y)
        m = model.to(dtype)
        ref_same = m(x.to(dtype), t, None if y is None else y.to(dtype))
    with torch.no_grad(), fastlego.use_backend("triton"):
        out = m(x.to(dtype), t, None if y is None else y.to(dtype))
    # fp32 Triton dots may use TF32: allow the error of a bf16-free TF32 path via atol.
    atol = 5e-3 if dtype == torch.float32 else 1e-2
    assert_close_to_reference(out.float(), ref32, None if dtype == torch.float32 else ref_same.float(),
                              atol=atol, what=f"{preset} {dtype}")


@pytest.mark.cuda
def test_backbone_auto_under_autocast_cuda():
    model = randomize_(fastlego.LegoBackbone.from_preset("lego_S_PG_64", label_dim=0), seed=4).cuda().eval()
    x, t, _ = _inputs(model, 2, 64, 64, torch.float32, "cuda", labels=False)
    with torch.no_grad():
        with fastlego.use_backend("reference"):
            ref32 = model(x, t)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ref_bf16 = model(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t)
            rows = fastlego.explain(model, x, t)
    assert {r.chosen for r in rows if r.op != "global_attention"} == {"triton"}
    assert_close_to_reference(out.float(), ref32, ref_bf16.float(), atol=1e-2, what="auto bf16 autocast")
