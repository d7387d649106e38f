"""flash-attn, xformers and PyTorch SDPA (token-major) as backends of the `global_attention` op.

Both take the fused qkv tensor (N, T, 3D), last dim laid out (3, heads, head_dim), as views:
flash-attn's `flash_attn_qkvpacked_func` reads it as (N, T, 3, heads, hd); xformers'
`memory_efficient_attention` gets the three (N, T, heads, hd) views of it. Both return
(N, T, heads, hd), which is already the merged-head layout (N, T, D).

The libraries are imported inside functions, so `import fastlego` works without them. Each
backend has a `*_not_supported_reasons(qkv, num_heads)` that says exactly why a call is refused:
not installed, installed but broken (a wheel built for another torch: its CUDA extension does not
load), too old, CPU tensors or too old a GPU, dtype, head dim. Import results and xformers' probe
call are cached; `clear_caches()` forgets them.

`sdpa` is PyTorch's scaled_dot_product_attention (cuDNN / flash / efficient kernels) on the same
token-major views: the values of the reference (which cuts qkv as timm does, permute then unbind)
with a cheaper backward (see `sdpa_attention`).

Both libraries put the batch on grid axis y or z (at most 65,535), so calls are split into
chunks of at most 65,535 // heads regions (the release's SDPA crash at 65,536 regions).
Under autocast the inputs are cast to the autocast dtype first, as SDPA's are.

FASTLEGO_EXPECT_ATTENTION_LIBS (e.g. "flash_attn,xformers") names the libraries a machine is
meant to have: the test suite then fails, instead of accepting a refusal, when one of them cannot
be imported or refuses a call it supports (`expected_libraries`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from . import reference
from .kernels.policy import compute_dtype   # the kernels' autocast rule (needs no triton)

# CUDA grid axes y and z take at most this many blocks; flash-attn and xformers put batch and
# heads there.
_GRID_YZ_MAX = 65535

_PIP_NAME = {"flash_attn": "flash-attn", "xformers": "xformers", "xformers.ops": "xformers"}
_INSTALL_HINT = {"flash-attn": "pip install flash-attn --no-build-isolation"}

# module name -> (module or None, error text or None); see `_import`.
_import_cache: Dict[str, Tuple[Optional[object], Optional[str]]] = {}
# (module id, device, dtype, heads, head_dim) -> error text or None, for the xformers probe call.
_probe_cache: Dict[tuple, Optional[str]] = {}


EXPECT_ENV = "FASTLEGO_EXPECT_ATTENTION_LIBS"
LIBRARIES = ("flash_attn", "xformers")


def expected_libraries() -> List[str]:
    """The backends FASTLEGO_EXPECT_ATTENTION_LIBS names (comma-separated; empty when unset)."""
    names = [n.strip() for n in os.environ.get(EXPECT_ENV, "").replace(" ", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in LIBRARIES]
    if unknown:
        raise ValueError(f"{EXPECT_ENV}={os.environ[EXPECT_ENV]!r} names {unknown}: expected a comma-separated "
                         f"subset of {', '.join(LIBRARIES)}")
    return names


def clear_caches() -> None:
    """Forget import results and probe calls (after installing a library, or in tests)."""
    _import_cache.clear()
    _probe_cache.clear()


def _import(name: str):
    """(module, None) or (None, why it cannot be used). Cached per module object in sys.modules."""
    cached = _import_cache.get(name)
    if cached is not None and sys.modules.get(name) is cached[0]:
        return cached
    pip = _PIP_NAME.get(name, name)
    try:
        module = importlib.import_module(name)
        result = (module, None)
    except Exception as exc:  # ImportError, or an extension built for another torch (OSError, ...)
        if name in sys.modules and sys.modules[name] is None:  # import blocked on purpose
            installed = False
        else:
            try:
                installed = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                installed = False
        if installed:
            why = (f"{pip} is installed but fails to import ({type(exc).__name__}: {exc}); usually it was "
                   f"built for another torch (you have {torch.__version__}): reinstall it for this torch")
        else:
            why = f"{pip} is not installed ({type(exc).__name__}: {exc}): {_INSTALL_HINT.get(pip, 'pip install ' + pip)}"
        result = (None, why)
    _import_cache[name] = result
    return result


def _version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in str(version).split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _shape_reasons(qkv, num_heads) -> List[str]:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        return [f"qkv must be a (N, T, 3D) tensor, got {tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}"]
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        return [f"num_heads must be a positive int, got {num_heads!r}"]
    if qkv.shape[2] == 0 or qkv.shape[2] % (3 * num_heads):
        return [f"qkv's last dim {qkv.shape[2]} is not 3 * num_heads * head_dim for num_heads={num_heads}"]
    return []


def _device_reasons(qkv: torch.Tensor, library: str, min_capability: Tuple[int, int]) -> List[str]:
    """Why `library` cannot run on qkv's device: it needs a CUDA GPU of at least `min_capability`.
    (A separate function so that tests can run the CPU-side logic with fake libraries.)"""
    if qkv.device.type != "cuda":
        return [f"tensors are on {qkv.device}: {library} runs on CUDA GPUs only"]
    if torch.version.hip is None:
        cap = torch.cuda.get_device_capability(qkv.device)
        if cap < min_capability:
            return [f"{library} needs a GPU of compute capability >= {min_capability[0]}.{min_capability[1]} "
                    f"(Ampere or newer); {torch.cuda.get_device_name(qkv.device)} is {cap[0]}.{cap[1]}"]
    return []


def _chunks(n: int, num_heads: int):
    """Region slices such that batch and batch * heads stay within the grid's y/z limit."""
    step = max(1, _GRID_YZ_MAX // num_heads)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _merge(outs: List[torch.Tensor], N: int, T: int, width: int) -> torch.Tensor:
    o = outs[0] if len(outs) == 1 else torch.cat(outs)
    return o.reshape(N, T, width)


# --------------------------------------------------------------------------------------------
# flash-attn
# --------------------------------------------------------------------------------------------

def flash_attn_not_supported_reasons(qkv, num_heads) -> List[str]:
    """Why flash-attn cannot take this call (empty list: it can)."""
    module, error = _import("flash_attn")
    if module is None:
        return [error]
    reasons = []
    version = getattr(module, "__version__", "0")
    if not hasattr(module, "flash_attn_qkvpacked_func") or _version_tuple(version) < (2,):
        reasons.append(f"flash-attn {version} is too old: flash_attn_qkvpacked_func needs flash-attn >= 2.0 "
                       f"(pip install -U flash-attn --no-build-isolation)")
    shape = _shape_reasons(qkv, num_heads)
    if shape:
        return reasons + shape
    reasons += _device_reasons(qkv, "flash-attn", (8, 0))
    dtype = compute_dtype(qkv)
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {dtype}: flash-attn takes float16 or bfloat16 only (run under torch.autocast "
                       f"or convert the model with .to(torch.bfloat16))")
    head_dim = qkv.shape[2] // (3 * num_heads)
    if head_dim > 256 or head_dim % 8:
        reasons.append(f"head_dim {head_dim}: flash-attn takes head dims that are multiples of 8, at most 256")
    return reasons


def _prepare(qkv: torch.Tensor, num_heads: int):
    """qkv in the compute dtype (autocast's, as SDPA would cast it) and its sizes."""
    dtype = compute_dtype(qkv)
    if qkv.dtype != dtype:
        qkv = qkv.to(dtype)
    N, T, three_d = qkv.shape
    return qkv, N, T, three_d, three_d // (3 * num_heads)


def flash_attn_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention over each region with flash-attn: (N, T, 3D) -> (N, T, D)."""
    module, error = _import("flash_attn")
    if module is None:
        raise RuntimeError(error)
    qkv, N, T, three_d, head_dim = _prepare(qkv, num_heads)
    if N == 0:
        return qkv.new_empty(N, T, three_d // 3)
    packed = qkv.reshape(N, T, 3, num_heads, head_dim)   # a view: the (3, heads, hd) layout of the last dim
    if packed.stride(-1) != 1:
        packed = packed.contiguous()
    outs = [module.flash_attn_qkvpacked_func(packed[s], dropout_p=0.0, softmax_scale=head_dim ** -0.5, causal=False)
            for s in _chunks(N, num_heads)]
    return _merge(outs, N, T, three_d // 3)


# --------------------------------------------------------------------------------------------
# xformers
# --------------------------------------------------------------------------------------------

def _xformers_ops():
    """(xformers.ops, None) or (None, why not)."""
    base, error = _import("xformers")
    if base is None:
        return None, error
    return _import("xformers.ops")


def _xformers_extension_error(base) -> Optional[str]:
    """The load error of xformers' C++/CUDA extension, if it failed (e.g. a wheel built for another torch)."""
    cpp_lib = getattr(base, "_cpp_lib", None)
    exc = getattr(cpp_lib, "_cpp_library_load_exception", None)
    if exc is None:
        return None
    first = str(exc).strip().splitlines()
    return " ".join(line.strip() for line in first[:3])


def _xformers_probe(ops, qkv: torch.Tensor, num_heads: int, dtype: torch.dtype) -> Optional[str]:
    """Run memory_efficient_attention once on a tiny input of the call's device, dtype and layout;
    None if it works, else the error. Cached per (module, device, dtype, heads, head_dim)."""
    head_dim = qkv.shape[2] // (3 * num_heads)
    key = (id(ops), str(qkv.device), dtype, num_heads, head_dim)
    if key in _probe_cache:
        return _probe_cache[key]
    try:
        tiny = torch.zeros(1, 8, 3, num_heads, head_dim, device=qkv.device, dtype=dtype)
        q, k, v = tiny.unbind(2)
        with torch.no_grad():
            ops.memory_efficient_attention(q, k, v, scale=head_dim ** -0.5)
        error = None
    except Exception as exc:
        text = " ".join(str(exc).split())
        error = f"{type(exc).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"
    _probe_cache[key] = error
    return error


def xformers_not_supported_reasons(qkv, num_heads) -> List[str]:
    """Why xformers cannot take this call (empty list: it can)."""
    ops, error = _xformers_ops()
    if ops is None:
        return [error]
    base = sys.modules.get("xformers")
    version = getattr(base, "__version__", "?")
    fn = getattr(ops, "memory_efficient_attention", None)
    if fn is None:
        return [f"xformers {version} has no xformers.ops.memory_efficient_attention: pip install -U xformers"]
    try:
        has_scale = "scale" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        has_scale = True
    reasons = []
    if not has_scale:
        reasons.append(f"xformers {version} is too old: memory_efficient_attention has no `scale` argument "
                       f"(pip install -U xformers)")
    ext = _xformers_extension_error(base)
    if ext is not None:
        reasons.append(f"xformers {version} is installed but its C++/CUDA ops fail to load (torch "
                       f"{torch.__version__}): {ext}")
    shape = _shape_reasons(qkv, num_heads)
    if shape:
        return reasons + shape
    device = _device_reasons(qkv, "xformers", (5, 0))
    reasons += device
    dtype = compute_dtype(qkv)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {dtype}: xformers takes float32, float16 or bfloat16")
    if not reasons:
        # The extension loaded (or xformers has none): ask a tiny real call whether its kernels run
        # here, for this dtype and head dim (e.g. no kernel for this GPU, ops missing from the wheel).
        probe = _xformers_probe(ops, qkv, num_heads, dtype)
        if probe is not None:
            reasons.append(f"xformers {version} is installed but memory_efficient_attention fails on "
                           f"{qkv.device} for {dtype}, head_dim {qkv.shape[2] // (3 * num_heads)}: {probe}")
    return reasons


def xformers_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention over each region with xformers: (N, T, 3D) -> (N, T, D)."""
    ops, error = _xformers_ops()
    if ops is None:
        raise RuntimeError(error)
    qkv, N, T, three_d, head_dim = _prepare(qkv, num_heads)
    if N == 0:
        return qkv.new_empty(N, T, three_d // 3)
    q, k, v = qkv.reshape(N, T, 3, num_heads, head_dim).unbind(2)   # (N, T, heads, hd) views
    outs = [ops.memory_efficient_attention(q[s], k[s], v[s], scale=head_dim ** -0.5)
            for s in _chunks(N, num_heads)]
    return _merge(outs, N, T, three_d // 3)


# --------------------------------------------------------------------------------------------
# PyTorch SDPA on token-major views
# --------------------------------------------------------------------------------------------

def sdpa_not_supported_reasons(qkv, num_heads) -> List[str]:
    """Why the token-major SDPA backend cannot take this call: only a malformed qkv (SDPA itself
    runs on every device and dtype)."""
    return _shape_reasons(qkv, num_heads)


def sdpa_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention over each region with PyTorch's SDPA on token-major views: (N, T, 3D) -> (N, T, D).

    q, k, v are cut by `unbind` along the 3-axis of qkv read as (N, T, 3, heads, hd), then viewed
    as (N, heads, T, hd). The values are the reference's (timm's permute-then-unbind gives the
    same views); the difference is autograd's backward of the cut: here one stack of dq, dk, dv
    lands directly in qkv's (N, T, 3D) layout, where the reference's cut costs that stack plus a
    copy back (bench/attention_layouts.py times both layouts; bench/RESULTS.md keeps the results)."""
    N, T, three_d = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in qkv.reshape(N, T, 3, num_heads, three_d // (3 * num_heads)).unbind(2))
    return reference.merge_heads(reference.sdpa(q, k, v))
