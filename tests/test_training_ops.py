"""Training on the fused ops: the custom ops' gradients (Triton backward kernels) against the
reference ops, the backward pieces against autograd, the whole model, optimizer steps,
torch.library.opcheck, a fullgraph torch.compile and deterministic mode.

Without a GPU: CPU tensors through Triton's interpreter (fp32/fp16, tiny shapes, the triton
backend forced). On a GPU (cuda mark): fp32/bf16/fp16, autocast, a bf16-held model, real widths."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastlego
from fastlego import dispatch, reference
from fastlego.testing import assert_close_to_reference, max_error, randomize_

pytest.importorskip("triton")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, g, scale=1.0, offset=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset


# ------------------------------------------------------------------------------------------------
# Inputs of each fused op (float64, CPU); per-image tensors are strided chunks of one (B, kD)
# tensor as in the model
# ------------------------------------------------------------------------------------------------

def modulated_inputs(B=2, L=3, T=5, K=24, N=40, seed=0):
    g = _gen(seed)
    ada = _rand((B, 2 * K), g, 0.5)
    h = _rand((B * L, T, K), g, 2.0, 0.7)
    return dict(h=h, shift=ada[:, :K], scale=ada[:, K:], weight=_rand((N, K), g, K ** -0.5), bias=_rand((N,), g, 0.1))


def gated_inputs(B=2, L=3, T=5, K=40, N=24, seed=1):
    g = _gen(seed)
    ada = _rand((B, 3 * N), g, 0.5)
    return dict(a=_rand((B * L, T, K), g), weight=_rand((N, K), g, K ** -0.5), bias=_rand((N,), g, 0.1),
                gate=ada[:, N:2 * N], residual=_rand((B * L, T, N), g))


def attention_inputs(N=5, T=9, heads=2, hd=8, seed=2):
    return dict(qkv=_rand((N, T, 3 * heads * hd), _gen(seed), 1.5))


def embed_inputs(B=2, C=3, H=8, W=16, region=4, patch=2, D=32, prev=True, seed=3):
    g = _gen(seed)
    cin = (2 * C if prev else C) + 2
    T = (region // patch) ** 2
    return dict(x=_rand((B, C, H, W), g), prev=_rand((B, C, H, W), g) if prev else None,
                weight=_rand((D, cin, patch, patch), g, (cin * patch * patch) ** -0.5), bias=_rand((D,), g, 0.1),
                pos_embed=_rand((1, T, D), g, 0.5))


def final_inputs(B=2, C=3, H=8, W=16, region=8, patch=2, D=32, seed=4):
    g = _gen(seed)
    L, T = (H // region) * (W // region), (region // patch) ** 2
    ada = _rand((B, 2 * D), g, 0.5)
    return dict(h=_rand((B * L, T, D), g, 1.5, -0.3), shift=ada[:, :D], scale=ada[:, D:],
                weight=_rand((patch * patch * C, D), g, D ** -0.5), bias=_rand((patch * patch * C,), g, 0.1))


def mlp_inputs(B=2, L=3, T=5, K=24, seed=5):
    g = _gen(seed)
    ada = _rand((B, 3 * K), g, 0.5)
    return dict(h=_rand((B * L, T, K), g, 2.0, 0.7), shift=ada[:, :K], scale=ada[:, K:2 * K], gate=ada[:, 2 * K:],
                w1=_rand((4 * K, K), g, K ** -0.5), b1=_rand((4 * K,), g, 0.1),
                w2=_rand((K, 4 * K), g, (4 * K) ** -0.5), b2=_rand((K,), g, 0.1))


# op name -> (ops function taking the tensors, input maker)
OPS = {
    "modulated_linear": (lambda t, act=None: fastlego.ops.modulated_linear(t["h"], t["shift"], t["scale"], t["weight"], t["bias"], act),
                         modulated_inputs),
    "modulated_linear_gelu": (lambda t: fastlego.ops.modulated_linear(t["h"], t["shift"], t["scale"], t["weight"], t["bias"], "gelu_tanh"),
                              modulated_inputs),
    "linear_gated_residual": (lambda t: fastlego.ops.linear_gated_residual(t["a"], t["weight"], t["bias"], t["gate"], t["residual"]),
                              gated_inputs),
    "linear_gated_residual_recompute_y": (lambda t: fastlego.ops.linear_gated_residual(
        t["a"], t["weight"], t["bias"], t["gate"], t["residual"], keep_y=False), gated_inputs),
    "window_attention": (lambda t: fastlego.ops.attention(t["qkv"], 2), attention_inputs),
    "brick_embed": (lambda t: fastlego.ops.brick_embed(t["x"], t["prev"], t["weight"], t["bias"], t["pos_embed"], 4),
                    embed_inputs),
    "mlp": (lambda t: fastlego.ops.mlp(t["h"], t["shift"], t["scale"], t["w1"], t["b1"], t["w2"], t["b2"], t["gate"]),
            mlp_inputs),
    "final_layer": (lambda t: fastlego.ops.final_layer(t["h"], t["shift"], t["scale"], t["weight"], t["bias"], 8, (2, 3, 8, 16)),
                    final_inputs),
}


def _leaves(tensors, dtype, device="cpu"):
    """Fresh leaf copies in dtype that require grad. Per-image tensors stay strided chunks of one
    leaf (as in the model), so their gradients flow through the chunk views."""
    out, grads_of = {}, {}
    bases = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        base = t._base if t._base is not None else t
        key = id(base)
        if key not in bases:
            bases[key] = base.detach().to(device, dtype).requires_grad_()
            grads_of[name] = bases[key]
        leaf = bases[key]
        out[name] = leaf.as_strided(t.shape, t.stride(), t.storage_offset()) if t._base is not None else leaf
    return out, grads_of


def op_grads(op, mode, dtype, device="cpu", seed=7):
    """(output, {leaf name: grad}) of an op under backend `mode`, for a fixed random grad_out."""
    fn, make = OPS[op]
    tensors, leaves = _leaves(make(), dtype, device)
    with fastlego.use_backend(mode):
        out = fn(tensors)
        g = torch.randn(out.shape, generator=_gen(seed), dtype=torch.float64).to(device, out.dtype)
        grads = torch.autograd.grad(out, list(leaves.values()), g)
    return out.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("op", list(OPS))
def test_reference_op_gradcheck_fp64(op):
    """torch.autograd.gradcheck on the fp64 reference ops (the oracle's own gradients)."""
    fn, make = OPS[op]
    small = dict(modulated_inputs=dict(B=1, L=2, T=2, K=8, N=6), gated_inputs=dict(B=1, L=2, T=2, K=6, N=8),
                 attention_inputs=dict(N=2, T=3, heads=2, hd=4), embed_inputs=dict(B=1, C=1, H=4, W=8, D=8),
                 final_inputs=dict(B=1, C=1, H=8, W=8, D=8), mlp_inputs=dict(B=1, L=2, T=2, K=4))[make.__name__]
    tensors = make(**small)
    if op == "final_layer":
        tensors = make(B=2, C=3, H=8, W=16, D=8)
    names = [n for n, t in tensors.items() if t is not None]

    def f(*args):
        t = dict(tensors, **dict(zip(names, args)))
        with fastlego.use_backend("reference"):
            return fn(t)

    args = [tensors[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# The reference backward pieces (the custom ops' fallback) against autograd of the forward ops
# ------------------------------------------------------------------------------------------------

def _autograd(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, grad_out)


def _ln_modulate(h, shift, scale):
    return reference.modulate(reference.layernorm(h), shift, scale)


def test_reference_backward_pieces_match_autograd():
    t = modulated_inputs()
    h, shift, scale = t["h"], t["shift"].contiguous(), t["scale"].contiguous()
    ga = _rand(h.shape, _gen(9))
    want = _autograd(_ln_modulate, (h, shift, scale), ga)
    got = reference.layernorm_modulate_backward(h, shift, scale, ga)
    for w, g in zip(want, got):
        assert max_error(g, w) < 1e-10

    t = gated_inputs()
    y = _rand(t["residual"].shape, _gen(10))
    gate = t["gate"].contiguous()
    gout = _rand(y.shape, _gen(11))
    want = _autograd(lambda yy, gg: reference.gated_residual(t["residual"], gg, yy), (y, gate), gout)
    dy, dgate, dbias = reference.gated_residual_backward(gout, y, gate)
    assert max_error(dy, want[0]) < 1e-12 and max_error(dgate, want[1]) < 1e-10
    assert max_error(dbias, want[0].reshape(-1, y.shape[-1]).sum(0)) < 1e-10
    # an incoming residual-branch gradient for h is added to LN's
    t = modulated_inputs()
    h, shift, scale = t["h"], t["shift"].contiguous(), t["scale"].contiguous()
    ga, gres = _rand(h.shape, _gen(16)), _rand(h.shape, _gen(19))
    want = _autograd(_ln_modulate, (h, shift, scale), ga)
    got = reference.layernorm_modulate_backward(h, shift, scale, ga, gres)
    assert max_error(got[0], want[0] + gres) < 1e-10

    pre, gact = _rand((4, 6, 20), _gen(17), 2.0), _rand((4, 6, 20), _gen(18))
    (want,) = _autograd(lambda p_: F.gelu(p_, approximate="tanh"), (pre,), gact)
    dpre, act, dbias = reference.gelu_tanh_backward(gact.clone(), pre)
    assert max_error(dpre, want) < 1e-12 and max_error(act, F.gelu(pre, approximate="tanh")) < 1e-14
    assert max_error(dbias, want.reshape(-1, 20).sum(0)) < 1e-10

    qkv = attention_inputs(N=4, T=7)["qkv"]
    gout = _rand((4, 7, 16), _gen(12))
    (want,) = _autograd(lambda q: reference.attention_math(q, 2), (qkv,), gout)
    assert max_error(reference.window_attention_backward(qkv, gout, 2), want) < 1e-10

    e = embed_inputs()
    gout = _rand((2 * 8, 4, 32), _gen(13))
    want = _autograd(lambda p, x: reference.brick_embed(x, p, e["weight"], e["bias"], e["pos_embed"], 4),
                     (e["prev"], e["x"]), gout)
    dprev, dx = reference.brick_embed_input_grad(gout, e["weight"], e["x"].shape, True, 4)
    assert max_error(dprev, want[0]) < 1e-10 and max_error(dx, want[1]) < 1e-10
    # patches @ weight^T + bias + pos is the embedding
    tokens = reference.patches(e["x"], e["prev"], 2, 4) @ e["weight"].reshape(32, -1).t() + e["bias"]
    ref = reference.brick_embed(e["x"], e["prev"], e["weight"], e["bias"], e["pos_embed"], 4)
    assert max_error(tokens.reshape(ref.shape) + e["pos_embed"], ref) < 1e-10

    img = _rand((2, 3, 8, 16), _gen(14))
    # patchify_image_grad inverts unpatchify + fold: <fold(y), img> = <y, patchify(img)>
    y = _rand((4, 16, 12), _gen(15))
    folded = reference.fold_regions(reference.unpatchify(y, 2, 3), 2, 8, 16)
    assert abs((folded * img).sum() - (y.reshape(-1, 12) * reference.patchify_image_grad(img, 2, 8)).sum()) < 1e-9


# The Triton backward kernels against the reference pieces: tests/test_kernel_<family>.py
# (layernorm_modulate, gated_residual, gelu, brick_embed, window_attention_backward).

def _dev_dtypes():
    return [torch.float32, torch.float16]


def _check(got, ref64, same, dtype, what, rel=1e-5):
    atol = rel * max(1.0, ref64.abs().max().item())
    assert_close_to_reference(got.double(), ref64, None if dtype == torch.float32 else same.double(),
                              atol=atol, what=what)


# ------------------------------------------------------------------------------------------------
# Each fused op: gradients of the custom op (triton) against the reference op
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", _dev_dtypes())
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.interpreter
def test_op_gradients_triton_vs_reference(op, dtype):
    out64, ref64 = op_grads(op, "reference", torch.float64)
    out_same, ref_same = op_grads(op, "reference", dtype)
    with dispatch.record() as rec:
        out, got = op_grads(op, "triton", dtype)
    chosen = {r.op: r.chosen for r in rec}
    assert set(chosen.values()) == {"triton"}, chosen     # forward (if dispatched) and backward kernels ran
    assert any(name.endswith("backward") or name.endswith("_grad") for name in chosen), chosen
    _check(out, out64, out_same, dtype, f"{op} output {dtype}")
    assert set(got) == set(ref64)
    for name in ref64:
        assert got[name].dtype == dtype
        _check(got[name], ref64[name], ref_same[name], dtype, f"{op} d{name} {dtype}", rel=2e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.interpreter
def test_mlp_backward_writes_gelu_over_pre_only_when_the_graph_is_dropped(mode, device):
    """The eager MLP backward writes GELU(pre) over the saved pre (one M x 4D buffer less at the
    peak) when nothing can read pre again; with retain_graph it keeps pre, so a second backward
    gives the same gradients. Both give the functional op's gradients."""
    from fastlego import custom_ops
    t, _ = _leaves(mlp_inputs(), torch.float32, device)
    args = (t["h"], t["shift"], t["scale"], t["w1"], t["b1"], t["w2"], t["b2"], t["gate"])
    leaves = [t["h"], t["shift"]._base, t["w1"], t["b1"], t["w2"], t["b2"]]
    g = torch.randn(t["h"].shape, generator=_gen(3)).to(device)
    with fastlego.use_backend("triton"):      # the custom op's eager path (the interpreter on the CPU)
        out = custom_ops.mlp(*args)
        first = torch.autograd.grad(out, leaves, g, retain_graph=True)
        second = torch.autograd.grad(out, leaves, g)                      # pre kept by the first
        out = custom_ops.mlp(*args)
        dropped = torch.autograd.grad(out, leaves, g)                     # pre overwritten
    for a, b, c in zip(first, second, dropped):
        assert torch.equal(a, b) and torch.allclose(a, c, rtol=1e-6, atol=1e-6)
    # the implementation itself: the same gradients, and pre holds GELU(pre) afterwards
    with torch.no_grad(), fastlego.use_backend(mode):
        saved = custom_ops._RAW["mlp"](*args, None)
        pre = saved[1].clone()
        grads = [custom_ops._mlp_backward_impl(g, t["h"], t["shift"], t["scale"], t["w1"], p, t["w2"], t["gate"],
                                               saved[2], None, True, True, overwrite_pre=over)
                 for p, over in ((pre.clone(), False), (pre, True))]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert torch.allclose(pre, F.gelu(saved[1], approximate="tanh"), rtol=1e-6, atol=1e-6)


def test_auto_mode_on_cpu_trains_through_the_reference_twins():
    """In auto mode on the CPU the Triton kernels are refused; eager training takes PyTorch's
    autograd through the reference ops (no custom op), and gives the reference gradients."""
    _, ref = op_grads("modulated_linear_gelu", "reference", torch.float32)
    with dispatch.record() as rec:
        out, got = op_grads("modulated_linear_gelu", "auto", torch.float32)
    assert {r.chosen for r in rec} == {"reference"} and {r.op for r in rec} == {"modulated_linear"}
    for name in ref:
        assert max_error(got[name], ref[name]) < 1e-5


# ------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------

def small_model(label_dim=5, intermediate=False, dtype=torch.float32, device="cpu"):
    # regions 4 / 8 / 32 (4, 4 and 256 tokens per region: window and global attention)
    m = fastlego.LegoBackbone([4, 8, 32], 3, label_dim=label_dim, model_type=[(32, 2, 2), (32, 4, 2), (32, 2, 2)],
                              depths=[1, 2, 1], train_intermediate_stages=intermediate)
    return randomize_(m, seed=1).to(device, dtype).train()


def model_grads(model, mode, x, t, y, drop):
    model.zero_grad(set_to_none=True)
    # global attention (regions > 64 tokens) trains on SDPA or flash-attn, whose backward they have;
    # the Triton flash kernel is forward-only, so a forced "triton" leaves that op on auto
    overrides = {"global_attention": "auto"} if mode == "triton" else {}
    with fastlego.use_backend(mode, **overrides):
        out = model(x, t, y, force_drop_ids=drop)
        outs = out if isinstance(out, list) else [out]
        loss = sum(((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64, device=o.device).view(o.shape)) ** 2).mean()
                   for o in outs)
        loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()     # a compiled model wraps the module
    return [o.detach() for o in outs], {n: p.grad.detach().clone() for n, p in params if p.grad is not None}


@pytest.mark.parametrize("intermediate", [False, True])
@pytest.mark.interpreter
def test_model_gradients_triton_vs_reference(intermediate):
    model = small_model(intermediate=intermediate)
    g = _gen(5)
    x = torch.randn(2, 3, 32, 64, generator=g)
    t = torch.randn(2, generator=g)
    y = F.one_hot(torch.tensor([1, 3]), 5).float()
    drop = torch.tensor([0, 1])          # label dropout with fixed ids: image 1 unconditional
    ref_out, ref = model_grads(model, "reference", x, t, y, drop)
    with dispatch.record() as rec:
        out, got = model_grads(model, "triton", x, t, y, drop)
    # (linear_gated_residual's training forward is cuBLAS + one fused pass that keeps y: no dispatch)
    assert {r.op for r in rec} >= {"brick_embed", "modulated_linear", "window_attention", "final_layer", "layernorm_modulate_backward", "gated_residual_backward",
                                    "gelu_tanh_backward", "window_attention_backward", "brick_embed_input_grad"}
    assert len(out) == (3 if intermediate else 1)
    for o, r in zip(out, ref_out):
        assert max_error(o, r) <= 1e-4 * r.abs().max().item()
    assert set(got) == set(ref)
    assert model.y_embedder.embedding_table.weight.grad[:, 3].abs().max() == 0, "dropped label must get no gradient"
    for name in ref:
        scale = max(ref[name].abs().max().item(), 1e-3)
        assert max_error(got[name], ref[name]) <= 2e-4 * scale, name


@pytest.mark.interpreter
def test_optimizer_steps_agree_across_backends():
    x = torch.randn(2, 3, 32, 32, generator=_gen(6))
    t = torch.randn(2, generator=_gen(7))
    y = F.one_hot(torch.tensor([0, 2]), 5).float()
    finals = {}
    for mode in ("reference", "triton"):
        torch.manual_seed(0)             # the same random label dropout in both runs
        model = small_model()
        # eps 1e-4: Adam's update g / (|g| + eps) turns a 1e-7 gradient difference at an element
        # whose gradient is ~0 into a full lr-sized step with the default eps (1e-8); with 1e-4
        # the update moves by at most lr * |dg| / eps
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-4)
        for _ in range(3):
            model_grads(model, mode, x, t, y, None)
            opt.step()
        finals[mode] = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = max((finals["reference"][n] - p).abs().max().item()
                for n, p in small_model().named_parameters())
    assert moved > 1e-3, "the optimizer must move the weights"
    for n, w in finals["reference"].items():
        assert max_error(finals["triton"][n], w) < 1e-5, n


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile(fullgraph=True), determinism, fp16 range
# ------------------------------------------------------------------------------------------------

def _opcheck_samples(dtype=torch.float32, device="cpu"):
    def req(t):
        return None if t is None else t.detach().to(device, dtype).requires_grad_()
    m, a, q = modulated_inputs(), gated_inputs(), attention_inputs(N=3, T=4)
    e, f, p = embed_inputs(), final_inputs(), mlp_inputs()
    ops = torch.ops.fastlego
    yield ops.modulated_linear.default, (req(m["h"]), req(m["shift"]), req(m["scale"]), req(m["weight"]), req(m["bias"]), "gelu_tanh", None)
    yield ops.modulated_linear.default, (req(m["h"]), req(m["shift"]), req(m["scale"]), req(m["weight"]), None, None, None)
    yield ops.linear_gated_residual.default, (req(a["a"]), req(a["weight"]), req(a["bias"]), req(a["gate"]), req(a["residual"]), None)
    yield ops.linear_gated_residual.default, (req(a["a"]), req(a["weight"]), req(a["bias"]), req(a["gate"]), req(a["residual"]), None, False)
    yield ops.linear_gated_residual.default, (req(a["a"]), req(a["weight"]), None, req(a["gate"]), req(a["residual"]), None, False)
    yield ops.mlp.default, (req(p["h"]), req(p["shift"]), req(p["scale"]), req(p["w1"]), req(p["b1"]), req(p["w2"]), req(p["b2"]), req(p["gate"]), None)
    yield ops.mlp.default, (req(p["h"]), req(p["shift"]), req(p["scale"]), req(p["w1"]), None, req(p["w2"]), None, req(p["gate"]), None)
    yield ops.window_attention.default, (req(q["qkv"]), 2, None, "window_attention")
    yield ops.brick_embed.default, (req(e["x"]), req(e["prev"]), req(e["weight"]), req(e["bias"]), req(e["pos_embed"]), 4, None)
    yield ops.final_layer.default, (req(f["h"]), req(f["shift"]), req(f["scale"]), req(f["weight"]), req(f["bias"]), 8, [2, 3, 8, 16], None)


@pytest.mark.parametrize("mode", [pytest.param("triton", marks=pytest.mark.interpreter), "reference"])
def test_opcheck_every_custom_op(mode):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration, and
    aot_dispatch (the backward custom ops through AOTAutograd) for every fused op."""
    with fastlego.use_backend(mode):
        for op, args in _opcheck_samples():
            torch.library.opcheck(op, args)


@pytest.mark.interpreter
def test_compile_fullgraph_trains_cpu():
    """torch.compile(model, fullgraph=True) traces the custom ops without graph breaks and its
    gradients are the eager ones (aot_eager on the CPU; Inductor on the GPU below)."""
    model = small_model()
    x = torch.randn(2, 3, 32, 32, generator=_gen(8))
    t = torch.randn(2, generator=_gen(9))
    y = F.one_hot(torch.tensor([0, 2]), 5).float()
    keep = torch.zeros(2, dtype=torch.long)     # no random label dropout
    _, eager = model_grads(model, "triton", x, t, y, keep)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _, comp = model_grads(compiled, "triton", x, t, y, keep)
    assert set(comp) == set(eager)
    for n in eager:
        assert max_error(comp[n], eager[n]) <= 1e-6 * max(1.0, eager[n].abs().max().item()), n
    # inference through the compiled model: the same custom ops, no autograd
    model.eval()
    with torch.no_grad(), fastlego.use_backend("triton", global_attention="auto"):
        want = model(x, t, y)
        got = compiled(x, t, y)
    assert max_error(got, want) <= 1e-6 * max(1.0, want.abs().max().item())


@pytest.mark.interpreter
def test_deterministic_mode_gives_identical_gradients():
    model = small_model()
    x = torch.randn(2, 3, 32, 32, generator=_gen(10))
    t = torch.randn(2, generator=_gen(11))
    assert not fastlego.dispatch.is_deterministic()
    with fastlego.deterministic():
        assert torch.are_deterministic_algorithms_enabled() and fastlego.dispatch.is_deterministic()
        _, first = model_grads(model, "triton", x, t, None, None)
        _, second = model_grads(model, "triton", x, t, None, None)
    assert not torch.are_deterministic_algorithms_enabled() and not fastlego.dispatch.is_deterministic()
    for n in first:
        assert torch.equal(first[n], second[n]), n


def _saved_activation_bytes(mode):
    """Bytes of the distinct tensors autograd keeps for a DiT block's backward, parameters and the
    block's inputs excluded (a storage saved by several ops counts once)."""
    block = randomize_(fastlego.model.DiTBlock(64, 2), seed=1)
    h = torch.randn(8, 16, 64, requires_grad=True)
    c = torch.randn(2, 64, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with fastlego.use_backend(mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(h, c)
    out.sum().backward()
    skip = {t.untyped_storage().data_ptr() for t in [h, c, *block.parameters()]}
    return sum(v for k, v in seen.items() if k not in skip)


@pytest.mark.interpreter
def test_backward_keeps_fewer_activations_than_the_reference():
    """The fused ops keep qkv, the attention output, fc2's y, the mid residual and fc1's
    pre-activation (10 M x D in fp32; proj's y is recomputed); the reference ops also keep
    LayerNorm outputs, modulated inputs, proj's y and GELU's output (19 M x D)."""
    ref, fused = _saved_activation_bytes("reference"), _saved_activation_bytes("triton")
    unit = 8 * 16 * 64 * 4
    assert fused <= 10.5 * unit and fused < 0.56 * ref, (fused / unit, ref / unit)


# ------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("op", list(OPS))
def test_cuda_op_gradients(op, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out64, ref64 = op_grads(op, "reference", torch.float64, "cuda")
    out_same, ref_same = op_grads(op, "reference", dtype, "cuda")
    with dispatch.record() as rec:
        out, got = op_grads(op, "triton", dtype, "cuda")
    assert {r.chosen for r in rec} == {"triton"}
    _check(out, out64, out_same, dtype, f"{op} output {dtype}")
    for name in ref64:
        _check(got[name], ref64[name], ref_same[name], dtype, f"{op} d{name} {dtype}", rel=2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(256, 4, 384, 6), (8, 64, 1024, 16), (16, 16, 1152, 16)])
def test_cuda_block_gradients_at_model_widths(shape):
    """One DiT block at the presets' widths (S 384/6, L 1024/16, XL 1152/16) in bf16 under
    autocast with fp32 weights, triton vs reference, against the fp32 reference."""
    regions, T, D, heads = shape
    torch.manual_seed(0)
    block = randomize_(fastlego.model.DiTBlock(D, heads), seed=2).cuda()
    h0 = torch.randn(regions, T, D, device="cuda") * 2 + 0.3
    c0 = torch.randn(4, D, device="cuda")

    def grads(mode, amp):
        block.zero_grad(set_to_none=True)
        h, c = h0.clone().requires_grad_(), c0.clone().requires_grad_()
        with fastlego.use_backend(mode), torch.autocast("cuda", torch.bfloat16, enabled=amp):
            out = block(h, c)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view(out.shape)).sum().backward()
        return [out.detach().float(), h.grad, c.grad] + [p.grad.float() for p in block.parameters()]

    torch.backends.cuda.matmul.allow_tf32 = False
    ref = grads("reference", False)
    same = grads("reference", True)
    got = grads("triton", True)
    for i, (o, r, s) in enumerate(zip(got, ref, same)):
        assert_close_to_reference(o, r, s, atol=1e-3 * r.abs().max().item(), what=f"block {shape} tensor {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16_autocast", "fp16_autocast", "bf16_model"])
def test_cuda_training_steps_in_mixed_precision(precision):
    """A few AdamW steps of lego_S_PG_64 (fp32 master weights under autocast; or the model held in
    bf16): finite losses, triton within tolerance of the reference, and the weights move."""
    preset = fastlego.LegoBackbone.from_preset("lego_S_PG_64", label_dim=10)
    state = randomize_(preset, seed=3, scale=0.5).state_dict()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 3, 64, 64, generator=g).cuda()
    t = torch.randn(16, generator=g).cuda()
    y = F.one_hot(torch.arange(16) % 10, 10).float().cuda()
    amp = {"bf16_autocast": torch.bfloat16, "fp16_autocast": torch.float16, "bf16_model": None}[precision]
    results = {}
    for mode in ("reference", "triton"):
        model = fastlego.LegoBackbone.from_preset("lego_S_PG_64", label_dim=10)
        model.load_state_dict(state)
        model = model.cuda().train()
        if precision == "bf16_model":
            model = model.to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            overrides = {"global_attention": "auto"} if mode == "triton" else {}   # brick 2: 1024-token regions
            with fastlego.use_backend(mode, **overrides), \
                    torch.autocast("cuda", amp or torch.bfloat16, enabled=amp is not None):
                out = model(x.to(model.dtype), t, y.to(model.dtype))
                loss = (out.float() - x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[mode] = losses
    assert all(math.isfinite(v) for v in results["triton"]), results
    for a, b in zip(results["triton"], results["reference"]):
        assert abs(a - b) <= 0.02 * abs(b) + 1e-3, results


@pytest.mark.cuda
def test_cuda_compile_fullgraph_inductor_trains():
    model = small_model(device="cuda")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.randn(4, device="cuda")
    y = F.one_hot(torch.tensor([0, 2, 1, 4]), 5).float().cuda()
    keep = torch.zeros(4, dtype=torch.long, device="cuda")
    _, eager = model_grads(model, "auto", x, t, y, keep)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", torch.bfloat16):
        model_grads(compiled, "auto", x, t, y, keep)        # bf16 autocast compiles too
    _, comp = model_grads(compiled, "auto", x, t, y, keep)
    assert set(comp) == set(eager)
    for n in eager:
        assert max_error(comp[n], eager[n]) <= 1e-3 * max(1.0, eager[n].abs().max().item()), n


@pytest.mark.cuda
def test_cuda_deterministic_gradients_are_bitwise_identical():
    model = fastlego.LegoBackbone.from_preset("lego_S_PG_64", label_dim=0)
    randomize_(model, seed=5, scale=0.5)
    model = model.cuda().train()
    x = torch.randn(32, 3, 64, 64, device="cuda")
    t = torch.randn(32, device="cuda")
    with fastlego.deterministic():
        runs = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                out = model(x, t)
            out.float().square().mean().backward()
            runs.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# The pieces a fused op's backward dispatches (fastlego.custom_ops)
BACKWARD_PIECES = ("layernorm_modulate", "layernorm_modulate_backward", "gated_residual_backward", "gelu_tanh_backward",
                   "window_attention_backward", "brick_embed_input_grad")


def _cuda_step_decisions(forward_block, backward_block, monkeypatch):
    """Forward of small_model inside `forward_block`, backward (on PyTorch's CUDA threads) inside
    `backward_block`: (decisions recorded, thread ids the backward pieces ran on, the test's thread)."""
    import threading
    from fastlego import custom_ops
    threads = set()
    real_call = custom_ops.call

    def spy(op, *args, **kwargs):
        if op in BACKWARD_PIECES:
            threads.add(threading.get_ident())
        return real_call(op, *args, **kwargs)

    monkeypatch.setattr(custom_ops, "call", spy)
    model = small_model(device="cuda")
    x = torch.randn(2, 3, 32, 64, device="cuda")
    t = torch.randn(2, device="cuda")
    y = torch.tensor([1, 3], device="cuda")
    with dispatch.record() as rec:
        with forward_block:
            out = model(x, t, y)
        with backward_block:
            (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view(out.shape)).square().sum().backward()
    torch.cuda.synchronize()
    return rec, threads, threading.get_ident()


@pytest.mark.cuda
def test_cuda_backward_pieces_run_under_the_forwards_choices(monkeypatch):
    """PyTorch runs the backward of CUDA tensors on its own threads, where the forward's
    use_backend block is not open: the backward pieces still take the forward's choices."""
    import contextlib
    # 1. forced reference around the forward: every op, forward and backward, on the reference
    rec, _, _ = _cuda_step_decisions(fastlego.use_backend("reference"), contextlib.nullcontext(), monkeypatch)
    assert rec and {d.chosen for d in rec} == {"reference"}, {(d.op, d.chosen) for d in rec}
    # 2. triton forward with every backward piece forced to the reference around it; the
    #    backward itself runs under a block that forces triton: the forward's choices win
    pieces_ref = {op: "reference" for op in BACKWARD_PIECES}
    rec, threads, main = _cuda_step_decisions(fastlego.use_backend("auto", **pieces_ref), fastlego.use_backend("triton"),
                                              monkeypatch)
    chosen = {(d.op, d.chosen) for d in rec}
    assert {op for op, _ in chosen} >= {*BACKWARD_PIECES, "modulated_linear", "brick_embed", "final_layer"}, chosen
    assert all(c == "reference" for op, c in chosen if op in BACKWARD_PIECES), chosen
    assert ("modulated_linear", "triton") in chosen and ("brick_embed", "triton") in chosen, chosen
    assert threads and main not in threads        # the pieces did run on PyTorch's backward threads
    # 3. the converse: a triton forward's backward, run inside a reference block, stays on triton
    rec, _, _ = _cuda_step_decisions(fastlego.use_backend("auto"), fastlego.use_backend("reference"), monkeypatch)
    assert all(d.chosen == "triton" for d in rec if d.op in BACKWARD_PIECES), {(d.op, d.chosen) for d in rec}


_FRESH_PROCESS_STEPS = """
import sys, torch, torch.nn.functional as F, fastlego
from fastlego.testing import randomize_
fastlego.set_deterministic(True)
torch.manual_seed(0)
model = randomize_(fastlego.LegoBackbone.from_preset("lego_S_PG_64", label_dim=10), seed=5, scale=0.5).cuda().train()
g = torch.Generator().manual_seed(6)
x = torch.randn(16, 3, 64, 64, generator=g).cuda()
t = torch.randn(16, generator=g).cuda()
y = torch.randint(0, 10, (16,), generator=g).cuda()
drop = torch.zeros(16, dtype=torch.long, device="cuda")
with torch.autocast("cuda", torch.bfloat16):
    fastlego.tune(model, x, t, y, force_drop_ids=drop)          # deterministic: a no-op, as train runs it
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for _ in range(2):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16):
        out = model(x, t, y, force_drop_ids=drop)
    (out.float() - x).square().mean().backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
torch.save({"grads": grads, "params": {n: p.detach().cpu() for n, p in model.named_parameters()}}, sys.argv[1])
"""


@pytest.mark.cuda
def test_cuda_deterministic_gradients_match_across_fresh_processes(tmp_path):
    """Deterministic mode: two fresh processes, each with empty Triton and tuning caches (cold:
    every kernel compiled anew, nothing measured), run the same training steps and get the same
    gradients and weights, bit for bit."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(fastlego.__file__)))
    script = tmp_path / "steps.py"
    script.write_text(_FRESH_PROCESS_STEPS)
    results = []
    for run in ("a", "b"):
        env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / f"triton_{run}"), CUBLAS_WORKSPACE_CONFIG=":4096:8",
                   FASTLEGO_TUNE_CACHE=str(tmp_path / f"tuning_{run}.json"),
                   PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("TRITON_INTERPRET", None)
        out = subprocess.run([sys.executable, str(script), str(tmp_path / f"{run}.pt")], env=env, cwd=repo,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        results.append(torch.load(tmp_path / f"{run}.pt"))
    a, b = results
    assert a["grads"] and set(a["grads"]) == set(b["grads"])
    assert any(g.abs().max() > 0 for g in a["grads"].values())
    for kind in ("grads", "params"):
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), f"{kind} {name} differs between fresh processes"


@pytest.mark.cuda
def test_cuda_integer_labels_sync_nothing_and_capture_in_a_graph():
    """Integer class ids: no host sync in the forward (sync debug mode "error"), an out-of-range
    id gives NaN for its own image only, and a training step (forward + backward) and a sampling
    forward with integer labels capture as CUDA graphs and replay the eager values."""
    model = small_model(label_dim=5, device="cuda")
    x = torch.randn(3, 3, 32, 32, device="cuda")
    t = torch.randn(3, device="cuda")
    y = torch.tensor([1, 4, 0], device="cuda")
    model.eval()
    with torch.no_grad():
        want = model(x, t, F.one_hot(y.cpu(), 5).float().cuda())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = model(x, t, y)
            bad = model(x, t, torch.tensor([1, 5, 0], device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
    assert torch.isnan(bad[1]).all() and torch.equal(bad[0], want[0]) and torch.equal(bad[2], want[2])

    def capture(fn, *static):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static)
        return graph, out

    with torch.no_grad():                                    # a sampler's network call
        graph, out = capture(model, x.clone(), t.clone(), y.clone())
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)

    model.train()
    drop = torch.zeros(3, dtype=torch.long, device="cuda")
    params = [p for p in model.parameters()]

    def step(x, t, y):
        for p in params:
            p.grad = None
        out = model(x, t, y, force_drop_ids=drop)
        loss = out.float().square().mean()
        grads = torch.autograd.grad(loss, params)
        return [loss.detach()] + [g.detach() for g in grads]

    eager = step(x, t, y)
    graph, outs = capture(step, x.clone(), t.clone(), y.clone())
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(outs, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_opcheck():
    with fastlego.use_backend("triton"):
        for op, args in _opcheck_samples(torch.float32, "cuda"):
            torch.library.opcheck(op, args)


def test_mm_into_reuses_a_dead_transient_only_when_it_fits():
    from fastlego.custom_ops import _mm_into
    g = _gen(4)
    a, b = _rand((6, 5), g).float(), _rand((5, 3), g).float()
    buf = torch.full((2, 9), float("nan"))                      # 18 elements, contiguous: taken
    out = _mm_into(a, b, buf)
    assert out.data_ptr() == buf.data_ptr() and torch.allclose(out, a @ b)
    for bad in (torch.zeros(19), torch.zeros(18, dtype=torch.float64), torch.zeros(9, 2).t()):
        out = _mm_into(a, b, bad)                               # wrong size, dtype or layout: a fresh product
        assert out.data_ptr() != bad.data_ptr() and torch.allclose(out, a @ b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.interpreter
def test_projection_reruns_a_window_attention_instead_of_keeping_its_output(device):
    """The attention projection's eager backward keeps the window attention's qkv (kept anyway)
    instead of its output, and reruns the attention: the output is freed after the forward and
    the gradients are the same bits as when the output is kept."""
    import weakref
    from fastlego import custom_ops
    inputs = dict(attention_inputs(N=6, T=5), **gated_inputs(K=16, N=24))
    del inputs["a"]                                   # the projection's input is the attention's output
    t, leaves = _leaves(inputs, torch.float32, device)
    g = torch.randn(t["residual"].shape, generator=_gen(8)).to(device)

    def run(keep_output):
        with fastlego.use_backend("triton"):
            a = custom_ops.window_attention(t["qkv"], 2)
            if keep_output:
                custom_ops._RECOMPUTE.pop(a)
            gone = weakref.ref(a)
            out = custom_ops.linear_gated_residual(a, t["weight"], t["bias"], t["gate"], t["residual"], keep_y=False)
            del a
            freed = gone() is None
            return freed, torch.autograd.grad(out, list(leaves.values()), g)

    freed, grads = run(False)
    kept, ref = run(True)
    assert freed and not kept
    for x, y in zip(grads, ref):
        assert torch.equal(x, y)
