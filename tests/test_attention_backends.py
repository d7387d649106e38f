"""flash-attn and xformers as global_attention backends (fastlego/attention_backends.py).

Neither library is installed here, and there is no GPU, so most tests put FAKE modules into
sys.modules: `flash_attn.flash_attn_qkvpacked_func` and `xformers.ops.memory_efficient_attention`
computed with torch, recording their calls. The device check (`_device_reasons`) is monkeypatched
where a test needs the CPU-side logic to accept CPU tensors. Checked: every refusal reason
(not installed, broken install, too old, CPU, dtype, head dim, failing probe), the layouts handed
to the libraries, region chunking, autocast, the dispatcher picking them in `auto`, and a backend
failing at run time: one RuntimeWarning, fallback, correct result. CUDA-marked tests use the real
libraries when present (and check that the dispatcher honours their reasons when they are not usable).
Where FASTLEGO_EXPECT_ATTENTION_LIBS names the libraries a machine must have (e.g.
"flash_attn,xformers"), their tests fail when one cannot be imported or refuses a call it
supports, instead of accepting the refusal.
"""

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlego
from fastlego import attention_backends as ab
from fastlego import dispatch, reference
from fastlego.testing import assert_close_to_reference

HEADS, HEAD_DIM = 2, 16


def _qkv(N=3, T=80, heads=HEADS, head_dim=HEAD_DIM, dtype=torch.float16, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(N, T, 3 * heads * head_dim, generator=g) * 1.5).to(device=device, dtype=dtype)


@pytest.fixture(autouse=True)
def fresh_backends():
    """Every test starts with no cached imports/probes and no retired backends, and leaves none."""
    ab.clear_caches()
    dispatch.reset_failures()
    yield
    ab.clear_caches()
    dispatch.reset_failures()


@pytest.fixture
def no_libraries(monkeypatch):
    """Make both libraries 'not installed', whatever is really installed (None blocks an import)."""
    for name in ("flash_attn", "xformers", "xformers.ops"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def any_device(monkeypatch):
    """Accept CPU tensors in the device check so the fakes run here."""
    monkeypatch.setattr(ab, "_device_reasons", lambda *args, **kwargs: [])


def _sdpa_bthd(q, k, v, scale):
    """Attention of (B, T, H, hd) tensors, computed in fp32 and returned in q's dtype."""
    o = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), scale=scale)
    return o.transpose(1, 2).to(q.dtype)


def _fake_flash_attn(monkeypatch, version="2.7.4"):
    calls = []

    def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False):
        assert qkv.dim() == 5 and qkv.shape[2] == 3 and qkv.stride(-1) == 1, "expects (N, T, 3, heads, hd)"
        assert dropout_p == 0.0 and not causal
        calls.append({"shape": tuple(qkv.shape), "dtype": qkv.dtype, "scale": softmax_scale})
        return _sdpa_bthd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale)

    module = types.ModuleType("flash_attn")
    module.__version__ = version
    module.flash_attn_qkvpacked_func = flash_attn_qkvpacked_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def _fake_xformers(monkeypatch, version="0.0.28", fail=None, load_exception=None, with_scale=True):
    """A fake xformers; `fail(call_index)` returning an exception makes that call raise it."""
    calls = []

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert query.dim() == 4 and query.stride(-1) == 1, "expects (B, T, heads, hd)"
        calls.append({"shape": tuple(query.shape), "dtype": query.dtype, "scale": scale})
        exc = fail(len(calls)) if fail is not None else None
        if exc is not None:
            raise exc
        return _sdpa_bthd(query, key, value, scale)

    def old_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0):
        return memory_efficient_attention(query, key, value, attn_bias, p, query.shape[-1] ** -0.5)

    base = types.ModuleType("xformers")
    base.__version__ = version
    base._cpp_lib = types.SimpleNamespace(_cpp_library_load_exception=load_exception)
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention if with_scale else old_memory_efficient_attention
    base.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", base)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


# --------------------------------------------------------------------------------------------
# Reasons
# --------------------------------------------------------------------------------------------

def test_not_installed(no_libraries):
    qkv = _qkv()
    (why,) = ab.flash_attn_not_supported_reasons(qkv, HEADS)
    assert "flash-attn is not installed" in why and "ModuleNotFoundError" in why and "pip install flash-attn" in why
    (why,) = ab.xformers_not_supported_reasons(qkv, HEADS)
    assert "xformers is not installed" in why and "pip install xformers" in why
    with pytest.raises(RuntimeError, match="not installed"):
        ab.flash_attn_attention(qkv, HEADS)


def test_import_fails_although_installed(monkeypatch):
    """A wheel built for another torch: the package is found but importing it raises."""
    import importlib
    import importlib.util

    real_import = importlib.import_module
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)

    def fake_import(name, *args):
        if name == "flash_attn":
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    (why,) = ab.flash_attn_not_supported_reasons(_qkv(), HEADS)
    assert "installed but fails to import" in why and "undefined symbol" in why and torch.__version__ in why


def test_flash_attn_reasons(monkeypatch):
    _fake_flash_attn(monkeypatch)
    qkv = _qkv()
    # CPU tensors: refused by the real device check
    assert ab.flash_attn_not_supported_reasons(qkv, HEADS) == ["tensors are on cpu: flash-attn runs on CUDA GPUs only"]
    monkeypatch.setattr(ab, "_device_reasons", lambda *args, **kwargs: [])
    assert ab.flash_attn_not_supported_reasons(qkv, HEADS) == []
    assert ab.flash_attn_not_supported_reasons(qkv.bfloat16(), HEADS) == []
    (why,) = ab.flash_attn_not_supported_reasons(qkv.float(), HEADS)
    assert "dtype torch.float32" in why and "float16 or bfloat16" in why
    (why,) = ab.flash_attn_not_supported_reasons(_qkv(head_dim=12), HEADS)
    assert "head_dim 12" in why and "multiples of 8" in why
    (why,) = ab.flash_attn_not_supported_reasons(_qkv(heads=1, head_dim=264), 1)
    assert "head_dim 264" in why
    (why,) = ab.flash_attn_not_supported_reasons(qkv, 5)
    assert "not 3 * num_heads * head_dim" in why
    with torch.autocast("cpu", dtype=torch.bfloat16):   # fp32 under autocast computes in bf16
        assert ab.flash_attn_not_supported_reasons(qkv.float(), HEADS) == []


def test_flash_attn_too_old(monkeypatch, any_device):
    _fake_flash_attn(monkeypatch, version="1.0.9")
    (why,) = ab.flash_attn_not_supported_reasons(_qkv(), HEADS)
    assert "flash-attn 1.0.9 is too old" in why and ">= 2.0" in why


def test_flash_attn_device_check_on_cpu_tensors():
    assert ab._device_reasons(_qkv(), "flash-attn", (8, 0)) == ["tensors are on cpu: flash-attn runs on CUDA GPUs only"]


def test_xformers_reasons(monkeypatch):
    calls = _fake_xformers(monkeypatch)
    qkv = _qkv()
    assert ab.xformers_not_supported_reasons(qkv, HEADS) == ["tensors are on cpu: xformers runs on CUDA GPUs only"]
    assert calls == []   # no probe while the device is refused
    monkeypatch.setattr(ab, "_device_reasons", lambda *args, **kwargs: [])
    assert ab.xformers_not_supported_reasons(qkv, HEADS) == []
    assert ab.xformers_not_supported_reasons(qkv.float(), HEADS) == []   # xformers takes fp32 too
    assert len(calls) == 2 and calls[0]["shape"] == (1, 8, HEADS, HEAD_DIM)   # one probe per dtype, cached
    ab.xformers_not_supported_reasons(qkv, HEADS)
    assert len(calls) == 2
    (why,) = ab.xformers_not_supported_reasons(qkv.double(), HEADS)
    assert "dtype torch.float64" in why


def test_xformers_cuda_extension_failed_to_load(monkeypatch, any_device):
    """The GPU machine's case: xformers imports, but its C++/CUDA ops were built for another torch."""
    exc = RuntimeError("xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
                       "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130)\n    Python  3.11.7")
    _fake_xformers(monkeypatch, version="0.0.35", load_exception=exc)
    (why,) = ab.xformers_not_supported_reasons(_qkv(), HEADS)
    assert "xformers 0.0.35 is installed but its C++/CUDA ops fail to load" in why
    assert "built for: PyTorch 2.10.0+cu128" in why


def test_xformers_probe_failure_is_a_reason(monkeypatch, any_device):
    calls = _fake_xformers(monkeypatch, fail=lambda i: NotImplementedError(
        "No operator found for `memory_efficient_attention_forward` with inputs: ... "
        "`cutlassF-pt` is not supported because: operator wasn't built"))
    (why,) = ab.xformers_not_supported_reasons(_qkv(), HEADS)
    assert "memory_efficient_attention fails" in why and "No operator found" in why and "head_dim 16" in why
    ab.xformers_not_supported_reasons(_qkv(), HEADS)
    assert len(calls) == 1   # the failed probe is cached too


def test_xformers_too_old(monkeypatch, any_device):
    _fake_xformers(monkeypatch, version="0.0.16", with_scale=False)
    (why,) = ab.xformers_not_supported_reasons(_qkv(), HEADS)
    assert "xformers 0.0.16 is too old" in why and "`scale`" in why


# --------------------------------------------------------------------------------------------
# The calls themselves
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_backend_result_and_layout(monkeypatch, backend):
    calls = _fake_flash_attn(monkeypatch) if backend == "flash_attn" else _fake_xformers(monkeypatch)
    fn = ab.flash_attn_attention if backend == "flash_attn" else ab.xformers_attention
    qkv = _qkv()
    out = fn(qkv, HEADS)
    assert out.shape == (3, 80, HEADS * HEAD_DIM) and out.dtype == torch.float16
    assert calls[-1]["scale"] == HEAD_DIM ** -0.5
    assert_close_to_reference(out, reference.attention(qkv.float(), HEADS), reference.attention(qkv, HEADS), atol=1e-4)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_regions_chunked_under_the_grid_limit(monkeypatch, backend):
    """Batch goes on grid axis y/z: at most 65,535 // heads regions per call (limit lowered here)."""
    calls = _fake_flash_attn(monkeypatch) if backend == "flash_attn" else _fake_xformers(monkeypatch)
    fn = ab.flash_attn_attention if backend == "flash_attn" else ab.xformers_attention
    monkeypatch.setattr(ab, "_GRID_YZ_MAX", 7)   # 3 regions per call with 2 heads
    qkv = _qkv(N=8, T=20)
    out = fn(qkv, HEADS)
    assert [c["shape"][0] for c in calls] == [3, 3, 2]
    assert_close_to_reference(out, reference.attention(qkv.float(), HEADS), reference.attention(qkv, HEADS), atol=1e-4)
    assert fn(qkv[:0], HEADS).shape == (0, 20, HEADS * HEAD_DIM)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_autocast_casts_inputs(monkeypatch, backend):
    calls = _fake_flash_attn(monkeypatch) if backend == "flash_attn" else _fake_xformers(monkeypatch)
    fn = ab.flash_attn_attention if backend == "flash_attn" else ab.xformers_attention
    qkv = _qkv(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(qkv, HEADS)
    assert calls[-1]["dtype"] == torch.bfloat16 and out.dtype == torch.bfloat16
    assert_close_to_reference(out, reference.attention(qkv, HEADS), reference.attention(qkv.bfloat16(), HEADS), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Through the dispatcher
# --------------------------------------------------------------------------------------------

def test_auto_without_libraries_uses_sdpa(no_libraries):
    qkv = _qkv()
    with dispatch.record() as rec:
        out = fastlego.ops.attention(qkv, HEADS)
    assert rec[0].op == "global_attention" and rec[0].chosen == "sdpa"
    assert "not installed" in rec[0].refused["flash_attn"][0] and "not installed" in rec[0].refused["xformers"][0]
    torch.testing.assert_close(out, reference.attention(qkv, HEADS), rtol=1e-5, atol=1e-6)


def test_auto_refuses_libraries_for_cpu_tensors(monkeypatch):
    _fake_flash_attn(monkeypatch)
    _fake_xformers(monkeypatch)
    with dispatch.record() as rec:
        fastlego.ops.attention(_qkv(), HEADS)
    assert rec[0].chosen == "sdpa"
    assert rec[0].refused["flash_attn"] == ["tensors are on cpu: flash-attn runs on CUDA GPUs only"]
    assert rec[0].refused["xformers"] == ["tensors are on cpu: xformers runs on CUDA GPUs only"]


def test_auto_picks_flash_attn_for_global_attention(monkeypatch, any_device):
    flash_calls = _fake_flash_attn(monkeypatch)
    xf_calls = _fake_xformers(monkeypatch)
    qkv = _qkv()
    with dispatch.record() as rec:
        out = fastlego.ops.attention(qkv, HEADS)
        fastlego.ops.attention(_qkv(T=16), HEADS)   # a window: not a global_attention backend
    assert [(d.op, d.chosen) for d in rec] == [("global_attention", "flash_attn"), ("window_attention", "reference")]
    assert len(flash_calls) == 1 and xf_calls == []
    assert_close_to_reference(out, reference.attention(qkv.float(), HEADS), reference.attention(qkv, HEADS), atol=1e-4)


def test_auto_picks_xformers_when_flash_attn_cannot(monkeypatch, any_device):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    xf_calls = _fake_xformers(monkeypatch)
    qkv = _qkv(dtype=torch.float32)
    with dispatch.record() as rec:
        out = fastlego.ops.attention(qkv, HEADS)
    assert rec[0].chosen == "xformers" and "not installed" in rec[0].refused["flash_attn"][0]
    assert xf_calls[-1]["shape"] == (3, 80, HEADS, HEAD_DIM)   # the real call after the probe
    assert_close_to_reference(out, reference.attention(qkv, HEADS), atol=1e-5)


def test_forced_backend_raises_with_reasons(monkeypatch, no_libraries):
    with fastlego.use_backend("flash_attn"):
        with pytest.raises(fastlego.BackendNotSupported, match="(?s)'flash_attn' was forced.*flash-attn is not installed"):
            fastlego.ops.attention(_qkv(), HEADS)
    _fake_flash_attn(monkeypatch)
    with fastlego.use_backend("flash_attn"):
        with pytest.raises(fastlego.BackendNotSupported, match="tensors are on cpu"):
            fastlego.ops.attention(_qkv(), HEADS)


def test_runtime_failure_falls_back_with_one_warning(monkeypatch, any_device):
    """xformers passes its reasons (the probe works) but the real call raises: in auto the call
    falls back to SDPA (token-major) with ONE RuntimeWarning naming the op and the error, and xformers is
    retired for the rest of the process (no second warning, no second call)."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    calls = _fake_xformers(monkeypatch, fail=lambda i: RuntimeError("CUDA error: no kernel image is available") if i > 1 else None)
    qkv = _qkv()
    with pytest.warns(RuntimeWarning) as caught:
        out = fastlego.ops.attention(qkv, HEADS)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "'xformers'" in messages[0] and "'global_attention'" in messages[0] and "no kernel image" in messages[0]
    torch.testing.assert_close(out, reference.attention(qkv, HEADS), rtol=1e-5, atol=1e-6)
    n_calls = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dispatch.record() as rec:
            again = fastlego.ops.attention(qkv, HEADS)
    assert torch.equal(again, out) and len(calls) == n_calls
    assert rec[0].chosen == "sdpa" and "failed at run time" in rec[0].refused["xformers"][0]


def test_runtime_failure_of_flash_attn_falls_back_to_xformers(monkeypatch, any_device):
    flash_calls = _fake_flash_attn(monkeypatch)
    monkeypatch.setattr(sys.modules["flash_attn"], "flash_attn_qkvpacked_func",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("FlashAttention only supports Ampere GPUs or newer.")))
    xf_calls = _fake_xformers(monkeypatch)
    qkv = _qkv()
    with pytest.warns(RuntimeWarning, match="(?s)'flash_attn'.*'global_attention'.*Ampere"):
        out = fastlego.ops.attention(qkv, HEADS)
    assert flash_calls == [] and len(xf_calls) == 2   # probe + call
    assert_close_to_reference(out, reference.attention(qkv.float(), HEADS), reference.attention(qkv, HEADS), atol=1e-4)


# --------------------------------------------------------------------------------------------
# CUDA, real libraries where installed
# --------------------------------------------------------------------------------------------

CUDA_CASES = [  # (N, T, heads, head_dim): the global bricks at batch 1 / 3, and the release's crash case
    (1, 1024, 16, 64), (3, 1024, 16, 72), (12, 256, 6, 64), (4, 256, 16, 72), (65536, 4, 6, 64),
]


def _supports(backend, dtype):
    """Whether the library is documented to take this call (both take head dims that are
    multiples of 8 up to 256; flash-attn only 16-bit dtypes)."""
    return backend == "xformers" or dtype in (torch.float16, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,T,heads,head_dim", CUDA_CASES)
def test_cuda_real_library(backend, dtype, N, T, heads, head_dim):
    """Installed and usable: matches the fp64 reference. Not usable: the reasons say why and auto
    does not pick it; but when FASTLEGO_EXPECT_ATTENTION_LIBS names the library, a refusal of a
    call it supports fails the test (and an unsupported dtype must be refused for its dtype only)."""
    reasons_fn = ab.flash_attn_not_supported_reasons if backend == "flash_attn" else ab.xformers_not_supported_reasons
    fn = ab.flash_attn_attention if backend == "flash_attn" else ab.xformers_attention
    qkv = _qkv(N, T, heads, head_dim, dtype, "cuda")
    reasons = reasons_fn(qkv, heads)
    print(f"{backend} {dtype} head_dim {head_dim}: reasons {reasons}")
    if backend in ab.expected_libraries():
        if _supports(backend, dtype):
            assert reasons == [], f"{ab.EXPECT_ENV} expects {backend}, but it refuses a call it supports: {reasons}"
        else:
            assert len(reasons) == 1 and reasons[0].startswith(f"dtype {dtype}"), reasons
    if reasons:
        assert all(isinstance(r, str) and r for r in reasons)
        with dispatch.record() as rec:
            dispatch.call("global_attention", qkv, heads)
        assert rec[0].chosen != backend
        assert rec[0].refused.get(backend, reasons) == reasons   # absent if an earlier backend took it
        return
    out = fn(qkv, heads)
    same = reference.attention(qkv, heads)
    atol = 1e-5 if dtype == torch.float32 else 1e-4
    assert_close_to_reference(out, reference.attention(qkv.double(), heads), same, atol=atol, what=f"{backend} {dtype}")


def test_expected_libraries_import(monkeypatch):
    """Each library FASTLEGO_EXPECT_ATTENTION_LIBS names imports, with its compiled ops loaded.
    Without the variable: nothing is expected (and a misspelt name is an error, not a skip)."""
    expected = ab.expected_libraries()
    for name in expected:
        module, error = ab._import(name)
        assert module is not None, f"{ab.EXPECT_ENV} expects {name}: {error}"
        if name == "xformers":
            ops, error = ab._xformers_ops()
            assert ops is not None, error
            assert ab._xformers_extension_error(module) is None, ab._xformers_extension_error(module)
    monkeypatch.setenv(ab.EXPECT_ENV, "flash_attn, xformers")
    assert ab.expected_libraries() == ["flash_attn", "xformers"]
    monkeypatch.setenv(ab.EXPECT_ENV, "flash-attn")
    with pytest.raises(ValueError, match="names \\['flash-attn'\\]: expected a comma-separated subset of flash_attn, xformers"):
        ab.expected_libraries()
    monkeypatch.delenv(ab.EXPECT_ENV)
    assert ab.expected_libraries() == []


@pytest.mark.cuda
def test_cuda_report_library_status():
    """Not a check of the libraries, a check of the reasons' form on the real machine: every
    refusal names the library and a cause (printed for the log)."""
    qkv = _qkv(2, 256, 6, 64, torch.bfloat16, "cuda")
    for name, fn in (("flash-attn", ab.flash_attn_not_supported_reasons), ("xformers", ab.xformers_not_supported_reasons)):
        reasons = fn(qkv, 6)
        print(f"{name}: {reasons or 'usable'}")
        assert all(name in r for r in reasons), reasons


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),
                                          pytest.param("cuda", torch.float32, marks=pytest.mark.cuda),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)])
def test_sdpa_backend_equals_the_reference_values_and_gradients(device, dtype):
    """The token-major SDPA backend computes the reference's attention; its gradient (autograd
    through SDPA and the cut) is the reference's too, on random non-zero qkv and output grads."""
    any_device = device
    torch.manual_seed(3)
    for N, T, heads, hd in ((3, 80, 2, 16), (2, 130, 4, 8)):
        qkv = torch.randn(N, T, 3 * heads * hd, device=any_device, dtype=dtype, requires_grad=True)
        g = torch.randn(N, T, heads * hd, device=any_device, dtype=dtype)
        out = ab.sdpa_attention(qkv, heads)
        (dqkv,) = torch.autograd.grad(out, qkv, g)
        ref = reference.attention(qkv, heads)
        (dref,) = torch.autograd.grad(ref, qkv, g)
        assert out.shape == (N, T, heads * hd) and out.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(dqkv, dref, **tol)
        assert torch.isfinite(dqkv).all() and dqkv.abs().sum() > 0
    assert ab.sdpa_not_supported_reasons(qkv.detach(), 3)[0].startswith("qkv's last dim")
    assert ab.sdpa_not_supported_reasons(qkv.detach(), heads) == []
