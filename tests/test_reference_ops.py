"""Each reference op (`fastlego.reference`) against an independent formulation written here.

The reference ops are the oracle every kernel is compared with, so they are checked against
other ways of computing the same thing: strided conv vs unfold + matmul vs whole-image conv,
fold as the inverse of unfold, explicit loops for layouts, per-region (release) vs per-image
(ours) conditioning, SDPA vs written-out softmax attention. Float64 where both sides allow it,
so tolerances stay tight.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastlego
from fastlego import reference as R

f64 = torch.float64


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastlego.use_backend("reference"):
        yield


def rand(*shape, dtype=f64):
    return torch.randn(*shape, dtype=dtype)


def repeat_per_region(cond: torch.Tensor, L: int) -> torch.Tensor:
    """(B, D) -> (B * L, D): the release's `c.repeat(L, 1, 1).transpose(1, 0).flatten(0, 1)`."""
    return cond.repeat(L, 1, 1).transpose(1, 0).flatten(0, 1)


def my_layernorm(h):
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + 1e-6)


def my_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def my_silu(x):
    return x / (1 + torch.exp(-x))


def regions_by_loops(z, r):
    """(B, C, H, W) -> (B*L, C, r, r), region n = b*L + row*(W/r) + col."""
    B, C, H, W = z.shape
    out = []
    for b in range(B):
        for i in range(H // r):
            for j in range(W // r):
                out.append(z[b, :, i * r:(i + 1) * r, j * r:(j + 1) * r])
    return torch.stack(out)


def coordinates_by_formula(B, H, W):
    rows = torch.tensor([[2 * i / (H - 1) - 1 for j in range(W)] for i in range(H)], dtype=f64)
    cols = torch.tensor([[2 * j / (W - 1) - 1 for j in range(W)] for i in range(H)], dtype=f64)
    return torch.stack([rows, cols])[None].expand(B, 2, H, W)


# ---------------------------------------------------------------------------------------------
# Coordinates, regions, patches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,W", [(8, 8), (8, 12), (16, 4)])
def test_coordinate_channels_formula_non_square(H, W):
    got = R.coordinate_channels(2, H, W, torch.float32, "cpu")
    assert got.shape == (2, 2, H, W) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), coordinates_by_formula(2, H, W), rtol=0, atol=1e-7)
    # rows normalised by H-1, columns by W-1: both reach exactly -1 and 1 at the borders
    assert got[0, 0, 0, 0] == -1 and got[0, 0, -1, 0] == 1 and got[0, 1, 0, -1] == 1
    # the release's formula, bit for bit in float32
    i = torch.arange(H, dtype=torch.float32)
    assert torch.equal(got[0, 0, :, 0], (i / (H - 1) - 0.5) * 2.0)


def test_brick_input_order_prev_x_rows_cols():
    x, prev = rand(2, 3, 8, 12), rand(2, 3, 8, 12)
    z = R.brick_input(x, prev)
    assert z.shape == (2, 8, 8, 12)
    assert torch.equal(z[:, :3], prev) and torch.equal(z[:, 3:6], x)
    # coordinates are computed in float32 (the release's values) whatever the dtype
    torch.testing.assert_close(z[:, 6:], coordinates_by_formula(2, 8, 12), rtol=0, atol=1e-7)
    z0 = R.brick_input(x, None)
    assert z0.shape == (2, 5, 8, 12) and torch.equal(z0[:, :3], x)


@pytest.mark.parametrize("H,W,r", [(8, 8, 4), (8, 16, 4), (16, 8, 8), (4, 4, 4)])
def test_unfold_regions_vs_loops_and_fold_inverse(H, W, r):
    z = rand(3, 5, H, W)
    regions = R.unfold_regions(z, r)
    assert torch.equal(regions, regions_by_loops(z, r))
    assert torch.equal(R.fold_regions(regions, 3, H, W), z)
    # the release's torch.Tensor.unfold formulation
    rel = z.unfold(2, r, r).unfold(3, r, r).permute(0, 2, 3, 1, 4, 5).flatten(0, 2)
    assert torch.equal(regions, rel)


@pytest.mark.parametrize("r,p", [(4, 2), (16, 8), (8, 2), (8, 4)])
def test_patch_embed_strided_conv_vs_unfold_matmul(r, p):
    N, Cin, D = 5, 7, 12
    regions, w, b = rand(N, Cin, r, r), rand(D, Cin, p, p), rand(D)
    got = R.patch_embed(regions, w, b)
    g = r // p
    assert got.shape == (N, g * g, D)
    # F.unfold with kernel = stride = p: (N, Cin*p*p, T), features ordered (channel, row, col),
    # columns row-major over the patch grid
    cols = F.unfold(regions, kernel_size=p, stride=p)
    want = cols.transpose(1, 2) @ w.reshape(D, -1).T + b
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and by explicit loops over patches
    want2 = torch.empty_like(want)
    for n in range(N):
        for gr in range(g):
            for gc in range(g):
                patch = regions[n, :, gr * p:(gr + 1) * p, gc * p:(gc + 1) * p]
                want2[n, gr * g + gc] = (w * patch).sum((1, 2, 3)) + b
    torch.testing.assert_close(got, want2, rtol=1e-12, atol=1e-12)
    assert R.patch_embed(regions, w, None).shape == got.shape


@pytest.mark.parametrize("H,W,r,p", [(8, 8, 4, 2), (16, 32, 16, 8), (8, 16, 8, 2)])
def test_patch_embed_of_regions_is_whole_image_conv_rearranged(H, W, r, p):
    """Regions never straddle patches, so embedding each region = one conv over the whole image,
    its (H/p, W/p) grid cut into (r/p)^2 blocks, row-major over regions."""
    B, Cin, D = 2, 5, 6
    z, w, b = rand(B, Cin, H, W), rand(D, Cin, p, p), rand(D)
    got = R.patch_embed(R.unfold_regions(z, r), w, b)
    full = F.conv2d(z, w, b, stride=p)  # (B, D, H/p, W/p)
    g = r // p
    want = full.reshape(B, D, H // r, g, W // r, g).permute(0, 2, 4, 3, 5, 1).reshape(B * (H // r) * (W // r), g * g, D)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p,C,g", [(2, 3, 2), (8, 4, 2), (2, 3, 4)])
def test_unpatchify_layout_patch_row_patch_col_channel(p, C, g):
    N = 3
    tokens = rand(N, g * g, p * p * C)
    got = R.unpatchify(tokens, p, C)
    want = torch.empty(N, C, g * p, g * p, dtype=f64)
    for n in range(N):
        for t in range(g * g):
            gr, gc = divmod(t, g)
            for pr in range(p):
                for pc in range(p):
                    for c in range(C):
                        want[n, c, gr * p + pr, gc * p + pc] = tokens[n, t, (pr * p + pc) * C + c]
    assert torch.equal(got, want)


def test_sincos_pos_embed_formula():
    D, g = 16, 3
    got = R.sincos_pos_embed(D, g)
    assert got.shape == (1, g * g, D) and got.dtype == torch.float32
    q = D // 4
    for t in range(g * g):
        row, col = divmod(t, g)
        for k in range(q):
            w = 10000 ** (-k / q)
            want = [math.sin(col * w), math.cos(col * w), math.sin(row * w), math.cos(row * w)]
            got_k = [got[0, t, k], got[0, t, q + k], got[0, t, 2 * q + k], got[0, t, 3 * q + k]]
            for a, e in zip(got_k, want):
                assert abs(a.item() - e) < 1e-6


# ---------------------------------------------------------------------------------------------
# Normalisation, modulation, adaLN: per image (ours) vs per region (the release)
# ---------------------------------------------------------------------------------------------

B, L, T, D = 2, 3, 4, 8


def test_layernorm_matches_written_out_formula():
    h = rand(B * L, T, D) * 3 + 1
    torch.testing.assert_close(R.layernorm(h), my_layernorm(h), rtol=1e-12, atol=1e-12)
    # eps is 1e-6: visible on tokens whose variance is of that order
    tiny = rand(B * L, T, D) * 1e-3
    torch.testing.assert_close(R.layernorm(tiny), my_layernorm(tiny), rtol=1e-10, atol=1e-10)
    assert (R.layernorm(tiny) - F.layer_norm(tiny, (D,), eps=1e-5)).abs().max() > 0.1


def test_layernorm_modulate_per_image_vs_per_region():
    h, shift, scale = rand(B * L, T, D), rand(B, D), rand(B, D)
    got = R.modulate(R.layernorm(h), shift, scale)
    # the release: c repeated per region, modulate(x, shift, scale) = x * (1 + scale) + shift
    s_r, c_r = repeat_per_region(shift, L), repeat_per_region(scale, L)
    want = my_layernorm(h) * (1 + c_r[:, None, :]) + s_r[:, None, :]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gated_residual_per_image_vs_per_region():
    res, gate, y = rand(B * L, T, D), rand(B, D), rand(B * L, T, D)
    got = R.gated_residual(res, gate, y)
    want = res + repeat_per_region(gate, L)[:, None, :] * y
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_adaln_modulation_per_image_equals_per_region_rows():
    c, w, b = rand(B, D), rand(6 * D, D), rand(6 * D)
    per_image = R.adaln_modulation(c, w, b)
    per_region = my_silu(repeat_per_region(c, L)) @ w.T + b
    torch.testing.assert_close(repeat_per_region(per_image, L), per_region, rtol=1e-12, atol=1e-12)
    # chunk order: shift1, scale1, gate1, shift2, scale2, gate2 are consecutive D-wide slices
    chunks = per_image.chunk(6, dim=1)
    for k in range(6):
        torch.testing.assert_close(chunks[k], my_silu(c) @ w[k * D:(k + 1) * D].T + b[k * D:(k + 1) * D])


def test_gelu_tanh_formula():
    x = rand(100) * 4
    torch.testing.assert_close(R.gelu_tanh(x), my_gelu_tanh(x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def attention_by_loops(qkv, heads):
    """softmax(q k^T / sqrt(hd)) v per region and head; qkv laid out (3, heads, head_dim)."""
    N, T_, three_d = qkv.shape
    D_ = three_d // 3
    hd = D_ // heads
    out = torch.empty(N, T_, D_, dtype=qkv.dtype)
    for n in range(N):
        for h in range(heads):
            q = qkv[n, :, 0 * D_ + h * hd:0 * D_ + (h + 1) * hd]
            k = qkv[n, :, 1 * D_ + h * hd:1 * D_ + (h + 1) * hd]
            v = qkv[n, :, 2 * D_ + h * hd:2 * D_ + (h + 1) * hd]
            s = q @ k.T / math.sqrt(hd)
            e = torch.exp(s - s.max(-1, keepdim=True).values)
            out[n, :, h * hd:(h + 1) * hd] = (e / e.sum(-1, keepdim=True)) @ v
    return out


@pytest.mark.parametrize("N,T_,heads,hd", [(3, 4, 2, 4), (2, 16, 3, 8), (1, 1, 2, 4)])
def test_attention_sdpa_vs_math_vs_loops(N, T_, heads, hd):
    qkv = rand(N, T_, 3 * heads * hd) * 2
    want = attention_by_loops(qkv, heads)
    torch.testing.assert_close(R.attention(qkv, heads), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(R.attention_math(qkv, heads), want, rtol=1e-10, atol=1e-10)
    # fp32 SDPA vs fp32 math: same to float rounding
    q32 = qkv.float()
    torch.testing.assert_close(R.attention(q32, heads), R.attention_math(q32, heads), rtol=1e-5, atol=1e-5)


def test_split_merge_heads_round_trip():
    qkv = rand(2, 5, 3 * 12)
    q, k, v = R.split_qkv(qkv, 3)
    assert q.shape == (2, 3, 5, 4)
    assert torch.equal(R.merge_heads(q), qkv[..., :12])
    assert torch.equal(R.merge_heads(k), qkv[..., 12:24])
    assert torch.equal(R.merge_heads(v), qkv[..., 24:])


# ---------------------------------------------------------------------------------------------
# The dispatched composite ops vs compositions written here
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("H,W,r,p", [(8, 8, 4, 2), (16, 32, 16, 8), (8, 16, 8, 2)])
def test_brick_embed_vs_composition(with_prev, H, W, r, p):
    Bn, C, Dn = 2, 3, 8
    x = rand(Bn, C, H, W)
    prev = rand(Bn, C, H, W) if with_prev else None
    cin = 2 * C + 2 if with_prev else C + 2
    w, b, pos = rand(Dn, cin, p, p), rand(Dn), rand(1, (r // p) ** 2, Dn)
    got = R.brick_embed(x, prev, w, b, pos, r)
    # composition: explicit input image, loop-cut regions, unfold + matmul patches, + table
    z = torch.cat(([prev] if with_prev else []) + [x, coordinates_by_formula(Bn, H, W)], dim=1)
    regions = regions_by_loops(z, r)
    cols = F.unfold(regions, kernel_size=p, stride=p).transpose(1, 2)
    want = cols @ w.reshape(Dn, -1).T + b + pos
    assert got.shape == (Bn * (H // r) * (W // r), (r // p) ** 2, Dn)
    # the coordinates are float32 values (the release's) in every dtype: 1e-6, not 1e-12
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fastlego.ops.brick_embed(x, prev, w, b, pos, r), got, rtol=0, atol=0)


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_modulated_linear_vs_composition(activation):
    h, shift, scale = rand(B * L, T, D), rand(B, D), rand(B, D)
    w, b = rand(3 * D, D), rand(3 * D)
    got = R.modulated_linear(h, shift, scale, w, b, activation)
    m = my_layernorm(h) * (1 + repeat_per_region(scale, L)[:, None]) + repeat_per_region(shift, L)[:, None]
    want = m @ w.T + b
    if activation == "gelu_tanh":
        want = my_gelu_tanh(want)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fastlego.ops.modulated_linear(h, shift, scale, w, b, activation), got, rtol=0, atol=0)


def test_modulated_linear_rejects_unknown_activation():
    h, shift, scale, w, b = rand(B * L, T, D), rand(B, D), rand(B, D), rand(D, D), rand(D)
    with pytest.raises(ValueError, match=r"unknown activation 'relu'.*gelu_tanh"):
        R.modulated_linear(h, shift, scale, w, b, "relu")


def test_linear_gated_residual_vs_composition():
    a, res, gate = rand(B * L, T, 4 * D), rand(B * L, T, D), rand(B, D)
    w, b = rand(D, 4 * D), rand(D)
    got = R.linear_gated_residual(a, w, b, gate, res)
    want = res + repeat_per_region(gate, L)[:, None] * (a @ w.T + b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fastlego.ops.linear_gated_residual(a, w, b, gate, res), got, rtol=0, atol=0)


@pytest.mark.parametrize("H,W,r,p", [(8, 8, 4, 2), (16, 32, 16, 8), (16, 8, 8, 2)])
def test_final_layer_vs_composition(H, W, r, p):
    Bn, C, Dn = 2, 3, 8
    Lr, g = (H // r) * (W // r), r // p
    h, shift, scale = rand(Bn * Lr, g * g, Dn), rand(Bn, Dn), rand(Bn, Dn)
    w, b = rand(p * p * C, Dn), rand(p * p * C)
    got = R.final_layer(h, shift, scale, w, b, r, (Bn, C, H, W))
    assert got.shape == (Bn, C, H, W)
    m = my_layernorm(h) * (1 + repeat_per_region(scale, Lr)[:, None]) + repeat_per_region(shift, Lr)[:, None]
    y = m @ w.T + b  # (N, T, p*p*C), each token laid out (patch_row, patch_col, channel)
    want = torch.empty(Bn, C, H, W, dtype=f64)
    for n in range(Bn * Lr):
        img, reg = divmod(n, Lr)
        ri, rj = divmod(reg, W // r)
        for t in range(g * g):
            gr, gc = divmod(t, g)
            y0, x0 = ri * r + gr * p, rj * r + gc * p
            want[img, :, y0:y0 + p, x0:x0 + p] = y[n, t].reshape(p, p, C).permute(2, 0, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fastlego.ops.final_layer(h, shift, scale, w, b, r, (Bn, C, H, W)), got, rtol=0, atol=0)


def test_ops_attention_routes_to_reference_attention():
    for T_ in (4, 256):  # window (<= 64 tokens) and global attention
        qkv = rand(2, T_, 3 * 8)
        torch.testing.assert_close(fastlego.ops.attention(qkv, 2), attention_by_loops(qkv, 2), rtol=1e-10, atol=1e-10)


def test_reference_ops_keep_fp32_and_accept_strided_conditioning():
    """Per-image conditioning may be any strided view (a chunk of the adaLN output)."""
    h = torch.randn(B * L, T, D)
    mod = torch.randn(B, 2 * D)
    shift, scale = mod.chunk(2, dim=1)  # non-contiguous views
    assert not shift.is_contiguous()
    got = R.modulate(R.layernorm(h), shift, scale)
    want = R.modulate(R.layernorm(h), shift.contiguous(), scale.contiguous())
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
