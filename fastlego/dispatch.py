"""The dispatch layer: every op LegoBackbone runs goes through `call(op, ...)`.

Each op has backends in priority order. A backend declares what it supports through
`not_supported_reasons(*args)`, an empty list meaning "I take this call" (xformers' fmha
convention). `auto` takes the first backend with no reasons; a forced backend that cannot take a
call raises with every reason. In `auto`, a backend that fails at run time is retired for the
rest of the process with one warning, and the call falls back to the next backend, ending at the
reference op, so the answer stays correct.

Backends are declared here by import path and loaded on first use, so `import fastlego` needs
neither triton nor flash-attn nor xformers: a backend whose module cannot be imported is simply
refused with the import error as its reason.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

MODES = ("auto", "reference", "triton", "flash_attn", "xformers")
ENV_VAR = "FASTLEGO_BACKEND"


class BackendNotSupported(RuntimeError):
    """A forced backend cannot take a call (or no backend can): the message lists every reason."""


@dataclass
class Backend:
    """One implementation of an op: `module:function` plus an optional `module:reasons` function."""

    op: str
    name: str
    target: Union[str, Callable]
    reasons_target: Union[str, Callable, None] = None
    _fn: Optional[Callable] = field(default=None, repr=False)
    _reasons: Optional[Callable] = field(default=None, repr=False)
    _load_error: Optional[str] = field(default=None, repr=False)
    _runtime_error: Optional[str] = field(default=None, repr=False)

    def _load(self) -> None:
        if self._fn is not None or self._load_error is not None:
            return
        try:
            self._fn = _resolve(self.target)
            self._reasons = _resolve(self.reasons_target) if self.reasons_target else None
        except Exception as exc:  # ImportError, or triton failing to initialise
            where = self.target.split(":")[0] if isinstance(self.target, str) else repr(self.target)
            self._load_error = f"{where} could not be loaded ({type(exc).__name__}: {exc})"

    def not_supported_reasons(self, *args, **kwargs) -> List[str]:
        self._load()
        if self._load_error is not None:
            return [self._load_error]
        reasons = [f"failed at run time earlier in this process: {self._runtime_error}"] if self._runtime_error else []
        if self._reasons is not None:
            reasons += list(self._reasons(*args, **kwargs))
        return reasons

    def __call__(self, *args, **kwargs):
        self._load()
        if self._fn is None:
            raise BackendNotSupported(self._load_error)
        return self._fn(*args, **kwargs)


def _resolve(path: Union[str, Callable]) -> Callable:
    if callable(path):
        return path
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# op name -> backends, highest priority first. The reference backend is always last in `auto`.
_REGISTRY: Dict[str, List[Backend]] = {}


def register(op: str, name: str, target: Union[str, Callable], reasons: Union[str, Callable, None] = None,
             priority: Optional[int] = None) -> Backend:
    """Declare a backend of `op`: `target` is a callable or "module:function" (imported on first use),
    `reasons` likewise for its `not_supported_reasons`. Inserted at `priority` (default: just before
    the reference backend); re-registering a name replaces it."""
    _DECISIONS.clear()
    backends = _REGISTRY.setdefault(op, [])
    backend = Backend(op, name, target, reasons)
    backends[:] = [b for b in backends if b.name != name]
    if priority is None:
        priority = len(backends) if name == "reference" else next(
            (i for i, b in enumerate(backends) if b.name == "reference"), len(backends))
    backends.insert(priority, backend)
    return backend


def unregister(op: str, name: Optional[str] = None) -> None:
    """Remove backend `name` of `op`, or the whole op when name is None."""
    _DECISIONS.clear()
    if name is None:
        _REGISTRY.pop(op, None)
    else:
        _REGISTRY[op] = [b for b in _REGISTRY.get(op, []) if b.name != name]


def reset_failures() -> None:
    """Forget run-time failures and import results (backends are tried afresh)."""
    _DECISIONS.clear()
    for bs in _REGISTRY.values():
        for b in bs:
            b._runtime_error = None
            if isinstance(b.target, str):
                b._fn = b._reasons = b._load_error = None


def backends(op: str) -> List[Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}: expected one of {', '.join(_REGISTRY)}")
    return list(_REGISTRY[op])


def ops() -> List[str]:
    return list(_REGISTRY)


# --------------------------------------------------------------------------------------------
# Which backend: a global mode, per-op overrides, a context manager, an environment variable
# --------------------------------------------------------------------------------------------

class _Config(threading.local):
    def __init__(self):
        self.mode = _mode_from_env()
        self.overrides: Dict[str, str] = {}
        self.forcing = False  # True while a forced backend is asked for its reasons


def _mode_from_env() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not a backend: expected one of {', '.join(MODES)}")
    return mode


_config = _Config()


def current_mode(op: Optional[str] = None) -> str:
    if op is not None and op in _config.overrides:
        return _config.overrides[op]
    return _config.mode


def _check_choice(mode: Optional[str], per_op: Dict[str, str]) -> None:
    for name, value in [("mode", mode)] + list(per_op.items()):
        if value is not None and value not in MODES:
            raise ValueError(f"backend {value!r} for {name} is not one of {', '.join(MODES)}")
    unknown = [op for op in per_op if op not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}: per-op overrides take {', '.join(_REGISTRY)}")


@contextlib.contextmanager
def use_backend(mode: Optional[str] = None, **per_op: str):
    """Choose backends inside a `with` block: `use_backend("triton")`, `use_backend("auto",
    global_attention="xformers")`. Modes: auto (fastest supported), reference, triton,
    flash_attn, xformers. The default comes from the FASTLEGO_BACKEND environment variable."""
    _check_choice(mode, per_op)
    saved = (_config.mode, dict(_config.overrides))
    if mode is not None:
        _config.mode = mode
    _config.overrides.update(per_op)
    try:
        yield
    finally:
        _config.mode, _config.overrides = saved


def set_backend(mode: str = "auto", **per_op: str) -> None:
    """Set the backend choice of the calling thread from now on (see `use_backend`); per-op
    overrides are added to the ones in force."""
    _check_choice(mode, per_op)
    _config.mode = mode
    _config.overrides.update(per_op)


# --------------------------------------------------------------------------------------------
# Calling an op
# --------------------------------------------------------------------------------------------

@dataclass
class Decision:
    op: str
    site: str
    chosen: str
    refused: Dict[str, List[str]]


_recorder: Optional[List[Decision]] = None
_site: List[str] = []


# Decisions are cached by everything `not_supported_reasons` looks at: the op, the backend choice,
# grad and autocast state, the interpreter and deterministic switches, and per argument its
# metadata (tensors: shape, strides, dtype, device, requires_grad) or value. Asking every backend
# costs ~0.2 ms of Python per call, which dominated small training steps (~200 ops per step);
# a cached decision costs a few microseconds. Calls with keyword arguments (`out=`, whose
# overlap check reads addresses) are not cached. Cleared when backends change or one fails.
_DECISIONS: Dict[tuple, tuple] = {}
_DECISIONS_MAX = 8192


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.shape, a.stride(), a.dtype, a.device, a.requires_grad)
    if isinstance(a, (list, tuple)):
        return tuple(_arg_key(x) for x in a)
    return a if isinstance(a, (int, float, str, bool, type(None), torch.dtype)) else id(a)


def _decision_key(op: str, args) -> tuple:
    autocast = tuple(autocast_state(d) for d in ("cuda", "cpu"))
    return (op, _config.mode, tuple(sorted(_config.overrides.items())), torch.is_grad_enabled(), autocast,
            triton_interpreting(), _deterministic, tuple(_arg_key(a) for a in args))


def autocast_state(device_type: str):
    """(enabled, dtype or None) of autocast for device type "cuda" or "cpu"."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    if not enabled:
        return False, None
    try:
        return True, torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return True, torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def choose(op: str, *args, **kwargs):
    """(backend, refused) for this call: the backend that takes it and why the others do not."""
    if kwargs:
        return _choose(op, *args, **kwargs)
    key = _decision_key(op, args)
    hit = _DECISIONS.get(key)
    if hit is None:
        hit = _choose(op, *args)
        if len(_DECISIONS) >= _DECISIONS_MAX:
            _DECISIONS.clear()
        _DECISIONS[key] = hit
    return hit


def _choose(op: str, *args, **kwargs):
    mode = current_mode(op)
    candidates = backends(op)
    refused: Dict[str, List[str]] = {}
    if mode != "auto":
        forced = [b for b in candidates if b.name == mode]
        if not forced:
            raise BackendNotSupported(
                f"fastlego op {op!r} has no {mode!r} backend (it has {', '.join(b.name for b in candidates)}); "
                f"use use_backend('auto') or a per-op override such as use_backend({mode!r}, {op}='auto')")
        _config.forcing = True
        try:
            reasons = forced[0].not_supported_reasons(*args, **kwargs)
        finally:
            _config.forcing = False
        if reasons:
            raise BackendNotSupported(
                f"fastlego op {op!r}: backend {mode!r} was forced but cannot take this call:\n  - "
                + "\n  - ".join(reasons)
                + "\nuse use_backend('auto') to let fastlego pick a backend that can")
        return forced[0], {b.name: ["not chosen: backend forced to " + mode] for b in candidates if b is not forced[0]}
    for b in candidates:
        reasons = b.not_supported_reasons(*args, **kwargs)
        if not reasons:
            return b, refused
        refused[b.name] = reasons
    raise BackendNotSupported(
        f"no backend of fastlego op {op!r} can take this call:\n"
        + "\n".join(f"  {name}: {'; '.join(r)}" for name, r in refused.items()))


def call(op: str, *args, **kwargs):
    """Run `op` on the backend the current mode picks (see the module docstring)."""
    backend, refused = choose(op, *args, **kwargs)
    if _recorder is not None:
        _recorder.append(Decision(op, _site[-1] if _site else "", backend.name, refused))
    if current_mode(op) != "auto" or backend.name == "reference":
        return backend(*args, **kwargs)
    try:
        return backend(*args, **kwargs)
    except Exception as exc:  # a kernel that fails at run time: retire it, fall back, warn once
        backend._runtime_error = f"{type(exc).__name__}: {exc}"
        _DECISIONS.clear()
        warnings.warn(
            f"fastlego: the {backend.name!r} backend of op {op!r} failed at run time "
            f"({backend._runtime_error}); falling back for the rest of this process",
            RuntimeWarning, stacklevel=2)
        if _recorder is not None:
            _recorder.pop()  # the retry records the decision that actually ran
        return call(op, *args, **kwargs)


@contextlib.contextmanager
def record(site_modules: Optional[torch.nn.Module] = None):
    """Collect a `Decision` per op call inside the block; sites are named after the modules
    of `site_modules` whose forward is running (hooks are removed on exit)."""
    global _recorder
    saved, _recorder = _recorder, []
    depth = len(_site)
    handles = []
    if site_modules is not None:
        for name, module in site_modules.named_modules():
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: _site.append(n) and None))
            handles.append(module.register_forward_hook(lambda m, a, o: _site.pop() and None))
    try:
        yield _recorder
    finally:
        for h in handles:
            h.remove()
        del _site[depth:]  # a forward that raised leaves its modules' names behind
        _recorder = saved


# --------------------------------------------------------------------------------------------
# Deterministic mode
# --------------------------------------------------------------------------------------------

_deterministic = False


def set_deterministic(enabled: bool = True) -> None:
    """Bitwise-reproducible gradients: the same seed and inputs give the same bits run to run.

    fastlego's Triton kernels never use atomics (every per-image or per-column sum is a
    fixed-order sum of per-program partials), so they are deterministic in any mode. This mode
    additionally (1) turns on `torch.use_deterministic_algorithms` (PyTorch's own ops, cuBLAS with
    CUBLAS_WORKSPACE_CONFIG=:4096:8, set here if unset: set it yourself before CUDA starts to be
    safe), (2) fixes the fused-vs-cuBLAS path of the matmul ops to cuBLAS instead of timing both
    (timing, and Triton's autotuner, could pick different tilings, hence summation orders, in two
    processes), and (3) trains global attention (regions > 64 tokens) with the reference backward
    (softmax recomputed in fp32, fixed-order matmuls) instead of SDPA's flash/efficient backward,
    which may accumulate with atomics. Costs some speed; off by default."""
    global _deterministic
    enabled = bool(enabled)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    _deterministic = enabled


def is_deterministic() -> bool:
    return _deterministic


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """`set_deterministic` inside a `with` block (restores the previous state, PyTorch's too)."""
    global _deterministic
    saved = (_deterministic, torch.are_deterministic_algorithms_enabled())
    set_deterministic(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[1])
        _deterministic = saved[0]


# --------------------------------------------------------------------------------------------
# Shared support checks for kernels
# --------------------------------------------------------------------------------------------

def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would cast `t` to (autocast on for t's device, t floating and not fp64),
    else None. Kernels compute in it, as the reference op does under autocast."""
    dev = t.device.type
    if dev not in ("cuda", "cpu") or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    return autocast_state(dev)[1]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_reasons(tensors: Sequence[Optional[torch.Tensor]], dtypes=(torch.float32, torch.float16, torch.bfloat16),
                   *, compute_dtype: Optional[torch.dtype] = None, mixed_dtypes_ok: bool = False,
                   forward_only: bool = True) -> List[str]:
    """Reasons a Triton kernel cannot take these tensors: device, dtype, mixed dtypes (unless the
    kernel casts every operand, `mixed_dtypes_ok`), the dtype it computes in (`compute_dtype`,
    e.g. autocast's), and, for kernels without a backward (`forward_only`), autograd recording a
    tensor that requires grad."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    reasons = device_problems(ts)
    for dev in {t.device for t in ts}:
        if dev.type == "cpu" and not triton_interpreting():
            reasons.append("tensors are on the CPU: Triton kernels need a CUDA device "
                           "(or TRITON_INTERPRET=1, Triton's interpreter, for testing)")
        elif dev.type == "cpu" and not _config.forcing:
            reasons.append("tensors are on the CPU: Triton's interpreter (TRITON_INTERPRET=1) is for "
                           "testing and is used only when the triton backend is forced")
        elif dev.type not in ("cuda", "cpu"):
            reasons.append(f"device {dev} is not supported (CUDA only)")
    bad = sorted({str(t.dtype) for t in ts if t.dtype not in dtypes})
    if bad:
        reasons.append(f"dtype {', '.join(bad)} not supported (expected one of {', '.join(str(d) for d in dtypes)})")
    if ts and not mixed_dtypes_ok and any(t.dtype != ts[0].dtype for t in ts):
        reasons.append(f"mixed dtypes {sorted({str(t.dtype) for t in ts})}: the kernel takes one dtype")
    if compute_dtype is not None and compute_dtype not in dtypes:
        reasons.append(f"autocast dtype {compute_dtype} not supported (expected float16 or bfloat16)")
    if triton_interpreting() and torch.bfloat16 in {compute_dtype} | {t.dtype for t in ts[:1]}:
        reasons.append("bfloat16 under Triton's interpreter (the input's or autocast's): its tl.dot returns "
                       "wrong results for bf16 operands")
    if forward_only:
        reasons += forward_only_reasons(ts)
    return reasons


def device_problems(tensors: Sequence[Optional[torch.Tensor]]) -> List[str]:
    """One problem if the tensors are not all on one device."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        return [f"tensors on several devices {sorted(map(str, devices))}: move them to one"]
    return []


def forward_only_reasons(tensors: Sequence[Optional[torch.Tensor]]) -> List[str]:
    """Why a kernel without a backward cannot take a call that autograd records."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return ["an input requires grad and autograd is recording: this Triton launcher is forward-only "
                "(fastlego.ops runs the fused ops as custom ops with a Triton backward when autograd "
                "records; call those, or run under torch.no_grad() / torch.inference_mode())"]
    return []
