"""Every bad input gets a clear error that names the expected value, raised before any compute.

"Before any compute" is proved by counting: a forward pre-hook on every submodule of the model
(bricks, blocks, embedders) and a wrapper around the dispatcher's `call` that every op goes
through; both counters must stay at zero while the error is raised.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import fastlego
from fastlego import EDMPrecond, LegoBackbone


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastlego.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def model():
    """lego_S_PG_64 (regions 4, 16, 64), one block per brick, 3 channels, 10 classes."""
    return LegoBackbone.from_preset("lego_S_PG_64", label_dim=10, depths=[1, 1, 1]).eval()


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return LegoBackbone.from_preset("lego_S_PG_64", label_dim=10, depths=[1, 1, 1]).eval()


@contextlib.contextmanager
def counting_compute(model: torch.nn.Module):
    """counts[0] = module forwards started + ops dispatched inside the block."""
    counts = [0]

    def bump(*args, **kwargs):
        counts[0] += 1

    handles = [m.register_forward_pre_hook(bump) for m in model.modules() if m is not model]
    original_call = fastlego.ops.call

    def counted_call(*args, **kwargs):
        bump()
        return original_call(*args, **kwargs)

    fastlego.ops.call = counted_call
    try:
        yield counts
    finally:
        fastlego.ops.call = original_call
        for h in handles:
            h.remove()


@contextlib.contextmanager
def raises_before_compute(model, exc, match):
    with counting_compute(model) as counts:
        with pytest.raises(exc, match=match):
            yield
    assert counts[0] == 0, f"{counts[0]} modules/ops ran before the error"


def good_inputs(B=1, H=64, W=64):
    return torch.randn(B, 3, H, W), torch.randn(B), torch.nn.functional.one_hot(torch.arange(B) % 10, 10).float()


# ---------------------------------------------------------------------------------------------
# The counter itself
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_the_counter_sees_compute(model):
    x, t, y = good_inputs()
    with counting_compute(model) as counts:
        out = model(x, t, y)
    assert out.shape == x.shape
    # 3 bricks, 3 blocks, the timestep MLP, the label embedder... and 3 + 4 * 3 + 3 dispatched ops
    assert counts[0] > 20
    with counting_compute(model) as counts:
        model.forward_with_cfg(x, t, y, 2.0, return_stage_idx=0)
    assert counts[0] > 5


# ---------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_wrong_channel_count(model):
    x, t, y = good_inputs()
    with raises_before_compute(model, ValueError, r"x has 4 channels but this model was built for in_channels=3"):
        model(torch.randn(1, 4, 64, 64), t, y)
    with raises_before_compute(model, ValueError, r"pass \(B, 3, H, W\) images"):
        model.forward_with_cfg(torch.randn(1, 1, 64, 64), t, y, 1.5)


@torch.no_grad()
@pytest.mark.parametrize("H,W,bad", [(64, 96, r"\[64\]"), (60, 64, r"\[16, 64\]"), (66, 64, r"\[4, 16, 64\]"),
                                     (32, 32, r"\[64\]")])
def test_size_not_a_multiple_of_a_region(model, H, W, bad):
    _, t, y = good_inputs()
    msg = rf"x is {H}x{W} but H and W must be multiples of every brick's region size \[4, 16, 64\] \(not of {bad}\)"
    with raises_before_compute(model, ValueError, msg):
        model(torch.randn(1, 3, H, W), t, y)
    with raises_before_compute(model, ValueError, r"use sizes that are multiples of 64"):
        model.forward_with_cfg(torch.randn(1, 3, H, W), t, y, 2.0)


@torch.no_grad()
def test_x_not_a_4d_float_tensor(model):
    _, t, y = good_inputs()
    with raises_before_compute(model, ValueError, r"x must be a \(B, C, H, W\) tensor, got torch.Size\(\[3, 64, 64\]\)"):
        model(torch.randn(3, 64, 64), t, y)
    with raises_before_compute(model, TypeError, r"x must be a floating-point tensor, got torch.int64"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.long), t, y)


@torch.no_grad()
def test_labels_of_the_wrong_width_or_batch(model):
    x, t, _ = good_inputs(B=3)
    with raises_before_compute(model, ValueError, r"class_labels must have shape \(B, 10\).*got \(3, 9\)"):
        model(x, t, torch.zeros(3, 9))
    with raises_before_compute(model, ValueError, r"class_labels must have shape \(B, 10\).*got \(3, 10, 1\)"):
        model(x, t, torch.zeros(3, 10, 1))
    with raises_before_compute(model, ValueError, r"class_labels has 2 rows but x has batch 3"):
        model(x, t, torch.zeros(2, 10))
    with raises_before_compute(model, ValueError, r"class ids must lie in 0\.\.9"):
        model(x, t, torch.tensor([0, 10, 1]))
    with raises_before_compute(model, ValueError, r"class ids must lie in 0\.\.9"):
        model(x, t, torch.tensor([0, -1, 1]))
    with raises_before_compute(model, ValueError, r"integer class_labels must be class ids of shape \(B,\)"):
        model(x, t, torch.zeros(3, 10, dtype=torch.long))
    with raises_before_compute(model, ValueError, r"class_labels must have shape \(B, 10\).*got \(3, 12\)"):
        model.forward_with_cfg(x, t, torch.zeros(3, 12), 2.0)
    with raises_before_compute(model, ValueError, r"forward_with_cfg needs class_labels"):
        model.forward_with_cfg(x, t, None, 2.0)


@torch.no_grad()
def test_timesteps_of_the_wrong_length(model):
    x, _, y = good_inputs(B=2)
    with raises_before_compute(model, ValueError, r"timesteps must be a tensor of shape \(B,\) = \(2,\), got \(3,\)"):
        model(x, torch.randn(3), y)
    with raises_before_compute(model, ValueError, r"timesteps must be a tensor of shape \(B,\) = \(2,\), got <class 'float'>"):
        model(x, 0.5, y)
    # under CFG the message speaks of the caller's batch, not of the doubled one
    with raises_before_compute(model, ValueError, r"timesteps must be a tensor of shape \(B,\) = \(2,\), got \(1,\)"):
        model.forward_with_cfg(x, torch.randn(1), y, 2.0)


@torch.no_grad()
def test_dtype_mismatch(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x, t, y = good_inputs()
    with raises_before_compute(bf16, TypeError, r"x is torch.float32 but the model's parameters are torch.bfloat16: "
                                                r"pass x.to\(torch.bfloat16\)"):
        bf16(x, t, y)
    with raises_before_compute(bf16, TypeError, r"run under torch.autocast"):
        bf16.forward_with_cfg(x, t, y, 2.0)
    with raises_before_compute(model, TypeError, r"x is torch.float64 but the model's parameters are torch.float32"):
        model(x.double(), t, y)
    # the matching dtype runs, and so does fp32 input under autocast
    out = bf16(x.bfloat16(), t, y, return_stage_idx=0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16(x, t, y, return_stage_idx=0)
    assert torch.isfinite(out.float()).all()


@torch.no_grad()
def test_device_mismatch(model, meta_model):
    x, t, y = good_inputs()
    with raises_before_compute(meta_model, ValueError, r"x is on cpu but the model is on meta: move one, e.g. x.to\('meta'\)"):
        meta_model(x, t, y)
    with raises_before_compute(model, ValueError, r"timesteps are on meta but x is on cpu"):
        model(x, t.to("meta"), y)
    with raises_before_compute(model, ValueError, r"class_labels are on meta but x is on cpu"):
        model(x, t, y.to("meta"))


@torch.no_grad()
def test_augment_labels_errors(model):
    x, t, y = good_inputs()
    with raises_before_compute(model, ValueError, r"augment_labels given but this model has augment_dim=0"):
        model(x, t, y, augment_labels=torch.zeros(1, 9))
    aug_model = LegoBackbone.from_preset("lego_S_PG_64", label_dim=10, augment_dim=9, depths=[1, 1, 1]).eval()
    with raises_before_compute(aug_model, ValueError, r"augment_labels must have shape \(1, 9\), got \(1, 8\)"):
        aug_model(x, t, y, augment_labels=torch.zeros(1, 8))


@torch.no_grad()
def test_force_drop_ids_of_the_wrong_length(model):
    x, t, y = good_inputs(B=2)
    with raises_before_compute(model, ValueError, r"force_drop_ids must hold one entry per image, shape \(2, 1\); got \(3, 1\)"):
        model(x, t, y, force_drop_ids=torch.zeros(3, 1))


# ---------------------------------------------------------------------------------------------
# Stage and skip errors
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("k", [3, 7, -4])
def test_return_stage_idx_out_of_range(model, k):
    x, t, y = good_inputs()
    msg = rf"return_stage_idx={k} is out of range: this model has 3 bricks, so pass 0\.\.2 \(or -1 for the last\)"
    with raises_before_compute(model, ValueError, msg):
        model(x, t, y, return_stage_idx=k)
    with raises_before_compute(model, ValueError, msg):
        model.forward_with_cfg(x, t, y, 2.0, return_stage_idx=k)


@torch.no_grad()
def test_skip_bricks_out_of_range_or_leaving_nothing(model):
    x, t, y = good_inputs()
    with raises_before_compute(model, ValueError, r"skip_bricks holds 3, but this model has 3 bricks \(0\.\.2\)"):
        model(x, t, y, skip_bricks=[1, 3])
    with raises_before_compute(model, ValueError, r"skip_bricks holds -4"):
        model.forward_with_cfg(x, t, y, 2.0, skip_bricks=[-4])
    with raises_before_compute(model, ValueError, r"skip_bricks=\[0, 1, 2\] with return_stage_idx=None leaves no brick to run"):
        model(x, t, y, skip_bricks=[0, 1, 2])
    with raises_before_compute(model, ValueError, r"skip_bricks=\[0\] with return_stage_idx=0 leaves no brick to run"):
        model(x, t, y, skip_bricks=[0], return_stage_idx=0)


# ---------------------------------------------------------------------------------------------
# Construction errors
# ---------------------------------------------------------------------------------------------

def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown LEGO preset 'nope': expected one of lego_S_PG_64, .*lego_XL_U_64"):
        LegoBackbone.from_preset("nope")
    with pytest.raises(ValueError, match=r"unknown LEGO preset 'nope'.*fastlego.PRESETS lists them"):
        EDMPrecond(img_resolution=64, img_channels=3, model_type="nope")


def test_learn_sigma_is_refused():
    with pytest.raises(ValueError, match=r"learn_sigma=True is not supported.*pass learn_sigma=False"):
        LegoBackbone.from_preset("lego_S_PG_64", learn_sigma=True)
    with pytest.raises(ValueError, match=r"learn_sigma=True is not supported"):
        EDMPrecond(img_resolution=64, img_channels=3, model_type="lego_S_PG_64", learn_sigma=True)


def test_bad_architecture_arguments():
    with pytest.raises(ValueError, match=r"must be lists of one length \(one entry per brick\); got 3, 2, 3"):
        LegoBackbone([4, 16, 64], 3, model_type=["lego_S_2", "lego_S_8"], depths=[1, 1, 1])
    with pytest.raises(ValueError, match=r"must be lists of one length"):
        LegoBackbone([], 3, model_type=[], depths=[])
    with pytest.raises(ValueError, match=r"unknown brick type\(s\) \['lego_M_2'\]: expected names from"):
        LegoBackbone([4], 3, model_type=["lego_M_2"], depths=[1])
    with pytest.raises(ValueError, match=r"all bricks must share one width .*\[384, 1024\]"):
        LegoBackbone([4, 4], 3, model_type=["lego_S_2", "lego_L_2"], depths=[0, 0])
    with pytest.raises(ValueError, match=r"region size 6 is not a multiple of the patch size 4"):
        LegoBackbone([6], 3, model_type=["lego_S_4"], depths=[0])
    with pytest.raises(TypeError, match=r"unexpected arguments \['dropout'\]"):
        LegoBackbone.from_preset("lego_S_PG_64", dropout=0.1)


# ---------------------------------------------------------------------------------------------
# Through the EDM wrapper
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_edm_wrapper_errors_before_compute():
    edm = EDMPrecond(img_resolution=64, img_channels=3, label_dim=10, model_type="lego_S_PG_64", depths=[1, 1, 1]).eval()
    x = torch.randn(1, 3, 64, 64)
    # (counted below the backbone: its own forward starts, then refuses)
    with raises_before_compute(edm.model, ValueError, r"x has 4 channels but this model was built for in_channels=3"):
        edm(torch.randn(1, 4, 64, 64), 1.0)
    with raises_before_compute(edm.model, ValueError, r"return_stage_idx=5 is out of range"):
        edm(x, 1.0, cfg_scale=2.0, return_stage_idx=5)
    with raises_before_compute(edm.model, ValueError, r"sigma holds 2 values but x has batch 1: pass one sigma"):
        edm(x, torch.tensor([1.0, 2.0]))
    with raises_before_compute(edm.model, ValueError, r"sigma holds 2 values but x has batch 3"):
        edm(torch.randn(3, 3, 64, 64), torch.tensor([1.0, 2.0]), cfg_scale=1.5)
    uncond = EDMPrecond(img_resolution=64, img_channels=3, label_dim=0, model_type="lego_S_PG_64", depths=[1, 1, 1]).eval()
    with raises_before_compute(uncond.model, ValueError, r"forward_with_cfg needs class_labels"):
        uncond(x, 1.0, cfg_scale=2.0)
