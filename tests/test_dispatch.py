"""The dispatcher: reasons, forced backends, run-time fallback, per-op overrides, no-triton behaviour."""

import os
import subprocess
import sys
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
    cpu = torch.ones(2)
    r = dispatch.triton_reasons([cpu, torch.ones(2, dtype=torch.float64)])
    assert any("float64 not supported" in s for s in r)
    assert any("mixed dtypes" in s for s in r)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the interpreter is for tests: CPU tensors go to triton only when it is forced
    assert any("only when the triton backend is forced" in s for s in dispatch.triton_reasons([cpu]))
    assert any("bfloat16 under Triton's interpreter" in s for s in dispatch.triton_reasons([cpu.bfloat16()]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("Triton kernels need a CUDA device" in s for s in dispatch.triton_reasons([cpu]))


def test_set_backend_persists(toy_op):
    try:
        fastlego.set_backend("reference", toy="auto")
        assert dispatch.current_mode() == "reference" and dispatch.current_mode("toy") == "auto"
        assert dispatch.choose("toy", torch.ones(2))[0].name == "triton"
        with pytest.raises(ValueError, match="is not one of"):
            fastlego.set_backend("bogus")
        assert dispatch.current_mode() == "reference"
    finally:
        dispatch._config.mode, dispatch._config.overrides = "auto", {}


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
