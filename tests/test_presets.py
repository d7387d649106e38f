"""Every preset builds the spec's architecture: key names, shapes, parameter counts, pos_embed.

The expected architecture is written out here from LEGO_SPEC.md ("Presets", "State-dict keys"),
independently of `fastlego.presets`; the big presets are built on the `meta` device (no memory,
no compute), the position tables are checked on small CPU builds against a numpy formula.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastlego
from fastlego import EDMPrecond, LegoBackbone
from fastlego.model import Brick
from fastlego.testing import randomize_

# ---------------------------------------------------------------------------------------------
# The spec's table, written out by hand
# ---------------------------------------------------------------------------------------------

# size -> (width D, heads)
SPEC_WIDTHS = {"S": (384, 6), "L": (1024, 16), "XL": (1152, 16)}

# preset -> (regions, depths), LEGO_SPEC.md "Presets"
SPEC_PRESETS = {
    "lego_S_PG_64": ([4, 16, 64], [2, 4, 6]),
    "lego_S_PR_64": ([64, 16, 4], [6, 4, 2]),
    "lego_S_U_32": ([32, 16, 4, 16, 32], [6, 4, 2, 4, 6]),
    "lego_S_U_64": ([64, 16, 4, 16, 64], [6, 4, 2, 4, 6]),
    "lego_L_PG_32": ([4, 16, 32], [4, 8, 12]),
    "lego_L_PR_32": ([32, 16, 4], [12, 8, 4]),
    "lego_L_PG_64": ([4, 16, 64], [6, 8, 12]),
    "lego_L_PR_64": ([64, 16, 4], [12, 8, 6]),
    "lego_L_U_32": ([32, 16, 4, 16, 32], [12, 8, 6, 8, 12]),
    "lego_L_U_64": ([64, 16, 4, 16, 64], [12, 8, 6, 8, 12]),
    "lego_L_PG_64_old": ([4, 16, 64], [6, 6, 12]),
    "lego_L_PR_64_old": ([64, 16, 4], [12, 6, 6]),
    "lego_XL_PG_32": ([4, 16, 32], [4, 12, 14]),
    "lego_XL_PG_64": ([4, 16, 64], [4, 12, 14]),
    "lego_XL_PR_32": ([32, 16, 4], [14, 12, 4]),
    "lego_XL_PR_64": ([64, 16, 4], [14, 12, 4]),
    "lego_XL_U_32": ([32, 16, 4, 16, 32], [14, 10, 4, 10, 14]),
    "lego_XL_U_64": ([64, 16, 4, 16, 64], [14, 12, 4, 12, 14]),
}


def spec_size(name: str) -> str:
    return name.split("_")[1]


def spec_patch(region: int) -> int:
    """Patch 8 for the 16-pixel-region bricks, 2 for regions of 4, 32 and 64."""
    return 8 if region == 16 else 2


def spec_state_dict_shapes(name: str, C: int, label_dim: int, augment_dim: int) -> dict:
    """key -> shape, from the spec's key patterns."""
    regions, depths = SPEC_PRESETS[name]
    D, _ = SPEC_WIDTHS[spec_size(name)]
    shapes = {}
    for i, (r, depth) in enumerate(zip(regions, depths)):
        p = spec_patch(r)
        cin = C + 2 if i == 0 else 2 * C + 2
        T = (r // p) ** 2
        pre = f"model.{i}."
        shapes[pre + "pos_embed"] = (1, T, D)
        shapes[pre + "x_embedder.proj.weight"] = (D, cin, p, p)
        shapes[pre + "x_embedder.proj.bias"] = (D,)
        for j in range(depth):
            b = f"{pre}blocks.{j}."
            shapes[b + "attn.qkv.weight"] = (3 * D, D)
            shapes[b + "attn.qkv.bias"] = (3 * D,)
            shapes[b + "attn.proj.weight"] = (D, D)
            shapes[b + "attn.proj.bias"] = (D,)
            shapes[b + "mlp.fc1.weight"] = (4 * D, D)
            shapes[b + "mlp.fc1.bias"] = (4 * D,)
            shapes[b + "mlp.fc2.weight"] = (D, 4 * D)
            shapes[b + "mlp.fc2.bias"] = (D,)
            shapes[b + "adaLN_modulation.1.weight"] = (6 * D, D)
            shapes[b + "adaLN_modulation.1.bias"] = (6 * D,)
        shapes[pre + "final_layer.linear.weight"] = (p * p * C, D)
        shapes[pre + "final_layer.linear.bias"] = (p * p * C,)
        shapes[pre + "final_layer.adaLN_modulation.1.weight"] = (2 * D, D)
        shapes[pre + "final_layer.adaLN_modulation.1.bias"] = (2 * D,)
    shapes["t_embedder.mlp.0.weight"] = (D, 256)
    shapes["t_embedder.mlp.0.bias"] = (D,)
    shapes["t_embedder.mlp.2.weight"] = (D, D)
    shapes["t_embedder.mlp.2.bias"] = (D,)
    if label_dim > 0:
        shapes["y_embedder.embedding_table.weight"] = (D, label_dim)
        shapes["y_embedder.embedding_table.bias"] = (D,)
    if augment_dim > 0:
        shapes["map_augment.weight"] = (D, augment_dim)
        shapes["map_augment.bias"] = (D,)
    return shapes


def spec_parameter_count(name: str, C: int, label_dim: int, augment_dim: int) -> int:
    """The parameter count from closed formulas (not from the shapes above)."""
    regions, depths = SPEC_PRESETS[name]
    D, _ = SPEC_WIDTHS[spec_size(name)]
    # per DiT block: qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, adaLN 6D^2+6D
    per_block = 18 * D * D + 15 * D
    total = 0
    for i, (r, depth) in enumerate(zip(regions, depths)):
        p = spec_patch(r)
        cin = C + 2 if i == 0 else 2 * C + 2
        total += (r // p) ** 2 * D                 # pos_embed
        total += D * cin * p * p + D               # patch embedding conv + bias
        total += depth * per_block
        total += (D + 1) * p * p * C + 2 * D * D + 2 * D   # final linear + final adaLN
    total += 256 * D + D + D * D + D               # timestep MLP
    total += (label_dim + 1) * D if label_dim else 0
    total += (augment_dim + 1) * D if augment_dim else 0
    return total


def numpy_sincos_table(D: int, grid: int) -> np.ndarray:
    """(grid*grid, D): first half encodes the patch column, second the row; each half
    [sin(pos w), cos(pos w)], w_k = 10000^(-k/(D/4)); token t = row * grid + col."""
    quarter = D // 4
    w = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
    table = np.zeros((grid * grid, D), dtype=np.float64)
    for row in range(grid):
        for col in range(grid):
            t = row * grid + col
            table[t, 0:quarter] = np.sin(col * w)
            table[t, quarter:2 * quarter] = np.cos(col * w)
            table[t, 2 * quarter:3 * quarter] = np.sin(row * w)
            table[t, 3 * quarter:] = np.cos(row * w)
    return table.astype(np.float32)


CONFIGS = [  # (in_channels, label_dim, augment_dim)
    pytest.param(3, 1000, 0, id="C3-labels1000"),
    pytest.param(4, 0, 9, id="C4-uncond-augment9"),
]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_the_preset_table_is_the_spec_table():
    assert set(fastlego.PRESETS) == set(SPEC_PRESETS)
    assert len(fastlego.PRESETS) == 18
    for name, (regions, depths) in SPEC_PRESETS.items():
        preset = fastlego.get_preset(name)
        assert list(preset.regions) == regions, name
        assert list(preset.depths) == depths, name
        assert preset.training_resolution == max(regions)
        D, heads = SPEC_WIDTHS[spec_size(name)]
        for r, kind in zip(regions, preset.model_type):
            assert fastlego.presets.BRICK_TYPES[kind] == (D, spec_patch(r), heads), (name, kind)


@pytest.mark.parametrize("C,label_dim,augment_dim", CONFIGS)
@pytest.mark.parametrize("name", list(SPEC_PRESETS))
def test_preset_keys_shapes_and_parameter_count(name, C, label_dim, augment_dim):
    with torch.device("meta"):
        model = LegoBackbone.from_preset(name, in_channels=C, label_dim=label_dim, augment_dim=augment_dim)
    expected = spec_state_dict_shapes(name, C, label_dim, augment_dim)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) - set(expected) == set(), "keys the spec does not have"
    assert set(expected) - set(got) == set(), "spec keys missing"
    assert got == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == spec_parameter_count(name, C, label_dim, augment_dim)
    # the module's own view of the architecture
    regions, depths = SPEC_PRESETS[name]
    D, heads = SPEC_WIDTHS[spec_size(name)]
    assert model.num_bricks == len(regions)
    assert model.img_resolution == regions
    for brick, r, depth in zip(model.model, regions, depths):
        assert (brick.region, brick.patch, brick.width, brick.num_heads) == (r, spec_patch(r), D, heads)
        assert len(brick.blocks) == depth
        assert all(b.attn.num_heads == heads for b in brick.blocks)
    # pos_embed is stored but not trained
    assert not any(b.pos_embed.requires_grad for b in model.model)


@pytest.mark.parametrize("name", ["lego_S_PG_64", "lego_L_PR_64", "lego_XL_U_32"])
def test_edm_wrapper_prefixes_every_key_with_model(name):
    with torch.device("meta"):
        edm = EDMPrecond(img_resolution=64, img_channels=4, label_dim=1000, model_type=name)
    expected = {"model." + k: v for k, v in spec_state_dict_shapes(name, 4, 1000, 0).items()}
    got = {k: tuple(v.shape) for k, v in edm.state_dict().items()}
    assert got == expected
    assert edm.sigma_data == 0.5


@pytest.mark.parametrize("name", ["lego_L_PG_32", "lego_XL_U_64"])
def test_release_layout_constructor_matches_preset(name):
    """LegoBackbone(**release LEGO arguments) builds what the preset builds."""
    regions, depths = SPEC_PRESETS[name]
    size = spec_size(name)
    types = [f"lego_{size}_{spec_patch(r)}" for r in regions]
    with torch.device("meta"):
        a = LegoBackbone(img_resolution=regions, in_channels=3, label_dim=1000, model_type=types, depths=depths)
        b = LegoBackbone.from_preset(name, label_dim=1000)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_pos_embed_is_the_spec_sincos_table_small_preset():
    """A CPU build of lego_S_PG_64 and lego_S_U_32: every brick's stored table equals numpy's."""
    for name in ("lego_S_PG_64", "lego_S_U_32"):
        regions, _ = SPEC_PRESETS[name]
        model = LegoBackbone.from_preset(name, label_dim=0, depths=[0] * len(regions))
        for brick, r in zip(model.model, regions):
            g = r // spec_patch(r)
            table = numpy_sincos_table(384, g)
            got = brick.pos_embed.detach()
            assert got.dtype == torch.float32 and got.shape == (1, g * g, 384)
            np.testing.assert_allclose(got[0].numpy(), table, rtol=0, atol=2e-7)


@pytest.mark.parametrize("width", [1024, 1152])
@pytest.mark.parametrize("region", [4, 16, 32, 64])
def test_pos_embed_is_the_spec_sincos_table_wide_bricks(width, region):
    """The L and XL widths, on a single CPU brick without blocks (cheap)."""
    p = spec_patch(region)
    brick = Brick(region, 5, 3, width, p, 16, depth=0)
    g = region // p
    np.testing.assert_allclose(brick.pos_embed.detach()[0].numpy(), numpy_sincos_table(width, g), rtol=0, atol=2e-7)


def test_fresh_model_is_adaln_zero_and_outputs_exactly_zero():
    """Spec "Initialisation": modulation Linears and the final Linear are zero, so F = 0 exactly;
    other Linears are Xavier-uniform with zero biases (bounded by sqrt(6 / (fan_in + fan_out)))."""
    model = LegoBackbone.from_preset("lego_S_PG_64", label_dim=10, depths=[1, 1, 1]).eval()
    for i, brick in enumerate(model.model):
        for blk in brick.blocks:
            assert torch.count_nonzero(blk.adaLN_modulation[1].weight) == 0
            assert torch.count_nonzero(blk.adaLN_modulation[1].bias) == 0
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                fan_out, fan_in = lin.weight.shape
                assert lin.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-7
                assert lin.weight.std() > 0.5 * math.sqrt(2 / (fan_in + fan_out))
                assert torch.count_nonzero(lin.bias) == 0
        for t in (brick.final_layer.linear.weight, brick.final_layer.linear.bias,
                  brick.final_layer.adaLN_modulation[1].weight, brick.final_layer.adaLN_modulation[1].bias):
            assert torch.count_nonzero(t) == 0
        w = brick.x_embedder.proj.weight
        fan_in = w[0].numel()
        assert w.abs().max() <= math.sqrt(6 / (fan_in + w.shape[0])) + 1e-7
        assert torch.count_nonzero(brick.x_embedder.proj.bias) == 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.005
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x, torch.randn(2), torch.eye(10)[:2])
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


def test_state_dict_round_trips_strictly_between_builds():
    """A state dict of one build loads with strict=True into another build of the same preset."""
    a = randomize_(LegoBackbone.from_preset("lego_S_PR_64", label_dim=10, depths=[1, 1, 1]), seed=3)
    b = LegoBackbone.from_preset("lego_S_PR_64", label_dim=10, depths=[1, 1, 1])
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=True)
    assert not missing and not unexpected
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown LEGO preset 'lego_S_PG_32'.*lego_S_PG_64"):
        fastlego.get_preset("lego_S_PG_32")
