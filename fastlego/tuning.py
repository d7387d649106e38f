"""Which path the fused matmul ops take, measured once in an explicit step: `fastlego.tune`.

`modulated_linear` and `linear_gated_residual` each have two paths on a GPU (see
`fastlego.kernels.modulated_linear` and `fastlego.kernels.linear_gated_residual`; their GEMM
machinery, tuning keys and tile configs in `fastlego.kernels.gemm`): (a) one Triton GEMM with the LayerNorm-modulate prologue or the
gate/residual epilogue fused in, and (b) cuBLAS with one memory-bound Triton/PyTorch pass beside
it. Which is faster depends on the shape and the card, so it is measured, but never inside a
model call: timing there needs host syncs in the forward, can pick differently on two DDP ranks
or processes (hence other summation orders), and cannot run inside a CUDA-graph capture. Instead:

- `tune(model, *example_inputs)` runs one forward of `model` as the caller's step runs it (same
  grad mode and autocast), noting each fused-matmul call's op, shapes and dtypes; then times both
  paths of each (the fused GEMM in every tile config that fits, so Triton's autotuner never runs
  inside a model call either) and keeps the fastest in this process's table. `fastlego train`,
  `sample` and `bench` call it before their first timed step.
- Results are kept in a JSON cache file (`cache_path()`: FASTLEGO_TUNE_CACHE, else
  ~/.cache/fastlego/tuning.json), per environment (GPU name, torch and triton versions), then
  per op, shapes and dtypes; a later `tune` of the same shapes reads them instead of timing.
  The file is written atomically (a temporary file renamed over it).
- Under torch.distributed every rank calls `tune` (a collective): the ranks' shapes are gathered,
  rank 0 alone reads the file, times what is missing and writes the file, and every rank installs
  rank 0's choices: no two ranks run different paths.
- Inside a model call the launcher only looks its shape up (`lookup`): a tuned shape takes its
  measured path and tile config; an untuned shape, and every shape in deterministic mode, takes
  the fixed rule (`fixed_path`): cuBLAS (b) on CUDA tensors; the fused GEMM (a) with its fixed
  small tile under Triton's interpreter (CPU tensors, tests). No timing, no sync.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .dispatch import autocast_state, is_deterministic

CACHE_ENV = "FASTLEGO_TUNE_CACHE"
CACHE_FORMAT = "fastlego-tuning"
CACHE_VERSION = 1
PATHS = ("fused", "cublas")


@dataclass(frozen=True)
class Choice:
    """A tuned path: "fused" with its Triton tile config (BLOCK_M/N/K, GROUP_M, num_warps,
    num_stages; None under the interpreter: its fixed config) or "cublas"; `ms` what each
    candidate took when it was measured."""

    path: str
    config: Optional[Dict[str, int]] = None
    ms: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"path": self.path, "config": self.config, "ms": self.ms}

    @staticmethod
    def from_json(obj) -> "Choice":
        if not isinstance(obj, dict) or obj.get("path") not in PATHS:
            raise ValueError(f"not a tuning choice: {obj!r}")
        config = obj.get("config")
        if config is not None and not (isinstance(config, dict) and all(isinstance(v, int) for v in config.values())):
            raise ValueError(f"not a tile config: {config!r}")
        return Choice(obj["path"], config, {str(k): float(v) for k, v in (obj.get("ms") or {}).items()})


@dataclass
class GemmOp:
    """The candidates of one fused matmul op, registered by its kernel module: `fused(*args,
    config=triton.Config or None)`, `cublas(*args)` and `configs(args)`, the tile configs worth
    timing for these arguments (None: the launcher's own config, under the interpreter)."""

    fused: Callable
    cublas: Callable
    configs: Callable[[tuple], list]


@dataclass(frozen=True)
class Request:
    """A call the tuning forward saw: the op and its arguments' metadata (tensors as (shape,
    stride, dtype, device)), with the autocast state it ran under."""

    op: str
    args: tuple
    autocast: tuple


@dataclass
class TuneResult:
    """What `tune` did: `choices` per shape key (rank 0's), which keys were `measured` now and
    which came `from_cache`, the cache file, and the seconds it took."""

    choices: Dict[str, Choice]
    measured: List[str]
    from_cache: List[str]
    cache_file: Optional[str]
    seconds: float

    def summary(self) -> str:
        fused = sum(c.path == "fused" for c in self.choices.values())
        return (f"tuned {len(self.choices)} matmul shape(s): {fused} fused, {len(self.choices) - fused} cuBLAS "
                f"({len(self.measured)} measured, {len(self.from_cache)} from {self.cache_file or 'no cache file'}; "
                f"{self.seconds:.1f} s)")


_OPS: Dict[str, GemmOp] = {}
_TABLE: Dict[str, Tuple[str, object]] = {}     # key -> (path, triton.Config or None): the choices in force
_CHOICES: Dict[str, Choice] = {}               # key -> Choice, as installed
_collecting: Optional[Dict[str, Request]] = None


def register_gemm(op: str, fused: Callable, cublas: Callable, configs: Callable[[tuple], list]) -> None:
    """Declare the two paths of a fused matmul op (called by its kernel module at import)."""
    _OPS[op] = GemmOp(fused, cublas, configs)


def clear() -> None:
    """Forget every installed choice: every shape takes the fixed rule until the next `tune`."""
    _TABLE.clear()
    _CHOICES.clear()


def installed() -> Dict[str, Choice]:
    """The choices in force in this process (key -> Choice)."""
    return dict(_CHOICES)


def install(choices: Dict[str, Choice]) -> None:
    """Put `choices` (key -> Choice) in force in this process."""
    for key, choice in choices.items():
        _TABLE[key] = (choice.path, _triton_config(choice.config))
        _CHOICES[key] = choice


def _triton_config(config: Optional[Dict[str, int]]):
    if config is None:
        return None
    import triton
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))


def config_to_dict(config) -> Optional[Dict[str, int]]:
    """A triton.Config as the JSON the cache file keeps (None stays None)."""
    if config is None:
        return None
    return {**{k: int(v) for k, v in config.kwargs.items()}, "num_warps": int(config.num_warps),
            "num_stages": int(config.num_stages)}


# --------------------------------------------------------------------------------------------
# Inside a model call: a lookup, never a measurement
# --------------------------------------------------------------------------------------------

def fixed_path(x: torch.Tensor) -> str:
    """The rule for untuned shapes and deterministic mode: cuBLAS on CUDA tensors (no autotuned
    tiling); the fused GEMM with its fixed config under Triton's interpreter (CPU tensors)."""
    return "cublas" if x.is_cuda else "fused"


def lookup(op: str, key: str, args: tuple) -> Tuple[str, object]:
    """(path, triton.Config or None) for a call of `op` with shape key `key` (see the module
    docstring). While `tune` runs its forward, the call is also noted for timing."""
    if _collecting is not None and key not in _collecting:
        _collecting[key] = Request(op, tuple(_describe(a) for a in args),
                                   (autocast_state("cuda"), autocast_state("cpu")))
    x = args[0]
    if not is_deterministic():
        hit = _TABLE.get(key)
        if hit is not None and not (x.is_cuda and hit[0] == "fused" and hit[1] is None):
            return hit
    return fixed_path(x), None


def _describe(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), str(a.dtype).replace("torch.", ""), str(a.device))
    return a


@contextlib.contextmanager
def collecting():
    """Note every fused-matmul call inside the block: yields {key: Request}."""
    global _collecting
    saved, _collecting = _collecting, {}
    try:
        yield _collecting
    finally:
        _collecting = saved


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Median milliseconds of `fn` on the current CUDA stream (CUDA events), after one warm-up
    call that compiles its kernels."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _rebuild(described, generator: torch.Generator):
    """Random tensors with the noted shapes, strides, dtypes and devices (values do not change a
    matmul's speed); other arguments as they were."""
    if not (isinstance(described, tuple) and described[:1] == ("tensor",)):
        return described
    _, shape, stride, dtype, device = described
    t = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=device)
    if t.numel():
        base = torch.randn(t.untyped_storage().nbytes() // t.element_size(), generator=generator, dtype=torch.float32)
        t.as_strided((base.numel(),), (1,), 0).copy_(base)
    return t


@contextlib.contextmanager
def _autocast_as(device_type: str, state: tuple):
    enabled, dtype = state
    if device_type not in ("cuda", "cpu"):
        yield
    elif enabled:
        with torch.autocast(device_type, dtype=dtype):
            yield
    else:
        with torch.autocast(device_type, enabled=False):
            yield


def measure(request: Request, timer: Callable[[Callable], float] = time_ms) -> Optional[Choice]:
    """Time both paths of one noted call (the fused GEMM once per tile config that fits) and
    return the fastest as a Choice; None if no candidate ran. A candidate that fails is skipped:
    a tile config that Triton refuses for want of shared memory (OutOfResources: the prune's
    estimate does not count every kernel's epilogue and prologue buffers) quietly when another
    candidate ran, any other failure (out of memory, a compile error) with its error in a warning."""
    gemm = _OPS[request.op]
    args = tuple(_rebuild(a, torch.Generator().manual_seed(0)) for a in request.args)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    cuda_state, cpu_state = request.autocast
    candidates: Dict[str, Tuple[str, object]] = {"cublas": ("cublas", None)}
    ms: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    with torch.no_grad(), _autocast_as(device.type, cuda_state if device.type == "cuda" else cpu_state):
        for config in gemm.configs(args):     # under the call's autocast: it sets the MMA dtype
            name = "fused" if config is None else "fused " + ",".join(f"{k}={v}" for k, v in config_to_dict(config).items())
            candidates[name] = ("fused", config)
        for name, (path, config) in candidates.items():
            fn = (lambda: gemm.cublas(*args)) if path == "cublas" else (lambda c=config: gemm.fused(*args, config=c))
            try:
                ms[name] = float(timer(fn))
            except Exception as exc:   # noqa: BLE001 - a candidate that cannot run is not a choice
                errors[name] = f"{type(exc).__name__}: {exc}"
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    finite = {k: v for k, v in ms.items() if math.isfinite(v)}
    if finite:   # a config too large for this GPU's shared memory is a pruned candidate, not news
        errors = {k: e for k, e in errors.items() if not e.startswith("OutOfResources:")}
    if errors:
        warnings.warn(f"fastlego.tune: {request.op} candidate(s) failed and were skipped: {errors}", RuntimeWarning)
    if not finite:
        return None
    best = min(finite, key=finite.get)
    path, config = candidates[best]
    return Choice(path, config_to_dict(config), {k: round(v, 5) for k, v in finite.items()})


# --------------------------------------------------------------------------------------------
# The cache file
# --------------------------------------------------------------------------------------------

def cache_path() -> str:
    """The default cache file: $FASTLEGO_TUNE_CACHE, else $XDG_CACHE_HOME/fastlego/tuning.json,
    else ~/.cache/fastlego/tuning.json."""
    path = os.environ.get(CACHE_ENV)
    if path:
        return path
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastlego", "tuning.json")


def environment_key(device: Union[torch.device, str, None] = None) -> str:
    """What a measurement depends on besides the op and shapes: the GPU's name (or the CPU under
    Triton's interpreter), the torch and triton versions."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} (Triton interpreter)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no (working) triton: no fused path to tune anyway
        triton_version = "none"
    return f"{name}|torch {torch.__version__}|triton {triton_version}"


def read_cache(path: str) -> Dict[str, Dict[str, Choice]]:
    """{environment key: {shape key: Choice}} from a cache file; empty if there is none. A file
    that cannot be read as one is reported (RuntimeWarning) and treated as empty; so is an entry."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"fastlego.tune: cache file {path} is unreadable ({exc}); it will be rewritten", RuntimeWarning)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        warnings.warn(f"fastlego.tune: {path} is not a version-{CACHE_VERSION} {CACHE_FORMAT} file; "
                      f"it will be rewritten", RuntimeWarning)
        return {}
    result: Dict[str, Dict[str, Choice]] = {}
    for env, entries in (data.get("environments") or {}).items():
        for key, obj in (entries or {}).items():
            try:
                result.setdefault(env, {})[key] = Choice.from_json(obj)
            except ValueError as exc:
                warnings.warn(f"fastlego.tune: {path}: entry {key!r} skipped ({exc})", RuntimeWarning)
    return result


def write_cache(path: str, env: str, choices: Dict[str, Choice]) -> None:
    """Merge `choices` into environment `env` of the cache file and write it atomically (a
    temporary file in the same folder, renamed over it: a reader sees the old file or the new
    one, never a part). The file is read again just before, so entries other processes wrote
    meanwhile are kept."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    data = read_cache(path)
    data.setdefault(env, {}).update(choices)
    doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
           "environments": {e: {k: c.to_json() for k, c in sorted(entries.items())} for e, entries in sorted(data.items())}}
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# tune()
# --------------------------------------------------------------------------------------------

def _tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters())[:1]
    return []


def _group_of(group):
    """(group, rank, world size): the default group when torch.distributed is initialised."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def choose_on_rank0(wanted: Dict[str, Request], decide: Callable[[Dict[str, Request]], Dict[str, Choice]],
                    group=None) -> Dict[str, Choice]:
    """Every rank's `wanted` requests are gathered; rank 0 runs `decide` on their union (rank
    order: the first rank to note a key gives its request), and every rank returns rank 0's
    choices. Without torch.distributed: `decide(wanted)`. A failure of `decide` on rank 0 is
    raised on every rank (no rank is left waiting)."""
    group, rank, world = _group_of(group)
    if world == 1:
        return decide(wanted)
    import torch.distributed as dist
    gathered: List[Optional[Dict[str, Request]]] = [None] * world
    dist.all_gather_object(gathered, wanted, group=group)
    result: List[object] = [None]
    if rank == 0:
        union: Dict[str, Request] = {}
        for part in gathered:
            for key, req in (part or {}).items():
                union.setdefault(key, req)
        try:
            result[0] = ("ok", {k: c.to_json() for k, c in decide(union).items()})
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            result[0] = ("error", f"{type(exc).__name__}: {exc}")
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(result, src=src, group=group)
    status, payload = result[0]
    if status != "ok":
        raise RuntimeError(f"fastlego.tune failed on rank 0: {payload}")
    return {k: Choice.from_json(v) for k, v in payload.items()}


def tune(model: Callable, *example_inputs, cache_file: Union[str, None, bool] = None, group=None,
         timer: Optional[Callable[[Callable], float]] = None, **forward_kwargs) -> TuneResult:
    """Measure the fused-matmul paths for the shapes `model(*example_inputs, **forward_kwargs)`
    runs, and put the fastest in force (see the module docstring).

    Call it the way your step calls the model (same grad mode, same autocast, same batch size),
    before the first timed step and before any CUDA-graph capture. `model` is any callable: the
    network itself (not its DDP wrapper, whose forward prepares a backward), or e.g.
    `lambda: loss_fn(net, images, ...)`. It runs one forward (no backward), with the random
    number generators' states restored after it, so a run with `tune` draws the same numbers as
    one without. `cache_file`: a path, None for `cache_path()`, False for no file. Under
    torch.distributed it is a collective: call it on every rank of `group` (default: the world).
    In deterministic mode it does nothing (the fixed rule applies). `timer(fn) -> ms` replaces the
    CUDA-event timer (tests); by default only CUDA calls are timed."""
    t0 = time.perf_counter()
    path = None if cache_file is False else (cache_path() if cache_file in (None, True) else str(cache_file))
    if is_deterministic():
        return TuneResult({}, [], [], path, time.perf_counter() - t0)
    devices = sorted({t.device.index or 0 for t in _tensors(example_inputs) + _tensors(forward_kwargs) +
                      _tensors(model) if t.is_cuda})
    with collecting() as wanted, torch.random.fork_rng(devices=devices):
        out = model(*example_inputs, **forward_kwargs)
    del out
    timed = dict(wanted) if timer is not None else {
        k: r for k, r in wanted.items() if any(isinstance(a, tuple) and a[:1] == ("tensor",) and a[4].startswith("cuda")
                                               for a in r.args)}
    measured: List[str] = []
    from_cache: List[str] = []

    def decide(requests: Dict[str, Request]) -> Dict[str, Choice]:
        if not requests:
            return {}
        first = next(a for r in requests.values() for a in r.args if isinstance(a, tuple) and a[:1] == ("tensor",))
        env = environment_key(first[4])
        cached = read_cache(path).get(env, {}) if path else {}
        choices: Dict[str, Choice] = {}
        new: Dict[str, Choice] = {}
        for key, request in requests.items():
            if key in cached:
                choices[key] = cached[key]
                from_cache.append(key)
                continue
            choice = measure(request, timer or time_ms)
            if choice is not None:
                choices[key] = new[key] = choice
                measured.append(key)
        if new and path:
            write_cache(path, env, new)
        return choices

    choices = choose_on_rank0(timed, decide, group)
    install(choices)
    return TuneResult(choices, measured, from_cache, path, time.perf_counter() - t0)
