"""The dispatcher: reasons, forced backends, run-time fallback, per-op overrides, no-triton behaviour."""

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastlego
from fastlego import dispatch


def _ref(x):
    return x * 2


def _fast(x):
    return x + x


def _only_small(x):
    return [] if x.numel() <= 4 else [f"takes at most 4 elements, got {x.numel()}"]


@pytest.fixture
def restore_settings():
    """Put the process-wide settings (and PyTorch's deterministic switch) back after the test."""
    saved = (dispatch._state.default, torch.are_deterministic_algorithms_enabled())
    yield
    dispatch._state.set_default(saved[0])
    torch.use_deterministic_algorithms(saved[1])


def in_thread(fn):
    """fn() on a fresh thread (none of this thread's `with` blocks open there); its result or error."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def toy_op():
    """A throwaway op with a 'triton' backend (picky), 'xformers' backend (broken) and a reference."""
    dispatch.register("toy", "reference", _ref)
    dispatch.register("toy", "triton", _fast, _only_small)
    yield "toy"
    dispatch.unregister("toy")


def test_auto_takes_first_backend_without_reasons(toy_op):
    with dispatch.record() as rec:
        assert torch.equal(dispatch.call("toy", torch.ones(3)), torch.full((3,), 2.0))
        dispatch.call("toy", torch.ones(9))
    assert [d.chosen for d in rec] == ["triton", "reference"]
    assert rec[1].refused == {"triton": ["takes at most 4 elements, got 9"]}


def test_forced_backend_raises_with_every_reason(toy_op):
    def two_reasons(x):
        return ["reason one", "reason two"]

    dispatch.register("toy", "triton", _fast, two_reasons)
    with fastlego.use_backend("triton"):
        with pytest.raises(fastlego.BackendNotSupported, match="(?s)'triton' was forced.*reason one.*reason two"):
            dispatch.call("toy", torch.ones(2))


def test_forced_backend_the_op_lacks(toy_op):
    with fastlego.use_backend("xformers"):
        with pytest.raises(fastlego.BackendNotSupported, match="has no 'xformers' backend"):
            dispatch.call("toy", torch.ones(2))


def test_reference_mode_and_per_op_override(toy_op):
    with fastlego.use_backend("reference"):
        assert dispatch.choose("toy", torch.ones(2))[0].name == "reference"
        with fastlego.use_backend(toy="auto"):
            assert dispatch.choose("toy", torch.ones(2))[0].name == "triton"
        assert dispatch.choose("toy", torch.ones(2))[0].name == "reference"
    assert dispatch.current_mode() == "auto"


def test_use_backend_rejects_unknown_names(toy_op):
    with pytest.raises(ValueError, match="is not one of"):
        with fastlego.use_backend("cuda-magic"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with fastlego.use_backend(not_an_op="reference"):
            pass


def test_runtime_failure_falls_back_once_with_one_warning(toy_op):
    calls = []

    def broken(x):
        calls.append(1)
        raise RuntimeError("kernel exploded")

    dispatch.register("toy", "triton", broken)
    with pytest.warns(RuntimeWarning, match="'triton' backend of op 'toy' failed at run time.*kernel exploded"):
        out = dispatch.call("toy", torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    # retired: no second attempt, no second warning, the reason is reported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dispatch.call("toy", torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0)) and len(calls) == 1
    backend, refused = dispatch.choose("toy", torch.ones(3))
    assert backend.name == "reference" and "kernel exploded" in refused["triton"][0]


def test_forced_backend_failure_is_not_hidden(toy_op):
    def broken(x):
        raise RuntimeError("kernel exploded")

    dispatch.register("toy", "triton", broken)
    with fastlego.use_backend("triton"), pytest.raises(RuntimeError, match="kernel exploded"):
        dispatch.call("toy", torch.ones(3))


def test_unloadable_backend_is_refused_with_import_error(toy_op):
    dispatch.register("toy", "triton", "fastlego.no_such_module:kernel")
    backend, refused = dispatch.choose("toy", torch.ones(3))
    assert backend.name == "reference"
    assert "fastlego.no_such_module could not be loaded (ModuleNotFoundError" in refused["triton"][0]


def test_triton_reasons(monkeypatch):
    from fastlego.kernels.policy import triton_reasons   # the kernels' support rules (no triton needed)

    cpu = torch.ones(2)
    r = triton_reasons([cpu, torch.ones(2, dtype=torch.float64)])
    assert any("float64 not supported" in s for s in r)
    assert any("mixed dtypes" in s for s in r)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the interpreter is for tests: CPU tensors go to triton only when it is forced
    assert any("only when the triton backend is forced" in s for s in triton_reasons([cpu]))
    assert any("bfloat16 under Triton's interpreter" in s for s in triton_reasons([cpu.bfloat16()]))
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the compute dtype is autocast's
        assert any("bfloat16 under Triton's interpreter" in s for s in triton_reasons([cpu]))
        assert not any("mixed dtypes" in s for s in triton_reasons([cpu, cpu.half()]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("Triton kernels need a CUDA device" in s for s in triton_reasons([cpu]))


def test_modes_are_the_registered_backends(toy_op):
    """MODES (use_backend's modes, the CLI's --backend choices) is "auto" plus every backend name
    registered for any op, read from the registry each time."""
    from fastlego.__main__ import build_parser

    registered = {b.name for op in dispatch.ops() for b in dispatch.backends(op)}
    assert dispatch.MODES[0] == "auto" and set(dispatch.MODES[1:]) == registered
    assert {"reference", "triton", "flash_attn", "xformers", "sdpa"} <= registered
    dispatch.register("toy", "toy_fast", _fast)
    assert "toy_fast" in dispatch.MODES and dispatch.modes("toy") == ("auto", "triton", "toy_fast", "reference")
    with fastlego.use_backend("toy_fast"):
        assert dispatch.choose("toy", torch.ones(2))[0].name == "toy_fast"
    dispatch.unregister("toy", "toy_fast")
    assert "toy_fast" not in dispatch.MODES
    with pytest.raises(ValueError, match="'toy_fast' for mode is not one of auto, reference"):
        fastlego.set_backend("toy_fast")
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    [backend] = [a for a in train._actions if a.dest == "backend"]
    assert list(backend.choices) == list(dispatch.MODES)


def test_per_op_override_takes_exactly_the_ops_backends():
    """`use_backend(op=...)` takes "auto" and the backends registered for that op, no other."""
    assert dispatch.modes("global_attention") == ("auto", "flash_attn", "xformers", "sdpa", "reference", "triton")
    with fastlego.use_backend(global_attention="sdpa"):
        assert dispatch.current_mode("global_attention") == "sdpa" and dispatch.current_mode() == "auto"
        qkv = torch.randn(2, 80, 3 * 16)
        backend, _ = dispatch.choose("global_attention", qkv, 2)
        assert backend.name == "sdpa"
        torch.testing.assert_close(dispatch.call("global_attention", qkv, 2), fastlego.reference.attention(qkv, 2))
    for op, bad in (("window_attention", "sdpa"), ("brick_embed", "flash_attn")):
        with pytest.raises(ValueError, match=f"backend '{bad}' for {op} is not one of auto, triton, reference"):
            with fastlego.use_backend(**{op: bad}):
                pass


def test_set_backend_persists(toy_op, restore_settings):
    fastlego.set_backend("reference", toy="auto")
    assert dispatch.current_mode() == "reference" and dispatch.current_mode("toy") == "auto"
    assert dispatch.choose("toy", torch.ones(2))[0].name == "triton"
    with pytest.raises(ValueError, match="is not one of"):
        fastlego.set_backend("bogus")
    assert dispatch.current_mode() == "reference"


def test_explain_after_a_runtime_fallback(toy_op):
    def broken(x):
        raise RuntimeError("kernel exploded")

    dispatch.register("toy", "triton", broken)

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            return dispatch.call("toy", x) + dispatch.call("toy", x)

    with pytest.warns(RuntimeWarning):
        rows = fastlego.explain(Net(), torch.ones(3), None)
    # one row per call that ran, each naming the backend that produced the result
    assert [r.chosen for r in rows] == ["reference", "reference"]
    assert "kernel exploded" in rows[0].refused["triton"][0]


def test_env_var_sets_default_mode():
    code = "import fastlego; print(fastlego.dispatch.current_mode())"
    env = dict(os.environ, FASTLEGO_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["FASTLEGO_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTLEGO_BACKEND='bogus' is not a backend" in bad.stderr


def test_without_triton_import_and_forward_work():
    """Block triton: import fastlego, run a model (reference ops), and get the reason from explain."""
    code = """
import sys
sys.modules['triton'] = None  # makes 'import triton' raise ImportError
import torch, fastlego
from fastlego.testing import randomize_
m = randomize_(fastlego.LegoBackbone.from_preset('lego_S_PG_64', label_dim=0, depths=[1, 1, 1])).eval()
x = torch.randn(1, 3, 64, 64)
rows = fastlego.explain(m, x, torch.randn(1))
assert all(r.chosen == ('sdpa' if r.op == 'global_attention' else 'reference') for r in rows), rows
reasons = [s for r in rows for s in r.refused.get('triton', []) if r.op != 'global_attention']
assert reasons and all('could not be loaded' in s for s in reasons), reasons
with fastlego.use_backend('triton'):
    try:
        m(x, torch.randn(1))
    except fastlego.BackendNotSupported as e:
        assert 'could not be loaded' in str(e)
    else:
        raise AssertionError('forced triton without triton must raise')
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "FASTLEGO_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_explain_names_every_call_site():
    from fastlego.testing import randomize_

    m = randomize_(fastlego.LegoBackbone.from_preset("lego_S_PG_64", label_dim=0, depths=[1, 1, 1])).eval()
    rows = fastlego.explain(m, torch.randn(1, 3, 64, 64), torch.randn(1))
    sites = {(r.site, r.op, r.what) for r in rows}
    for i in range(3):
        assert (f"model.{i}", "brick_embed", "") in sites
        assert (f"model.{i}.final_layer", "final_layer", "") in sites
        assert (f"model.{i}.blocks.0", "modulated_linear", "mlp.fc1 (LN + modulate + Linear + GELU)") in sites
    attention_ops = [r.op for r in rows if "attention" in r.op]
    # regions of 4 and 16 pixels with patch 2 / 8: 4 tokens; region 64 with patch 2: 1024 tokens
    assert attention_ops == ["window_attention", "window_attention", "global_attention"]
    assert "model.0.blocks.0 attn.qkv" in str(rows)


def test_decisions_are_cached_per_call_signature(toy_op):
    """Reasons are asked once per (op, mode, grad/autocast state, argument metadata); a new shape,
    a mode change, a re-registered backend or a retired one asks again."""
    calls = []

    def counting(x):
        calls.append(x.numel())
        return _only_small(x)

    dispatch.register("toy", "triton", _fast, counting)
    for _ in range(3):
        dispatch.call("toy", torch.ones(3))
    assert calls == [3]
    dispatch.call("toy", torch.ones(9))                 # another shape
    with fastlego.use_backend("reference"):
        dispatch.call("toy", torch.ones(3))             # another mode: reference only, triton not asked
    with torch.no_grad():
        dispatch.call("toy", torch.ones(3))             # another grad state
    assert calls == [3, 9, 3]
    x = torch.ones(3, requires_grad=True)
    dispatch.call("toy", x)                             # requires_grad is part of the signature
    assert calls == [3, 9, 3, 3]
    dispatch.register("toy", "triton", _fast, counting)  # re-registering clears the cache
    dispatch.call("toy", torch.ones(3))
    assert calls == [3, 9, 3, 3, 3]

    def broken(x):
        raise RuntimeError("kernel exploded")

    dispatch.register("toy", "triton", broken, counting)
    with pytest.warns(RuntimeWarning, match="kernel exploded"):
        assert torch.equal(dispatch.call("toy", torch.ones(2)), torch.full((2,), 2.0))
    with dispatch.record() as rec:                      # the retired backend is not taken from the cache
        dispatch.call("toy", torch.ones(2))
    assert rec[0].chosen == "reference" and "failed at run time" in rec[0].refused["triton"][0]


def test_a_backends_plan_is_made_once_per_decision_and_runs_the_calls(toy_op):
    """A backend with a plan checks a call signature once (the plan) and runs every call of it
    through the plan's function; a new signature gets a new plan; calls with keyword arguments
    (not cached) run the backend itself; a plan whose run fails retires the backend as before."""
    plans, runs, direct = [], [], []

    def fast(x, *, scale=1.0):
        direct.append(x.numel())
        return (x + x) * scale

    def plan(x):
        plans.append(tuple(x.shape))

        def run(x):
            runs.append(x.numel())
            return x + x
        return run

    dispatch.register("toy", "triton", fast, lambda x, **kw: _only_small(x), plan=plan)
    for v in (1.0, 2.0, 3.0):
        assert torch.equal(dispatch.call("toy", torch.full((3,), v)), torch.full((3,), 2 * v))
    assert plans == [(3,)] and runs == [3, 3, 3] and direct == []
    dispatch.call("toy", torch.ones(2, 2))
    assert plans == [(3,), (2, 2)]
    assert torch.equal(dispatch.call("toy", torch.ones(3), scale=0.5), torch.ones(3))
    assert direct == [3] and runs == [3, 3, 3, 4]
    with dispatch.record() as rec:                      # the reference takes what triton refuses
        dispatch.call("toy", torch.ones(9))
    assert rec[0].chosen == "reference" and plans == [(3,), (2, 2)]

    def failing_plan(x):
        def run(x):
            raise RuntimeError("launch failed")
        return run

    dispatch.register("toy", "triton", fast, _only_small, plan=failing_plan)
    with pytest.warns(RuntimeWarning, match="launch failed"):
        assert torch.equal(dispatch.call("toy", torch.ones(3)), torch.full((3,), 2.0))
    with dispatch.record() as rec:
        dispatch.call("toy", torch.ones(3))
    assert rec[0].chosen == "reference"


def test_a_missing_plan_function_means_no_plan(toy_op):
    """`plan="module:name"` naming nothing runs the backend itself (ops declare `<op>_plan` for
    every Triton backend; only some kernels have one)."""
    dispatch.register("toy", "triton", _fast, _only_small, plan="fastlego.reference:no_such_plan")
    assert torch.equal(dispatch.call("toy", torch.ones(3)), torch.full((3,), 2.0))
    with dispatch.record() as rec:
        dispatch.call("toy", torch.ones(3))
    assert rec[0].chosen == "triton"


# --------------------------------------------------------------------------------------------
# One state, one scoping rule: process-wide settings, per-thread blocks
# --------------------------------------------------------------------------------------------

def test_set_backend_is_process_wide_and_blocks_are_per_thread(toy_op, restore_settings):
    fastlego.set_backend("reference")
    assert in_thread(dispatch.current_mode) == "reference"          # another thread sees set_backend
    with fastlego.use_backend("triton", toy="auto"):
        assert dispatch.current_mode() == "triton" and dispatch.current_mode("toy") == "auto"
        assert in_thread(dispatch.current_mode) == "reference"      # ... but not this thread's block
        assert in_thread(lambda: dispatch.current_mode("toy")) == "reference"
        fastlego.set_backend("auto", toy="reference")               # changed under an open block:
        assert dispatch.current_mode() == "triton"                  # the block's own choices win
        assert dispatch.current_mode("toy") == "auto"
        with fastlego.use_backend("reference"):                     # inner block: overrides add up
            assert dispatch.current_mode() == "reference" and dispatch.current_mode("toy") == "auto"
    assert dispatch.current_mode() == "auto" and dispatch.current_mode("toy") == "reference"
    assert in_thread(lambda: dispatch.current_mode("toy")) == "reference"


def test_deterministic_follows_the_same_rule(restore_settings):
    assert not dispatch.is_deterministic()
    with fastlego.deterministic():
        assert dispatch.is_deterministic() and torch.are_deterministic_algorithms_enabled()
        assert not in_thread(dispatch.is_deterministic)             # a block is the calling thread's
        with fastlego.use_backend("reference"):                     # other settings' blocks keep it
            assert dispatch.is_deterministic()
        with fastlego.deterministic(False):
            assert not dispatch.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    assert not dispatch.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
    fastlego.set_deterministic(True)
    assert in_thread(dispatch.is_deterministic) and torch.are_deterministic_algorithms_enabled()
    with fastlego.use_backend("reference"):
        assert dispatch.is_deterministic()
    fastlego.set_deterministic(False)
    assert not in_thread(dispatch.is_deterministic)


def test_settings_token_round_trip_and_scope(toy_op, restore_settings):
    s = dispatch.Settings("reference", {"toy": "auto", "global_attention": "xformers"}, deterministic=True)
    assert dispatch.Settings.from_token(s.token) == s and hash(dispatch.Settings.from_token(s.token)) == hash(s)
    assert s.mode_of("toy") == "auto" and s.mode_of("brick_embed") == "reference" and s.mode_of() == "reference"
    assert s.replace(mode="auto", overrides={"toy": "triton"}).overrides == (("global_attention", "xformers"), ("toy", "triton"))
    for bad in ("reference", "warp|0|", "auto|0|toy=warp", "auto|0|toy"):
        with pytest.raises(ValueError):
            dispatch.Settings.from_token(bad)
    with fastlego.use_backend("triton"):
        with dispatch.scope(s.token):                  # a carried token replaces every open block
            assert dispatch.current_settings() == s and dispatch.is_deterministic()
            assert dispatch.choose("toy", torch.ones(2))[0].name == "triton"     # toy=auto
        with dispatch.scope(""):                       # no token: nothing changes
            assert dispatch.current_mode() == "triton"
    assert in_thread(lambda: _in_scope(s.token)) == s  # on any thread


def _in_scope(token):
    with dispatch.scope(token):
        return dispatch.current_settings()


def test_decision_cache_is_keyed_by_the_settings_and_shared_by_threads(toy_op):
    calls = []

    def counting(x):
        calls.append(x.numel())
        return _only_small(x)

    dispatch.register("toy", "triton", _fast, counting)
    dispatch.call("toy", torch.ones(3))
    in_thread(lambda: dispatch.call("toy", torch.ones(3)))                         # same settings: cached
    assert calls == [3]
    with fastlego.use_backend(toy="auto", brick_embed="reference"):                 # other settings: asked
        dispatch.call("toy", torch.ones(3))
    assert calls == [3, 3]
    key = dispatch._decision_key("toy", (torch.ones(3),))
    assert dispatch.current_settings() in key


def test_checkpoint_recompute_runs_under_the_forwards_settings(toy_op):
    """torch.utils.checkpoint reruns the forward inside the backward; with
    `context_fn=dispatch.checkpoint_contexts` it takes the forward's backends even when the
    backward runs on a thread where the forward's block is not open."""
    seen = []

    def fn(x):
        seen.append(dispatch.current_mode("toy"))
        return dispatch.call("toy", x) * x

    x = torch.ones(3, requires_grad=True)
    with fastlego.use_backend(toy="reference"):
        out = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False, context_fn=dispatch.checkpoint_contexts)
    (g,) = in_thread(lambda: torch.autograd.grad(out.sum(), x))
    assert seen == ["reference", "reference"]            # the forward, then its recomputation
    assert torch.equal(g, torch.full((3,), 4.0))


# --------------------------------------------------------------------------------------------
# The fused ops carry their forward's settings into the backward (Triton's interpreter)
# --------------------------------------------------------------------------------------------

def _modulated_leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    K, N = 16, 24
    ada = torch.randn(2, 2 * K, generator=g).mul(0.5).requires_grad_()
    h = torch.randn(2 * 3, 4, K, generator=g).requires_grad_()
    w = (torch.randn(N, K, generator=g) * K ** -0.5).requires_grad_()
    b = (torch.randn(N, generator=g) * 0.1).requires_grad_()
    return (h, ada, w, b), torch.randn(2 * 3, 4, N, generator=g)


def _forward(leaves):
    h, ada, w, b = leaves
    K = h.shape[-1]
    return fastlego.ops.modulated_linear(h, ada[:, :K], ada[:, K:], w, b, "gelu_tanh")


@pytest.mark.interpreter
def test_backward_on_another_thread_runs_under_the_forwards_settings():
    """The forward runs the custom op under forced triton (Triton's interpreter); its backward,
    run on a thread where no block is open (auto: the interpreter is refused there), still runs
    every piece on triton; and an override of one backward piece made around the forward holds
    in the backward even where the backward's thread forces triton."""
    leaves, g = _modulated_leaves()
    with fastlego.use_backend("triton"):
        out = _forward(leaves)
        want = torch.autograd.grad(out, leaves, g, retain_graph=True)    # on the forward's thread
    with dispatch.record() as rec:
        got = in_thread(lambda: torch.autograd.grad(out, leaves, g))
    pieces = {(d.op, d.chosen) for d in rec}
    assert pieces == {("layernorm_modulate", "triton"), ("layernorm_modulate_backward", "triton")}, pieces
    for a, b in zip(got, want):
        assert torch.equal(a, b)

    with fastlego.use_backend("triton", layernorm_modulate_backward="reference"):
        out = _forward(leaves)

    def backward_under_triton():
        with fastlego.use_backend("triton"):
            return torch.autograd.grad(out, leaves, g)

    with dispatch.record() as rec:
        in_thread(backward_under_triton)
    assert {(d.op, d.chosen) for d in rec} == {("layernorm_modulate", "triton"),
                                               ("layernorm_modulate_backward", "reference")}


@pytest.mark.interpreter
def test_every_fused_backward_carries_the_settings_and_deterministic_switch(monkeypatch):
    """Each fused op's backward pieces see exactly the settings of their forward (mode, per-op
    overrides, deterministic switch), on a thread of their own."""
    from fastlego import custom_ops
    seen = []
    real_call = custom_ops.call

    def spy(op, *args, **kwargs):
        seen.append((op, dispatch.current_settings(), threading.get_ident()))
        return real_call(op, *args, **kwargs)

    monkeypatch.setattr(custom_ops, "call", spy)
    g = torch.Generator().manual_seed(1)
    K = 16
    ada = torch.randn(2, 6 * K, generator=g).mul(0.5).requires_grad_()
    h = torch.randn(2 * 3, 4, K, generator=g).requires_grad_()
    w1, w2 = (torch.randn(4 * K, K, generator=g) * K ** -0.5).requires_grad_(), (torch.randn(K, 4 * K, generator=g) * 0.1).requires_grad_()
    qkv = torch.randn(6, 4, 3 * K, generator=g).requires_grad_()
    x = torch.randn(2, 3, 8, 8, generator=g).requires_grad_()
    we = (torch.randn(K, 5, 2, 2, generator=g) * 0.2).requires_grad_()
    pos = torch.randn(1, 4, K, generator=g).requires_grad_()
    wf = (torch.randn(12, K, generator=g) * 0.2).requires_grad_()
    with fastlego.deterministic(), fastlego.use_backend("triton", gated_residual_backward="reference"):
        forward_settings = dispatch.current_settings()
        outs = [fastlego.ops.mlp(h, ada[:, :K], ada[:, K:2 * K], w1, None, w2, None, ada[:, 2 * K:3 * K]),
                fastlego.ops.attention(qkv, 2),
                fastlego.ops.brick_embed(x, None, we, None, pos, 4),
                fastlego.ops.final_layer(h, ada[:, 3 * K:4 * K], ada[:, 4 * K:5 * K], wf, None, 4, (2, 3, 4, 12)),
                fastlego.ops.linear_gated_residual(h, w2[:, :K], None, ada[:, 5 * K:], h)]
    seen.clear()
    loss = sum((o * o).sum() for o in outs)
    main = threading.get_ident()
    in_thread(lambda: loss.backward())
    ops = {op for op, _, _ in seen}
    assert ops >= {"gated_residual_backward", "gelu_tanh_backward", "layernorm_modulate", "layernorm_modulate_backward",
                   "window_attention_backward", "brick_embed_input_grad"}, ops
    assert all(s == forward_settings and s.deterministic and t != main for _, s, t in seen), seen


# --------------------------------------------------------------------------------------------
# Retiring a backend: only for a failure before it wrote anything
# --------------------------------------------------------------------------------------------

class _CompileError(Exception):
    """Stands for triton's CompilationError / OutOfResources, raised before any launch."""


@pytest.mark.parametrize("error", [_CompileError("ptxas: too many resources requested"),
                                   RuntimeError("CUDA error: no kernel image is available for execution")])
def test_compile_or_launch_failure_retires_with_a_warning(toy_op, error):
    def broken(x):
        raise error

    dispatch.register("toy", "triton", broken)
    with pytest.warns(RuntimeWarning, match="'triton' backend of op 'toy' failed at run time"):
        assert torch.equal(dispatch.call("toy", torch.ones(3)), torch.full((3,), 2.0))
    assert ("toy", "triton") in dispatch._state.retired
    assert dispatch.choose("toy", torch.ones(3))[0].name == "reference"
    dispatch.register("toy", "triton", _fast)                       # re-registered: tried afresh
    assert dispatch.choose("toy", torch.ones(3))[0].name == "triton"


def _assert_reraised_not_retired(op, error_type, match, note, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # no retirement warning
        with pytest.raises(error_type, match=match) as info:
            dispatch.call(op, *args, **kwargs)
    assert (op, "triton") not in dispatch._state.retired
    assert dispatch.choose(op, torch.ones(3))[0].name == "triton"   # still the backend of choice
    if sys.version_info >= (3, 11):
        assert any(note in n and "was not retired" in n for n in getattr(info.value, "__notes__", [])), info.value


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("Triton Error [CUDA]: out of memory")])
def test_out_of_memory_reraises_and_does_not_retire(toy_op, error):
    calls = []

    def oom(x):
        calls.append(1)
        raise error

    dispatch.register("toy", "triton", oom)
    _assert_reraised_not_retired("toy", type(error), "out of memory", "out of memory", torch.ones(3))
    _assert_reraised_not_retired("toy", type(error), "out of memory", "out of memory", torch.ones(3))
    assert len(calls) == 2                                           # tried again: it was not retired


def test_broken_cuda_context_reraises(toy_op):
    def crash(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    dispatch.register("toy", "triton", crash)
    _assert_reraised_not_retired("toy", RuntimeError, "illegal memory access", "sticky error", torch.ones(3))


def test_failure_inside_a_cuda_graph_capture_is_never_retired(toy_op, monkeypatch):
    def broken(x):
        raise _CompileError("operation not permitted when stream is capturing")

    dispatch.register("toy", "triton", broken)
    monkeypatch.setattr(dispatch, "capturing", lambda: True)
    _assert_reraised_not_retired("toy", _CompileError, "capturing", "CUDA-graph capture", torch.ones(3))
    monkeypatch.setattr(dispatch, "capturing", lambda: False)       # eagerly the same failure retires
    with pytest.warns(RuntimeWarning, match="failed at run time"):
        dispatch.call("toy", torch.ones(3))


def test_failure_after_an_in_place_write_reraises(toy_op):
    """A backend that writes into its arguments (registered in_place, or given out=) may have
    written part of them: rerunning the op elsewhere would read corrupted inputs."""
    def scale_in_place(x):
        x.mul_(3)                                  # wrote
        raise _CompileError("second kernel failed to compile")

    dispatch.register("toy", "triton", scale_in_place, in_place=True)
    x = torch.ones(3)
    _assert_reraised_not_retired("toy", _CompileError, "second kernel", "writes into its arguments", x)
    assert torch.equal(x, torch.full((3,), 3.0))                    # what it wrote stays visible

    def into_out(x, out=None):
        out.copy_(x)
        raise _CompileError("epilogue failed")

    dispatch.register("toy", "triton", into_out, lambda x, out=None: [])
    _assert_reraised_not_retired("toy", _CompileError, "epilogue", "out=", torch.ones(3), out=torch.empty(3))


def test_ops_declare_gelu_backward_in_place():
    assert all(b.in_place for b in dispatch.backends("gelu_tanh_backward"))
    assert not any(b.in_place for op in ("modulated_linear", "layernorm_modulate_backward") for b in dispatch.backends(op))


# --------------------------------------------------------------------------------------------
# fastlego.testing's tolerance rule: never an infinite bound
# --------------------------------------------------------------------------------------------

def test_tolerance_bound_is_never_infinite():
    from fastlego.testing import assert_close_to_reference, max_error
    ref = torch.tensor([1.0, 2.0, 3.0])
    far = torch.tensor([1.0, 2.0, 300.0])                            # finite, but wrong
    for broken_baseline in (torch.tensor([1.0, float("inf"), 3.0]), torch.tensor([float("nan"), 2.0, 3.0])):
        with pytest.raises(AssertionError, match="baseline"):
            assert_close_to_reference(far, ref, broken_baseline)
        with pytest.raises(AssertionError, match="baseline"):
            assert_close_to_reference(ref.clone(), ref, broken_baseline)   # even a right answer: no bound
    with pytest.raises(AssertionError, match="reference holds inf"):
        assert_close_to_reference(far, torch.tensor([1.0, float("inf"), 3.0]))
    with pytest.raises(AssertionError, match="finite"):
        assert_close_to_reference(far, ref, atol=float("inf"))
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_reference(torch.tensor([1.0, float("inf"), 3.0]), ref, ref)
    assert max_error(torch.tensor([float("inf")]), torch.tensor([float("inf")])) == float("inf")
    assert_close_to_reference(ref + 1e-3, ref, ref + 1e-3, atol=0.0)       # a finite baseline still bounds
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_reference(ref + 3e-3, ref, ref + 1e-3, atol=0.0)
