"""cuBLASLt's own GEMM epilogues for the DiT MLP, through ctypes: the elementwise work of the MLP's
GELU and bias gradients done inside the library's GEMM.

  linear_gelu_aux    fc1 forward, epilogue GELU_AUX_BIAS: y = GELU(x W^T + b) and pre = x W^T + b
                     (the "aux" output, kept for the backward) from one GEMM
  dgelu_bgrad        fc2 -> GELU backward, epilogue DGELU_BGRAD: dpre = (dY W2) * GELU'(pre) and
                     fc1's bias gradient sum_rows dpre from the dP GEMM (dP never stored)
  weight_grad_bgrad  a Linear's weight gradient, epilogue BGRADB (or BGRADA): dW = dY^T X and the
                     bias gradient sum_rows dY from one GEMM

Each has a twin in plain PyTorch (`*_reference`, fp32 math; fp64 for fp64) and a
`*_not_supported_reasons` (empty: it takes the call). `not_supported_reasons()` says why the library
cannot be used at all (no CUDA, ROCm, library not found with the places searched, a symbol
missing), one line per reason. torch exposes only the forward epilogue
(`torch._addmm_activation(..., use_gelu=True)`, without the aux output); the rest is reached here.

GELU: cuBLASLt's GELU epilogues are the tanh approximation, 0.5 a (1 + tanh(sqrt(2/pi)(a + 0.044715
a^3))). The header and docs only say "GELU"; PyTorch treats the epilogue as that form (its addmm
path, when it cannot use the GELU epilogue, applies gelu(..., approximate="tanh") instead), and the
cuda-marked tests check the outputs against the tanh form (and that the tanh form fits better than
erf-GELU in fp32).

Library: the libcublasLt that this process already loaded (torch's CUDA build loads it), else the
first loadable one of: torch/lib, every site-packages/nvidia/*/lib (nvidia/cu13/lib and
nvidia/cublas/lib first), LD_LIBRARY_PATH, then ctypes.util.find_library("cublasLt"); a file of
another major version than torch.version.cuda's is not loaded.

Constants and layouts, verified against cublasLt.h and cublas_api.h of cuBLAS 13.4.0
(CUBLAS_VER_MAJOR 13, MINOR 4, PATCH 0, BUILD 1) and CUDA's library_types.h; each constant names its
enum. The values used here are the same in the CUDA 12.x headers (they date from CUDA 11.x).

Row-major PyTorch vs column-major cuBLASLt: a contiguous row-major (r, c) tensor T is, read by
cuBLASLt, the column-major c x r matrix T^T with leading dimension c. So a row-major product
Y = P Q (M x N) is computed as the column-major D = Y^T = Q^T P^T (N x M, ld N): cuBLASLt's A is
Q's storage, B is P's, and transa/transb undo what the storage already transposes. `lt_call` builds
every argument of the call from the op and its sizes, without a GPU (the tests run those arguments
through a column-major GEMM emulator); the launchers take all their arguments from it.

Dtypes: bf16 and fp16 (the MLP's), and fp32 where the library has an algorithm; one dtype per call,
fp32 accumulation (CUBLAS_COMPUTE_32F, never TF32). Every matrix is contiguous and 16-byte aligned,
its leading dimension a multiple of 16 bytes, and pre's width N a multiple of 8 (EPILOGUE_AUX_LD).

Memory: dgelu_bgrad does not return GELU(pre) (fc2's input, for fc2's weight gradient), which
fastlego's Triton `gelu_tanh_backward` writes: with this route the forward keeps both y and pre.
Bias gradients come back in the output dtype (cuBLASLt stores them in D's type), the twins' in fp32.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .policy import device_problems, forward_only_reasons, out_problems, raise_if

# --------------------------------------------------------------------------------------------
# Constants (cuBLAS 13.4.0 headers)
# --------------------------------------------------------------------------------------------

# cublasStatus_t (cublas_api.h)
CUBLAS_STATUS_SUCCESS = 0
CUBLAS_STATUS_NOT_SUPPORTED = 15

# cublasOperation_t (cublas_api.h)
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1

# cublasComputeType_t (cublas_api.h): fp32 accumulation ("float - default"; not TF32)
CUBLAS_COMPUTE_32F = 68

# cudaDataType (library_types.h)
CUDA_R_32F = 0
CUDA_R_16F = 2
CUDA_R_16BF = 14

# cublasLtMatmulDescAttributes_t (cublasLt.h); the C type of each value in brackets
CUBLASLT_MATMUL_DESC_TRANSA = 3                  # [int32] cublasOperation_t of A
CUBLASLT_MATMUL_DESC_TRANSB = 4                  # [int32] cublasOperation_t of B
CUBLASLT_MATMUL_DESC_EPILOGUE = 7                # [uint32] cublasLtEpilogue_t
CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8            # [void*] bias (input) or bias gradient (output)
CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11   # [void*] GELU input: written by GELU_AUX_BIAS, read by DGELU_BGRAD
CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12        # [int64] its leading dimension: divisible by 8, >= D's rows
CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE = 22  # [int32 cudaDataType] default: D's type (not set here)
CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26         # [int32 cudaDataType] default: D's type (not set here)

# cublasLtEpilogue_t (cublasLt.h)
CUBLASLT_EPILOGUE_DEFAULT = 1
CUBLASLT_EPILOGUE_BIAS = 4
CUBLASLT_EPILOGUE_GELU = 32
CUBLASLT_EPILOGUE_GELU_BIAS = CUBLASLT_EPILOGUE_GELU | CUBLASLT_EPILOGUE_BIAS            # 36
CUBLASLT_EPILOGUE_GELU_AUX = CUBLASLT_EPILOGUE_GELU | 128                                # 160
CUBLASLT_EPILOGUE_GELU_AUX_BIAS = CUBLASLT_EPILOGUE_GELU_AUX | CUBLASLT_EPILOGUE_BIAS    # 164
CUBLASLT_EPILOGUE_DGELU = 64 | 128                                                       # 192
CUBLASLT_EPILOGUE_DGELU_BGRAD = CUBLASLT_EPILOGUE_DGELU | 16                             # 208
CUBLASLT_EPILOGUE_BGRADA = 256   # bias gradient = sum over k of op(A): one value per row of D
CUBLASLT_EPILOGUE_BGRADB = 512   # bias gradient = sum over k of op(B): one value per column of D

# cublasLtMatmulPreferenceAttributes_t (cublasLt.h)
CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1     # [uint64]
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5   # [uint32] default 256: algos may assume it
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8


class MatmulAlgo(ctypes.Structure):
    """cublasLtMatmulAlgo_t: semi-opaque, uint64_t data[8] (64 bytes)."""
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class MatmulHeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: { cublasLtMatmulAlgo_t algo; size_t workspaceSize;
    cublasStatus_t state; float wavesCount; int reserved[4]; } (96 bytes on 64-bit)."""
    _fields_ = [("algo", MatmulAlgo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


WORKSPACE_BYTES = 32 << 20        # per device and stream (cuBLASLt's split-K and epilogue scratch)
HEURISTIC_RESULTS = 8             # algos asked of cublasLtMatmulAlgoGetHeuristic
AUX_LD_MULTIPLE = 8               # EPILOGUE_AUX_LD: "Must be divisible by 8" (elements)
POINTER_ALIGNMENT = 16            # bytes: every operand's start (vector loads)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CUDA_DTYPE = {torch.bfloat16: CUDA_R_16BF, torch.float16: CUDA_R_16F, torch.float32: CUDA_R_32F}

# --------------------------------------------------------------------------------------------
# The library: where it is, loading it, its functions
# --------------------------------------------------------------------------------------------

# (name, restype, argtypes) of every function used; all return cublasStatus_t except the two noted
_P, _I, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_SYMBOLS = (
    ("cublasLtGetVersion", ctypes.c_size_t, []),                      # size_t
    ("cublasLtGetStatusName", ctypes.c_char_p, [_I]),                 # const char*
    ("cublasLtCreate", _I, [ctypes.POINTER(_P)]),
    ("cublasLtMatmulDescCreate", _I, [ctypes.POINTER(_P), _I, _I]),   # (desc*, cublasComputeType_t, cudaDataType_t scale)
    ("cublasLtMatmulDescSetAttribute", _I, [_P, _I, _P, _SZ]),
    ("cublasLtMatmulDescDestroy", _I, [_P]),
    ("cublasLtMatrixLayoutCreate", _I, [ctypes.POINTER(_P), _I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]),
    ("cublasLtMatrixLayoutDestroy", _I, [_P]),
    ("cublasLtMatmulPreferenceCreate", _I, [ctypes.POINTER(_P)]),
    ("cublasLtMatmulPreferenceSetAttribute", _I, [_P, _I, _P, _SZ]),
    ("cublasLtMatmulPreferenceDestroy", _I, [_P]),
    # (handle, desc, Adesc, Bdesc, Cdesc, Ddesc, pref, requestedAlgoCount, results[], returnAlgoCount*)
    ("cublasLtMatmulAlgoGetHeuristic", _I, [_P, _P, _P, _P, _P, _P, _P, _I, ctypes.POINTER(MatmulHeuristicResult),
                                            ctypes.POINTER(_I)]),
    # (handle, desc, alpha*, A, Adesc, B, Bdesc, beta*, C, Cdesc, D, Ddesc, algo*, workspace, size, stream)
    ("cublasLtMatmul", _I, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.POINTER(MatmulAlgo), _P, _SZ, _P]),
)

_LIB_PATTERNS = ("libcublasLt.so*", "cublasLt64_*.dll")


def torch_cuda_major() -> Optional[int]:
    """The CUDA major version torch was built for (None for a CPU or ROCm build)."""
    v = torch.version.cuda
    return int(v.split(".")[0]) if v else None


def file_major(path: str) -> Optional[int]:
    """The major version in a library file name (libcublasLt.so.13.4.0.1 -> 13, cublasLt64_12.dll
    -> 12), None when the name has none (libcublasLt.so)."""
    name = os.path.basename(path)
    m = re.match(r"libcublasLt\.so\.(\d+)", name) or re.match(r"cublasLt64_(\d+)\.dll$", name)
    return int(m.group(1)) if m else None


def loaded_library_paths() -> List[str]:
    """libcublasLt files this process has already mapped (torch's own, once its CUDA part loaded)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = [line.split()[-1] for line in f if "libcublasLt" in line]
    except OSError:
        return []
    return list(dict.fromkeys(p for p in paths if p.startswith("/")))


def search_dirs(sys_path: Optional[Sequence[str]] = None, ld_library_path: Optional[str] = None,
                cuda_major: Optional[int] = None) -> List[str]:
    """Existing folders searched for the library, in order: torch/lib, each site-packages'
    nvidia/cu<major>/lib and nvidia/cublas/lib, then its other nvidia/*/lib, then LD_LIBRARY_PATH."""
    sys_path = sys.path if sys_path is None else sys_path
    ld_library_path = os.environ.get("LD_LIBRARY_PATH", "") if ld_library_path is None else ld_library_path
    dirs = [os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")]
    first = ([f"cu{cuda_major}"] if cuda_major else []) + ["cublas"]
    for entry in sys_path:
        nvidia = os.path.join(entry or ".", "nvidia")
        if not os.path.isdir(nvidia):
            continue
        subs = sorted(os.listdir(nvidia))
        for sub in [s for s in first if s in subs] + [s for s in subs if s not in first]:
            dirs.append(os.path.join(nvidia, sub, "lib"))
    dirs += [d for d in ld_library_path.split(os.pathsep) if d]
    return [d for d in dict.fromkeys(os.path.abspath(d) for d in dirs) if os.path.isdir(d)]


def library_candidates(dirs: Sequence[str], cuda_major: Optional[int]) -> Tuple[List[str], List[str]]:
    """(files to try, files of another major version) among `dirs`: the same major as torch's
    CUDA first, unversioned names after (their version is checked once loaded)."""
    same, unversioned, other = [], [], []
    for d in dirs:
        for pattern in _LIB_PATTERNS:
            for path in sorted(glob.glob(os.path.join(d, pattern))):
                major = file_major(path)
                if major is None:
                    unversioned.append(path)
                elif cuda_major is None or major == cuda_major:
                    same.append(path)
                else:
                    other.append(path)
    return list(dict.fromkeys(same + unversioned)), list(dict.fromkeys(other))


def missing_symbols(lib) -> List[str]:
    """The functions of `_SYMBOLS` that `lib` (a ctypes.CDLL) lacks."""
    missing = []
    for name, _, _ in _SYMBOLS:
        try:
            getattr(lib, name)
        except AttributeError:
            missing.append(name)
    return missing


def _bind(lib) -> None:
    for name, restype, argtypes in _SYMBOLS:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def try_load(path: str, cuda_major: Optional[int]):
    """(CDLL, None) if `path` loads, has every function and is of torch's major version; else
    (None, why)."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"{path} could not be loaded ({exc})"
    missing = missing_symbols(lib)
    if missing:
        return None, f"{path} lacks {', '.join(missing)} (a cuBLASLt older than CUDA 11.8, or not cuBLASLt)"
    _bind(lib)
    major = int(lib.cublasLtGetVersion()) // 10000
    if cuda_major is not None and major != cuda_major:
        return None, f"{path} is cuBLASLt {major}.x but torch is built for CUDA {torch.version.cuda}"
    return lib, None


@dataclass
class Library:
    lib: object
    path: str
    version: int     # cublasLtGetVersion(): major * 10000 + minor * 100 + patch


@lru_cache(maxsize=None)
def _library() -> Tuple[Optional[Library], Tuple[str, ...]]:
    """(the library, ()) or (None, why not): searched once per process."""
    major = torch_cuda_major()
    dirs = search_dirs(cuda_major=major)
    candidates, other = library_candidates(dirs, major)
    found = ctypes.util.find_library("cublasLt")
    tried, failures = set(), []
    for path in loaded_library_paths() + candidates + ([found] if found else []):
        if path in tried:
            continue
        tried.add(path)
        if path == found and file_major(found) not in (None, major) and major is not None:
            failures.append(f"{found} (found by ctypes.util.find_library) is for CUDA {file_major(found)}, "
                            f"torch is built for CUDA {torch.version.cuda}")
            continue
        lib, why = try_load(path, major)
        if lib is not None:
            return Library(lib, path, int(lib.cublasLtGetVersion())), ()
        failures.append(why)
    where = ", ".join(dirs) or "none exists"
    want = f"libcublasLt.so.{major}" if major else "libcublasLt.so"
    wheel = {12: "nvidia-cublas-cu12", None: "nvidia-cublas (CUDA 13) or nvidia-cublas-cu12"}.get(major, "nvidia-cublas")
    reasons = [f"{want} not found. Searched: the libraries this process loaded; the folders torch/lib, "
               f"site-packages/nvidia/*/lib and LD_LIBRARY_PATH ({where}); ctypes.util.find_library('cublasLt'). "
               f"Install the cuBLAS wheel of torch's CUDA (pip install {wheel}) or put the folder of "
               f"libcublasLt on LD_LIBRARY_PATH"] if not failures else []
    reasons += failures
    reasons += [f"{p} is for another CUDA major version than torch's ({torch.version.cuda}); not loaded" for p in other
                if not failures and major is not None]
    return None, tuple(reasons)


def library_info() -> Dict[str, object]:
    """Path and version of the cuBLASLt in use (None values when there is none), for reports."""
    lib, reasons = _library() if not torch.version.hip else (None, ())
    if lib is None:
        return {"path": None, "version": None, "reasons": list(reasons)}
    v = lib.version
    return {"path": lib.path, "version": f"{v // 10000}.{v // 100 % 100}.{v % 100}", "reasons": []}


def not_supported_reasons() -> List[str]:
    """Why cuBLASLt cannot be used in this process at all (empty: it can), one reason per line:
    a ROCm or CPU build of torch, no visible GPU, the library not found (with the places searched),
    a function missing from it."""
    if torch.version.hip:
        return [f"ROCm build of torch ({torch.__version__}): its BLAS is hipBLASLt, which this binding does not call"]
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is built without CUDA: cuBLASLt needs a CUDA build of torch")
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False): cuBLASLt runs on a CUDA device")
    reasons += list(_library()[1])
    return reasons


class CublasLtUnavailable(RuntimeError):
    """cuBLASLt cannot be used in this process: the message lists why (`not_supported_reasons`)."""


def _lib():
    reasons = not_supported_reasons()
    if reasons:
        raise CublasLtUnavailable("cuBLASLt cannot be used: " + "; ".join(reasons))
    return _library()[0].lib


def _check(status: int, what: str) -> None:
    if status != CUBLAS_STATUS_SUCCESS:
        lib = _library()[0]
        name = lib.lib.cublasLtGetStatusName(status).decode() if lib is not None else "?"
        raise RuntimeError(f"{what} failed: {name} ({status})")


# --------------------------------------------------------------------------------------------
# The call: every argument of cublasLtMatmul, from the op and its sizes (no GPU needed)
# --------------------------------------------------------------------------------------------

OPS = ("linear_gelu_aux", "dgelu_bgrad", "weight_grad_bgradb", "weight_grad_bgrada")


@dataclass(frozen=True)
class LtCall:
    """One cublasLtMatmul, D (m x n) = op(A) op(B) with an epilogue, all column-major, and which
    PyTorch tensor plays each part. A is stored as a (m x k) matrix for transa N, (k x m) for T,
    with leading dimension lda; B likewise (k x n or n x k). D (m x n, ldd) is the storage of the
    row-major tensor of shape `d_rowmajor_shape`; the op's result is its transpose when
    `d_transposed`. aux (m x n, aux_ld) is the GELU input; bias has m entries (BIAS, DGELU_BGRAD,
    BGRADA) or n (BGRADB)."""

    op: str
    epilogue: int
    transa: int
    transb: int
    m: int
    n: int
    k: int
    a: str
    lda: int
    b: str
    ldb: int
    d: str
    ldd: int
    aux: Optional[str]
    aux_ld: int
    bias: Optional[str]
    bias_len: int
    d_rowmajor_shape: Tuple[int, int]
    d_transposed: bool = False

    @property
    def a_stored(self) -> Tuple[int, int]:
        """(rows, cols) of A as stored (the layout given to cublasLtMatrixLayoutCreate)."""
        return (self.m, self.k) if self.transa == CUBLAS_OP_N else (self.k, self.m)

    @property
    def b_stored(self) -> Tuple[int, int]:
        return (self.k, self.n) if self.transb == CUBLAS_OP_N else (self.n, self.k)


def lt_call(op: str, M: int, N: int, K: int) -> LtCall:
    """The cublasLtMatmul arguments of `op` in PyTorch's row-major terms; N is always the length
    of the bias (or bias gradient):

      linear_gelu_aux     x (M, K), weight (N, K), bias (N,) -> y, pre (M, N)
          Y = X W^T is column-major Y^T = W X^T (N x M): A = weight's storage, the K x N matrix W^T
          (ld K), taken transposed (transa T); B = x's storage X^T (K x M, ld K) as is (N); the
          bias is per row of D (N entries); aux = pre's storage (N x M, ld N).
      dgelu_bgrad         grad_act (M, K), weight2 (K, N), pre (M, N) -> dpre (M, N), dbias (N,)
          dAct = G W2 is column-major dAct^T = W2^T G^T: A = weight2's storage W2^T (N x K, ld N),
          B = grad_act's storage G^T (K x M, ld K), both as is; the DGELU reads aux = pre's
          storage (N x M, ld N); the bias gradient sums each row of D over its M columns.
      weight_grad_bgradb  grad_out (M, N), inp (M, K) -> dweight (N, K), dbias (N,)
          dW = G^T X is column-major dW^T = X^T G (K x N): A = inp's storage X^T (K x M, ld K) as
          is, B = grad_out's storage G^T (N x M, ld N) transposed (T) into G (M x N); the
          reduction dimension k is M, and BGRADB sums op(B) = G over k per column of D: the N
          sums of grad_out's columns, i.e. grad_out.sum(0).
      weight_grad_bgrada  the same product stored the other way, column-major dW = G^T X (N x K,
          ld N): A = grad_out's storage G^T (N x M) as is, B = inp's storage X^T (K x M)
          transposed into X (M x K); BGRADA sums op(A) = G^T over k per row of D, again
          grad_out.sum(0). D's storage is dW^T row-major (K, N), so dweight is its transpose view."""
    N_OP, T_OP = CUBLAS_OP_N, CUBLAS_OP_T
    if op == "linear_gelu_aux":
        return LtCall(op, CUBLASLT_EPILOGUE_GELU_AUX_BIAS, T_OP, N_OP, m=N, n=M, k=K, a="weight", lda=K,
                      b="x", ldb=K, d="y", ldd=N, aux="pre", aux_ld=N, bias="bias", bias_len=N,
                      d_rowmajor_shape=(M, N))
    if op == "dgelu_bgrad":
        return LtCall(op, CUBLASLT_EPILOGUE_DGELU_BGRAD, N_OP, N_OP, m=N, n=M, k=K, a="weight2", lda=N,
                      b="grad_act", ldb=K, d="dpre", ldd=N, aux="pre", aux_ld=N, bias="dbias", bias_len=N,
                      d_rowmajor_shape=(M, N))
    if op == "weight_grad_bgradb":
        return LtCall(op, CUBLASLT_EPILOGUE_BGRADB, N_OP, T_OP, m=K, n=N, k=M, a="inp", lda=K,
                      b="grad_out", ldb=N, d="dweight", ldd=K, aux=None, aux_ld=0, bias="dbias", bias_len=N,
                      d_rowmajor_shape=(N, K))
    if op == "weight_grad_bgrada":
        return LtCall(op, CUBLASLT_EPILOGUE_BGRADA, N_OP, T_OP, m=N, n=K, k=M, a="grad_out", lda=N,
                      b="inp", ldb=K, d="dweight", ldd=N, aux=None, aux_ld=0, bias="dbias", bias_len=N,
                      d_rowmajor_shape=(K, N), d_transposed=True)
    raise ValueError(f"unknown op {op!r}: expected one of {', '.join(OPS)}")


# --------------------------------------------------------------------------------------------
# Plans and launches
# --------------------------------------------------------------------------------------------

def _alignment(ptr: int) -> int:
    """The largest power of two (<= 256) that divides a device address."""
    return 256 if ptr % 256 == 0 else ptr & -ptr


class _Plan:
    """A matmul descriptor, the layouts of A, B and D, and the algo the heuristic chose, for one
    (call, dtype, operand alignments); the pointers are set on the descriptor at each launch."""

    def __init__(self, lib, handle, call: LtCall, dtype: torch.dtype, ptrs: Dict[str, int], algo_index: int):
        self.lib, self.call, self.lock = lib, call, threading.Lock()
        self.desc, self.layouts = ctypes.c_void_p(), []
        pref = ctypes.c_void_p()
        try:
            _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
                   "cublasLtMatmulDescCreate")
            self._set(CUBLASLT_MATMUL_DESC_TRANSA, ctypes.c_int32(call.transa))
            self._set(CUBLASLT_MATMUL_DESC_TRANSB, ctypes.c_int32(call.transb))
            self._set(CUBLASLT_MATMUL_DESC_EPILOGUE, ctypes.c_uint32(call.epilogue))
            if call.aux is not None:
                self._set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, ctypes.c_int64(call.aux_ld))
            self.set_pointers(ptrs)   # the heuristic reads their alignment
            t = _CUDA_DTYPE[dtype]
            a, b, d = (self._layout(t, *shape, ld) for shape, ld in
                       ((call.a_stored, call.lda), (call.b_stored, call.ldb), ((call.m, call.n), call.ldd)))
            _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
            self._pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(WORKSPACE_BYTES))
            for attr, name in ((CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, call.a),
                               (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, call.b),
                               (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, call.d),
                               (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, call.d)):
                self._pref(pref, attr, ctypes.c_uint32(_alignment(ptrs[name])))
            results = (MatmulHeuristicResult * HEURISTIC_RESULTS)()
            count = ctypes.c_int(0)
            status = lib.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, a, b, d, d, pref, HEURISTIC_RESULTS,
                                                        results, ctypes.byref(count))
            usable = [r for r in results[:count.value] if r.state == CUBLAS_STATUS_SUCCESS
                      and r.workspaceSize <= WORKSPACE_BYTES]
            if status == CUBLAS_STATUS_NOT_SUPPORTED or (status == CUBLAS_STATUS_SUCCESS and not usable):
                raise RuntimeError(f"cuBLASLt has no algorithm for {call.op} ({dtype}, m={call.m} n={call.n} "
                                   f"k={call.k}, epilogue {call.epilogue}) on this GPU")
            _check(status, "cublasLtMatmulAlgoGetHeuristic")
            if algo_index >= len(usable):
                raise RuntimeError(f"algo_index {algo_index}: the heuristic offers {len(usable)} algorithms for "
                                   f"{call.op} at m={call.m} n={call.n} k={call.k}")
            self.a, self.b, self.d = a, b, d
            self.algo = MatmulAlgo.from_buffer_copy(usable[algo_index].algo)
            self.algo_count = len(usable)
        except Exception:
            self.destroy()
            raise
        finally:
            if pref:
                lib.cublasLtMatmulPreferenceDestroy(pref)

    def _set(self, attr: int, value) -> None:
        _check(self.lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
               f"cublasLtMatmulDescSetAttribute({attr})")

    def _pref(self, pref, attr: int, value) -> None:
        _check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, attr, ctypes.byref(value), ctypes.sizeof(value)),
               f"cublasLtMatmulPreferenceSetAttribute({attr})")

    def _layout(self, dtype_code: int, rows: int, cols: int, ld: int):
        layout = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype_code, rows, cols, ld),
               "cublasLtMatrixLayoutCreate")
        self.layouts.append(layout)
        return layout

    def set_pointers(self, ptrs: Dict[str, int]) -> None:
        if self.call.bias is not None:
            self._set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, ctypes.c_void_p(ptrs[self.call.bias]))
        if self.call.aux is not None:
            self._set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, ctypes.c_void_p(ptrs[self.call.aux]))

    def launch(self, handle, ptrs: Dict[str, int], workspace: torch.Tensor, stream: int) -> None:
        c = self.call
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)   # host scalars (pointer mode host)
        with self.lock:   # the descriptor holds this launch's bias / aux pointers until it is queued
            self.set_pointers(ptrs)
            _check(self.lib.cublasLtMatmul(
                handle, self.desc, ctypes.byref(alpha), ptrs[c.a], self.a, ptrs[c.b], self.b, ctypes.byref(beta),
                ptrs[c.d], self.d, ptrs[c.d], self.d, ctypes.byref(self.algo), workspace.data_ptr(),
                WORKSPACE_BYTES, stream), f"cublasLtMatmul ({c.op})")

    def destroy(self) -> None:
        for layout in self.layouts:
            self.lib.cublasLtMatrixLayoutDestroy(layout)
        self.layouts = []
        if self.desc:
            self.lib.cublasLtMatmulDescDestroy(self.desc)
            self.desc = ctypes.c_void_p()


class _DeviceState:
    """One cuBLASLt handle per device, a workspace per stream, the plans."""

    def __init__(self, lib, device: torch.device):
        self.lib, self.device = lib, device
        self.handle = ctypes.c_void_p()
        self.workspaces: Dict[int, torch.Tensor] = {}
        self.plans: Dict[tuple, _Plan] = {}
        with torch.cuda.device(device):
            torch.cuda.init()
            _check(lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")

    def workspace(self, stream: int) -> torch.Tensor:
        ws = self.workspaces.get(stream)
        if ws is None:
            ws = self.workspaces[stream] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        return ws


_STATES: Dict[int, _DeviceState] = {}
_STATE_LOCK = threading.Lock()


def _state(device: torch.device) -> _DeviceState:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _STATE_LOCK:
        if index not in _STATES:
            _STATES[index] = _DeviceState(_lib(), torch.device("cuda", index))
        return _STATES[index]


def _plan(call: LtCall, dtype: torch.dtype, ptrs: Dict[str, int], device: torch.device, algo_index: int):
    state = _state(device)
    key = (call, dtype, algo_index, tuple(sorted((name, _alignment(p)) for name, p in ptrs.items())))
    with _STATE_LOCK:
        plan = state.plans.get(key)
        if plan is None:
            plan = state.plans[key] = _Plan(state.lib, state.handle, call, dtype, ptrs, algo_index)
    return state, plan


def clear_plans() -> None:
    """Destroy every cached plan (descriptors and layouts); handles and workspaces stay."""
    with _STATE_LOCK:
        for state in _STATES.values():
            for plan in state.plans.values():
                plan.destroy()
            state.plans.clear()


def heuristic_count(call: LtCall, tensors: Dict[str, torch.Tensor]) -> int:
    """How many algorithms cuBLASLt's heuristic offers for this call (for the probe's algo sweep)."""
    ptrs = {name: t.data_ptr() for name, t in tensors.items()}
    device = tensors[call.d].device
    with torch.cuda.device(device):
        return _plan(call, tensors[call.d].dtype, ptrs, device, 0)[1].algo_count


def _run(call: LtCall, tensors: Dict[str, torch.Tensor], algo_index: int = 0) -> None:
    """cublasLtMatmul of `call` on `tensors` (name -> tensor, names as in the call), on the current
    stream of their device."""
    d = tensors[call.d]
    ptrs = {name: t.data_ptr() for name, t in tensors.items()}
    with torch.cuda.device(d.device):
        state, plan = _plan(call, d.dtype, ptrs, d.device, algo_index)
        stream = torch.cuda.current_stream(d.device).cuda_stream
        plan.launch(state.handle, ptrs, state.workspace(stream), stream)


# --------------------------------------------------------------------------------------------
# Argument checks (before any compute)
# --------------------------------------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _tensor_problems(named: Sequence[Tuple[str, torch.Tensor]], ld_names: Dict[str, int], aux_width: Optional[int]) -> List[str]:
    """dtype, device, contiguity, alignment and leading-dimension problems of the named tensors."""
    ts = [t for _, t in named]
    problems = device_problems(ts)
    dtypes = {t.dtype for t in ts}
    bad = sorted(str(d) for d in dtypes if d not in DTYPES)
    if bad:
        problems.append(f"dtype {', '.join(bad)} not supported: expected bfloat16, float16 or float32")
    elif len(dtypes) > 1:
        problems.append(f"mixed dtypes {sorted(str(d) for d in dtypes)}: pass every tensor in one dtype "
                        f"(cuBLASLt's A, B, D, bias and aux share it here)")
    dev = ts[0].device
    if not problems and dev.type != "cuda":
        problems.append(f"tensors are on {dev}: cuBLASLt needs CUDA tensors")
    for name, t in named:
        if not t.is_contiguous():
            problems.append(f"{name} must be contiguous (cuBLASLt reads it as a dense matrix): pass {name}.contiguous()")
        elif t.numel() and t.data_ptr() % POINTER_ALIGNMENT:
            problems.append(f"{name} starts at an address not {POINTER_ALIGNMENT}-byte aligned (a view with an "
                            f"offset): pass {name}.clone()")
    if not bad:
        size = ts[0].element_size()
        for what, ld in ld_names.items():
            if (ld * size) % POINTER_ALIGNMENT:
                problems.append(f"{what} = {ld} is not a multiple of {POINTER_ALIGNMENT // size} elements "
                                f"({POINTER_ALIGNMENT} bytes): cuBLASLt's epilogue kernels need 16-byte aligned "
                                f"leading dimensions; pad it")
    if aux_width is not None and aux_width % AUX_LD_MULTIPLE:
        problems.append(f"the width N = {aux_width} of pre (cuBLASLt's EPILOGUE_AUX_LD) must be a multiple of "
                        f"{AUX_LD_MULTIPLE} elements (cublasLt.h: the GELU input's leading dimension must be "
                        f"divisible by 8); pad N")
    return problems


def _out_problems(name: str, out, shape, like: torch.Tensor, inputs) -> List[str]:
    """What is wrong with an output buffer: `out_problems`, then contiguity and alignment."""
    problems = [p.replace("out ", f"{name} ", 1) for p in out_problems(out, shape, like.dtype, like.device, inputs)]
    if out is None or problems:
        return problems
    if not out.is_contiguous():
        problems.append(f"{name} must be contiguous (cuBLASLt writes it densely): pass a fresh tensor")
    elif out.numel() and out.data_ptr() % POINTER_ALIGNMENT:
        problems.append(f"{name} starts at an address not {POINTER_ALIGNMENT}-byte aligned: pass a fresh tensor")
    return problems


def _linear_gelu_aux_problems(x, weight, bias, out=None, pre_out=None) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, bias)):
        return ["x, weight and bias must be tensors (bias is required: the epilogue is GELU_AUX_BIAS)"]
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] == 0 or x.shape[-1] == 0:
        return [f"x must be (..., K) and weight an nn.Linear weight (N, K) with N, K > 0; got x {_shape(x)}, "
                f"weight {_shape(weight)}"]
    N, K = weight.shape
    problems = [] if tuple(bias.shape) == (N,) else [f"bias must be ({N},); got {_shape(bias)}"]
    problems += _tensor_problems([("x", x), ("weight", weight), ("bias", bias)], {"K": K}, N)
    shape = (*x.shape[:-1], N)
    problems += _out_problems("out", out, shape, x, (x, weight, bias, pre_out))
    problems += _out_problems("pre_out", pre_out, shape, x, (x, weight, bias))
    return problems + forward_only_reasons([x, weight, bias])


def _dgelu_bgrad_problems(grad_act, weight2, pre, out=None, dbias_out=None) -> List[str]:
    if not all(isinstance(t, torch.Tensor) for t in (grad_act, weight2, pre)):
        return ["grad_act, weight2 and pre must be tensors"]
    if weight2.dim() != 2 or grad_act.dim() < 1 or weight2.shape[0] != grad_act.shape[-1] or 0 in weight2.shape:
        return [f"grad_act must be (..., D_out) and weight2 fc2's weight (D_out, N) with D_out, N > 0; got grad_act "
                f"{_shape(grad_act)}, weight2 {_shape(weight2)}"]
    K, N = weight2.shape
    shape = (*grad_act.shape[:-1], N)
    problems = [] if tuple(pre.shape) == shape else [f"pre must be {shape} (grad_act's rows x weight2's N); got "
                                                     f"{_shape(pre)}"]
    problems += _tensor_problems([("grad_act", grad_act), ("weight2", weight2), ("pre", pre)], {"D_out": K}, N)
    problems += _out_problems("out", out, shape, grad_act, (grad_act, weight2, pre, dbias_out))
    problems += _out_problems("dbias_out", dbias_out, (N,), grad_act, (grad_act, weight2, pre))
    return problems + forward_only_reasons([grad_act, weight2, pre])


def _weight_grad_problems(grad_out, inp, epilogue, out=None, dbias_out=None) -> List[str]:
    if epilogue not in ("bgradb", "bgrada"):
        return [f"epilogue must be 'bgradb' (dweight contiguous) or 'bgrada' (dweight as a transposed view); "
                f"got {epilogue!r}"]
    if not (isinstance(grad_out, torch.Tensor) and isinstance(inp, torch.Tensor)):
        return ["grad_out and inp must be tensors"]
    if grad_out.dim() < 1 or inp.dim() < 1 or grad_out.shape[:-1] != inp.shape[:-1] or 0 in (grad_out.shape[-1], inp.shape[-1]):
        return [f"grad_out (..., N) and inp (..., K) must have the same rows and N, K > 0; got grad_out "
                f"{_shape(grad_out)}, inp {_shape(inp)}"]
    N, K = grad_out.shape[-1], inp.shape[-1]
    problems = _tensor_problems([("grad_out", grad_out), ("inp", inp)], {"N": N, "K": K}, None)
    if out is not None and epilogue == "bgrada":
        # dweight is the transpose of D's storage: out must be a (N, K) view of a contiguous (K, N)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or tuple(out.shape) != (N, K) or out.stride() != (1, N):
            problems.append(f"with epilogue 'bgrada' out must be a ({N}, {K}) transposed view with strides (1, {N}), "
                            f"e.g. torch.empty({K}, {N}).t(); got {_shape(out)}"
                            + (f" strides {out.stride()}" if isinstance(out, torch.Tensor) else ""))
        else:
            problems += _out_problems("out", out.t(), (K, N), grad_out, (grad_out, inp, dbias_out))
    else:
        problems += _out_problems("out", out, (N, K), grad_out, (grad_out, inp, dbias_out))
    problems += _out_problems("dbias_out", dbias_out, (N,), grad_out, (grad_out, inp))
    return problems + forward_only_reasons([grad_out, inp])


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, t.shape[-1])


def _plan_reasons(call: LtCall, tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The library's reasons, then whether the heuristic has an algorithm (host-side only)."""
    reasons = not_supported_reasons()
    if reasons or call.m == 0 or call.n == 0 or call.k == 0:
        return reasons
    try:
        heuristic_count(call, tensors)
    except (RuntimeError, CublasLtUnavailable) as exc:
        return [str(exc)]
    return []


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

def linear_gelu_aux(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                    pre_out: Optional[torch.Tensor] = None, algo_index: int = 0):
    """(y, pre) with pre = x @ weight^T + bias and y = gelu_tanh(pre), x (..., K), weight (N, K)
    (nn.Linear layout), bias (N,), from one cuBLASLt GEMM (epilogue GELU_AUX_BIAS); `out` /
    `pre_out` receive y / pre when given. `algo_index`: the heuristic's i-th algorithm."""
    raise_if(_linear_gelu_aux_problems(x, weight, bias, out, pre_out), "linear_gelu_aux")
    N, K = weight.shape
    shape = (*x.shape[:-1], N)
    y = out if out is not None else torch.empty(shape, dtype=x.dtype, device=x.device)
    pre = pre_out if pre_out is not None else torch.empty(shape, dtype=x.dtype, device=x.device)
    M = x.numel() // K
    if M:
        call = lt_call("linear_gelu_aux", M, N, K)
        _run(call, {"x": x, "weight": weight, "bias": bias, "y": y, "pre": pre}, algo_index)
    return y, pre


def dgelu_bgrad(grad_act: torch.Tensor, weight2: torch.Tensor, pre: torch.Tensor, *,
                out: Optional[torch.Tensor] = None, dbias_out: Optional[torch.Tensor] = None, algo_index: int = 0):
    """(dpre, dbias) with dpre = (grad_act @ weight2) * gelu_tanh'(pre) and dbias = dpre summed over
    rows (fc1's bias gradient, in the input dtype), from one cuBLASLt GEMM (epilogue DGELU_BGRAD):
    grad_act (..., D_out) = dL/d fc2's output, weight2 (D_out, N) = fc2's weight, pre (..., N) =
    fc1's pre-activation."""
    raise_if(_dgelu_bgrad_problems(grad_act, weight2, pre, out, dbias_out), "dgelu_bgrad")
    K, N = weight2.shape
    dpre = out if out is not None else torch.empty(pre.shape, dtype=pre.dtype, device=pre.device)
    dbias = dbias_out if dbias_out is not None else torch.empty(N, dtype=pre.dtype, device=pre.device)
    M = pre.numel() // N
    if M:
        call = lt_call("dgelu_bgrad", M, N, K)
        _run(call, {"grad_act": grad_act, "weight2": weight2, "pre": pre, "dpre": dpre, "dbias": dbias}, algo_index)
    else:
        dbias.zero_()
    return dpre, dbias


def weight_grad_bgrad(grad_out: torch.Tensor, inp: torch.Tensor, *, epilogue: str = "bgradb",
                      out: Optional[torch.Tensor] = None, dbias_out: Optional[torch.Tensor] = None, algo_index: int = 0):
    """(dweight, dbias) of a Linear from its output gradient grad_out (..., N) and input inp (..., K):
    dweight = grad_out^T @ inp (N, K), dbias = grad_out summed over rows (in the input dtype), from
    one cuBLASLt GEMM. epilogue "bgradb" writes dweight contiguous; "bgrada" computes the transposed
    product and returns dweight as a (N, K) view of a contiguous (K, N) tensor (strides (1, N))."""
    raise_if(_weight_grad_problems(grad_out, inp, epilogue, out, dbias_out), "weight_grad_bgrad")
    N, K = grad_out.shape[-1], inp.shape[-1]
    M = grad_out.numel() // N
    call = lt_call("weight_grad_" + epilogue, M, N, K)
    if out is not None:
        dweight = out
    else:
        storage = torch.empty(call.d_rowmajor_shape, dtype=grad_out.dtype, device=grad_out.device)
        dweight = storage.t() if call.d_transposed else storage
    dbias = dbias_out if dbias_out is not None else torch.empty(N, dtype=grad_out.dtype, device=grad_out.device)
    if M:
        d_storage = dweight.t() if call.d_transposed else dweight
        _run(call, {"grad_out": grad_out, "inp": inp, "dweight": d_storage, "dbias": dbias}, algo_index)
    else:
        dweight.zero_()
        dbias.zero_()
    return dweight, dbias


def linear_gelu_aux_not_supported_reasons(x, weight, bias, *, out=None, pre_out=None, algo_index: int = 0) -> List[str]:
    """Why `linear_gelu_aux` cannot take this call (empty: it can); on a GPU this builds (and
    caches) the plan, so a shape the library has no algorithm for is named here."""
    problems = _linear_gelu_aux_problems(x, weight, bias, out, pre_out)
    if problems:
        return problems
    N, K = weight.shape
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    return _plan_reasons(lt_call("linear_gelu_aux", x.numel() // K, N, K),
                         {"x": x, "weight": weight, "bias": bias, "y": out if out is not None else y,
                          "pre": pre_out if pre_out is not None else y})


def dgelu_bgrad_not_supported_reasons(grad_act, weight2, pre, *, out=None, dbias_out=None, algo_index: int = 0) -> List[str]:
    """Why `dgelu_bgrad` cannot take this call (empty: it can)."""
    problems = _dgelu_bgrad_problems(grad_act, weight2, pre, out, dbias_out)
    if problems:
        return problems
    K, N = weight2.shape
    d = torch.empty((1, N), dtype=pre.dtype, device=pre.device)
    return _plan_reasons(lt_call("dgelu_bgrad", pre.numel() // N, N, K),
                         {"grad_act": grad_act, "weight2": weight2, "pre": pre, "dpre": out if out is not None else d,
                          "dbias": dbias_out if dbias_out is not None else d})


def weight_grad_bgrad_not_supported_reasons(grad_out, inp, *, epilogue: str = "bgradb", out=None, dbias_out=None,
                                            algo_index: int = 0) -> List[str]:
    """Why `weight_grad_bgrad` cannot take this call (empty: it can)."""
    problems = _weight_grad_problems(grad_out, inp, epilogue, out, dbias_out)
    if problems:
        return problems
    N, K = grad_out.shape[-1], inp.shape[-1]
    call = lt_call("weight_grad_" + epilogue, grad_out.numel() // N, N, K)
    d = torch.empty(call.d_rowmajor_shape, dtype=inp.dtype, device=inp.device)
    return _plan_reasons(call, {"grad_out": grad_out, "inp": inp, "dweight": d,
                                "dbias": dbias_out if dbias_out is not None else d})


# --------------------------------------------------------------------------------------------
# Twins in plain PyTorch (fp32 math; fp64 for fp64)
# --------------------------------------------------------------------------------------------

def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear_gelu_aux_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """(gelu_tanh(pre), pre), pre = x @ weight^T + bias, in fp32 (fp64 for fp64)."""
    w = _work(x)
    pre = F.linear(x.to(w), weight.to(w), bias.to(w))
    return F.gelu(pre, approximate="tanh"), pre


def dgelu_bgrad_reference(grad_act: torch.Tensor, weight2: torch.Tensor, pre: torch.Tensor):
    """((grad_act @ weight2) * gelu_tanh'(pre), its sum over rows), in fp32 (fp64 for fp64)."""
    w = _work(grad_act)
    dpre = torch.ops.aten.gelu_backward(grad_act.to(w) @ weight2.to(w), pre.to(w), approximate="tanh")
    return dpre, _rows(dpre.contiguous()).sum(0)


def weight_grad_bgrad_reference(grad_out: torch.Tensor, inp: torch.Tensor):
    """(grad_out^T @ inp, grad_out summed over rows), rows flattened, in fp32 (fp64 for fp64)."""
    w = _work(grad_out)
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(w)
    return g.t() @ inp.reshape(-1, inp.shape[-1]).to(w), g.sum(0)


__all__ = [
    "CublasLtUnavailable", "LtCall", "OPS", "clear_plans", "dgelu_bgrad", "dgelu_bgrad_not_supported_reasons",
    "dgelu_bgrad_reference", "heuristic_count", "library_info", "linear_gelu_aux",
    "linear_gelu_aux_not_supported_reasons", "linear_gelu_aux_reference", "lt_call", "not_supported_reasons",
    "weight_grad_bgrad", "weight_grad_bgrad_not_supported_reasons", "weight_grad_bgrad_reference",
]
