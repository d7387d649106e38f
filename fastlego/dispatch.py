"""The dispatch layer: every op LegoBackbone runs goes through `call(op, ...)`.

Each op has backends in priority order. A backend declares what it supports through
`not_supported_reasons(*args)`, an empty list meaning "I take this call" (xformers' fmha
convention). `auto` takes the first backend with no reasons; a forced backend that cannot take a
call raises with every reason.

One state (`DispatchState`) holds what decides a call: the settings (mode, per-op overrides,
deterministic switch), the decision cache and the retired backends, with one scoping rule (see
`DispatchState`): `set_backend` / `set_deterministic` are process-wide, `use_backend` /
`deterministic` blocks override them for the calling thread, and a fused op's backward runs under
the settings its forward ran with (`fastlego.custom_ops` carries them on the autograd context),
whichever thread PyTorch runs it on.

In `auto`, a backend whose call fails before it wrote anything the caller can see (a compile or
launch failure; its outputs are fresh tensors) is retired for the rest of the process with one
warning, and the call falls back to the next backend, ending at the reference op, so the answer
stays correct. Never retired, the error re-raised: out of memory (not the kernel's fault), a
broken CUDA context (illegal address, device-side assert), a failure inside a CUDA-graph capture,
and a call that writes into its arguments (`out=`, or a backend registered `in_place`), which may
be partly written.

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
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

ENV_VAR = "FASTLEGO_BACKEND"


def __getattr__(name: str):
    if name == "MODES":   # computed on each read: backends may be registered at any time
        return modes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BackendNotSupported(RuntimeError):
    """A forced backend cannot take a call (or no backend can): the message lists every reason."""


@dataclass
class Backend:
    """One implementation of an op: `module:function` plus an optional `module:reasons` function
    and an optional `module:plan` function (`plan(*args)` -> the function that runs every call
    with the same decision key as `args` without checking it again, see `call`; a plan target
    whose function does not exist means no plan)."""

    op: str
    name: str
    target: Union[str, Callable]
    reasons_target: Union[str, Callable, None] = None
    in_place: bool = False   # writes into its arguments: a failed call is never retried elsewhere
    plan_target: Union[str, Callable, None] = None
    _fn: Optional[Callable] = field(default=None, repr=False)
    _reasons: Optional[Callable] = field(default=None, repr=False)
    _plan: Optional[Callable] = field(default=None, repr=False)
    _load_error: Optional[str] = field(default=None, repr=False)

    def _load(self) -> None:
        if self._fn is not None or self._load_error is not None:
            return
        try:
            self._fn = _resolve(self.target)
            self._reasons = _resolve(self.reasons_target) if self.reasons_target else None
            self._plan = _resolve(self.plan_target, optional=True) if self.plan_target else None
        except Exception as exc:  # ImportError, or triton failing to initialise
            where = self.target.split(":")[0] if isinstance(self.target, str) else repr(self.target)
            self._load_error = f"{where} could not be loaded ({type(exc).__name__}: {exc})"

    def not_supported_reasons(self, *args, **kwargs) -> List[str]:
        self._load()
        if self._load_error is not None:
            return [self._load_error]
        retired = _state.retired.get((self.op, self.name))
        reasons = [f"failed at run time earlier in this process: {retired}"] if retired else []
        if self._reasons is not None:
            reasons += list(self._reasons(*args, **kwargs))
        return reasons

    def __call__(self, *args, **kwargs):
        self._load()
        if self._fn is None:
            raise BackendNotSupported(self._load_error)
        return self._fn(*args, **kwargs)

    def runner(self, *args) -> Callable:
        """What runs the calls whose decision key is that of `args`: the backend's plan for them
        when it has one, else the backend itself."""
        self._load()
        return self._plan(*args) if self._plan is not None else self


def _resolve(path: Union[str, Callable], optional: bool = False) -> Optional[Callable]:
    if callable(path):
        return path
    module, _, attr = path.partition(":")
    found = getattr(importlib.import_module(module), attr, None)
    if found is None and not optional:
        raise AttributeError(f"module {module!r} has no attribute {attr!r}")
    return found


# op name -> backends, highest priority first. The reference backend is always last in `auto`.
_REGISTRY: Dict[str, List[Backend]] = {}


def register(op: str, name: str, target: Union[str, Callable], reasons: Union[str, Callable, None] = None,
             priority: Optional[int] = None, *, in_place: bool = False,
             plan: Union[str, Callable, None] = None) -> Backend:
    """Declare a backend of `op`: `target` is a callable or "module:function" (imported on first use),
    `reasons` likewise for its `not_supported_reasons`. Inserted at `priority` (default: just before
    the reference backend); re-registering a name replaces it (and forgets its retirement).
    `in_place`: the backend writes into its arguments, so a call of it that fails is re-raised,
    never retried on another backend (see the module docstring). `plan`: see `Backend`."""
    _state.forget(op, name)
    backends = _REGISTRY.setdefault(op, [])
    backend = Backend(op, name, target, reasons, in_place, plan)
    backends[:] = [b for b in backends if b.name != name]
    if priority is None:
        priority = len(backends) if name == "reference" else next(
            (i for i, b in enumerate(backends) if b.name == "reference"), len(backends))
    backends.insert(priority, backend)
    return backend


def unregister(op: str, name: Optional[str] = None) -> None:
    """Remove backend `name` of `op`, or the whole op when name is None."""
    _state.forget(op, name)
    if name is None:
        _REGISTRY.pop(op, None)
    else:
        _REGISTRY[op] = [b for b in _REGISTRY.get(op, []) if b.name != name]


def reset_failures() -> None:
    """Forget run-time failures and import results (backends are tried afresh)."""
    _state.retired.clear()
    _state.decisions.clear()
    for bs in _REGISTRY.values():
        for b in bs:
            if isinstance(b.target, str):
                b._fn = b._reasons = b._load_error = None


def backends(op: str) -> List[Backend]:
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}: expected one of {', '.join(_REGISTRY)}")
    return list(_REGISTRY[op])


def ops() -> List[str]:
    return list(_REGISTRY)


def modes(op: Optional[str] = None) -> Tuple[str, ...]:
    """The backend choices: "auto" plus every backend name registered for any op (`MODES`), or for
    `op` alone (what a per-op override of `op` takes)."""
    if op is not None:
        return ("auto",) + tuple(b.name for b in _REGISTRY.get(op, ()))
    names = dict.fromkeys(b.name for bs in _REGISTRY.values() for b in bs)
    return ("auto",) + tuple(sorted(names, key=lambda name: name != "reference"))   # reference first


# --------------------------------------------------------------------------------------------
# Which backend: the dispatcher's one state and its scoping rule
# --------------------------------------------------------------------------------------------

class Settings:
    """What decides a call's backend: the mode, per-op overrides and the deterministic switch.

    Immutable and hashable (a decision-cache key). `token` is its text form: the fused custom ops
    carry it into their backward as an argument (custom ops take tensors, numbers and strings),
    and `Settings.from_token` reads it back."""

    __slots__ = ("mode", "overrides", "deterministic", "token", "_per_op", "_hash")

    def __init__(self, mode: str = "auto", overrides: Optional[Dict[str, str]] = None, deterministic: bool = False):
        self._per_op = dict(overrides or {})
        self.mode = mode
        self.overrides = tuple(sorted(self._per_op.items()))
        self.deterministic = bool(deterministic)
        self.token = f"{mode}|{int(self.deterministic)}|" + ",".join(f"{k}={v}" for k, v in self.overrides)
        self._hash = hash(self.token)

    def mode_of(self, op: Optional[str] = None) -> str:
        """The backend choice for `op` (its override, else the mode)."""
        return self._per_op.get(op, self.mode) if op is not None else self.mode

    def replace(self, mode: Optional[str] = None, overrides: Optional[Dict[str, str]] = None,
                deterministic: Optional[bool] = None) -> "Settings":
        """A copy with `mode` / `deterministic` replaced where given and `overrides` merged in."""
        return Settings(self.mode if mode is None else mode, {**self._per_op, **(overrides or {})},
                        self.deterministic if deterministic is None else deterministic)

    @staticmethod
    def from_token(token: str) -> "Settings":
        settings = _TOKENS.get(token)
        if settings is None:
            try:
                mode, det, per_op = token.split("|")
                overrides = dict(item.split("=") for item in per_op.split(",") if item)
                settings = Settings(mode, overrides, det == "1")
            except ValueError:
                raise ValueError(f"{token!r} is not a dispatcher settings token (expected 'mode|0 or 1|op=backend,...', "
                                 f"as Settings.token writes)") from None
            _check_choice(settings.mode, settings._per_op, known_ops=False)
            if len(_TOKENS) < 1024:
                _TOKENS[token] = settings
        return settings

    def __eq__(self, other) -> bool:
        return isinstance(other, Settings) and other.token == self.token

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Settings(mode={self.mode!r}, overrides={dict(self.overrides)!r}, deterministic={self.deterministic})"


_TOKENS: Dict[str, Settings] = {}


class _ThreadScopes(threading.local):
    """The calling thread's part of the state: its open `with` blocks, innermost last (a dict of
    the settings a block changes, or a whole `Settings` carried from a forward), the settings they
    resolve to, and whether a forced backend is being asked for its reasons."""

    def __init__(self):
        self.layers: List[Union[dict, Settings]] = []
        self.resolved: Optional[Settings] = None
        self.version = -1    # the process-wide version `resolved` was computed against
        self.forcing = False


class DispatchState:
    """Everything the dispatcher decides with, in one object.

    The scoping rule, one for every setting (mode, per-op overrides, deterministic):
    - `set_backend`, `set_deterministic` and the FASTLEGO_BACKEND variable set the process-wide
      settings, which every thread sees;
    - a `use_backend(...)` or `deterministic(...)` block overrides them for the calling thread
      until it exits (the innermost block wins; per-op overrides add to the outer ones);
    - a fused op's backward runs under the settings its forward ran with (`scope(token)`, entered
      by `fastlego.custom_ops`), on whatever thread PyTorch runs it: for CUDA tensors its own
      threads, where the forward's blocks are not open.
    The decision cache and the retired backends are facts about backends and argument shapes,
    shared by every thread; decisions are keyed by the settings they were made under.
    `torch.use_deterministic_algorithms`, PyTorch's own switch, is process-wide: `deterministic()`
    sets it while the block is open (run the backward inside the block too)."""

    def __init__(self):
        self._default: Optional[Settings] = None      # read from FASTLEGO_BACKEND on first use
        self.version = 0                              # bumped when `default` changes
        self.thread = _ThreadScopes()
        self.decisions: Dict[tuple, tuple] = {}       # see `choose`
        self.retired: Dict[Tuple[str, str], str] = {}  # (op, backend) -> the run-time error

    @property
    def default(self) -> Settings:
        """The process-wide settings; at first use the FASTLEGO_BACKEND variable's mode, checked
        against the backends registered by then (`fastlego.ops` registers the built-in ones)."""
        if self._default is None:
            self._default = Settings(_mode_from_env())
        return self._default

    def settings(self) -> Settings:
        """The settings of the calling thread (see the scoping rule)."""
        t = self.thread
        if not t.layers:
            return self.default
        if t.version != self.version:
            resolved = self.default
            for layer in t.layers:
                resolved = layer if isinstance(layer, Settings) else resolved.replace(**layer)
            t.resolved, t.version = resolved, self.version
        return t.resolved

    def set_default(self, settings: Settings) -> None:
        self._default = settings
        self.version += 1

    @contextlib.contextmanager
    def scoped(self, layer: Union[dict, Settings]):
        """Open a block of the calling thread: `layer` is the settings it changes (a dict of
        Settings.replace arguments) or a whole Settings."""
        t = self.thread
        t.layers.append(layer)
        t.version = -1
        try:
            yield
        finally:
            t.layers.pop()
            t.version = -1

    def forget(self, op: str, name: Optional[str] = None) -> None:
        """Backends of `op` changed: drop cached decisions and the retirement of `name` (all of the
        op's when None)."""
        self.decisions.clear()
        for key in [k for k in self.retired if k[0] == op and name in (None, k[1])]:
            del self.retired[key]


def _mode_from_env() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if mode not in modes():
        raise ValueError(f"{ENV_VAR}={mode!r} is not a backend: expected one of {', '.join(modes())}")
    return mode


_state = DispatchState()
_config = _state.thread   # the calling thread's part (tests set `_config.forcing` as `_choose` does)


def current_settings() -> Settings:
    """The settings the calling thread's calls run under (see `DispatchState`)."""
    return _state.settings()


# torch.compile reads the settings once, when it traces (a compiled graph keeps the settings it
# was traced under): both readers are constants to it, so it never traces the thread-local state.
@torch.compiler.assume_constant_result
def settings_token() -> str:
    """`current_settings().token`: what a fused op carries from its forward into its backward."""
    return _state.settings().token


@torch.compiler.assume_constant_result
def current_mode(op: Optional[str] = None) -> str:
    """The backend mode op `op` runs under on the calling thread (its override, else the mode)."""
    return _state.settings().mode_of(op)


@contextlib.contextmanager
def scope(settings: Union[Settings, str, None]):
    """Run the block under `settings` (a Settings or its token), whatever the calling thread's
    own settings are: how a backward runs under its forward's choices. "" or None: no change."""
    if not settings:
        yield
        return
    if isinstance(settings, str):
        settings = Settings.from_token(settings)
    if settings == _state.settings():
        yield
        return
    with _state.scoped(settings):
        yield


def checkpoint_contexts():
    """`context_fn` for `torch.utils.checkpoint(..., use_reentrant=False)`: the recomputation,
    which PyTorch runs inside the backward (on its own threads for CUDA tensors), runs under the
    settings of the forward it repeats, so it takes the same backends (and saves the same
    tensors) as that forward did."""
    return contextlib.nullcontext(), scope(settings_token())


def _check_choice(mode: Optional[str], per_op: Dict[str, str], known_ops: bool = True) -> None:
    """`mode` must be one of `modes()`, each per-op override one of `modes(op)` (the op's own
    backends). Settings read back from a token (`known_ops` False) may name ops not registered in
    this process: their overrides are checked against `modes()`."""
    if mode is not None and mode not in modes():
        raise ValueError(f"backend {mode!r} for mode is not one of {', '.join(modes())}")
    unknown = [op for op in per_op if op not in _REGISTRY]
    if unknown and known_ops:
        raise ValueError(f"unknown op(s) {unknown}: per-op overrides take {', '.join(_REGISTRY)}")
    for op, value in per_op.items():
        allowed = modes(op) if op in _REGISTRY else modes()
        if value not in allowed:
            raise ValueError(f"backend {value!r} for {op} is not one of {', '.join(allowed)} "
                             f"(the backends registered for {op!r}, and auto)")


@contextlib.contextmanager
def use_backend(mode: Optional[str] = None, **per_op: str):
    """Choose backends inside a `with` block, for the calling thread (and the backward of every
    fused op run inside): `use_backend("triton")`, `use_backend("auto", global_attention="xformers")`.
    The mode is "auto" (the first backend of each op that takes the call) or any registered
    backend name (`modes()`: reference, triton, flash_attn, xformers, sdpa); a per-op override is
    "auto" or one of that op's backends (`modes(op)`). Outside any block the process-wide choice
    applies (`set_backend`, default from the FASTLEGO_BACKEND variable)."""
    _check_choice(mode, per_op)
    layer: dict = {}
    if mode is not None:
        layer["mode"] = mode
    if per_op:
        layer["overrides"] = per_op
    with _state.scoped(layer):
        yield


def set_backend(mode: str = "auto", **per_op: str) -> None:
    """Set the process-wide backend choice (every thread, outside `use_backend` blocks); per-op
    overrides are added to the ones in force."""
    _check_choice(mode, per_op)
    _state.set_default(_state.default.replace(mode=mode, overrides=per_op))


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
_observer: Optional[Callable[[Decision, tuple, dict], None]] = None  # record(on_call=...)
_site: List[str] = []


# Decisions (`_state.decisions`) are cached by everything `not_supported_reasons` looks at: the
# op, the settings (mode, overrides, deterministic switch), grad and autocast state, the
# interpreter switch, and per argument its metadata (tensors: shape, strides, dtype, device,
# requires_grad) or value. Asking every backend costs far more Python than a dictionary lookup,
# and a training step makes hundreds of op calls (bench/RESULTS.md has the timings). Calls with
# keyword arguments (`out=`, whose overlap check reads addresses) are not cached. Cleared when
# backends change or one is retired. A cached decision also keeps its backend's plan for the key
# (`Backend.runner`): a backend that checks its arguments (shapes, dtypes, devices, autocast)
# does so once per key, not at every call, which is most of an op's host cost at small batches.
_DECISIONS_MAX = 8192


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.shape, a.stride(), a.dtype, a.device, a.requires_grad)
    if isinstance(a, (list, tuple)):
        return tuple(_arg_key(x) for x in a)
    return a if isinstance(a, (int, float, str, bool, type(None), torch.dtype)) else id(a)


def _decision_key(op: str, args) -> tuple:
    autocast = tuple(autocast_state(d) for d in ("cuda", "cpu"))
    return (op, _state.settings(), torch.is_grad_enabled(), autocast, triton_interpreting(),
            tuple(_arg_key(a) for a in args))


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
    entry = _decide(op, args, kwargs)
    return entry[0], entry[1]


def _decide(op: str, args: tuple, kwargs: dict) -> list:
    """[backend, refused, runner] of this call: cached by decision key for calls without keyword
    arguments, where `runner` (the backend's plan for such calls, made at the first call) runs
    the call; None until then."""
    if kwargs:
        backend, refused = _choose(op, *args, **kwargs)
        return [backend, refused, backend]
    key = _decision_key(op, args)
    decisions = _state.decisions
    hit = decisions.get(key)
    if hit is None:
        hit = [*_choose(op, *args), None]
        if len(decisions) >= _DECISIONS_MAX:
            decisions.clear()
        decisions[key] = hit
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
        _state.thread.forcing = True
        try:
            reasons = forced[0].not_supported_reasons(*args, **kwargs)
        finally:
            _state.thread.forcing = False
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


# Messages of CUDA errors after which the context is unusable (sticky errors): retiring the
# backend would not help, and the next call of any backend fails the same way.
_BROKEN_CONTEXT = ("illegal memory access", "device-side assert", "misaligned address", "illegal instruction",
                   "unspecified launch failure", "launch timed out", "uncorrectable ecc")


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def capturing() -> bool:
    """Whether the calling thread's current CUDA stream is capturing a CUDA graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _may_retire(op: str, backend: Backend, exc: BaseException, kwargs: dict) -> bool:
    """Whether a failed call of `backend` retires it and falls back (see the module docstring).
    Where it does not, the re-raised error says why no fallback ran."""
    if current_mode(op) != "auto" or backend.name == "reference":
        return False   # a forced backend's failure is the caller's to see; the reference is the last resort
    why = None
    if _out_of_memory(exc):
        why = "out of memory is not the backend's fault: free memory or use a smaller batch"
    elif any(m in str(exc).lower() for m in _BROKEN_CONTEXT):
        why = "the CUDA context is broken (a sticky error): no backend can run after it"
    elif capturing():
        why = ("it failed inside a CUDA-graph capture, which fails as a whole: nothing is retired while "
               f"capturing (run the step eagerly once first, or force another backend, use_backend({op}='reference'))")
    elif backend.in_place or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        why = ("the call writes into its arguments (in place or out=), which may be partly written: "
               f"no fallback can redo it (force another backend with use_backend({op}='reference'))")
    if why is None:
        return True
    if hasattr(exc, "add_note"):   # Python 3.11+
        exc.add_note(f"fastlego: the {backend.name!r} backend of op {op!r} was not retired and no fallback ran: {why}")
    return False


def call(op: str, *args, **kwargs):
    """Run `op` on the backend the current mode picks (see the module docstring)."""
    entry = _decide(op, args, kwargs)
    backend, refused = entry[0], entry[1]
    decision = None
    if _recorder is not None:
        decision = Decision(op, _site[-1] if _site else "", backend.name, refused)
        _recorder.append(decision)
    try:
        runner = entry[2]
        if runner is None:   # the first call of this decision key: the backend checks it once
            runner = entry[2] = backend.runner(*args)
        out = runner(*args, **kwargs)
    except Exception as exc:  # a kernel that fails at run time: retire it, fall back, warn once
        if not _may_retire(op, backend, exc, kwargs):
            raise
        error = f"{type(exc).__name__}: {exc}"
        _state.retired[(op, backend.name)] = error
        _state.decisions.clear()
        warnings.warn(
            f"fastlego: the {backend.name!r} backend of op {op!r} failed at run time "
            f"({error}); falling back for the rest of this process",
            RuntimeWarning, stacklevel=2)
        if _recorder is not None:
            _recorder.pop()  # the retry records the decision that actually ran
        return call(op, *args, **kwargs)
    if decision is not None and _observer is not None:
        _observer(decision, args, kwargs)
    return out


def _leave_site(module, args, output) -> None:
    """`record`'s forward hook: the module's forward returned. Returns None, which keeps the
    output (a hook's non-None value replaces it: the root module's name "" would)."""
    _site.pop()


@contextlib.contextmanager
def record(site_modules: Optional[torch.nn.Module] = None,
           on_call: Optional[Callable[[Decision, tuple, dict], None]] = None):
    """Collect a `Decision` per op call inside the block; sites are named after the modules
    of `site_modules` whose forward is running (hooks are removed on exit).

    `on_call(decision, args, kwargs)`, the observer hook, is called after each op call inside
    the block returns, with the decision that ran (a backend that failed and fell back is not
    reported, its replacement is) and the call's arguments: to note what each call site
    receives (shapes, strides, dtypes) without keeping the tensors. Calls the op itself makes
    (a backward calling its pieces) are reported before it. Nested blocks see only their own
    calls."""
    global _recorder, _observer
    saved, _recorder = (_recorder, _observer), []
    _observer = on_call
    depth = len(_site)
    handles = []
    if site_modules is not None:
        for name, module in site_modules.named_modules():
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: _site.append(n)))
            handles.append(module.register_forward_hook(_leave_site))
    try:
        yield _recorder
    finally:
        for h in handles:
            h.remove()
        del _site[depth:]  # a forward that raised leaves its modules' names behind
        _recorder, _observer = saved


# --------------------------------------------------------------------------------------------
# Deterministic mode
# --------------------------------------------------------------------------------------------

def set_deterministic(enabled: bool = True) -> None:
    """Bitwise-reproducible gradients: the same seed and inputs give the same bits run to run.

    fastlego's Triton kernels never use atomics (every per-image or per-column sum is a
    fixed-order sum of per-program partials), so they are deterministic in any mode. This mode
    additionally (1) turns on `torch.use_deterministic_algorithms` (PyTorch's own ops, cuBLAS with
    CUBLAS_WORKSPACE_CONFIG=:4096:8, set here if unset: set it yourself before CUDA starts to be
    safe), (2) fixes the fused-vs-cuBLAS path of the matmul ops to cuBLAS instead of the table
    `fastlego.tune` measured (a fixed rule: no tiling that timing picked, whose summation order
    another process or card could pick differently), and (3) trains global attention (regions >
    64 tokens) with the reference backward (softmax recomputed in fp32, fixed-order matmuls)
    instead of SDPA's flash/efficient backward, which may accumulate with atomics. Costs some
    speed; off by default. Process-wide; `deterministic()` is the per-thread block (see
    `DispatchState` for the scoping rule)."""
    enabled = bool(enabled)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    _state.set_default(_state.default.replace(deterministic=enabled))


def is_deterministic() -> bool:
    """Whether the calling thread's calls run in deterministic mode (a backward: its forward's)."""
    return _state.settings().deterministic


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """`set_deterministic` for the calling thread inside a `with` block (and the backward of every
    fused op run inside). PyTorch's own switch, which is process-wide, is set while the block is
    open and restored after."""
    saved = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(enabled))
    try:
        with _state.scoped({"deterministic": bool(enabled)}):
            yield
    finally:
        torch.use_deterministic_algorithms(saved)


# --------------------------------------------------------------------------------------------
# Facts kernels ask about the call (their support rules: fastlego.kernels.policy)
# --------------------------------------------------------------------------------------------

def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would cast `t` to (autocast on for t's device, t floating and not fp64),
    else None. Kernels compute in it, as the reference op does under autocast."""
    dev = t.device.type
    if dev not in ("cuda", "cpu") or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    return autocast_state(dev)[1]


def triton_interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (TRITON_INTERPRET=1: CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forcing() -> bool:
    """Whether the calling thread is asking a forced backend for its reasons (`choose`): Triton
    kernels take CPU tensors, through the interpreter, only then."""
    return _state.thread.forcing
