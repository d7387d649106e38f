"""kernels/cublaslt.py: cuBLASLt's GEMM epilogues (GELU_AUX_BIAS, DGELU_BGRAD, BGRADB / BGRADA)
through ctypes.

On the CPU: the reasons name what is missing (CUDA build, GPU, library, symbols) and the library
search prefers torch's CUDA major; the twins match autograd of F.linear + tanh-GELU in fp64; the
row-major / column-major bookkeeping is checked by running the exact arguments the binding hands to
cuBLASLt (recorded through a stand-in library) through a column-major GEMM emulator written from
cublasLt.h's definitions; bad arguments raise ValueError before any compute.
On a GPU (`cuda`): each op against its twin at the MLP's shapes in bf16 / fp16 / fp32 with the
2x-of-PyTorch rule, NaN-poisoned outputs, the GELU's tanh form, streams, CUDA graphs, refusals.
No Triton kernel runs here: nothing is marked `interpreter`."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastlego.kernels import cublaslt as lt
from fastlego.kernels.policy import tf32
from fastlego.testing import assert_close_to_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")


# --------------------------------------------------------------------------------------------
# A column-major GEMM emulator, from cublasLt.h's definitions (independent of the binding)
# --------------------------------------------------------------------------------------------

def colmajor(flat: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major rows x cols matrix at `flat` with leading dimension ld: M[i, j] = flat[i + j ld]."""
    assert ld >= rows and (cols == 0 or (cols - 1) * ld + rows <= flat.size), "layout runs past the buffer"
    return flat[np.arange(rows)[:, None] + np.arange(cols)[None, :] * ld]


def store_colmajor(flat: np.ndarray, mat: np.ndarray, ld: int) -> None:
    rows, cols = mat.shape
    flat[np.arange(rows)[:, None] + np.arange(cols)[None, :] * ld] = mat


def gelu_tanh_np(a):
    return 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))


def dgelu_tanh_np(a):
    u = math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)
    du = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * a ** 2)
    t = np.tanh(u)
    return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * du


def emulate_matmul(transa, transb, a, a_layout, b, b_layout, d, d_layout, epilogue, bias=None, aux=None, aux_ld=0):
    """cublasLtMatmul with alpha 1, beta 0, C = D: D (m x n) = op(A) op(B) then the epilogue, on flat
    fp64 buffers (written in place: d, and aux / bias where the epilogue writes them). A layout is
    (rows, cols, ld) of the stored matrix; op(X) is X for CUBLAS_OP_N (0), X^T for CUBLAS_OP_T (1)."""
    A = colmajor(a, *a_layout)
    B = colmajor(b, *b_layout)
    opA = A if transa == 0 else A.T
    opB = B if transb == 0 else B.T
    m, n, ldd = d_layout
    assert opA.shape[0] == m and opB.shape[1] == n and opA.shape[1] == opB.shape[0], "inconsistent m, n, k"
    D = opA @ opB
    if epilogue == 164:     # GELU_AUX_BIAS: bias per row of D, the GELU input to aux, then GELU
        D = D + bias[:m, None]
        store_colmajor(aux, D, aux_ld)
        D = gelu_tanh_np(D)
    elif epilogue == 208:   # DGELU_BGRAD: D * GELU'(aux); bias gradient = each row of D summed
        D = D * dgelu_tanh_np(colmajor(aux, m, n, aux_ld))
        bias[:m] = D.sum(axis=1)
    elif epilogue == 256:   # BGRADA: bias gradient over the k of op(A), one per row of D
        bias[:m] = opA.sum(axis=1)
    elif epilogue == 512:   # BGRADB: bias gradient over the k of op(B), one per column of D
        bias[:n] = opB.sum(axis=0)
    else:
        raise AssertionError(f"epilogue {epilogue} not emulated")
    store_colmajor(d, D, ldd)


def test_emulator_is_a_column_major_gemm():
    """The emulator itself: Fortran-order buffers and op(X) give numpy's product."""
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    for transa in (0, 1):
        for transb in (0, 1):
            a_st, b_st = (A if transa == 0 else A.T), (B if transb == 0 else B.T)
            d = np.full(5 * 4, np.nan)
            bias = np.zeros(4)
            emulate_matmul(transa, transb, a_st.flatten(order="F"), (*a_st.shape, a_st.shape[0]),
                           b_st.flatten(order="F"), (*b_st.shape, b_st.shape[0]), d, (5, 4, 5), 512, bias=bias)
            np.testing.assert_allclose(d.reshape(4, 5).T, A @ B, rtol=1e-12)
            np.testing.assert_allclose(bias, B.sum(0), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# A stand-in cuBLASLt that records what the binding passes
# --------------------------------------------------------------------------------------------

def _value(x):
    return x.value if isinstance(x, ctypes.c_void_p) else x


class RecordingLt:
    """Python stand-ins for the cuBLASLt functions the binding calls: descriptors and layouts are
    numbered objects holding what was set on them; each cublasLtMatmul is recorded with the state
    of its descriptor at that moment."""

    def __init__(self, algos: int = 3):
        self.algos, self.next, self.objects, self.matmuls, self.destroyed = algos, 1000, {}, [], []

    def _new(self, ref, **info):
        handle, self.next = self.next, self.next + 1
        ref._obj.value = handle
        self.objects[handle] = info
        return 0

    def cublasLtMatmulDescCreate(self, ref, compute, scale):
        return self._new(ref, kind="desc", compute=compute, scale=scale, attrs={})

    def cublasLtMatmulDescSetAttribute(self, desc, attr, buf, size):
        assert size == ctypes.sizeof(buf._obj)
        self.objects[_value(desc)]["attrs"][attr] = (type(buf._obj), buf._obj.value)
        return 0

    def cublasLtMatrixLayoutCreate(self, ref, dtype, rows, cols, ld):
        return self._new(ref, kind="layout", dtype=dtype, rows=rows, cols=cols, ld=ld)

    def cublasLtMatmulPreferenceCreate(self, ref):
        return self._new(ref, kind="pref", attrs={})

    def cublasLtMatmulPreferenceSetAttribute(self, pref, attr, buf, size):
        assert size == ctypes.sizeof(buf._obj)
        self.objects[_value(pref)]["attrs"][attr] = buf._obj.value
        return 0

    def cublasLtMatmulAlgoGetHeuristic(self, handle, desc, a, b, c, d, pref, requested, results, count):
        self.heuristic = dict(a=_value(a), b=_value(b), c=_value(c), d=_value(d),
                              pref=dict(self.objects[_value(pref)]["attrs"]))
        n = min(requested, self.algos)
        for i in range(n):
            results[i].state, results[i].workspaceSize = 0, 1024
            results[i].algo.data[0] = 77 + i
        count._obj.value = n
        return 0

    def cublasLtMatmul(self, handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo, ws, ws_size, stream):
        self.matmuls.append(dict(desc=dict(self.objects[_value(desc)]["attrs"]), alpha=alpha._obj.value,
                                 beta=beta._obj.value, A=A, Adesc=self.objects[_value(Adesc)], B=B,
                                 Bdesc=self.objects[_value(Bdesc)], C=C, Cdesc=_value(Cdesc), D=D,
                                 Ddesc=self.objects[_value(Ddesc)], Ddesc_id=_value(Ddesc), algo=algo._obj.data[0],
                                 ws=ws, ws_size=ws_size, stream=stream))
        return 0

    def cublasLtMatmulPreferenceDestroy(self, pref):
        self.destroyed.append(_value(pref))
        return 0

    cublasLtMatmulDescDestroy = cublasLtMatrixLayoutDestroy = cublasLtMatmulPreferenceDestroy

    def cublasLtGetStatusName(self, status):
        return b"CUBLAS_STATUS_?"


def _op_tensors(op: str, M: int, N: int, K: int, seed: int = 0):
    """fp64 inputs of `op` (row-major PyTorch tensors), every value random and non-zero."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)   # noqa: E731
    if op == "linear_gelu_aux":
        return {"x": r(M, K), "weight": r(N, K) / K ** 0.5, "bias": r(N) * 0.5}
    if op == "dgelu_bgrad":
        return {"grad_act": r(M, K), "weight2": r(K, N) / K ** 0.5, "pre": r(M, N) * 1.5}
    return {"grad_out": r(M, N), "inp": r(M, K)}


def _twin(op, ts):
    if op == "linear_gelu_aux":
        y, pre = lt.linear_gelu_aux_reference(ts["x"], ts["weight"], ts["bias"])
        return {"y": y, "pre": pre}
    if op == "dgelu_bgrad":
        dpre, db = lt.dgelu_bgrad_reference(ts["grad_act"], ts["weight2"], ts["pre"])
        return {"dpre": dpre, "dbias": db}
    dw, db = lt.weight_grad_bgrad_reference(ts["grad_out"], ts["inp"])
    return {"dweight": dw, "dbias": db}


@pytest.mark.parametrize("op", lt.OPS)
@pytest.mark.parametrize("M,N,K", [(7, 16, 8), (5, 24, 40), (1, 8, 16)])
def test_binding_passes_a_call_that_computes_the_row_major_op(op, M, N, K):
    """What the binding hands cuBLASLt for `op` (a _Plan built and launched on a recording stand-in)
    is, run through the column-major emulator on the tensors' row-major storage, the op itself:
    its outputs (as the binding views them) equal the twin's."""
    call = lt.lt_call(op, M, N, K)
    ts = _op_tensors(op, M, N, K)
    outputs = {"linear_gelu_aux": {"y": (M, N), "pre": (M, N)}, "dgelu_bgrad": {"dpre": (M, N), "dbias": (N,)}}.get(
        op, {"dweight": call.d_rowmajor_shape, "dbias": (N,)})
    buffers = {name: t.contiguous().view(-1).numpy().copy() for name, t in ts.items()}
    buffers.update({name: np.full(math.prod(shape), np.nan) for name, shape in outputs.items()})
    ptrs = {name: 4096 * (i + 1) for i, name in enumerate(buffers)}   # 256-byte aligned stand-in addresses
    fake = RecordingLt()
    plan = lt._Plan(fake, ctypes.c_void_p(1), call, torch.bfloat16, ptrs, 1)
    workspace = torch.empty(8, dtype=torch.uint8)
    plan.launch(ctypes.c_void_p(1), ptrs, workspace, 1234)
    [rec] = fake.matmuls
    name_of = {p: name for name, p in ptrs.items()}
    desc = rec["desc"]
    # what was set, with the C types of cublasLtMatmulDescAttributes_t
    assert desc[lt.CUBLASLT_MATMUL_DESC_TRANSA][0] is ctypes.c_int32
    assert desc[lt.CUBLASLT_MATMUL_DESC_EPILOGUE][0] is ctypes.c_uint32
    assert rec["alpha"] == 1.0 and rec["beta"] == 0.0 and rec["C"] == rec["D"] and rec["Cdesc"] == rec["Ddesc_id"]
    assert rec["algo"] == 78, "algo_index 1: the heuristic's second algorithm"
    assert rec["stream"] == 1234 and rec["ws"] == workspace.data_ptr() and rec["ws_size"] == lt.WORKSPACE_BYTES
    assert all(lay["dtype"] == lt.CUDA_R_16BF for lay in (rec["Adesc"], rec["Bdesc"], rec["Ddesc"]))
    assert fake.heuristic["pref"][lt.CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES] == lt.WORKSPACE_BYTES
    assert fake.heuristic["pref"][lt.CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES] == 256
    epilogue = desc[lt.CUBLASLT_MATMUL_DESC_EPILOGUE][1]
    aux_name = name_of.get(desc.get(lt.CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, (None, None))[1])
    bias_name = name_of.get(desc.get(lt.CUBLASLT_MATMUL_DESC_BIAS_POINTER, (None, None))[1])
    aux_ld = desc.get(lt.CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, (None, 0))[1]
    # cublasLt.h's constraints: aux ld divisible by 8 and >= D's rows; every layout inside its tensor
    if aux_name is not None:
        assert aux_ld % 8 == 0 and aux_ld >= rec["Ddesc"]["rows"]
    for lay, ptr in ((rec["Adesc"], rec["A"]), (rec["Bdesc"], rec["B"]), (rec["Ddesc"], rec["D"])):
        assert lay["ld"] >= lay["rows"] and lay["ld"] * lay["cols"] == buffers[name_of[ptr]].size, name_of[ptr]
    lay = lambda d: (d["rows"], d["cols"], d["ld"])   # noqa: E731
    emulate_matmul(desc[lt.CUBLASLT_MATMUL_DESC_TRANSA][1], desc[lt.CUBLASLT_MATMUL_DESC_TRANSB][1],
                   buffers[name_of[rec["A"]]], lay(rec["Adesc"]), buffers[name_of[rec["B"]]], lay(rec["Bdesc"]),
                   buffers[name_of[rec["D"]]], lay(rec["Ddesc"]), epilogue,
                   bias=buffers.get(bias_name), aux=buffers.get(aux_name), aux_ld=aux_ld)
    twin = _twin(op, ts)
    for name, shape in outputs.items():
        got = torch.from_numpy(buffers[name]).view(shape)
        if name == "dweight" and call.d_transposed:
            got = got.t()
        assert not torch.isnan(got).any(), f"{op}: {name} not written"
        torch.testing.assert_close(got, twin[name], rtol=1e-10, atol=1e-10, msg=f"{op}: {name}")
    plan.destroy()
    assert set(fake.destroyed) >= {rec["Ddesc_id"]}


def test_plan_without_algorithm_is_refused_clearly():
    """No algorithm from the heuristic, or fewer than algo_index: a RuntimeError naming the op."""
    call = lt.lt_call("dgelu_bgrad", 8, 16, 8)
    ptrs = {n: 4096 * (i + 1) for i, n in enumerate(("grad_act", "weight2", "pre", "dpre", "dbias"))}
    with pytest.raises(RuntimeError, match="no algorithm for dgelu_bgrad"):
        lt._Plan(RecordingLt(algos=0), ctypes.c_void_p(1), call, torch.float16, ptrs, 0)
    with pytest.raises(RuntimeError, match="algo_index 5: the heuristic offers 2"):
        lt._Plan(RecordingLt(algos=2), ctypes.c_void_p(1), call, torch.float16, ptrs, 5)


def test_lt_call_picks_the_bias_gradient_epilogue_of_its_layout():
    """weight grad: dW stored contiguous (column-major dW^T = X^T G) reduces op(B) = G: BGRADB; the
    other storage (column-major dW = G^T X) reduces op(A) = G^T: BGRADA. Both are grad_out.sum(0)."""
    b, a = lt.lt_call("weight_grad_bgradb", 10, 16, 8), lt.lt_call("weight_grad_bgrada", 10, 16, 8)
    assert (b.epilogue, b.b, b.bias_len, b.n, b.k) == (lt.CUBLASLT_EPILOGUE_BGRADB, "grad_out", 16, 16, 10)
    assert (a.epilogue, a.a, a.bias_len, a.m, a.k) == (lt.CUBLASLT_EPILOGUE_BGRADA, "grad_out", 16, 16, 10)
    with pytest.raises(ValueError, match="unknown op"):
        lt.lt_call("gelu", 1, 8, 8)


# --------------------------------------------------------------------------------------------
# Twins against autograd (fp64)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(9,), (2, 5)])
def test_twins_match_autograd_of_the_mlp(lead):
    """MLP out = fc2(gelu_tanh(fc1(x))) in fp64: the forward twin gives (act, pre), the DGELU twin
    pre's gradient and fc1's bias gradient, the weight-gradient twin both layers' dW and db."""
    D, N = 12, 20
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)   # noqa: E731
    x, W1, b1, W2, b2 = r(*lead, D), r(N, D) / D ** 0.5, r(N) * 0.5, r(D, N) / N ** 0.5, r(D) * 0.5
    for t in (x, W1, b1, W2, b2):
        t.requires_grad_(True)
    pre = F.linear(x, W1, b1)
    pre.retain_grad()
    act = F.gelu(pre, approximate="tanh")
    act.retain_grad()
    out = F.linear(act, W2, b2)
    gY = r(*out.shape)
    (out * gY).sum().backward()
    with torch.no_grad():
        y_t, pre_t = lt.linear_gelu_aux_reference(x, W1, b1)
        torch.testing.assert_close(y_t, act, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pre_t, pre, rtol=1e-12, atol=1e-12)
        dpre, db1 = lt.dgelu_bgrad_reference(gY, W2, pre_t)
        torch.testing.assert_close(dpre, pre.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db1, b1.grad, rtol=1e-12, atol=1e-12)
        dW1, db1b = lt.weight_grad_bgrad_reference(dpre, x)
        torch.testing.assert_close(dW1, W1.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db1b, b1.grad, rtol=1e-12, atol=1e-12)
        dW2, db2 = lt.weight_grad_bgrad_reference(gY, y_t)
        torch.testing.assert_close(dW2, W2.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(db2, b2.grad, rtol=1e-12, atol=1e-12)
    assert y_t.dtype == torch.float64
    assert lt.linear_gelu_aux_reference(x.detach().half(), W1.detach().half(), b1.detach().half())[0].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Library search and refusals
# --------------------------------------------------------------------------------------------

def test_header_layouts_and_enum_relations():
    """cublasLtMatmulAlgo_t is uint64_t data[8]; cublasLtMatmulHeuristicResult_t is {algo, size_t,
    status, float, int[4]}; the epilogues compose as cublasLt.h defines them."""
    R = lt.MatmulHeuristicResult
    assert ctypes.sizeof(lt.MatmulAlgo) == 64 and ctypes.sizeof(R) == 96
    assert (R.workspaceSize.offset, R.state.offset, R.wavesCount.offset, R.reserved.offset) == (64, 72, 76, 80)
    assert lt.CUBLASLT_EPILOGUE_GELU_AUX_BIAS == lt.CUBLASLT_EPILOGUE_GELU | 128 | lt.CUBLASLT_EPILOGUE_BIAS
    assert lt.CUBLASLT_EPILOGUE_DGELU_BGRAD == lt.CUBLASLT_EPILOGUE_DGELU | 16
    assert len({lt.CUDA_R_16BF, lt.CUDA_R_16F, lt.CUDA_R_32F}) == 3


def test_reasons_name_rocm_cpu_build_and_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    [why] = lt.not_supported_reasons()
    assert "ROCm" in why and "hipBLASLt" in why
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = lt.not_supported_reasons()
    assert any("built without CUDA" in r for r in reasons)
    assert any("no CUDA GPU is visible" in r for r in reasons)


def test_reasons_say_where_the_library_was_searched(monkeypatch, tmp_path):
    monkeypatch.setattr(lt, "loaded_library_paths", lambda: [])
    monkeypatch.setattr(lt, "search_dirs", lambda **kw: [str(tmp_path)])
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    lib, reasons = lt._library.__wrapped__()
    assert lib is None
    [why] = reasons
    for what in ("not found", "Searched", "torch/lib", "site-packages/nvidia/*/lib", "LD_LIBRARY_PATH", str(tmp_path),
                 "find_library", "pip install"):
        assert what in why, what


@needs_no_gpu
def test_on_this_machine_every_op_refuses_with_the_reasons():
    """No GPU here: the library reasons name it; an op on (valid) CPU tensors raises ValueError
    naming CUDA tensors, and its *_not_supported_reasons says the same."""
    reasons = lt.not_supported_reasons()
    assert any("GPU" in r for r in reasons) and reasons == lt.not_supported_reasons()
    x, W, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cuBLASLt needs CUDA tensors"):
        lt.linear_gelu_aux(x, W, b)
    assert any("CUDA tensors" in r for r in lt.linear_gelu_aux_not_supported_reasons(x, W, b))
    with pytest.raises(ValueError, match="cuBLASLt needs CUDA tensors"):
        lt.dgelu_bgrad(torch.randn(4, 8, dtype=torch.half), torch.randn(8, 16, dtype=torch.half),
                       torch.randn(4, 16, dtype=torch.half))
    with pytest.raises(ValueError, match="cuBLASLt needs CUDA tensors"):
        lt.weight_grad_bgrad(torch.randn(4, 16), torch.randn(4, 8))
    with pytest.raises(lt.CublasLtUnavailable, match="GPU"):
        lt._lib()
    # the library file itself may be installed (a CUDA build of torch on a machine whose GPU is
    # hidden); found or not, the report says whether it loaded and never names a missing file
    info = lt.library_info()
    assert info["path"] is None or os.path.exists(info["path"])


def test_library_search_prefers_torch_cuda_major(tmp_path):
    """Folders: torch/lib, then each site-packages' nvidia/cu<major>/lib and nvidia/cublas/lib, its
    other nvidia/*/lib, then LD_LIBRARY_PATH; files of torch's major first, unversioned next, other
    majors set aside (not loaded)."""
    sp, ld = tmp_path / "site", tmp_path / "ld"
    for sub in ("cu13", "cublas", "cudnn", "nccl"):
        (sp / "nvidia" / sub / "lib").mkdir(parents=True)
    ld.mkdir()
    (sp / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13").write_bytes(b"")
    (sp / "nvidia" / "cublas" / "lib" / "libcublasLt.so.12").write_bytes(b"")
    (ld / "libcublasLt.so").write_bytes(b"")
    dirs = lt.search_dirs(sys_path=[str(sp), str(tmp_path / "missing")], ld_library_path=str(ld), cuda_major=13)
    nv = str(sp / "nvidia")
    assert dirs[0].endswith(os.path.join("torch", "lib"))
    assert dirs[1:] == [os.path.join(nv, "cu13", "lib"), os.path.join(nv, "cublas", "lib"),
                        os.path.join(nv, "cudnn", "lib"), os.path.join(nv, "nccl", "lib"), str(ld)]
    assert lt.search_dirs(sys_path=[str(sp)], ld_library_path="", cuda_major=12)[1] == os.path.join(nv, "cublas", "lib")
    for major, first, other in ((13, "libcublasLt.so.13", "libcublasLt.so.12"), (12, "libcublasLt.so.12", "libcublasLt.so.13")):
        candidates, others = lt.library_candidates(dirs, major)
        assert [os.path.basename(p) for p in candidates] == [first, "libcublasLt.so"]
        assert [os.path.basename(p) for p in others] == [other]
    assert lt.file_major("/x/libcublasLt.so.13.4.0.1") == 13 and lt.file_major("cublasLt64_12.dll") == 12
    assert lt.file_major("/x/libcublasLt.so") is None


def test_a_file_that_is_not_cublaslt_is_refused_with_its_path(tmp_path):
    fake = tmp_path / "libcublasLt.so.13"
    fake.write_bytes(b"not a library")
    lib, why = lt.try_load(str(fake), 13)
    assert lib is None and str(fake) in why and "could not be loaded" in why
    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no C library to stand in for a library without cuBLASLt's functions")
    lib, why = lt.try_load(libc, 13)
    assert lib is None and f"{libc} lacks cublasLtGetVersion" in why and "cublasLtMatmulAlgoGetHeuristic" in why
    assert lt.missing_symbols(ctypes.CDLL(libc)) == [name for name, _, _ in lt._SYMBOLS]


# --------------------------------------------------------------------------------------------
# Argument checks: ValueError before any compute (CPU tensors: the shape checks come first)
# --------------------------------------------------------------------------------------------

def _bf(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


@pytest.mark.parametrize("call,match", [
    (lambda: lt.linear_gelu_aux(_bf(4, 8), _bf(16, 12), _bf(16)), r"weight an nn.Linear weight \(N, K\)"),
    (lambda: lt.linear_gelu_aux(_bf(4, 8), _bf(16, 8), _bf(8)), r"bias must be \(16,\)"),
    (lambda: lt.linear_gelu_aux(_bf(4, 8), _bf(16, 8), None), "bias is required"),
    (lambda: lt.linear_gelu_aux(_bf(4, 8), _bf(12, 8), _bf(12)), "multiple of 8 elements .*divisible by 8"),
    (lambda: lt.linear_gelu_aux(_bf(4, 12), _bf(16, 12), _bf(16)), "K = 12 is not a multiple of 8"),
    (lambda: lt.linear_gelu_aux(_bf(4, 8), _bf(16, 8).half(), _bf(16)), "mixed dtypes"),
    (lambda: lt.linear_gelu_aux(_bf(4, 8).double(), _bf(16, 8).double(), _bf(16).double()), "float64 not supported"),
    (lambda: lt.linear_gelu_aux(_bf(8, 4).t(), _bf(16, 8), _bf(16)), "x must be contiguous"),
    (lambda: lt.linear_gelu_aux(_bf(33)[1:].view(4, 8), _bf(16, 8), _bf(16)), "x starts at an address not 16-byte"),
    (lambda: lt.linear_gelu_aux(_bf(4, 8), _bf(16, 8), _bf(16), out=_bf(4, 8)), r"out is \(4, 8\).*expected \(4, 16\)"),
    (lambda: lt.linear_gelu_aux(_bf(4, 8), _bf(16, 8), _bf(16), pre_out=_bf(16, 4).t()), "pre_out must be contiguous"),
    (lambda: lt.dgelu_bgrad(_bf(4, 8), _bf(8, 16), _bf(4, 8)), r"pre must be \(4, 16\)"),
    (lambda: lt.dgelu_bgrad(_bf(4, 8), _bf(16, 8), _bf(4, 16)), r"weight2 fc2's weight \(D_out, N\)"),
    (lambda: lt.dgelu_bgrad(_bf(4, 8), _bf(8, 16), _bf(4, 16), dbias_out=_bf(8)), r"dbias_out is \(8,\)"),
    (lambda: lt.weight_grad_bgrad(_bf(4, 16), _bf(5, 8)), "same rows"),
    (lambda: lt.weight_grad_bgrad(_bf(4, 16), _bf(4, 8), epilogue="bgrad"), "epilogue must be 'bgradb'"),
    (lambda: lt.weight_grad_bgrad(_bf(4, 16), _bf(4, 8), epilogue="bgrada", out=_bf(16, 8)),
     r"transposed view with strides \(1, 16\)"),
])
def test_bad_arguments_raise_before_compute(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_outputs_overlapping_inputs_and_autograd_are_refused():
    x, W, b = _bf(4, 8), _bf(16, 8), _bf(16)
    buf = torch.empty(4 * 16 + 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="overlaps an input"):
        lt.dgelu_bgrad(_bf(4, 8), _bf(8, 16), buf[:64].view(4, 16), out=buf[:64].view(4, 16))
    W.requires_grad_(True)
    with pytest.raises(ValueError, match="autograd is recording"):
        lt.linear_gelu_aux(x, W, b)


# --------------------------------------------------------------------------------------------
# The probe script
# --------------------------------------------------------------------------------------------

def _probe_module():
    spec = importlib.util.spec_from_file_location("bench_probe_cublaslt_epilogues",
                                                  os.path.join(ROOT, "bench", "probe_cublaslt_epilogues.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_probe_times_with_the_package_timer_and_refuses_without_a_gpu(tmp_path):
    from fastlego import benchmark as bm
    probe = _probe_module()
    assert probe.measure is bm.measure
    source = open(probe.__file__).read()
    assert "Event(" not in source and "perf_counter" not in source and "do_bench" not in source
    assert probe.parse_shapes("a/B1:64x16,128x8") == [("a/B1", 64, 16), ("128x8", 128, 8)]
    with pytest.raises(SystemExit, match="name:MxD"):
        probe.parse_shapes("a:64")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA GPU"):
            probe.main(["--json", str(tmp_path / "out.json")])
        assert not (tmp_path / "out.json").exists()


# --------------------------------------------------------------------------------------------
# On the GPU
# --------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MLP_SHAPES = [(4096, 384), (4096, 1024), (4096, 1152), (4099, 384)]   # (M rows, D); N = 4D; an odd M
ATOL = {torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float32: 1e-5}
# The library evaluates GELU's tanh itself, perhaps with the hardware approximation (PTX
# tanh.approx.f32: relative error 2^-10.987): its GELU outputs get an elementwise slack for a tanh
# off by TANH_EPS (twice that bound) on top of the 2x-of-PyTorch rule.
TANH_EPS = 2.0 ** -10


def _gpu_inputs(M, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N = 4 * D
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)   # noqa: E731
    return dict(x=r(M, D).to(dtype), W1=(r(N, D) / D ** 0.5).to(dtype), b1=(0.5 * r(N)).to(dtype),
                W2=(r(D, N) / N ** 0.5).to(dtype), dY=r(M, D).to(dtype), pre=(1.5 * r(M, N)).to(dtype))


def _skip_if_refused(reasons):
    if reasons:
        pytest.skip("cuBLASLt refuses this call: " + "; ".join(reasons))


def _must_take(reasons, dtype, optional=False):
    """The MLP's route (bf16 / fp16; GELU_AUX_BIAS, DGELU_BGRAD, BGRADB) must be taken; fp32 and
    BGRADA are skipped, with the library's own reason, when it has no algorithm for them."""
    if dtype == torch.float32 or optional:
        _skip_if_refused(reasons)
    assert reasons == []


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def gelu_slack(pre):
    """|d GELU / d tanh| * TANH_EPS = 0.5 |a| TANH_EPS, elementwise."""
    return 0.5 * pre.double().abs() * TANH_EPS


def dgelu_slack(dact, pre):
    """GELU'(a) = 0.5 (1 + t) + 0.5 a (1 - t^2) u'(a): a tanh off by e moves it by at most
    e (0.5 + |a| u'(a)) (|d(1 - t^2)| <= 2 e); times |dact|, elementwise."""
    a = pre.double()
    du = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * a * a)
    return dact.double().abs() * TANH_EPS * (0.5 + a.abs() * du)


def assert_close_with_slack(out, ref, same, atol, slack, what):
    """The 2x-of-PyTorch rule of `assert_close_to_reference` (NaN never passes) with an elementwise
    slack added to the bound."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (unwritten or broken elements)"
    ref = ref.double()
    base = (same.double() - ref).abs().max().item()
    assert math.isfinite(base), f"{what}: the same-dtype baseline is not finite"
    err = (out.double() - ref).abs()
    excess = err - (2 * base + atol + slack)
    assert (excess <= 0).all(), (f"{what}: {(excess > 0).sum().item()} elements beyond 2 x PyTorch's error {base:.3e} "
                                 f"+ atol {atol:.0e} + tanh slack; max error {err.max().item():.3e}, worst excess "
                                 f"{excess.max().item():.3e}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M,D", MLP_SHAPES)
def test_linear_gelu_aux_on_gpu(M, D, dtype):
    t = _gpu_inputs(M, D, dtype)
    x, W, b = t["x"], t["W1"], t["b1"]
    N = 4 * D
    _must_take(lt.linear_gelu_aux_not_supported_reasons(x, W, b), dtype)
    y, pre = _nan(M, N, dtype=dtype), _nan(M, N, dtype=dtype)
    got = lt.linear_gelu_aux(x, W, b, out=y, pre_out=pre)
    assert got[0] is y and got[1] is pre
    y_ref, pre_ref = lt.linear_gelu_aux_reference(x, W, b)
    with tf32(False):
        pre_same = F.linear(x, W, b)
        y_same = F.gelu(pre_same, approximate="tanh")
    torch.cuda.synchronize()
    assert_close_to_reference(pre, pre_ref, pre_same, atol=ATOL[dtype], what="pre")
    assert_close_with_slack(y, y_ref, y_same, ATOL[dtype], gelu_slack(pre_ref), "y")
    # fresh outputs, and rows given as (B, T, K)
    y3, pre3 = lt.linear_gelu_aux(x.view(1, M, D), W, b)
    assert y3.shape == (1, M, N) and pre3.shape == (1, M, N)
    torch.testing.assert_close(y3.view(M, N), y)
    torch.testing.assert_close(pre3.view(M, N), pre)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M,D", MLP_SHAPES)
def test_dgelu_bgrad_on_gpu(M, D, dtype):
    t = _gpu_inputs(M, D, dtype)
    dY, W2, pre = t["dY"], t["W2"], t["pre"]
    N = 4 * D
    _must_take(lt.dgelu_bgrad_not_supported_reasons(dY, W2, pre), dtype)
    dpre, db = _nan(M, N, dtype=dtype), _nan(N, dtype=dtype)
    got = lt.dgelu_bgrad(dY, W2, pre, out=dpre, dbias_out=db)
    assert got[0] is dpre and got[1] is db
    dpre_ref, db_ref = lt.dgelu_bgrad_reference(dY, W2, pre)
    with tf32(False):
        dpre_same = torch.ops.aten.gelu_backward(dY @ W2, pre, approximate="tanh")
    torch.cuda.synchronize()
    slack = dgelu_slack(dY.double() @ W2.double(), pre)
    assert_close_with_slack(dpre, dpre_ref, dpre_same, ATOL[dtype], slack, "dpre")
    # the bias gradient: of the DGELU output (the library's own dpre summed over rows: tight), and
    # against the twin with the summed slack (loose)
    own = dpre.double().sum(0)
    torch_sum_err = dpre_same.sum(0).double() - dpre_same.double().sum(0)   # PyTorch summing its rows in the dtype
    assert_close_to_reference(db, own, own + torch_sum_err, atol=ATOL[dtype], what="dbias vs the sum of dpre's rows")
    assert_close_with_slack(db, db_ref, dpre_same.sum(0), ATOL[dtype], slack.sum(0), "dbias")


@pytest.mark.cuda
@pytest.mark.parametrize("epilogue", ["bgradb", "bgrada"])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("M,D", MLP_SHAPES)
def test_weight_grad_bgrad_on_gpu(M, D, dtype, layer, epilogue):
    t = _gpu_inputs(M, D, dtype)
    G, X = (t["pre"], t["x"]) if layer == "fc1" else (t["dY"], F.gelu(t["pre"], approximate="tanh"))
    N, K = G.shape[1], X.shape[1]
    _must_take(lt.weight_grad_bgrad_not_supported_reasons(G, X, epilogue=epilogue), dtype, epilogue == "bgrada")
    dw = _nan(K, N, dtype=dtype).t() if epilogue == "bgrada" else _nan(N, K, dtype=dtype)
    db = _nan(N, dtype=dtype)
    got = lt.weight_grad_bgrad(G, X, epilogue=epilogue, out=dw, dbias_out=db)
    assert got[0] is dw and got[1] is db
    dw_ref, db_ref = lt.weight_grad_bgrad_reference(G.double(), X.double())   # the truth, in fp64
    with tf32(False):
        dw_same = G.t() @ X
    torch.cuda.synchronize()
    assert_close_to_reference(dw, dw_ref, dw_same, atol=ATOL[dtype], what="dweight")
    # a bias gradient sums M rows: its absolute error grows with the sums' size
    assert_close_to_reference(db, db_ref, G.sum(0), atol=ATOL[dtype] * max(1.0, db_ref.abs().max().item()),
                              what="dbias")
    fresh, _ = lt.weight_grad_bgrad(G, X, epilogue=epilogue)
    assert fresh.shape == (N, K) and fresh.stride() == ((1, N) if epilogue == "bgrada" else (K, 1))
    torch.testing.assert_close(fresh, dw)


@pytest.mark.cuda
def test_cublaslt_gelu_is_the_tanh_form():
    """fp32: regress y - gelu_erf(pre) on gelu_tanh(pre) - gelu_erf(pre) over pre in about
    [-5, 5] (pre: cuBLASLt's own aux output): slope ~1 for the tanh form, ~0 for erf. The same for
    the DGELU epilogue's derivative."""
    M, D = 4096, 64
    g = torch.Generator(device="cuda").manual_seed(5)
    x = 2.0 * torch.randn(M, D, device="cuda", generator=g)
    W = torch.randn(256, D, device="cuda", generator=g) / D ** 0.5
    b = 0.5 * torch.randn(256, device="cuda", generator=g)
    _skip_if_refused(lt.linear_gelu_aux_not_supported_reasons(x, W, b))
    y, pre = lt.linear_gelu_aux(x, W, b)
    p = pre.double()
    gap = F.gelu(p, approximate="tanh") - F.gelu(p)
    slope = ((y.double() - F.gelu(p)) * gap).sum() / (gap * gap).sum()
    assert 0.5 < slope.item() < 1.5, f"GELU epilogue: slope {slope.item():.3f} on the tanh-vs-erf gap (1: tanh form)"
    dY = torch.randn(M, D, device="cuda", generator=g)
    W2 = torch.randn(D, 256, device="cuda", generator=g) / 16
    _skip_if_refused(lt.dgelu_bgrad_not_supported_reasons(dY, W2, pre))
    dpre, _ = lt.dgelu_bgrad(dY, W2, pre)
    dact = dY.double() @ W2.double()
    d_tanh = torch.ops.aten.gelu_backward(dact, p, approximate="tanh")
    d_erf = torch.ops.aten.gelu_backward(dact, p)
    gap = d_tanh - d_erf
    slope = ((dpre.double() - d_erf) * gap).sum() / (gap * gap).sum()
    assert 0.5 < slope.item() < 1.5, f"DGELU epilogue: slope {slope.item():.3f} (1: tanh form)"


@pytest.mark.cuda
def test_every_heuristic_algorithm_and_a_side_stream_give_the_same_answer():
    t = _gpu_inputs(1024, 384, torch.bfloat16)
    x, W, b = t["x"], t["W1"], t["b1"]
    call = lt.lt_call("linear_gelu_aux", 1024, 1536, 384)
    y_ref, pre_ref = lt.linear_gelu_aux_reference(x, W, b)
    y_same = F.gelu(F.linear(x, W, b), approximate="tanh")
    count = lt.heuristic_count(call, {"x": x, "weight": W, "bias": b, "y": y_same, "pre": y_same})
    assert count >= 1
    for i in range(min(count, 4)):
        y, _ = lt.linear_gelu_aux(x, W, b, algo_index=i)
        assert_close_with_slack(y, y_ref, y_same, 1e-3, gelu_slack(pre_ref), f"y (algo {i})")
    with pytest.raises(RuntimeError, match="algo_index"):
        lt.linear_gelu_aux(x, W, b, algo_index=lt.HEURISTIC_RESULTS + 1)
    y0, _ = lt.linear_gelu_aux(x, W, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y1 = _nan(1024, 1536, dtype=torch.bfloat16)
        lt.linear_gelu_aux(x, W, b, out=y1)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(y0, y1)


@pytest.mark.cuda
def test_ops_replay_in_a_cuda_graph():
    t = _gpu_inputs(512, 384, torch.bfloat16)
    x, W1, b1, W2, dY = t["x"], t["W1"], t["b1"], t["W2"], t["dY"]

    def step():
        y, pre = lt.linear_gelu_aux(x, W1, b1)
        dpre, db1 = lt.dgelu_bgrad(dY, W2, pre)
        dw1, db1b = lt.weight_grad_bgrad(dpre, x)
        return y, dpre, db1, dw1, db1b

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()   # warm-up (plans, the capture stream's workspace)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for out in captured:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_empty_rows_and_refusals_on_gpu():
    t = _gpu_inputs(64, 384, torch.bfloat16)
    x, W, b = t["x"], t["W1"], t["b1"]
    y, pre = lt.linear_gelu_aux(x[:0], W, b)
    assert y.shape == (0, 1536) and pre.shape == (0, 1536)
    dw, db = lt.weight_grad_bgrad(t["dY"][:0], x[:0])
    assert torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0
    dpre, db = lt.dgelu_bgrad(t["dY"][:0], t["W2"], t["pre"][:0])
    assert dpre.shape == (0, 1536) and torch.count_nonzero(db) == 0
    with pytest.raises(ValueError, match="divisible by 8"):
        lt.linear_gelu_aux(x, W[:100].contiguous(), b[:100].contiguous())
    flat = torch.empty(64 * 384 + 1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        lt.linear_gelu_aux(flat[1:].view(64, 384), W, b)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        lt.linear_gelu_aux(x, W.t().contiguous().t(), b)
    with pytest.raises(ValueError, match="mixed dtypes"):
        lt.linear_gelu_aux(x, W.half(), b)
    with pytest.raises(ValueError, match="several devices"):
        lt.linear_gelu_aux(x, W, b.cpu())
    # the refusal happens before any compute: the out buffer is untouched
    out = _nan(64, 1536, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        lt.linear_gelu_aux(x, W, b, out=out, pre_out=out)
    assert torch.isnan(out).all()
    assert lt.not_supported_reasons() == [] and lt.library_info()["path"]
