"""The whole backbone (and the EDM wrapper) against a second, naive implementation of the spec.

`NaiveLego` below is written from LEGO_SPEC.md alone, the way the release computes it: a Python
loop over images and regions, the conditioning repeated for every region (the adaLN Linears run
once per region), its own LayerNorm / softmax attention / tanh-GELU / patch and unpatch loops,
weights read from the state dict, in float64. The model under test runs in float32 on the
reference backend. Every weight is randomised (`fastlego.testing.randomize_`): a fresh LEGO
outputs exactly zero, where any two implementations agree.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import List, Optional, Sequence

import pytest
import torch

import fastlego
from fastlego import EDMPrecond, LegoBackbone
from fastlego.testing import randomize_

f64 = torch.float64
HEADS_OF_WIDTH = {384: 6, 1024: 16, 1152: 16}  # spec: S = 384 wide, 6 heads; L, XL 16 heads


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastlego.use_backend("reference"):
        yield


@pytest.fixture(autouse=True, scope="module")
def _free_cached_models():
    yield
    _built.cache_clear()
    _edm.cache_clear()


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """The naive twin is a Python loop over small matmuls: on a shared CPU, extra intra-op
    threads only spin (a 10x slowdown measured on 2 busy cores)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------
# The naive implementation
# ---------------------------------------------------------------------------------------------

def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _layernorm(h):
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + 1e-6)


def _linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


class NaiveLego:
    """The spec's forward pass, one image and one region at a time, in float64."""

    def __init__(self, model: LegoBackbone):
        self.sd = {k: v.detach().to(f64).clone() for k, v in model.state_dict().items()}
        self.regions = list(model.img_resolution)
        self.C = model.in_channels

    # -- conditioning --------------------------------------------------------------------
    def conditioning(self, t, labels=None, augment=None):
        """c = t_emb + label_emb (+ augment_emb); labels None adds no label embedding."""
        sd = self.sd
        k = torch.arange(128, dtype=f64)
        f = 10000.0 ** (-k / 128)
        # the float32 features, as the spec's frequencies are float32 in the release
        args = t.double().reshape(-1, 1) * f.float().double()[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        c = _linear(_silu(_linear(feats, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
        if labels is not None and "y_embedder.embedding_table.weight" in sd:
            c = c + _linear(labels.double(), sd, "y_embedder.embedding_table")
        if augment is not None:
            c = c + _linear(augment.double(), sd, "map_augment")
        return c

    # -- one brick -----------------------------------------------------------------------
    def block(self, h, mod, pre, heads):
        """One DiT block on the tokens (B, T, D) of one region of every image; mod (B, 6D) the
        adaLN output of those regions' copies of c."""
        sd = self.sd
        D = h.shape[-1]
        shift1, scale1, gate1, shift2, scale2, gate2 = [mod[:, None, k * D:(k + 1) * D] for k in range(6)]
        # attention
        a_in = _layernorm(h) * (1 + scale1) + shift1
        qkv = _linear(a_in, sd, pre + "attn.qkv")           # (B, T, 3D), laid out (3, heads, hd)
        hd = D // heads
        att = torch.empty_like(h)
        for n in range(heads):
            q = qkv[..., 0 * D + n * hd:0 * D + (n + 1) * hd]
            k = qkv[..., 1 * D + n * hd:1 * D + (n + 1) * hd]
            v = qkv[..., 2 * D + n * hd:2 * D + (n + 1) * hd]
            s = q @ k.transpose(1, 2) / math.sqrt(hd)
            e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            att[..., n * hd:(n + 1) * hd] = (e / e.sum(dim=-1, keepdim=True)) @ v
        h = h + gate1 * _linear(att, sd, pre + "attn.proj")
        # MLP
        m_in = _layernorm(h) * (1 + scale2) + shift2
        h = h + gate2 * _linear(_gelu_tanh(_linear(m_in, sd, pre + "mlp.fc1")), sd, pre + "mlp.fc2")
        return h

    def brick(self, i, inp, c):
        """Brick i on its input image inp (B, Cin, H, W) -> (B, C, H, W). A Python loop over the
        region grid; each region of every image is an independent token sequence."""
        sd, C = self.sd, self.C
        pre = f"model.{i}."
        r = self.regions[i]
        w = sd[pre + "x_embedder.proj.weight"]            # (D, Cin, p, p)
        D, Cin, p, _ = w.shape
        heads = HEADS_OF_WIDTH[D]
        g = r // p
        depth = len({k.split(".")[3] for k in sd if k.startswith(pre + "blocks.")})
        B, _, H, W = inp.shape
        L = (H // r) * (W // r)
        # the release's conditioning: c repeated once per region (row n = b * L + l is c[b]),
        # every adaLN Linear run on the repeated rows
        c_rep = torch.stack([c[n // L] for n in range(B * L)])
        block_mods = [_linear(_silu(c_rep), sd, f"{pre}blocks.{j}.adaLN_modulation.1") for j in range(depth)]
        final_mods = _linear(_silu(c_rep), sd, pre + "final_layer.adaLN_modulation.1")
        out = torch.empty(B, C, H, W, dtype=f64)
        for ri in range(H // r):
            for rj in range(W // r):
                l = ri * (W // r) + rj                       # regions row-major over the grid
                rows = [b * L + l for b in range(B)]         # this region's rows, every image
                region = inp[:, :, ri * r:(ri + 1) * r, rj * r:(rj + 1) * r]
                # patch embedding: a Linear over each patch's (channel, row, col) values
                patches = region.reshape(B, Cin, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, Cin * p * p)
                h = patches @ w.reshape(D, -1).T + sd[pre + "x_embedder.proj.bias"] + sd[pre + "pos_embed"]
                for j in range(depth):
                    h = self.block(h, block_mods[j][rows], f"{pre}blocks.{j}.", heads)
                shift, scale = final_mods[rows, None, :D], final_mods[rows, None, D:]
                y = _linear(_layernorm(h) * (1 + scale) + shift, sd, pre + "final_layer.linear")
                for t in range(g * g):                      # token t -> patch (row, col)
                    gr, gc = divmod(t, g)
                    y0, x0 = ri * r + gr * p, rj * r + gc * p
                    out[:, :, y0:y0 + p, x0:x0 + p] = y[:, t].reshape(B, p, p, C).permute(0, 3, 1, 2)
        return out

    # -- the network ---------------------------------------------------------------------
    def coordinates(self, B, H, W):
        """Channel C: row i -> 2i/(H-1) - 1; channel C+1: column j -> 2j/(W-1) - 1."""
        rows = (2 * torch.arange(H, dtype=f64) / (H - 1) - 1)[:, None].expand(H, W)
        cols = (2 * torch.arange(W, dtype=f64) / (W - 1) - 1)[None, :].expand(H, W)
        return torch.stack([rows, cols])[None].expand(B, 2, H, W)

    def stages(self, x, t, labels=None, augment=None, run: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """The outputs of the bricks in `run` (default all). A brick i > 0 whose predecessor did
        not run is fed the last run brick's output, or x itself when none ran (fastlego's
        documented skipping semantics)."""
        x = x.double()
        B, C, H, W = x.shape
        xp = torch.cat([x, self.coordinates(B, H, W)], dim=1)
        c = self.conditioning(t, labels, augment)
        run = range(len(self.regions)) if run is None else run
        prev, outs = None, []
        for i in run:
            if i == 0:
                inp = xp
            else:
                inp = torch.cat([prev if prev is not None else x, xp], dim=1)
            prev = self.brick(i, inp, c)
            outs.append(prev)
        return outs

    def __call__(self, x, t, labels=None, augment=None, run=None):
        return self.stages(x, t, labels, augment, run)[-1]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _built(name, label_dim, depths=None, augment_dim=0, seed=0, **kw):
    model = LegoBackbone.from_preset(name, label_dim=label_dim, augment_dim=augment_dim,
                                     **({} if depths is None else {"depths": list(depths)}), **kw)
    randomize_(model, seed=seed)
    model.eval()
    return model, NaiveLego(model)


def built(name, label_dim, depths=None, augment_dim=0, seed=0, **kw):
    """A randomised model (eval mode, fp32) and its naive twin; the small (depth-reduced) ones
    are cached per configuration, full presets are built afresh (memory)."""
    if depths is None:
        return _built.__wrapped__(name, label_dim, None, augment_dim, seed, **kw)
    model, naive = _built(name, label_dim, tuple(depths), augment_dim, seed, **kw)
    model.eval()
    return model, naive


def assert_matches(out: torch.Tensor, ref: torch.Tensor, what: str = "output", rel: float = 2e-5):
    """fp32 output vs float64 naive: |out - ref| <= rel * max|ref|; the reference is not ~zero."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all(), f"{what}: NaN/inf"
    scale = ref.abs().max().item()
    assert ref.abs().mean().item() > 0.05, f"{what}: reference is ~zero, the comparison would prove nothing"
    err = (out.double() - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.0e} x max|ref| {scale:.3e}"


def assert_differ(a: torch.Tensor, b: torch.Tensor, what: str):
    """Two paths that must not agree (e.g. labels None vs zeros) differ far beyond the tolerance."""
    d = (a.double() - b.double()).abs().max().item()
    assert d > 1e-2 * a.abs().max().item(), f"{what}: outputs agree (max diff {d:.3e})"


@contextlib.contextmanager
def count_brick_calls(model: LegoBackbone):
    """calls[i] = how many times brick i's forward ran inside the block."""
    calls = [0] * model.num_bricks
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(model.model)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def one_hot(ids, n):
    return torch.nn.functional.one_hot(torch.as_tensor(ids), n).float()


def inputs(B, C, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.randn(B, generator=g) * 0.7


# The small configuration most tests use: the five-brick U stack, one block per brick, 32x32.
U = "lego_S_U_32"
U_DEPTHS = (1, 1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Full presets against the naive implementation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,B", [
    ("lego_S_PG_64", 64, 1),
    ("lego_S_PR_64", 64, 1),
    ("lego_S_U_32", 32, 2),
])
@torch.no_grad()
def test_full_preset_matches_naive(name, size, B):
    model, naive = built(name, 10)
    x, t = inputs(B, 3, size, size)
    y = one_hot([3, 7][:B], 10)
    with count_brick_calls(model) as calls:
        out = model(x, t, y)
    assert calls == [1] * model.num_bricks
    assert_matches(out, naive(x, t, y), name)


@pytest.mark.parametrize("name,size,B,depths", [
    ("lego_S_PG_64", 64, 1, (2, 1, 1)),
    (U, 32, 3, U_DEPTHS),
])
@torch.no_grad()
def test_unconditional_model_matches_naive(name, size, B, depths):
    model, naive = built(name, 0, depths)
    assert model.y_embedder is None
    x, t = inputs(B, 3, size, size, seed=2)
    out = model(x, t)
    assert_matches(out, naive(x, t), name)
    # labels given to an unconditional model are ignored (the release does the same)
    assert torch.equal(model(x, t, torch.ones(B, 7)), out)


@torch.no_grad()
def test_labels_none_vs_zeros_vs_one_hot_vs_class_ids():
    model, naive = built(U, 10, U_DEPTHS)
    x, t = inputs(3, 3, 32, 32, seed=3)
    y = one_hot([0, 9, 4], 10)
    zeros = torch.zeros(3, 10)
    out_none, out_zero, out_y = model(x, t, None), model(x, t, zeros), model(x, t, y)
    assert_matches(out_none, naive(x, t, None), "labels None")
    assert_matches(out_zero, naive(x, t, zeros), "labels zeros")
    assert_matches(out_y, naive(x, t, y), "one-hot labels")
    # None adds no label embedding; all-zero rows add the embedding's bias
    assert_differ(out_none, out_zero, "None vs zero labels")
    assert_differ(out_zero, out_y, "zero vs one-hot labels")
    # integer class ids are one-hot rows
    assert torch.equal(model(x, t, torch.tensor([0, 9, 4])), out_y)
    # one label row broadcasts over the batch
    assert torch.equal(model(x, t, y[:1]), model(x, t, y[:1].expand(3, 10)))


@torch.no_grad()
def test_augment_labels():
    model, naive = built(U, 10, U_DEPTHS, augment_dim=9)
    x, t = inputs(2, 3, 32, 32, seed=4)
    y, aug = one_hot([1, 2], 10), torch.randn(2, 9)
    out_aug = model(x, t, y, augment_labels=aug)
    assert_matches(out_aug, naive(x, t, y, aug), "augment labels")
    out_none = model(x, t, y)
    assert_matches(out_none, naive(x, t, y, None), "no augment labels")
    assert_differ(out_aug, out_none, "augment vs none")


@pytest.mark.parametrize("name,depths,H,W", [
    ("lego_S_PG_64", (1, 1, 1), 64, 128),
    (U, U_DEPTHS, 64, 32),
])
@torch.no_grad()
def test_non_square_input_normalises_rows_by_H_and_columns_by_W(name, depths, H, W):
    model, naive = built(name, 10, depths)
    x, t = inputs(1, 3, H, W, seed=5)
    y = one_hot([6], 10)
    out = model(x, t, y)
    assert_matches(out, naive(x, t, y), f"{name} {H}x{W}")
    # the transposed image is a different input (coordinates are not symmetric): not a transpose
    out_t = model(x.transpose(2, 3).contiguous(), t, y)
    assert_differ(out_t.transpose(2, 3), out, "transposed input")


@torch.no_grad()
def test_larger_than_training_resolution():
    model, naive = built("lego_S_PG_64", 10, (1, 1, 1))
    x, t = inputs(1, 3, 128, 128, seed=6)
    y = one_hot([2], 10)
    with count_brick_calls(model) as calls:
        out = model(x, t, y)
    assert calls == [1, 1, 1]
    assert_matches(out, naive(x, t, y), "128x128")


# ---------------------------------------------------------------------------------------------
# Stages, skipping, CFG
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_return_stage_idx_stops_after_that_brick():
    model, naive = built(U, 10, U_DEPTHS)
    x, t = inputs(2, 3, 32, 32, seed=7)
    y = one_hot([5, 8], 10)
    ref_stages = naive.stages(x, t, y)
    assert len(ref_stages) == 5
    for k in range(5):
        with count_brick_calls(model) as calls:
            out = model(x, t, y, return_stage_idx=k)
        assert calls == [1] * (k + 1) + [0] * (4 - k), f"return_stage_idx={k} ran {calls}"
        assert_matches(out, ref_stages[k], f"stage {k}")
    with count_brick_calls(model) as calls:
        out = model(x, t, y, return_stage_idx=-2)
    assert calls == [1, 1, 1, 1, 0]
    assert_matches(out, ref_stages[3], "stage -2")
    with count_brick_calls(model) as calls:
        assert torch.equal(model(x, t, y, return_stage_idx=-1), model(x, t, y))
    assert calls == [2] * 5


@torch.no_grad()
def test_skip_bricks_semantics():
    """Skipped bricks do not run; a brick after a skipped one sees the last run brick's output,
    or x itself if no brick ran yet (LegoBackbone.forward's docstring)."""
    model, naive = built(U, 10, U_DEPTHS)
    x, t = inputs(1, 3, 32, 32, seed=8)
    y = one_hot([1], 10)
    cases = [  # (skip_bricks, return_stage_idx, bricks that run)
        ([2], None, [0, 1, 3, 4]),
        ([0], None, [1, 2, 3, 4]),
        ([0, 1, 2, 3], None, [4]),
        ([1, 3], None, [0, 2, 4]),
        ([-1], None, [0, 1, 2, 3]),
        ({4, 3}, None, [0, 1, 2]),
        ([0], 2, [1, 2]),
        ([1], -2, [0, 2, 3]),
        ([], None, [0, 1, 2, 3, 4]),
    ]
    for skip, k, run in cases:
        with count_brick_calls(model) as calls:
            out = model(x, t, y, return_stage_idx=k, skip_bricks=skip)
        assert calls == [int(i in run) for i in range(5)], f"skip {skip}, k {k}: ran {calls}"
        assert model.bricks_to_run(k, skip) == run
        assert_matches(out, naive(x, t, y, run=run), f"skip {skip}, k {k}")


@torch.no_grad()
def test_skip_bricks_on_a_three_brick_stack():
    """The paper's policy on PG: drop the last (global) brick late in sampling."""
    model, naive = built("lego_S_PG_64", 10, (1, 1, 1))
    x, t = inputs(1, 3, 64, 64, seed=14)
    y = one_hot([3], 10)
    with count_brick_calls(model) as calls:
        out = model(x, t, y, skip_bricks=[1])
    assert calls == [1, 0, 1]
    assert_matches(out, naive(x, t, y, run=[0, 2]), "PG skip 1")
    with count_brick_calls(model) as calls:
        out = model(x, t, y, return_stage_idx=model.num_bricks - 2)
    assert calls == [1, 1, 0]
    assert_matches(out, naive(x, t, y, run=[0, 1]), "PG stop after brick 1")


@torch.no_grad()
def test_forward_with_cfg_is_uncond_plus_scale_times_difference():
    model, naive = built(U, 10, U_DEPTHS)
    x, t = inputs(2, 3, 32, 32, seed=9)
    y = one_hot([3, 6], 10)
    scale = 2.5
    cond, uncond = naive(x, t, y), naive(x, t, torch.zeros(2, 10))
    with count_brick_calls(model) as calls:
        out = model.forward_with_cfg(x, t, y, scale)
    assert calls == [1] * 5, "CFG must run each brick once on the doubled batch"
    assert_matches(out, uncond + scale * (cond - uncond), "cfg")
    assert_differ(out, cond, "cfg vs cond")
    # scale 1 is the conditional output, 0 the unconditional one
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), model(x, t, y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 0.0), model(x, t, torch.zeros(2, 10)),
                               rtol=1e-5, atol=1e-5)
    # class ids work too
    torch.testing.assert_close(model.forward_with_cfg(x, t, torch.tensor([3, 6]), scale), out, rtol=0, atol=0)
    # use_full_channels=False guides only the first 3 channels (all of them here)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, scale, use_full_channels=False), out, rtol=0, atol=0)


@torch.no_grad()
def test_forward_with_cfg_skips_bricks():
    model, naive = built(U, 10, U_DEPTHS)
    x, t = inputs(1, 3, 32, 32, seed=10)
    y = one_hot([4], 10)
    scale = 4.0
    for k, skip, run in [(1, None, [0, 1]), (None, [1, 2], [0, 3, 4]), (3, [0], [1, 2, 3])]:
        with count_brick_calls(model) as calls:
            out = model.forward_with_cfg(x, t, y, scale, return_stage_idx=k, skip_bricks=skip)
        assert calls == [int(i in run) for i in range(5)], f"cfg k={k} skip={skip} ran {calls}"
        cond, uncond = naive(x, t, y, run=run), naive(x, t, torch.zeros(1, 10), run=run)
        assert_matches(out, uncond + scale * (cond - uncond), f"cfg k={k} skip={skip}")


@torch.no_grad()
def test_train_intermediate_stages_in_train_and_eval_mode():
    model, naive = built(U, 10, U_DEPTHS, seed=1, train_intermediate_stages=True)
    x, t = inputs(2, 3, 32, 32, seed=11)
    y = one_hot([2, 5], 10)
    drop = torch.tensor([[1], [0]])
    y_dropped = y.clone()
    y_dropped[0] = 0
    ref = naive.stages(x, t, y_dropped)
    try:
        model.train()
        with count_brick_calls(model) as calls:
            outs = model(x, t, y, force_drop_ids=drop)
        assert calls == [1] * 5
        assert isinstance(outs, list) and len(outs) == 5
        for k in range(5):
            assert_matches(outs[k], ref[k], f"train stage {k}")
        # return_stage_idx in training: the list up to that brick
        with count_brick_calls(model) as calls:
            outs1 = model(x, t, y, force_drop_ids=drop, return_stage_idx=1)
        assert calls == [1, 1, 0, 0, 0]
        assert isinstance(outs1, list) and len(outs1) == 2
        assert torch.equal(outs1[1], outs[1])
        # force_drop_ids of shape (B,) works as (B, 1)
        assert torch.equal(model(x, t, y, force_drop_ids=drop.flatten())[4], outs[4])
    finally:
        model.eval()
    # eval mode: the last brick's output (a tensor), or the chosen stage
    out_eval = model(x, t, y, force_drop_ids=drop)
    assert isinstance(out_eval, torch.Tensor)
    assert torch.equal(out_eval, outs[4])
    with count_brick_calls(model) as calls:
        out1 = model(x, t, y, force_drop_ids=drop, return_stage_idx=1)
    assert calls == [1, 1, 0, 0, 0]
    assert torch.equal(out1, outs[1])


@torch.no_grad()
def test_class_dropout_and_force_drop_ids():
    """Training drops each sample's labels with probability class_dropout_prob; force_drop_ids
    (entries 1 drop) overrides the random choice, in training and in eval mode."""
    model = randomize_(LegoBackbone.from_preset(U, label_dim=10, depths=list(U_DEPTHS),
                                                class_dropout_prob=1.0), seed=2).eval()
    naive = NaiveLego(model)
    B = 4
    t = torch.randn(B)
    y = one_hot([1, 2, 3, 4], 10)
    zeros = torch.zeros(B, 10)

    def cond(train, force=None):
        model.train(train)
        try:
            return model.conditioning(t, y, None, force).double()
        finally:
            model.eval()

    c_keep, c_drop = naive.conditioning(t, y), naive.conditioning(t, zeros)
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
    close(cond(False), c_keep)                                          # eval: never random
    close(cond(True), c_drop)                                           # p = 1: all dropped
    close(cond(True, torch.zeros(B, 1, dtype=torch.long)), c_keep)      # forced: none dropped
    mixed = torch.tensor([[1], [0], [0], [1]])
    want = torch.where(mixed.bool(), c_drop, c_keep)
    close(cond(True, mixed), want)
    close(cond(False, mixed), want)                                     # eval with force_drop_ids
    # p = 0.5: each sample independently either dropped or kept, both happen
    model.y_embedder.dropout_prob = 0.5
    torch.manual_seed(123)
    t64 = torch.randn(64)
    y64 = one_hot(torch.arange(64) % 10, 10)
    model.train()
    try:
        c = model.conditioning(t64, y64).double()
    finally:
        model.eval()
        model.y_embedder.dropout_prob = 1.0
    keep, drop = naive.conditioning(t64, y64), naive.conditioning(t64, torch.zeros(64, 10))
    is_keep = (c - keep).abs().amax(1) < 1e-5
    is_drop = (c - drop).abs().amax(1) < 1e-5
    assert bool((is_keep ^ is_drop).all())
    assert 10 < int(is_drop.sum()) < 54
    # the full forward in training mode with p = 1 equals the naive one with zero labels
    x, _ = inputs(1, 3, 32, 32, seed=12)
    model.train()
    try:
        out = model(x, t[:1], y[:1])
    finally:
        model.eval()
    assert_matches(out, naive(x, t[:1], zeros[:1]), "train, p=1")


@torch.no_grad()
def test_images_are_independent_within_a_batch():
    """Each image's output depends on that image only (the regions of image b use c[b])."""
    model, _ = built(U, 10, U_DEPTHS)
    x, t = inputs(3, 3, 32, 32, seed=13)
    y = one_hot([1, 2, 3], 10)
    full = model(x, t, y)
    for b in range(3):
        torch.testing.assert_close(model(x[b:b + 1], t[b:b + 1], y[b:b + 1]), full[b:b + 1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# EDM preconditioning
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _edm(label_dim, train_stages=False):
    edm = EDMPrecond(img_resolution=32, img_channels=3, label_dim=label_dim, model_type=U,
                     depths=list(U_DEPTHS), train_intermediate_stages=train_stages)
    randomize_(edm, seed=4)
    return edm.eval()


def edm_coefficients(sigma):
    """(c_skip, c_out, c_in, c_noise) in float64, sigma_data 0.5, from the spec."""
    s = torch.as_tensor(sigma, dtype=f64).reshape(-1, 1, 1, 1)
    return 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt(), 1 / (s ** 2 + 0.25).sqrt(), s.flatten().log() / 4


def test_edm_preconditioning_coefficients():
    edm = _edm(10)
    values = [0.002, 0.5, 2.0, 80.0]
    c_skip, c_out, c_in, c_noise = edm.preconditioning(torch.tensor(values, dtype=f64).reshape(-1, 1, 1, 1))
    for n, s in enumerate(values):
        assert math.isclose(c_skip.flatten()[n].item(), 0.25 / (s * s + 0.25), rel_tol=1e-12)
        assert math.isclose(c_out.flatten()[n].item(), s * 0.5 / math.sqrt(s * s + 0.25), rel_tol=1e-12)
        assert math.isclose(c_in.flatten()[n].item(), 1 / math.sqrt(s * s + 0.25), rel_tol=1e-12)
        assert math.isclose(c_noise.flatten()[n].item(), math.log(s) / 4, rel_tol=1e-12)
    # hand-computed at sigma = sigma_data = 0.5 and sigma = 2
    assert math.isclose(c_skip.flatten()[1].item(), 0.5)
    assert math.isclose(c_out.flatten()[1].item(), 0.35355339059327373)
    assert math.isclose(c_in.flatten()[1].item(), 1.4142135623730951)
    assert math.isclose(c_noise.flatten()[1].item(), -0.17328679513998632)
    assert math.isclose(c_skip.flatten()[2].item(), 0.058823529411764705)
    assert math.isclose(c_out.flatten()[2].item(), 0.48507125007266594)
    assert math.isclose(c_in.flatten()[2].item(), 0.48507125007266594)
    assert math.isclose(c_noise.flatten()[2].item(), 0.17328679513998632)


@torch.no_grad()
def test_edm_denoiser_is_the_manual_composition():
    edm = _edm(10)
    naive = NaiveLego(edm.model)
    x = torch.randn(2, 3, 32, 32) * 2
    sigma = torch.tensor([0.7, 3.0])
    y = one_hot([1, 8], 10)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    out = edm(x, sigma, y)
    assert out.dtype == torch.float32
    assert_matches(out, c_skip * x.double() + c_out * naive(c_in * x.double(), c_noise, y), "EDM D(x)")
    # against the backbone called by hand (the same float32 path)
    manual = c_skip.float() * x + c_out.float() * edm.model(c_in.float() * x, c_noise.float(), y)
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    # a scalar sigma broadcasts over the batch
    torch.testing.assert_close(edm(x, 0.7, y), edm(x, torch.tensor([0.7, 0.7]), y), rtol=0, atol=0)
    # labels None on a conditional model: all-zero labels (EDM's convention), not "no labels"
    ref_zero = c_skip * x.double() + c_out * naive(c_in * x.double(), c_noise, torch.zeros(2, 10))
    assert_matches(edm(x, sigma, None), ref_zero, "EDM labels None")
    # return_stage_idx and skip_bricks pass through
    with count_brick_calls(edm.model) as calls:
        out1 = edm(x, sigma, y, return_stage_idx=1, skip_bricks=[0])
    assert calls == [0, 1, 0, 0, 0]
    ref1 = c_skip * x.double() + c_out * naive(c_in * x.double(), c_noise, y, run=[1])
    assert_matches(out1, ref1, "EDM skip 0, stage 1")


@torch.no_grad()
def test_edm_unconditional_ignores_labels():
    edm = _edm(0)
    naive = NaiveLego(edm.model)
    x = torch.randn(1, 3, 32, 32)
    out = edm(x, 1.5)
    assert torch.equal(edm(x, 1.5, torch.ones(1, 10)), out)
    c_skip, c_out, c_in, c_noise = edm_coefficients([1.5])
    assert_matches(out, c_skip * x.double() + c_out * naive(c_in * x.double(), c_noise), "EDM unconditional")


@torch.no_grad()
def test_edm_cfg_path():
    edm = _edm(10)
    naive = NaiveLego(edm.model)
    x = torch.randn(1, 3, 32, 32)
    sigma = torch.tensor([1.2])
    y = one_hot([5], 10)
    scale = 1.7
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    for k, skip, run in [(None, None, [0, 1, 2, 3, 4]), (2, [1], [0, 2])]:
        with count_brick_calls(edm.model) as calls:
            out = edm(x, sigma, y, cfg_scale=scale, return_stage_idx=k, skip_bricks=skip)
        assert calls == [int(i in run) for i in range(5)]
        cond = naive(c_in * x.double(), c_noise, y, run=run)
        uncond = naive(c_in * x.double(), c_noise, torch.zeros(1, 10), run=run)
        ref = c_skip * x.double() + c_out * (uncond + scale * (cond - uncond))
        assert_matches(out, ref, f"EDM cfg k={k} skip={skip}")
    # cfg_scale 1 is the plain conditional denoiser
    torch.testing.assert_close(edm(x, sigma, y, cfg_scale=1.0), edm(x, sigma, y), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_edm_list_output_with_train_intermediate_stages():
    edm = _edm(10, train_stages=True)
    naive = NaiveLego(edm.model)
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.9, 5.0])
    y = one_hot([3, 3], 10)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    ref = naive.stages(c_in * x.double(), c_noise, y)
    edm.train()
    try:
        outs = edm(x, sigma, y, force_drop_ids=torch.zeros(2, 1))
    finally:
        edm.eval()
    assert isinstance(outs, list) and len(outs) == 5
    for k in range(5):
        assert_matches(outs[k], c_skip * x.double() + c_out * ref[k], f"EDM train stage {k}")
    # eval mode: one tensor, the last stage
    out = edm(x, sigma, y)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, outs[4], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# On a GPU (the lead runs these): the reference backend on CUDA, fp32 with TF32 off
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("name,depths,H,W,B", [
    (U, U_DEPTHS, 32, 32, 2),
    ("lego_S_PG_64", (1, 1, 1), 64, 128, 1),
    ("lego_S_PR_64", None, 64, 64, 1),
])
@torch.no_grad()
def test_cuda_reference_backend_matches_naive(name, depths, H, W, B):
    model, naive = built(name, 10, depths)
    gpu = copy.deepcopy(model).cuda()
    x, t = inputs(B, 3, H, W, seed=21)
    y = one_hot([4, 2][:B], 10)
    with _no_tf32():
        out = gpu(x.cuda(), t.cuda(), y.cuda())
        cfg = gpu.forward_with_cfg(x.cuda(), t.cuda(), y.cuda(), 3.0, return_stage_idx=1)
    assert_matches(out.cpu(), naive(x, t, y), f"cuda {name}", rel=1e-4)
    cond, uncond = naive(x, t, y, run=[0, 1]), naive(x, t, torch.zeros(B, 10), run=[0, 1])
    assert_matches(cfg.cpu(), uncond + 3.0 * (cond - uncond), f"cuda cfg {name}", rel=1e-4)


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_many_regions_chunked_attention_matches_cpu():
    """512x512 on lego_S_PG_64: brick 0 has 16,384 four-token regions x 6 heads, more rows than
    one SDPA launch takes, so the reference attention runs in chunks; CPU fp32 is the oracle."""
    model, _ = built("lego_S_PG_64", 10, (1, 1, 1))
    gpu = copy.deepcopy(model).cuda()
    x, t = inputs(1, 3, 512, 512, seed=22)
    y = one_hot([9], 10)
    ref = model(x, t, y).double()
    with _no_tf32():
        out = gpu(x.cuda(), t.cuda(), y.cuda()).cpu()
    assert_matches(out, ref, "cuda 512x512", rel=1e-4)
