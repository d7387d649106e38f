"""The benchmark suite: end-to-end and per-kernel timings against "the floor" (BASELINE.md).

Shared by `fastlego bench` (`main`) and `pytest bench/` (which passes pytest-benchmark's
`benchmark.pedantic` in as the `runner`, so both time the same rounds with CUDA events).

What one run measures, all on the same device in the same process:
- device limits: the bf16 matrix peak (an 8192^3 matmul) and the copy bandwidth (a large
  device-to-device copy);
- per workload (`Case`: preset, batch, input, labels): FLOPs of one forward (FlopCounterMode on
  the reference model, and the release-equivalent count with the adaLN Linear once per region),
  the floor (every matmul of the forward timed with cuBLAS in bf16, global attention with SDPA,
  local window attention as the bytes it moves at the measured bandwidth), and the end-to-end
  variants: `fastlego` (auto backend, fp32 weights + bf16 autocast, TF32 on), `reference`
  (`use_backend("reference")` eager), `compile` (`torch.compile` of the reference model) and
  `fastlego_bf16` (auto backend, weights held in bf16);
- per kernel: every dispatched op at the exact arguments (shapes, strides, dtypes, autocast) it
  receives in the workload's auto forward, on every backend that takes it, against its own floor
  max(FLOPs / peak, minimum bytes / bandwidth).

Modes (`STEP_BUILDERS`): `infer`, a `torch.no_grad()` forward, and `train`, one training step =
forward of `EDMPrecond` (every brick trained as a denoiser) + EDM loss (`training.EDMLoss`,
averaged over bricks) + backward + AdamW step, fp32 weights under bf16 autocast, for the
variants `reference`, `fastlego`, `fastlego_graph` (the step replayed as one CUDA graph) and
`compile` (`MODE_VARIANTS["train"]`), at the training batches of
`DEFAULT_TRAIN_CASES` unless --presets names others; FLOPs = 3x the forward's. The floor and the
per-kernel timings are of the inference forward (infer mode only). Nothing here imports triton:
without it the auto backend runs the reference ops, and the recorded decisions say so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import dispatch, ops
from . import reference as R
from .edm import EDMPrecond
from .model import LegoBackbone
from .presets import BRICK_TYPES, get_preset
from .testing import randomize_
from .training import EDMLoss, TrainStep, adamw, make_capturable

SCHEMA_VERSION = 1
GIB = float(1 << 30)

# The three workloads of BASELINE.md: (preset, batch, channels, resolution, label_dim).
DEFAULT_CASES = (
    ("lego_S_PG_64", 256, 3, 64, 0),
    ("lego_L_PG_64", 128, 3, 64, 1000),
    ("lego_XL_U_32", 128, 4, 32, 1000),
)
# Inference targets (issue 3): fastlego at >= 80% of the floor; on H200 also these speed-ups
# over torch.compile of the reference model.
FLOOR_TARGET = 0.8
COMPILE_TARGETS = {"lego_S_PG_64": 1.9, "lego_L_PG_64": 1.5, "lego_XL_U_32": 1.4}

VARIANTS = ("reference", "fastlego", "fastlego_bf16", "compile")
VARIANT_HELP = {
    "reference": "use_backend('reference') eager, fp32 weights + autocast",
    "fastlego": "use_backend('auto'), fp32 weights + autocast",
    "fastlego_bf16": "use_backend('auto'), weights and inputs in bf16, no autocast",
    "compile": "torch.compile(model) under use_backend('reference'), fp32 weights + autocast",
}
TRAIN_VARIANT_HELP = {
    "reference": "use_backend('reference') eager training step, fp32 weights + autocast",
    "fastlego": "use_backend('auto') training step, fp32 weights + autocast",
    "fastlego_graph": "the fastlego step captured once as a CUDA graph and replayed (fastlego train's default "
                      "on one GPU), fp32 weights + autocast",
    "compile": "torch.compile(EDMPrecond) under use_backend('reference'), then eager loss, backward, AdamW; "
               "fp32 weights + autocast",
    "fastlego_graph_ckpt": "fastlego_graph with the first N DiT blocks checkpointed (--checkpoint-blocks N, default "
                           "all): less memory for recompute; timed only when named in --variants",
}
MODES = ("infer", "train")
# Training (issue 4): the batches to time, (preset, batch); channels, resolution and labels as in
# DEFAULT_CASES. The two the release cannot run on one GPU (S_PG_64 at 256: its attention
# backward crashes; L_PG_64 at 128: 126 GiB) come last, so a failure there cannot spoil the rest.
DEFAULT_TRAIN_CASES = (
    ("lego_S_PG_64", 32), ("lego_S_PG_64", 64), ("lego_L_PG_64", 64), ("lego_XL_U_32", 128),
    ("lego_S_PG_64", 256), ("lego_L_PG_64", 128),
)
# The variants a mode times: training keeps fp32 weights (AdamW on bf16 weights is not a recipe).
MODE_VARIANTS = {"infer": VARIANTS, "train": ("reference", "fastlego", "fastlego_graph", "compile",
                                              "fastlego_graph_ckpt")}
ALL_VARIANTS = tuple(dict.fromkeys(v for vs in MODE_VARIANTS.values() for v in vs))
# Variants timed only when asked for (--variants): a memory/speed trade-off, not a default.
OPT_IN_VARIANTS = ("fastlego_graph_ckpt",)
DEFAULT_VARIANTS = tuple(v for v in ALL_VARIANTS if v not in OPT_IN_VARIANTS)
GRAPH_VARIANTS = ("fastlego_graph", "fastlego_graph_ckpt")
# A training step: EDM's loss (P_mean -1.2, P_std 1.2, sigma_data 0.5), AdamW at this rate, and
# weights from `randomize_` at this scale: small enough that the joint loss is finite at every
# depth, large enough that no gradient is zero.
TRAIN_LR = 1e-4
TRAIN_INIT_SCALE = 0.1
# The arguments the kernels are timed with: those the ops receive in the `fastlego` variant (fp32
# weights under autocast) and in the `fastlego_bf16` variant (everything in bf16).
KERNEL_INPUTS = {"autocast": "as in the fastlego variant: fp32 weights, activations under autocast",
                 "bf16": "as in the fastlego_bf16 variant: weights and activations in bf16"}

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# =============================================================================================
# Configuration
# =============================================================================================

@dataclass(frozen=True)
class Case:
    """One end-to-end workload: a preset at a batch size, input shape and label width."""

    preset: str
    batch: int
    in_channels: int = 3
    resolution: int = 64
    label_dim: int = 1000
    depths: Optional[Tuple[int, ...]] = None  # override of the preset's depths (smoke tests only)

    @property
    def name(self) -> str:
        return self.preset if self.depths is None else f"{self.preset}[depths={','.join(map(str, self.depths))}]"

    def model_kwargs(self) -> dict:
        kw = dict(in_channels=self.in_channels, label_dim=self.label_dim)
        if self.depths is not None:
            kw["depths"] = list(self.depths)
        return kw

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.resolution, self.resolution)

    def describe(self) -> str:
        labels = "uncond" if self.label_dim == 0 else f"{self.label_dim} classes"
        return f"{self.name} B={self.batch} {self.in_channels}x{self.resolution}x{self.resolution} {labels}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_case(preset: str, batch: Optional[int] = None) -> Case:
    """The BASELINE.md workload of `preset`, or for other presets: 3 channels at the training
    resolution with 1000 classes (4 latent channels for `_U_32`), batch 128."""
    for name, b, c, res, labels in DEFAULT_CASES:
        if name == preset:
            return Case(name, batch or b, c, res, labels)
    p = get_preset(preset)
    channels = 4 if preset.endswith("_U_32") else 3
    return Case(preset, batch or 128, channels, p.training_resolution, 1000)


def parse_cases(spec: Optional[str], batch: Optional[int] = None) -> List[Case]:
    """`"lego_S_PG_64,lego_L_PG_64:64"` -> Cases (`name:batch` overrides that preset's batch)."""
    if not spec:
        return [default_case(name, batch) for name, *_ in DEFAULT_CASES]
    cases = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, b = item.partition(":")
        if b and not b.isdigit():
            raise ValueError(f"bad preset spec {item!r}: expected NAME or NAME:BATCH, e.g. lego_S_PG_64:64")
        cases.append(default_case(name, int(b) if b else batch))
    return cases


def default_train_cases() -> List[Case]:
    """The training workloads of `DEFAULT_TRAIN_CASES`."""
    return [default_case(name, batch) for name, batch in DEFAULT_TRAIN_CASES]


def with_depths(case: Case, depths: Sequence[int]) -> Case:
    """`case` with every brick's depth replaced (one entry per brick)."""
    n = len(get_preset(case.preset).regions)
    depths = tuple(int(d) for d in depths)
    if len(depths) != n or min(depths) < 1:
        raise ValueError(f"--depths needs {n} positive integers for {case.preset} (one per brick), got {list(depths)}")
    return dataclasses.replace(case, depths=depths)


@dataclass
class BenchConfig:
    """Everything a run needs; `for_mode` fills the repeat counts of full / --quick / --tiny runs."""

    device: str = "cuda"
    cases: List[Case] = field(default_factory=lambda: parse_cases(None))
    # the workloads of the train mode; None: the same as `cases` (--presets, --tiny)
    train_cases: Optional[List[Case]] = field(default_factory=default_train_cases)
    modes: Tuple[str, ...] = ("infer",)
    variants: Tuple[str, ...] = DEFAULT_VARIANTS
    checkpoint_blocks: Optional[int] = None   # fastlego_graph_ckpt: the first N DiT blocks (None: all)
    compile_mode: Optional[str] = None
    autocast_dtype: Optional[torch.dtype] = torch.bfloat16
    tf32: bool = True
    kernels: bool = True
    floor: bool = True
    check: bool = True
    cuda_graphs: bool = False
    kernel_inputs: Tuple[str, ...] = ("autocast", "bf16")
    seed: int = 0
    # end to end: `repeats` timed rounds of `iters` forwards each, after `warmup` rounds
    warmup: int = 2
    repeats: int = 5
    iters: int = 10
    # kernels and floor matmuls: rounds of at least `op_min_round_ms` (calls repeated to fill it)
    op_warmup: int = 3
    op_repeats: int = 15
    op_min_round_ms: float = 2.0
    # device limits
    peak_size: int = 8192
    peak_repeats: int = 20
    copy_mib: int = 1024
    json_path: Optional[str] = None
    markdown_path: Optional[str] = None
    profile: str = "full"

    @classmethod
    def for_mode(cls, quick: bool = False, tiny: bool = False, **overrides) -> "BenchConfig":
        cfg = cls()
        if quick:
            cfg.profile = "quick"
            cfg.warmup, cfg.repeats, cfg.iters = 1, 3, 3
            cfg.op_warmup, cfg.op_repeats, cfg.op_min_round_ms = 1, 5, 1.0
            cfg.peak_repeats = 10
        if tiny:
            cfg.profile = "tiny"
            cfg.cases = [Case("lego_S_PG_64", 1, 3, 64, 0)]
            cfg.train_cases = None
            cfg.warmup, cfg.repeats, cfg.iters = 1, 2, 1
            cfg.op_warmup, cfg.op_repeats, cfg.op_min_round_ms = 1, 2, 0.0
            cfg.peak_size, cfg.peak_repeats, cfg.copy_mib = 256, 3, 4
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg

    def cases_for(self, mode: str) -> List[Case]:
        """The workloads `mode` runs: `train_cases` for train when set, else `cases`."""
        return list(self.train_cases) if mode == "train" and self.train_cases is not None else list(self.cases)

    def variants_for(self, mode: str) -> Tuple[str, ...]:
        """The asked-for variants that `mode` has (train: no fastlego_bf16)."""
        return tuple(v for v in self.variants if v in MODE_VARIANTS.get(mode, VARIANTS))

    def validate(self) -> None:
        bad = [m for m in self.modes if m not in STEP_BUILDERS]
        if bad:
            raise ValueError(f"mode(s) {bad} are not implemented: expected a subset of {sorted(STEP_BUILDERS)}")
        bad = [v for v in self.variants if v not in ALL_VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}: expected a subset of {', '.join(ALL_VARIANTS)}")
        for mode in self.modes:
            if not self.variants_for(mode):
                raise ValueError(f"none of the variants {list(self.variants)} has a {mode} mode: pick from "
                                 f"{', '.join(MODE_VARIANTS[mode])} (e.g. --variants {','.join(MODE_VARIANTS[mode][:2])})")
        bad = [v for v in self.kernel_inputs if v not in KERNEL_INPUTS]
        if bad:
            raise ValueError(f"unknown kernel input kind(s) {bad}: expected a subset of {', '.join(KERNEL_INPUTS)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False; "
                               "run on a GPU, or pass --device cpu (with --tiny for a quick smoke run)")
        for name in ("warmup", "op_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("repeats", "iters", "op_repeats", "peak_repeats", "peak_size", "copy_mib"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cases"] = [c.to_dict() for c in self.cases]
        d.pop("train_cases")
        if "train" in self.modes:  # (an inference run's config reads as before)
            d["train_cases"] = [c.to_dict() for c in self.cases_for("train")]
        d["autocast_dtype"] = _dtype_name(self.autocast_dtype)
        return d


# =============================================================================================
# Environment
# =============================================================================================

def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def environment(device: str) -> dict:
    """Date, device and library versions (None for a library that is not installed)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    env = {
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "gpu": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "xformers": _version("xformers"),
        "fastlego": _version("fastlego"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "FASTLEGO_BACKEND": os.environ.get(dispatch.ENV_VAR),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    from . import __version__
    env["fastlego"] = env["fastlego"] or __version__
    if device.startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / GIB, 1),
                   l2_cache_mib=round(_l2_bytes(dev) / 2 ** 20, 1))
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20)


# =============================================================================================
# Timing
# =============================================================================================

# A runner calls `target` (one timed round) `warmup + rounds` times; pytest's `benchmark.pedantic`
# is one (bench/conftest.py), the default is a plain loop.
Runner = Callable[[Callable[[], None], int, int], Any]


def default_runner(target: Callable[[], None], rounds: int, warmup: int) -> None:
    for _ in range(warmup + rounds):
        target()


def pedantic_runner(benchmark) -> Runner:
    """A runner that times through pytest-benchmark (each round ends with a CUDA sync)."""
    def run(target, rounds, warmup):
        return benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return run


@dataclass
class Timing:
    """Per-call times in ms: median (the figure reported), min, max over the timed rounds."""

    median_ms: float
    min_ms: float
    max_ms: float
    rounds: int
    inner: int
    copies: int
    cuda_graph: bool = False
    note: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capture_graph(body: Callable[[], None], device: torch.device):
    """Capture `body` into a CUDA graph (after warming it up on a side stream, as CUDA requires)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def measure(fn: Callable, arg_sets: Sequence[tuple] = ((),), *, device, rounds: int, warmup: int,
            inner: Optional[int] = None, min_round_ms: float = 0.0, max_inner: int = 1000,
            runner: Optional[Runner] = None, cuda_graph: bool = False,
            context: Callable[[], Any] = contextlib.nullcontext) -> Timing:
    """Median per-call time of `fn(*args)`, cycling through `arg_sets` (input rotation, so small
    inputs are not served from L2). A round calls fn `inner` times between two CUDA events (a
    perf_counter pair on the CPU) and ends with a sync; `inner` defaults to enough calls to fill
    `min_round_ms`. With `cuda_graph`, a round replays a graph of the `inner` calls instead."""
    device = torch.device(device)
    arg_sets = list(arg_sets)
    copies = len(arg_sets)
    with context():
        if inner is None:  # calibrate: one warm call of each input set, then size the round
            for args in arg_sets:
                fn(*args)
            _sync(device)
            t0 = time.perf_counter()
            fn(*arg_sets[0])
            _sync(device)
            probe_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
            inner = copies * max(1, math.ceil(min_round_ms / (probe_ms * copies)))
            inner = max(copies, min(inner, max_inner))

        def body():
            for j in range(inner):
                fn(*arg_sets[j % copies])

        note = None
        run_round = body
        if cuda_graph and device.type == "cuda":
            try:
                graph = _capture_graph(body, device)
                run_round = graph.replay
            except Exception as exc:  # e.g. an op that syncs: time it eagerly instead
                note = f"CUDA graph capture failed, timed eagerly ({type(exc).__name__}: {_first_line(exc)})"
                cuda_graph = False
                torch.cuda.synchronize(device)
        else:
            cuda_graph = False

        times: List[float] = []
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def target():
                start.record()
                run_round()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / inner)
        else:
            def target():
                t = time.perf_counter()
                run_round()
                times.append((time.perf_counter() - t) * 1e3 / inner)

        (runner or default_runner)(target, rounds, warmup)
        if len(times) < warmup + rounds:  # e.g. pytest-benchmark disabled: it ran target once
            default_runner(target, warmup + rounds - len(times), 0)
    timed = times[-rounds:]
    return Timing(statistics.median(timed), min(timed), max(timed), len(timed), inner, copies, cuda_graph, note)


def _copies_for(nbytes: int, device: torch.device, cap: int = 16) -> int:
    """How many input sets to rotate through so their total is >= 3x the L2 cache."""
    l2 = _l2_bytes(device)
    if l2 == 0 or nbytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(3 * l2 / nbytes)))


@contextlib.contextmanager
def precision(device, tf32: bool = True):
    """TF32 for fp32 matmuls and convolutions on or off inside the block (restored after)."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _autocast(device: torch.device, dtype: Optional[torch.dtype], cache: bool = True):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def _first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _error(exc: BaseException, limit: int = 2000) -> str:
    return f"{type(exc).__name__}: {str(exc).strip()}"[:limit]


def _free(device: torch.device, collect: bool = True) -> None:
    """Return freed memory to the device between large pieces (gc.collect is slow: not per kernel)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# =============================================================================================
# Device limits: the matrix peak and the copy bandwidth
# =============================================================================================

def measure_matmul_peak(device, size: int = 8192, dtype=torch.bfloat16, rounds: int = 20, warmup: int = 3,
                        runner: Optional[Runner] = None) -> dict:
    """TFLOP/s of a size^3 matmul (cuBLAS on CUDA) in `dtype`: the matrix peak of this run."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    t = measure(torch.mm, [(a, b)], device=device, rounds=rounds, warmup=warmup, inner=1, runner=runner)
    flops = 2 * size ** 3
    del a, b
    return {"size": size, "dtype": _dtype_name(dtype), "ms": t.median_ms,
            "tflops": flops / (t.median_ms * 1e-3) / 1e12, "timing": t.to_dict()}


def measure_copy_bandwidth(device, mib: int = 1024, rounds: int = 20, warmup: int = 3,
                           runner: Optional[Runner] = None) -> dict:
    """GB/s of a device-to-device copy of `mib` MiB (bytes moved = read + write = 2 x size)."""
    device = torch.device(device)
    n = mib * 2 ** 20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, rounds=rounds, warmup=warmup, inner=1, runner=runner)
    moved = 2 * n * 4
    del src, dst
    return {"mib": mib, "bytes_moved": moved, "ms": t.median_ms,
            "gbps": moved / (t.median_ms * 1e-3) / 1e9, "timing": t.to_dict()}


# =============================================================================================
# The forward as matmuls and attentions: FLOPs and the floor, from the model configuration
# =============================================================================================

@dataclass(frozen=True)
class BrickGeometry:
    index: int
    region: int
    patch: int
    width: int
    heads: int
    depth: int
    in_channels: int      # the brick's patch-embedding input channels (C + 2, or 2C + 2)
    regions_per_image: int  # L
    tokens_per_region: int  # T

    @property
    def attention_op(self) -> str:
        return "window_attention" if self.tokens_per_region <= ops.WINDOW_MAX_TOKENS else "global_attention"


def brick_geometry(case: Case) -> List[BrickGeometry]:
    preset = get_preset(case.preset)
    depths = case.depths if case.depths is not None else preset.depths
    out = []
    for i, (region, kind, depth) in enumerate(zip(preset.regions, preset.model_type, depths)):
        width, patch, heads = BRICK_TYPES[kind]
        if case.resolution % region:
            raise ValueError(f"{case.preset}: resolution {case.resolution} is not a multiple of region {region}")
        cin = case.in_channels + 2 if i == 0 else 2 * case.in_channels + 2
        out.append(BrickGeometry(i, region, patch, width, heads, depth, cin,
                                 (case.resolution // region) ** 2, (region // patch) ** 2))
    return out


@dataclass(frozen=True)
class Matmul:
    """`count` matmuls (M, K) x (K, N) in one forward."""

    name: str
    m: int
    k: int
    n: int
    count: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class AttentionShape:
    """`count` attentions over `regions` independent sequences of `tokens` tokens."""

    name: str
    kind: str  # "global" (timed with SDPA) or "local" (counted as bytes at the copy bandwidth)
    regions: int
    heads: int
    tokens: int
    head_dim: int
    count: int

    @property
    def flops(self) -> int:  # q k^T and p v
        return 4 * self.regions * self.heads * self.tokens ** 2 * self.head_dim * self.count

    def min_bytes(self, elem: int = 2) -> int:  # read qkv, write the output, per call
        return self.regions * self.tokens * self.heads * self.head_dim * 4 * elem


def forward_matmuls(case: Case, per_region_adaln: bool = False) -> List[Matmul]:
    """Every matmul of one forward (patch embedding as a matmul). `per_region_adaln`: the
    release's count, where the adaLN Linears run once per region instead of once per image."""
    B = case.batch
    D0 = brick_geometry(case)[0].width  # the conditioning width
    mm = [Matmul("t_embed.fc1", B, 256, D0, 1), Matmul("t_embed.fc2", B, D0, D0, 1)]
    if case.label_dim:
        mm.append(Matmul("y_embed", B, case.label_dim, D0, 1))
    for g in brick_geometry(case):
        D, M = g.width, B * g.regions_per_image * g.tokens_per_region
        ada_m = B * g.regions_per_image if per_region_adaln else B
        p = f"b{g.index}."
        mm += [
            Matmul(p + "patch_embed", M, g.in_channels * g.patch ** 2, D, 1),
            Matmul(p + "adaLN", ada_m, D, 6 * D, g.depth),
            Matmul(p + "qkv", M, D, 3 * D, g.depth),
            Matmul(p + "proj", M, D, D, g.depth),
            Matmul(p + "fc1", M, D, 4 * D, g.depth),
            Matmul(p + "fc2", M, 4 * D, D, g.depth),
            Matmul(p + "final_adaLN", ada_m, D, 2 * D, 1),
            Matmul(p + "final", M, D, g.patch ** 2 * case.in_channels, 1),
        ]
    return mm


def forward_attentions(case: Case) -> List[AttentionShape]:
    out = []
    for g in brick_geometry(case):
        kind = "local" if g.attention_op == "window_attention" else "global"
        out.append(AttentionShape(f"b{g.index}.attention", kind, case.batch * g.regions_per_image, g.heads,
                                  g.tokens_per_region, g.width // g.heads, g.depth))
    return out


def analytic_flops(case: Case, per_region_adaln: bool = False) -> int:
    """Matmul + attention FLOPs of one forward (what FlopCounterMode counts)."""
    return (sum(m.flops for m in forward_matmuls(case, per_region_adaln))
            + sum(a.flops for a in forward_attentions(case)))


def count_forward_flops(model: LegoBackbone, inputs: tuple) -> int:
    """FLOPs of one reference forward, as torch.utils.flop_counter counts them (SDPA forced to
    its math path so that attention is counted on every device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), dispatch.use_backend("reference"), sdpa_kernel(SDPBackend.MATH), counter:
        model(*inputs)
    return int(counter.get_total_flops())


def measure_floor(case: Case, device, bandwidth_gbps: float, *, rounds: int, warmup: int,
                  min_round_ms: float, dtype=torch.bfloat16, runner: Optional[Runner] = None) -> dict:
    """The floor of BASELINE.md: every matmul of the forward with cuBLAS (each distinct shape
    timed once, times its count), global attention with SDPA, local attention as its bytes at
    `bandwidth_gbps`; everything else free."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(2)
    shape_ms: Dict[Tuple[int, int, int], float] = {}
    items = []
    for mm in forward_matmuls(case):
        key = (mm.m, mm.k, mm.n)
        if key not in shape_ms:
            nbytes = (mm.m * mm.k + mm.k * mm.n) * _elem(dtype)
            sets = [(torch.randn(mm.m, mm.k, device=device, dtype=dtype, generator=g),
                     torch.randn(mm.n, mm.k, device=device, dtype=dtype, generator=g))
                    for _ in range(_copies_for(nbytes, device))]
            t = measure(F.linear, sets, device=device, rounds=rounds, warmup=warmup, min_round_ms=min_round_ms)
            shape_ms[key] = t.median_ms
            del sets
        items.append({"name": mm.name, "kind": "matmul", "shape": list(key), "count": mm.count,
                      "ms_each": shape_ms[key], "ms": shape_ms[key] * mm.count})
    attn_ms: Dict[tuple, float] = {}
    for at in forward_attentions(case):
        if at.kind == "global":
            key = (at.regions, at.heads, at.tokens, at.head_dim)
            if key not in attn_ms:
                nbytes = at.regions * at.heads * at.tokens * at.head_dim * 3 * _elem(dtype)
                sets = [tuple(torch.randn(*key, device=device, dtype=dtype, generator=g) for _ in range(3))
                        for _ in range(_copies_for(nbytes, device))]
                t = measure(R.sdpa, sets, device=device, rounds=rounds, warmup=warmup, min_round_ms=min_round_ms)
                attn_ms[key] = t.median_ms
                del sets
            ms_each = attn_ms[key]
        else:
            ms_each = at.min_bytes(_elem(dtype)) / (bandwidth_gbps * 1e9) * 1e3
        items.append({"name": at.name, "kind": at.kind + "_attention",
                      "shape": [at.regions, at.heads, at.tokens, at.head_dim], "count": at.count,
                      "ms_each": ms_each, "ms": ms_each * at.count})
    _free(device, collect=False)
    sums = {k: sum(i["ms"] for i in items if i["kind"] == k) for k in ("matmul", "global_attention", "local_attention")}
    total = sum(sums.values())
    matmul_flops = sum(m.flops for m in forward_matmuls(case))
    return {"ms": total, "img_per_s": case.batch / (total * 1e-3),
            "matmul_ms": sums["matmul"], "global_attention_ms": sums["global_attention"],
            "local_attention_ms": sums["local_attention"],
            "matmul_tflops": matmul_flops / (sums["matmul"] * 1e-3) / 1e12 if sums["matmul"] else None,
            "dtype": _dtype_name(dtype), "bandwidth_gbps": bandwidth_gbps, "items": items}




# =============================================================================================
# Models and inputs
# =============================================================================================

def build_model(case: Case, device, seed: int = 0) -> LegoBackbone:
    """The preset in eval mode, fp32, every parameter random and non-zero."""
    with torch.device(device):
        model = LegoBackbone.from_preset(case.preset, **case.model_kwargs())
    return randomize_(model.eval(), seed=seed)


def make_inputs(case: Case, device, seed: int = 0, dtype=torch.float32) -> tuple:
    """(x, timesteps, class_labels): Gaussian images, EDM timesteps log(sigma)/4 with
    ln(sigma) ~ N(-1.2, 1.2^2), one-hot labels of random classes (None when unconditional)."""
    g = torch.Generator().manual_seed(seed + 1)
    B = case.batch
    x = torch.randn(case.input_shape, generator=g)
    t = (-1.2 + 1.2 * torch.randn(B, generator=g)) / 4
    y = None
    if case.label_dim:
        y = F.one_hot(torch.randint(0, case.label_dim, (B,), generator=g), case.label_dim).float()
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), t.to(device), cast(y)


def build_train_net(case: Case, device, seed: int = 0, scale: float = TRAIN_INIT_SCALE) -> EDMPrecond:
    """`EDMPrecond` around the preset (`train_intermediate_stages=True`: one output per brick, the
    release's joint loss), fp32, in training mode, every parameter random and non-zero."""
    kw = {} if case.depths is None else {"depths": list(case.depths)}
    with torch.device(device):
        net = EDMPrecond(case.resolution, case.in_channels, label_dim=case.label_dim, model_type=case.preset,
                         train_intermediate_stages=True, **kw)
    return randomize_(net, seed=seed, scale=scale).train()


def make_train_inputs(case: Case, device, seed: int = 0, loss: EDMLoss = EDMLoss()) -> tuple:
    """(images, sigma, noise, labels) of one training step: images ~ U(-1, 1) (the data range),
    EDM's log-normal sigmas, Gaussian noise, one-hot labels of random classes (None when
    unconditional). The same batch every step (drawing new ones costs nothing measurable)."""
    g = torch.Generator().manual_seed(seed + 2)
    B = case.batch
    images = torch.rand(case.input_shape, generator=g) * 2 - 1
    sigma = loss.sigma(torch.randn(B, generator=g))
    noise = torch.randn(case.input_shape, generator=g)
    labels = None
    if case.label_dim:
        labels = F.one_hot(torch.randint(0, case.label_dim, (B,), generator=g), case.label_dim).float()
    return tuple(None if v is None else v.to(device) for v in (images, sigma, noise, labels))


def bf16_copy(model: LegoBackbone, inputs: tuple) -> Tuple[LegoBackbone, tuple]:
    """The model with its weights in bf16, and the inputs with x and the labels in bf16."""
    cast = lambda v: None if v is None else (v.to(torch.bfloat16) if v.is_floating_point() and v.dim() > 1 else v)  # noqa: E731
    return copy.deepcopy(model).to(torch.bfloat16), tuple(cast(v) for v in inputs)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# =============================================================================================
# Per-op cases: what each dispatched op receives in the workload's forward
# =============================================================================================

@dataclass
class TensorSpec:
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:  # the elements the op sees (a chunk view counts only its elements)
        return math.prod(self.shape) * _elem(self.dtype)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "stride": list(self.stride), "dtype": _dtype_name(self.dtype)}


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class OpCase:
    """One dispatched op at one call site (brick b, role): its arguments' specs and call count."""

    key: str
    op: str
    brick: int
    role: str
    count: int
    args: list  # TensorSpec or plain values
    autocast: Optional[torch.dtype]
    auto_backend: Optional[str]
    refused: Dict[str, List[str]]
    extra: bool = False

    def to_dict(self) -> dict:
        return {"key": self.key, "op": self.op, "brick": self.brick, "role": self.role, "count": self.count,
                "args": [a.to_dict() if isinstance(a, TensorSpec) else (None if a is None else repr(a)) for a in self.args],
                "autocast": _dtype_name(self.autocast), "auto_backend": self.auto_backend,
                "refused": self.refused, "extra": self.extra}


def _role(op: str, args: tuple) -> str:
    if op == "modulated_linear":
        return "modulated_linear.fc1" if args[5] == "gelu_tanh" else "modulated_linear.qkv"
    if op == "linear_gated_residual":
        w = args[1]
        return "linear_gated_residual.proj" if w.shape[0] == w.shape[1] else "linear_gated_residual.fc2"
    if op in ("window_attention", "global_attention"):
        return f"{op}.T{args[0].shape[1]}"
    return op


def expected_op_keys(case: Case, kernel_inputs: Sequence[str] = ("autocast",)) -> List[Tuple[str, str]]:
    """(key, op) of every op case of a workload, from its configuration alone (for pytest's
    collection); `record_op_cases` finds the same keys in a real forward. A key reads
    `<inputs>:b<brick>.<role>`, e.g. `autocast:b0.modulated_linear.qkv`."""
    keys, extra = [], None
    for g in brick_geometry(case):
        p = f"b{g.index}."
        att = f"{g.attention_op}.T{g.tokens_per_region}"
        keys += [(p + "brick_embed", "brick_embed"), (p + "modulated_linear.qkv", "modulated_linear"),
                 (p + att, g.attention_op), (p + "linear_gated_residual.proj", "linear_gated_residual"),
                 (p + "modulated_linear.fc1", "modulated_linear"), (p + "linear_gated_residual.fc2", "linear_gated_residual"),
                 (p + "final_layer", "final_layer")]
        if extra is None and g.attention_op == "window_attention" and g.tokens_per_region < 16:
            extra = (p + "window_attention.T16", "window_attention")
    keys += [extra] if extra else []
    return [(f"{kind}:{key}", op) for kind in kernel_inputs for key, op in keys]


@contextlib.contextmanager
def _intercept_ops(on_call: Callable[[str, tuple, dict], None]):
    """Route every `fastlego.ops` call through `on_call(op, args, kwargs)` first."""
    saved = ops.call

    def wrapper(op, *args, **kwargs):
        on_call(op, args, kwargs)
        return saved(op, *args, **kwargs)

    ops.call = wrapper
    try:
        yield
    finally:
        ops.call = saved


def record_op_cases(model: LegoBackbone, inputs: tuple, device, autocast_dtype,
                    prefix: str = "autocast:") -> Tuple[Dict[str, OpCase], torch.Tensor]:
    """Run one auto-backend forward, noting for each call site (brick, role) the argument specs,
    the autocast state, how often it runs and which backend auto chose (with the refusals).
    Returns the cases (keys `prefix` + `b<brick>.<role>`) and the forward's output."""
    device = torch.device(device)
    cases: Dict[str, OpCase] = {}
    current = [-1]
    hooks = [brick.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
             for i, brick in enumerate(model.model)]

    def on_call(op, args, kwargs):
        if kwargs:
            args = args + tuple(kwargs.values())
        role = _role(op, args)
        key = f"{prefix}b{current[0]}.{role}"
        if key in cases:
            cases[key].count += 1
            return
        backend, refused = dispatch.choose(op, *args)
        specs = [TensorSpec(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a
                 for a in args]
        ac = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        cases[key] = OpCase(key, op, current[0], role, 1, specs, ac, backend.name,
                            {k: list(v) for k, v in refused.items()})

    try:
        with torch.no_grad(), dispatch.use_backend("auto"), _autocast(device, autocast_dtype), _intercept_ops(on_call):
            out = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    # Window attention at 16 tokens (not in these presets): the first T=4 site's tokens regrouped.
    for key, case in list(cases.items()):
        if case.op == "window_attention" and case.args[0].shape[1] < 16:
            qkv = case.args[0]
            N, T, C3 = qkv.shape
            n16 = N * T // 16
            if n16 >= 1:
                spec = TensorSpec((n16, 16, C3), (16 * C3, C3, 1), qkv.dtype)
                k16 = f"{prefix}b{case.brick}.window_attention.T16"
                cases[k16] = OpCase(k16, "window_attention", case.brick, "window_attention.T16", 0,
                                    [spec] + list(case.args[1:]), case.autocast, None, {}, extra=True)
            break
    return cases, out


def synthesize_args(case: OpCase, device, seed: int) -> tuple:
    """Random tensors with the recorded shapes, strides and dtypes (non-tensor args as recorded)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for a in case.args:
        if isinstance(a, TensorSpec):
            values = torch.randn(a.shape, generator=g, device=device, dtype=torch.float32).to(a.dtype)
            if 0 in a.stride:  # a broadcast (expanded) view: its elements share memory
                out.append(values)
                continue
            t = torch.empty_strided(a.shape, a.stride, dtype=a.dtype, device=device)
            out.append(t.copy_(values) if t.numel() else t)
        else:
            out.append(a)
    return tuple(out)


def _op_flops(case: OpCase, args: tuple, device: torch.device) -> int:
    """FLOPs of one call: attention by formula, the rest as FlopCounterMode counts the reference op."""
    if case.op in ("window_attention", "global_attention"):
        N, T, C3 = args[0].shape
        return 4 * N * T * T * (C3 // 3)
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    ref = _backend(case.op, "reference")
    with torch.no_grad(), _autocast(device, case.autocast, cache=False), counter:
        ref(*args)
    return int(counter.get_total_flops())


def _backend(op: str, name: str):
    for b in dispatch.backends(op):
        if b.name == name:
            return b
    raise KeyError(f"op {op!r} has no backend {name!r} (it has {[b.name for b in dispatch.backends(op)]} and 'auto')")


def op_backend_names(op: str) -> List[str]:
    """The backends a kernel benchmark times: each registered one, then 'auto' (the dispatcher)."""
    return [b.name for b in dispatch.backends(op)] + ["auto"]


def bench_op(case: OpCase, backend_name: str, device, *, peak_tflops: float, bandwidth_gbps: float,
             rounds: int, warmup: int, min_round_ms: float, cuda_graph: bool = False,
             runner: Optional[Runner] = None, seed: int = 0) -> dict:
    """Time one op case on one backend ('auto' = through the dispatcher, its overhead included).
    Also reports FLOPs, minimum bytes, GB/s, TFLOP/s, the op's floor and the error against the
    reference op on the same inputs. A backend that refuses the call gets `refused` reasons."""
    device = torch.device(device)
    result = {"key": case.key, "op": case.op, "role": case.role, "brick": case.brick, "count": case.count,
              "backend": backend_name, "auto_backend": case.auto_backend, "extra": case.extra}
    in_bytes = sum(a.nbytes for a in case.args if isinstance(a, TensorSpec))
    copies = _copies_for(in_bytes, device)
    sets = [synthesize_args(case, device, seed + 17 * j) for j in range(copies)]
    ctx = lambda: _autocast(device, case.autocast, cache=False)  # noqa: E731
    reference = _backend(case.op, "reference")
    try:
        if backend_name == "auto":
            fn = lambda *a: dispatch.call(case.op, *a)  # noqa: E731
            with dispatch.use_backend("auto"), ctx():
                chosen, refused = dispatch.choose(case.op, *sets[0])
            result["chosen"] = chosen.name
        else:
            fn = _backend(case.op, backend_name)
            with ctx():
                reasons = fn.not_supported_reasons(*sets[0])
            if reasons:
                result["refused"] = reasons
                return result
        with torch.no_grad(), dispatch.use_backend("auto"), ctx():
            ref_out = reference(*sets[0])
            out = fn(*sets[0])
            result["rel_err_vs_reference"] = _rel_err(out.float(), ref_out.float())
            out_bytes = ref_out.numel() * ref_out.element_size()
            flops = _op_flops(case, sets[0], device)
            del out, ref_out
        with torch.no_grad(), dispatch.use_backend("auto"):
            t = measure(fn, sets, device=device, rounds=rounds, warmup=warmup, min_round_ms=min_round_ms,
                        runner=runner, cuda_graph=cuda_graph, context=ctx)
    except Exception as exc:
        result["error"] = _error(exc)
        return result
    finally:
        del sets
    nbytes = in_bytes + out_bytes
    floor_ms = max(flops / (peak_tflops * 1e12), nbytes / (bandwidth_gbps * 1e9)) * 1e3
    s = t.median_ms * 1e-3
    result.update(ms=t.median_ms, flops=flops, bytes=nbytes, gbps=nbytes / s / 1e9, tflops=flops / s / 1e12,
                  floor_ms=floor_ms, frac_floor=floor_ms / t.median_ms, timing=t.to_dict())
    return result


# =============================================================================================
# End to end
# =============================================================================================

def _infer_step(model, inputs, backend: str, device: torch.device, autocast_dtype) -> Callable[[], torch.Tensor]:
    def step():
        with torch.no_grad(), dispatch.use_backend(backend), _autocast(device, autocast_dtype):
            return model(*inputs)
    return step


def _train_step(net, inputs, backend: str, device: torch.device, autocast_dtype,
                cuda_graph: bool = False) -> Callable[[], torch.Tensor]:
    """One training step of `net` (an EDMPrecond, or torch.compile of one) on `inputs` =
    `make_train_inputs(...)`: forward + EDM loss under autocast, backward, AdamW step (fused on
    CUDA, the same in every variant; its state is created by the first step), as
    `fastlego.training.TrainStep` runs it: eagerly, or with `cuda_graph` captured after 3 eager
    steps and replayed. Returns the loss (detached; with a graph, the graph's tensor,
    overwritten by the next step)."""
    images, sigma, noise, labels = inputs
    opt = adamw([p for p in net.parameters() if p.requires_grad], device, lr=TRAIN_LR)
    make_capturable(opt, cuda_graph, device)
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)

    def body(images, sigma, noise, labels):
        with dispatch.use_backend(backend):
            with _autocast(device, autocast_dtype, cache=not cuda_graph):
                loss, _ = loss_fn(net, images, sigma, noise, labels)
            loss.backward()
            opt.step()
        return loss.detach()

    run = TrainStep(body, opt, cuda_graph=cuda_graph)

    def step():
        return run(images, sigma, noise, labels)
    step.train_step = run
    return step


# mode -> builder(model, inputs, backend, device, autocast_dtype) -> step(); a train step counts
# 3x the forward's FLOPs (backward = 2 forwards).
STEP_BUILDERS: Dict[str, Callable] = {"infer": _infer_step, "train": _train_step}
FLOP_MULTIPLIER: Dict[str, int] = {"infer": 1, "train": 3}


def result_key(variant: str, mode: str = "infer") -> str:
    """Key of an end-to-end result in a report: the variant, suffixed by the mode unless infer."""
    return variant if mode == "infer" else f"{variant}@{mode}"


def _first_call(step, variant: str, res: dict):
    """Run `step` once; outside torch.compile, record in `res` the backends the dispatcher chose."""
    if variant == "compile":
        return step()
    with dispatch.record() as decisions:
        out = step()
    res["backends"] = _decision_summary(decisions)
    return out


def _decision_summary(decisions) -> dict:
    """{op: {backend: calls}} and the first reasons each refused backend gave."""
    chosen: Dict[str, Dict[str, int]] = {}
    refused: Dict[str, Dict[str, List[str]]] = {}
    for d in decisions:
        chosen.setdefault(d.op, {}).setdefault(d.chosen, 0)
        chosen[d.op][d.chosen] += 1
        for name, reasons in d.refused.items():
            refused.setdefault(d.op, {}).setdefault(name, list(reasons))
    return {"chosen": chosen, "refused": refused}


class _CaseState:
    """The live objects of one workload: model, inputs, the fp32 reference output."""

    def __init__(self, case: Case, cfg: BenchConfig):
        self.case, self.cfg = case, cfg
        self.device = torch.device(cfg.device)
        self.model = build_model(case, self.device, cfg.seed)
        self.inputs = make_inputs(case, self.device, cfg.seed)
        self.ref32: Optional[torch.Tensor] = None

    def close(self):
        self.model = self.inputs = self.ref32 = None
        _free(self.device)


class BenchSession:
    """Runs the pieces of a benchmark and collects them into one report (see module docstring).

    Both drivers use it: `run()` for the CLI, the fixtures of bench/conftest.py for pytest. Each
    piece is computed on first use and cached, so pytest tests can run in any order or alone."""

    def __init__(self, config: BenchConfig):
        config.validate()
        self.config = config
        self.device = torch.device(config.device)
        self.env = environment(config.device)
        self._limits: Optional[dict] = None
        self._state: Optional[_CaseState] = None
        self.results: Dict[Case, dict] = {}
        self.op_cases: Dict[Case, Dict[str, OpCase]] = {}
        self._train_init: Optional[Tuple[Case, EDMPrecond]] = None  # the training net's initial weights, on the CPU

    # ---- device limits --------------------------------------------------------------------
    def limits(self) -> dict:
        if self._limits is None:
            cfg = self.config
            dtype = self.matrix_dtype
            with precision(self.device, cfg.tf32):
                peak = measure_matmul_peak(self.device, cfg.peak_size, dtype, cfg.peak_repeats, min(3, cfg.peak_repeats))
                bw = measure_copy_bandwidth(self.device, cfg.copy_mib, cfg.peak_repeats, min(3, cfg.peak_repeats))
            self._limits = {"matmul_peak": peak, "copy_bandwidth": bw}
            _free(self.device)
        return self._limits

    @property
    def matrix_dtype(self) -> torch.dtype:
        """bf16 on the GPU (the floor of BASELINE.md); fp32 on the CPU, where bf16 is emulated."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def peak_tflops(self) -> float:
        return self.limits()["matmul_peak"]["tflops"]

    @property
    def bandwidth_gbps(self) -> float:
        return self.limits()["copy_bandwidth"]["gbps"]

    # ---- per workload ---------------------------------------------------------------------
    def result(self, case: Case) -> dict:
        if case not in self.results:
            self.results[case] = {"name": case.name, "case": case.to_dict(), "description": case.describe(),
                                  "end_to_end": {}, "kernels": []}
        return self.results[case]

    def state(self, case: Case) -> _CaseState:
        """The live model of `case` (the previous workload's is freed first); building it also
        records the op cases and counts the FLOPs."""
        if self._state is not None and self._state.case == case:
            return self._state
        if self._state is not None:
            self._state.close()
            self._state = None
        st = _CaseState(case, self.config)
        self._state = st
        res = self.result(case)
        if "flops" not in res:
            small = tuple(None if v is None else v[:1] for v in st.inputs)
            counted = count_forward_flops(st.model, small) if self.config.check else None
            analytic = analytic_flops(dataclasses.replace(case, batch=1))
            # the release computes each adaLN Linear once per region: the extra FLOPs it counts
            repeat = analytic_flops(dataclasses.replace(case, batch=1), per_region_adaln=True) - analytic
            per_img = counted if counted is not None else analytic
            res["flops"] = {"per_image_counted": counted, "per_image_analytic": analytic, "per_image": per_img,
                            "per_image_release": per_img + repeat,
                            "forward": per_img * case.batch, "forward_release": (per_img + repeat) * case.batch,
                            "gflop_per_image": per_img / 1e9, "gflop_per_image_release": (per_img + repeat) / 1e9}
        if case not in self.op_cases and "infer" in self.config.modes and case in self.config.cases:
            self._record_op_cases(case, st)
        return st

    def _record_op_cases(self, case: Case, st: _CaseState) -> None:
        """The op cases (kernel arguments) of the workload's inference forward, per kernel input kind."""
        res = self.result(case)
        if case not in self.op_cases:
            cases: Dict[str, OpCase] = {}
            with precision(self.device, self.config.tf32):
                for kind in self.config.kernel_inputs:
                    if kind == "autocast":
                        found, _ = record_op_cases(st.model, st.inputs, self.device, self.config.autocast_dtype, "autocast:")
                    else:
                        model16, inputs16 = bf16_copy(st.model, st.inputs)
                        found, _ = record_op_cases(model16, inputs16, self.device, None, "bf16:")
                        del model16, inputs16
                    cases.update(found)
            self.op_cases[case] = cases
            res["op_cases"] = {k: c.to_dict() for k, c in cases.items()}
            _free(self.device)

    def reference_output(self, case: Case) -> torch.Tensor:
        """The reference forward in fp32 without TF32 or autocast: the yardstick of every error."""
        st = self.state(case)
        if st.ref32 is None:
            with precision(self.device, tf32=False), torch.no_grad(), dispatch.use_backend("reference"):
                st.ref32 = st.model(*st.inputs).float()
        return st.ref32

    def floor(self, case: Case) -> dict:
        res = self.result(case)
        if "floor" not in res:
            cfg = self.config
            res["floor"] = measure_floor(case, self.device, self.bandwidth_gbps, rounds=cfg.op_repeats,
                                         warmup=cfg.op_warmup, min_round_ms=cfg.op_min_round_ms,
                                         dtype=self.matrix_dtype)
        return res["floor"]

    def end_to_end(self, case: Case, variant: str, mode: str = "infer", runner: Optional[Runner] = None) -> dict:
        """Time one variant of a workload; an error (compile failure, out of memory) is recorded
        as a string in place of the numbers."""
        cfg, dev = self.config, self.device
        if mode not in STEP_BUILDERS:
            raise ValueError(f"mode {mode!r} is not implemented: expected one of {sorted(STEP_BUILDERS)}")
        if variant not in MODE_VARIANTS[mode]:
            raise ValueError(f"unknown {mode} variant {variant!r}: expected one of {', '.join(MODE_VARIANTS[mode])}")
        if mode == "train":
            return self._train_end_to_end(case, variant, runner)
        st = self.state(case)
        if cfg.floor:
            self.floor(case)
        ref32 = self.reference_output(case) if cfg.check else None
        res = {"variant": variant, "mode": mode, "description": VARIANT_HELP[variant], "batch": case.batch}
        model, inputs, backend, ac = st.model, st.inputs, "auto", cfg.autocast_dtype
        compiled = None
        try:
            if variant == "reference":
                backend = "reference"
            elif variant == "fastlego_bf16":
                model, inputs = bf16_copy(st.model, st.inputs)
                ac = None
            elif variant == "compile":
                backend = "reference"
                # load every reference backend first: dynamo then traces the dispatcher into one graph
                STEP_BUILDERS[mode](model, inputs, backend, dev, ac)()
                torch._dynamo.reset()
                from torch._dynamo.utils import counters
                counters.clear()
                compiled = torch.compile(model, mode=cfg.compile_mode)
                model = compiled
            step = STEP_BUILDERS[mode](model, inputs, backend, dev, ac)
            weights = st.model if variant == "compile" else model
            weight_bytes = sum(t.numel() * t.element_size() for t in list(weights.parameters()) + list(weights.buffers()))
            if dev.type == "cuda":
                _free(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                start_bytes = torch.cuda.memory_allocated(dev)
            with precision(dev, cfg.tf32):
                t0 = time.perf_counter()
                out = _first_call(step, variant, res)
                _sync(dev)
                res["first_call_s"] = time.perf_counter() - t0
                if variant == "compile":
                    from torch._dynamo.utils import counters
                    res["graph_breaks"] = int(sum(counters["graph_break"].values()))
                if ref32 is not None:
                    res["rel_err_vs_fp32"] = _rel_err(out.float(), ref32)
                del out
                t = measure(step, device=dev, rounds=cfg.repeats, warmup=cfg.warmup, inner=cfg.iters, runner=runner)
            res["timing"] = t.to_dict()
            res["ms"] = t.median_ms
            res["img_per_s"] = case.batch / (t.median_ms * 1e-3)
            res["weights_gib"] = weight_bytes / GIB
            if dev.type == "cuda":
                # what this variant needs: its weights + the peak of everything it allocated (the
                # session also holds the fp32 model, inputs and the reference output: not counted)
                peak = torch.cuda.max_memory_allocated(dev)
                res["peak_gib"] = (peak - start_bytes + weight_bytes) / GIB
                res["process_peak_gib"] = peak / GIB
        except Exception as exc:
            res["error"] = _error(exc)
        finally:
            if variant == "fastlego_bf16" and model is not st.model:
                del model
            if compiled is not None:
                del compiled
                torch._dynamo.reset()
            _free(dev)
        self._derive(case, res)
        self.result(case)["end_to_end"][result_key(variant, mode)] = res
        return res

    def _train_end_to_end(self, case: Case, variant: str, runner: Optional[Runner] = None) -> dict:
        """Time training steps of one variant (see `_train_step`): a fresh EDMPrecond, inputs and
        AdamW per variant. Peak memory counts everything the variant allocates (weights, gradients,
        optimizer state, activations) over the timed steps (steady state); the first step's peak,
        which adds one-off work (the kernels' path timing and autotuning, compilation), is
        recorded apart as first_step_peak_gib. An error (out of memory, a kernel that refuses the size, a
        compile failure) is recorded as a string and the run goes on."""
        cfg, dev = self.config, self.device   # `end_to_end` checked the variant
        res = {"variant": variant, "mode": "train", "description": TRAIN_VARIANT_HELP[variant], "batch": case.batch,
               "loss_fn": "EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5), averaged over bricks",
               "optimizer": f"AdamW(lr={TRAIN_LR})", "init_scale": TRAIN_INIT_SCALE}
        backend = "reference" if variant in ("reference", "compile") else "auto"
        net = inputs = model = step = None
        last: List[Optional[torch.Tensor]] = [None]
        try:
            if "flops" not in self.result(case):
                self.state(case)  # the forward's FLOP count (inside the try: a broken device is an error row too)
            if self._state is not None:  # the inference model is not needed here: free its memory
                self._state.close()
                self._state = None
            init = self._train_net(case)
            _free(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                start_bytes = torch.cuda.memory_allocated(dev)
            net = copy.deepcopy(init).to(dev)
            del init
            if variant == "fastlego_graph_ckpt":
                net.model.set_activation_checkpointing("block", cfg.checkpoint_blocks)
                res["checkpointed_blocks"] = net.model.checkpointed_blocks
            inputs = make_train_inputs(case, dev, cfg.seed)
            res["weights_gib"] = sum(p.numel() * p.element_size() for p in net.parameters()) / GIB
            model = net
            torch.manual_seed(cfg.seed)  # the same label-dropout draws in every variant
            if variant == "compile":
                # load every reference backend first (one image, no grad): dynamo then traces the
                # dispatcher into one graph
                images, sigma, _, labels = inputs
                with torch.no_grad(), dispatch.use_backend("reference"), _autocast(dev, cfg.autocast_dtype):
                    net(images[:1], sigma[:1], None if labels is None else labels[:1])
                torch._dynamo.reset()
                from torch._dynamo.utils import counters
                counters.clear()
                model = torch.compile(net, mode=cfg.compile_mode)
            step = STEP_BUILDERS["train"](model, inputs, backend, dev, cfg.autocast_dtype,
                                          cuda_graph=variant in GRAPH_VARIANTS)
            with precision(dev, cfg.tf32):
                t0 = time.perf_counter()
                loss = _first_call(step, variant, res)
                res["loss"] = float(loss)  # the first step's: a sanity value (finite, about 1)
                res["first_call_s"] = time.perf_counter() - t0
                if variant == "compile":
                    from torch._dynamo.utils import counters
                    res["graph_breaks"] = int(sum(counters["graph_break"].values()))

                def timed_step():
                    last[0] = step()
                if dev.type == "cuda":   # the first step's one-off allocations (path timing, autotune, compile) apart
                    _sync(dev)
                    res["first_step_peak_gib"] = (torch.cuda.max_memory_allocated(dev) - start_bytes) / GIB
                    torch.cuda.reset_peak_memory_stats(dev)
                t = measure(timed_step, device=dev, rounds=cfg.repeats, warmup=cfg.warmup, inner=cfg.iters, runner=runner)
            res["loss_last"] = float(last[0])
            if variant in GRAPH_VARIANTS:
                res["captured"] = step.train_step.captured
                if step.train_step.fallback_reason:
                    res["capture_failed"] = step.train_step.fallback_reason
            res["loss_finite"] = math.isfinite(res["loss"]) and math.isfinite(res["loss_last"])
            res["timing"] = t.to_dict()
            res["ms"] = t.median_ms
            res["img_per_s"] = case.batch / (t.median_ms * 1e-3)
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev)
                res["peak_gib"] = (peak - start_bytes) / GIB
                res["process_peak_gib"] = peak / GIB
        except Exception as exc:
            res["error"] = _error(exc)
        finally:
            # drop every reference to the variant's tensors before handing memory back
            net = inputs = model = step = None
            last[0] = None
            if variant == "compile":
                torch._dynamo.reset()
            _free(dev)
        self._derive(case, res)
        self.result(case)["end_to_end"][result_key(variant, "train")] = res
        return res

    def _train_net(self, case: Case) -> EDMPrecond:
        """The workload's training net with its initial weights, on the CPU: randomised once per
        workload, copied to the device by each variant (all start from the same weights)."""
        if self._train_init is None or self._train_init[0] != case:
            self._train_init = None
            gc.collect()
            self._train_init = (case, build_train_net(case, "cpu", self.config.seed))
        return self._train_init[1]

    def _derive(self, case: Case, res: dict) -> None:
        """TFLOP/s, fraction of the matrix peak and of the floor for a timed variant."""
        if "ms" not in res:
            return
        fl = self.result(case).get("flops", {})
        s = res["ms"] * 1e-3
        mult = FLOP_MULTIPLIER.get(res["mode"], 1)
        if fl:
            res["tflops"] = mult * fl["forward"] / s / 1e12
            res["tflops_release_count"] = mult * fl["forward_release"] / s / 1e12
            res["frac_peak"] = res["tflops"] / self.peak_tflops
        floor = self.result(case).get("floor")
        if floor and res["mode"] == "infer":  # the floor is of one forward
            res["frac_floor"] = floor["ms"] / res["ms"]

    def kernel(self, case: Case, key: str, backend: str, runner: Optional[Runner] = None) -> dict:
        """Time one op case of a workload on one backend (see `bench_op`)."""
        if self._state is not None and self._state.case != case:
            self.close()  # only the recorded specs are needed: free the other workload's model
        if case not in self.op_cases:
            self._record_op_cases(case, self.state(case))
        cases = self.op_cases[case]
        if key not in cases:
            res = {"key": key, "backend": backend, "error": f"call site {key} was not seen in the forward of "
                   f"{case.preset} (seen: {', '.join(cases)})"}
        else:
            cfg = self.config
            with precision(self.device, cfg.tf32):
                res = bench_op(cases[key], backend, self.device, peak_tflops=self.peak_tflops,
                               bandwidth_gbps=self.bandwidth_gbps, rounds=cfg.op_repeats, warmup=cfg.op_warmup,
                               min_round_ms=cfg.op_min_round_ms, cuda_graph=cfg.cuda_graphs, runner=runner,
                               seed=cfg.seed)
        kernels = self.result(case)["kernels"]
        kernels[:] = [k for k in kernels if not (k["key"] == key and k["backend"] == backend)]
        kernels.append(res)
        return res

    # ---- the whole run ------------------------------------------------------------------------
    def run(self, log: Callable[[str], None] = print, checkpoint: Optional[Callable[[dict], Any]] = None) -> dict:
        """Everything the config asks for: the device limits; per inference workload the floor,
        the eager variants and the kernels; per training workload the eager training variants;
        then torch.compile of every workload (last: it is the slowest and the least certain
        part). `checkpoint(report)` is called after each piece, so an interrupted run still
        leaves its numbers."""
        cfg = self.config
        lim = self.limits()
        log(f"[bench] {self.env.get('gpu') or self.env['device']}: matmul peak {lim['matmul_peak']['tflops']:.1f} TFLOP/s "
            f"({cfg.peak_size}^3 {lim['matmul_peak']['dtype']}), copy {lim['copy_bandwidth']['gbps']:.0f} GB/s")
        eager = [v for v in cfg.variants_for("infer") if v != "compile"]
        for case in (cfg.cases if "infer" in cfg.modes else []):
            t0 = time.perf_counter()
            self.state(case)
            if cfg.floor:
                fl = self.floor(case)
                log(f"[bench] {case.describe()}: floor {fl['ms']:.2f} ms = {fl['img_per_s']:.0f} img/s")
            for variant in eager:
                self._log_e2e(log, self.end_to_end(case, variant, "infer"))
            if checkpoint:
                checkpoint(self.report())
            if cfg.kernels:
                for key, op in self.op_cases[case].items():
                    for backend in op_backend_names(op.op):
                        self.kernel(case, key, backend)
                log(f"[bench]   kernels: {len(self.result(case)['kernels'])} timings")
                if checkpoint:
                    checkpoint(self.report())
            log(f"[bench]   {case.name} done in {time.perf_counter() - t0:.0f} s")
        if "train" in cfg.modes:
            eager = [v for v in cfg.variants_for("train") if v != "compile"]
            log("[bench] training steps (forward + EDM loss + backward + AdamW), per workload:")
            for case in cfg.cases_for("train"):
                for variant in eager:
                    self._log_e2e(log, self.end_to_end(case, variant, "train"), case)
                if checkpoint:
                    checkpoint(self.report())
        for mode in cfg.modes:
            if "compile" not in cfg.variants_for(mode):
                continue
            log("[bench] torch.compile of the reference model, per workload" + ("" if mode == "infer" else f" ({mode})") + ":")
            for case in cfg.cases_for(mode):
                self._log_e2e(log, self.end_to_end(case, "compile", mode), case)
                if checkpoint:
                    checkpoint(self.report())
        self.close()
        return self.report()

    @staticmethod
    def _log_e2e(log, r: dict, case: Optional[Case] = None) -> None:
        where = f"{case.name} " if case is not None else ""
        extra = (f"  (first call {r['first_call_s']:.1f} s, {r.get('graph_breaks', 0)} graph breaks)"
                 if r["variant"] == "compile" and "first_call_s" in r else "")
        if r["mode"] == "train":
            where = f"{case.name} B={case.batch} " if case is not None else ""
            if "ms" in r:
                extra += f"  loss {r['loss']:.3g}" + (f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else "")
        log(f"[bench]   {where}{result_key(r['variant'], r['mode']):14s} " + (
            f"{r['img_per_s']:9.1f} img/s  {r['ms']:8.2f} ms" + extra
            if "ms" in r else f"error: {_first_line(Exception(r['error']), 200)}"))

    def close(self) -> None:
        self._train_init = None
        if self._state is not None:
            self._state.close()
            self._state = None

    def report(self) -> dict:
        """The JSON-ready report (targets filled in from what has been measured)."""
        cases = []
        for case, res in self.results.items():
            res = dict(res)
            res["targets"] = _targets(case, res, self.env)
            res["kernel_summary"] = _kernel_summary(res.get("kernels", []))
            cases.append(res)
        return {"schema": SCHEMA_VERSION, "environment": self.env, "config": self.config.to_dict(),
                "limits": self._limits, "cases": cases}


def _targets(case: Case, res: dict, env: dict) -> dict:
    e2e = res.get("end_to_end", {})
    fast = e2e.get("fastlego", {})
    out = {}
    if "frac_floor" in fast:
        out["floor_fraction"] = {"target": FLOOR_TARGET, "value": fast["frac_floor"], "met": fast["frac_floor"] >= FLOOR_TARGET}
    comp = e2e.get("compile", {})
    if "ms" in fast and "ms" in comp:
        value = comp["ms"] / fast["ms"]
        target = COMPILE_TARGETS.get(case.preset)
        out["vs_compile"] = {"target": target, "target_gpu": "H200", "value": value,
                             "met": None if target is None else value >= target,
                             "same_gpu_as_target": bool(env.get("gpu") and "H200" in env["gpu"])}
    ref = e2e.get("reference", {})
    if "ms" in fast and "ms" in ref:
        out["vs_reference_eager"] = {"value": ref["ms"] / fast["ms"]}
    for mine, prefix in (("fastlego", "train"), ("fastlego_graph", "graph_train"),
                         ("fastlego_graph_ckpt", "graph_ckpt_train")):  # training speed-ups
        fast_train = e2e.get(result_key(mine, "train"), {})
        for other in ("reference", "compile"):
            r = e2e.get(result_key(other, "train"), {})
            if "ms" in fast_train and "ms" in r:
                out[f"{prefix}_vs_{other}"] = {"value": r["ms"] / fast_train["ms"]}
    return out


def _kernel_summary(kernels: List[dict]) -> dict:
    """Per call site: each backend's ms, the auto-chosen backend's GB/s, TFLOP/s and fraction of
    the op floor, its speed-up over the reference op, the dispatcher's overhead; forward totals
    (sum of ms x calls per forward)."""
    grouped: Dict[str, List[dict]] = {}
    for k in kernels:
        grouped.setdefault(k["key"], []).append(k)
    by_key: Dict[str, dict] = {}
    for key, rows in grouped.items():
        first = rows[0]
        chosen = first.get("auto_backend") or next((r.get("chosen") for r in rows if r.get("chosen")), None)
        s = by_key[key] = {"op": first.get("op"), "count": first.get("count", 0), "auto_backend": chosen,
                           "extra": first.get("extra", False), "ms": {}, "errors": {}}
        for r in rows:
            if "ms" in r:
                s["ms"][r["backend"]] = r["ms"]
                s.setdefault("floor_ms", r["floor_ms"])
                s.setdefault("bytes", r["bytes"])
                s.setdefault("flops", r["flops"])
                if r["backend"] == chosen:
                    s.update(frac_floor=r["frac_floor"], gbps=r["gbps"], tflops=r["tflops"],
                             rel_err_vs_reference=r.get("rel_err_vs_reference"))
            elif "error" in r:
                s["errors"][r["backend"]] = r["error"]
        if "auto" in s["ms"] and chosen in s["ms"]:
            s["dispatch_overhead_ms"] = s["ms"]["auto"] - s["ms"][chosen]
    totals: Dict[str, dict] = {}  # per kind of kernel inputs (autocast, bf16)
    for key, s in by_key.items():
        total = totals.setdefault(key.rpartition(":")[0], {"reference_ms": 0.0, "auto_backend_ms": 0.0,
                                                             "floor_ms": 0.0, "complete": True})
        ref, chosen = s["ms"].get("reference"), s["ms"].get(s["auto_backend"])
        if ref is not None and chosen is not None:
            s["speedup"] = ref / chosen
        if s["extra"]:
            continue
        if ref is None or chosen is None or "floor_ms" not in s:
            total["complete"] = False
            continue
        total["reference_ms"] += ref * s["count"]
        total["auto_backend_ms"] += chosen * s["count"]
        total["floor_ms"] += s["floor_ms"] * s["count"]
    return {"sites": by_key, "ops": _kernel_roles(by_key), "forward_total": totals}


def _kernel_roles(sites: Dict[str, dict]) -> Dict[str, dict]:
    """Sites of one op role (e.g. modulated_linear.qkv) summed over bricks, weighted by calls per
    forward: ms per forward of the reference op and of the auto-chosen backends, and of the floor;
    GB/s and TFLOP/s of the chosen backends. Extra shapes (count 0) are reported per call."""
    roles: Dict[str, dict] = {}
    for key, s in sites.items():
        kind, _, site = key.rpartition(":")
        role = (f"{kind}:" if kind else "") + site.split(".", 1)[1] + (" (extra, per call)" if s["extra"] else "")
        weight = 1 if s["extra"] else s["count"]
        r = roles.setdefault(role, {"calls": 0, "sites": 0, "backends": [], "reference_ms": 0.0, "auto_ms": 0.0,
                                    "floor_ms": 0.0, "bytes": 0, "flops": 0, "complete": True})
        r["sites"] += 1
        r["calls"] += s["count"]
        if s["auto_backend"] and s["auto_backend"] not in r["backends"]:
            r["backends"].append(s["auto_backend"])
        ref, chosen = s["ms"].get("reference"), s["ms"].get(s["auto_backend"])
        if ref is None or chosen is None or "floor_ms" not in s:
            r["complete"] = False
            continue
        r["reference_ms"] += ref * weight
        r["auto_ms"] += chosen * weight
        r["floor_ms"] += s["floor_ms"] * weight
        r["bytes"] += s["bytes"] * weight
        r["flops"] += s["flops"] * weight
    for r in roles.values():
        if r["auto_ms"] > 0:
            t = r["auto_ms"] * 1e-3
            r.update(speedup=r["reference_ms"] / r["auto_ms"], frac_floor=r["floor_ms"] / r["auto_ms"],
                     gbps=r["bytes"] / t / 1e9, tflops=r["flops"] / t / 1e12)
    return roles


# =============================================================================================
# Output: JSON and the markdown table
# =============================================================================================

RESULTS_HEADER = """# fastlego benchmark results

Appended by `fastlego bench` and `pytest bench/` (`fastlego.benchmark.append_results_markdown`);
the full numbers of each run are in its JSON report. Each run is one dated section:

- **Limits**: the bf16 matrix peak (TFLOP/s of an 8192^3 matmul) and the copy bandwidth (GB/s of
  a large device-to-device copy, read + write), measured in the same run.
- **End to end** (inference, `torch.no_grad()`, TF32 on): `reference` = the reference ops eager
  (`use_backend("reference")`), `compile` = `torch.compile` of that model, `fastlego` = the auto
  backend; these three keep fp32 weights under bf16 autocast, as BASELINE.md did.
  `fastlego_bf16` = the auto backend with weights held in bf16. Random weights (every parameter
  non-zero), random inputs. img/s and ms are medians (CUDA events) of the timed rounds.
  TFLOP/s uses our FLOP count (adaLN once per image); "TFLOP/s rel." uses the release's count
  (adaLN once per region, as BASELINE.md's GFLOP/img), so it compares with BASELINE.md's column.
  "% peak" = TFLOP/s / matrix peak; "% floor" = floor ms / ms; "x compile" = compile ms / ms;
  "err" = relative L2 error against the fp32 reference forward (TF32 off). "peak GiB" = the
  variant's weights + the peak of what its forwards allocate (torch.cuda.max_memory_allocated).
- **Floor** (BASELINE.md "The floor"): every matmul of the forward timed with cuBLAS in bf16 +
  global attention with SDPA + local window attention as its bytes at the copy bandwidth.
  Targets: fastlego >= 80% of the floor; on H200 also >= 1.9x / 1.5x / 1.4x compile on
  S_PG_64 / L_PG_64 / XL_U_32.
- **Kernels**: each dispatched op timed at each call site of the forward, with the arguments
  (shapes, strides, dtypes) the auto forward gives it: `autocast:` rows as in the `fastlego`
  variant (fp32 weights, activations under bf16 autocast), `bf16:` rows as in `fastlego_bf16`.
  Timed: the reference op and the backend `auto` chose (every backend, and the dispatcher's
  overhead, are in the JSON, per site). Here the sites of one op are summed over bricks, each
  weighted by its calls per forward, so "ms" is per forward. Op floor = max(FLOPs / peak,
  minimum bytes / bandwidth); "% floor", GB/s (minimum bytes) and TFLOP/s are the chosen
  backend's. "all ops" should come close to the variant's end-to-end ms. "(extra, per call)"
  rows are shapes not in the model (windows of 16 tokens), timed per call.
- **Training** (`--modes train`; "train step" rows): one step = forward of `EDMPrecond` with every
  brick trained as a denoiser + EDM loss (P_mean -1.2, P_std 1.2, sigma_data 0.5, averaged over
  bricks) + backward + AdamW step, fp32 weights under bf16 autocast, TF32 on; random weights
  (`randomize_` at a small scale), data and labels. Variants `reference`, `fastlego` (auto
  backend; the backends it chose are listed below the tables) and `compile` (`torch.compile` of
  the reference EDMPrecond). TFLOP/s = 3 x the forward's FLOPs over the step time. "peak GiB" =
  everything the variant allocates (weights, gradients, AdamW state, activations). "loss" = the
  first and last timed steps' losses (finite). A failure (out of memory, a crash) is an error row.
"""


def _fmt(v, spec: str = ".1f", missing: str = "-") -> str:
    if v is None:
        return missing
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def results_markdown(report: dict, kernels: bool = True) -> str:
    """The dated section `append_results_markdown` appends."""
    env = report["environment"]
    lim = report.get("limits") or {}
    cfg = report.get("config", {})
    lines = [f"## {env['date']}: {env.get('gpu') or env['device']} ({cfg.get('profile', 'full')} run"
             f"{', interrupted' if report.get('interrupted') else ''})", "",
             f"torch {env['torch']}, CUDA {env.get('cuda')}, triton {env.get('triton')}, flash-attn {env.get('flash_attn')}, "
             f"xformers {env.get('xformers')}; {env['timestamp']}."]
    if lim:
        lines.append(f"Matrix peak {lim['matmul_peak']['tflops']:.1f} TFLOP/s ({lim['matmul_peak']['size']}^3 "
                     f"{lim['matmul_peak']['dtype']}), copy bandwidth {lim['copy_bandwidth']['gbps']:.0f} GB/s.")
    has_train = any(r.get("mode") == "train" for res in report["cases"] for r in res.get("end_to_end", {}).values())
    has_infer = any(r.get("mode", "infer") == "infer" for res in report["cases"] for r in res.get("end_to_end", {}).values())
    if has_infer or not has_train:
        lines += ["", "| preset (batch) | variant | img/s | ms | TFLOP/s (rel.) | % peak | % floor | x compile | peak GiB | err |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in report["cases"]:
        name = f"{res['name']} ({res['case']['batch']})"
        e2e = res.get("end_to_end", {})
        comp = e2e.get("compile", {}).get("ms")
        for variant, r in e2e.items():
            if r.get("mode", "infer") != "infer":
                continue
            if "ms" not in r:
                lines.append(f"| {name} | {variant} | error: {_md_escape(r.get('error', '?'))[:160]} | - | - | - | - | - | - | - |")
                continue
            lines.append(
                f"| {name} | {variant} | {r['img_per_s']:.1f} | {r['ms']:.2f} | {_fmt(r.get('tflops'))} ({_fmt(r.get('tflops_release_count'))}) "
                f"| {_pct(r.get('frac_peak'))} | {_pct(r.get('frac_floor'))} | {_fmt(comp / r['ms'] if comp else None, '.2f')} "
                f"| {_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('rel_err_vs_fp32'), '.1e')} |")
    if has_train:
        lines += _train_markdown(report)
    floor_rows = []
    for res in report["cases"]:
        fl, fp, tg = res.get("floor"), res.get("flops", {}), res.get("targets", {})
        if not fl:
            continue
        ff, vc = tg.get("floor_fraction"), tg.get("vs_compile")
        floor_rows.append(
            f"| {res['name']} ({res['case']['batch']}) | {fl['ms']:.2f} ({fl['matmul_ms']:.2f} / {fl['global_attention_ms']:.2f} / "
            f"{fl['local_attention_ms']:.2f}) | {fl['img_per_s']:,.0f} | {_fmt(fp.get('gflop_per_image'))} ({_fmt(fp.get('gflop_per_image_release'))}) "
            f"| {_pct(ff['value']) if ff else '-'}{' (met)' if ff and ff['met'] else ''} "
            f"| {_fmt(vc['value'], '.2f') if vc else '-'} ({_fmt(vc['target'], '.1f') if vc else '-'}) |")
    if floor_rows:
        lines += ["", "| preset (batch) | floor ms (matmul / global attn / local attn) | floor img/s | GFLOP/img (rel.) | fastlego / floor | x compile (target) |",
                  "| --- | --- | --- | --- | --- | --- |"] + floor_rows
    if kernels and any(res.get("kernel_summary", {}).get("ops") for res in report["cases"]):
        lines += ["", "| preset | op (all bricks) | calls | auto backend | reference ms | auto ms | speed-up | op floor ms | % floor | GB/s | TFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for res in report["cases"]:
            ks = res.get("kernel_summary", {})
            for kind, tot in ks.get("forward_total", {}).items():
                for role, r in ks.get("ops", {}).items():
                    if role.rpartition(":")[0] != kind:
                        continue
                    done = r["auto_ms"] > 0
                    lines.append(
                        f"| {res['name']} | {role}{'' if r['complete'] else ' (incomplete)'} | {r['calls']} | {'/'.join(r['backends']) or '-'} "
                        f"| {_fmt(r['reference_ms'] if done else None, '.3f')} | {_fmt(r['auto_ms'] if done else None, '.3f')} "
                        f"| {_fmt(r.get('speedup'), '.2f')} | {_fmt(r['floor_ms'] if done else None, '.3f')} | {_pct(r.get('frac_floor'))} "
                        f"| {_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('tflops'), '.1f')} |")
                if tot["auto_backend_ms"]:
                    lines.append(f"| {res['name']} | {kind}: all ops{'' if tot['complete'] else ' (incomplete)'} |  |  | "
                                 f"{tot['reference_ms']:.2f} | {tot['auto_backend_ms']:.2f} | {tot['reference_ms'] / tot['auto_backend_ms']:.2f} "
                                 f"| {tot['floor_ms']:.2f} | {_pct(tot['floor_ms'] / tot['auto_backend_ms'])} |  |  |")
    backends = _backend_lines(report)
    if backends:
        lines += [""] + backends
    return "\n".join(lines) + "\n"


def _train_markdown(report: dict) -> List[str]:
    """The training table: one row per (workload, variant) timed in train mode."""
    lines = ["", "| preset (batch), train step | variant | img/s | ms / step | TFLOP/s (rel.) | % peak | x compile "
                 "| peak GiB | loss (first / last) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in report["cases"]:
        name = f"{res['name']} ({res['case']['batch']})"
        e2e = res.get("end_to_end", {})
        comp = e2e.get(result_key("compile", "train"), {}).get("ms")
        for key, r in e2e.items():
            if r.get("mode") != "train":
                continue
            variant = r["variant"]
            if "checkpointed_blocks" in r:
                variant += f" ({r['checkpointed_blocks']} blocks)"
            if "ms" not in r:
                lines.append(f"| {name} | {variant} | error: {_md_escape(r.get('error', '?'))[:160]} | - | - | - | - | - | - |")
                continue
            lines.append(
                f"| {name} | {variant} | {r['img_per_s']:.1f} | {r['ms']:.2f} | {_fmt(r.get('tflops'))} ({_fmt(r.get('tflops_release_count'))}) "
                f"| {_pct(r.get('frac_peak'))} | {_fmt(comp / r['ms'] if comp else None, '.2f')} "
                f"| {_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('loss'), '.3g')} / {_fmt(r.get('loss_last'), '.3g')} |")
    return lines


def _backend_lines(report: dict) -> List[str]:
    out = []
    for res in report["cases"]:
        for mode in ("infer", "train"):
            fast = res.get("end_to_end", {}).get(result_key("fastlego", mode), {})
            chosen = fast.get("backends", {}).get("chosen")
            if chosen:
                desc = ", ".join(f"{op}: " + "/".join(f"{b} x{n}" for b, n in c.items()) for op, c in chosen.items())
                where = res["name"] if mode == "infer" else f"the training step of {res['name']} ({res['case']['batch']})"
                out.append(f"Backends chosen by auto in {where}: {desc}.")
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def append_results_markdown(report: dict, path, kernels: bool = True) -> Path:
    """Append the report's dated section to `path` (created with the table header if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = results_markdown(report, kernels)
    with path.open("a", encoding="utf-8") as f:
        if path.stat().st_size == 0:
            f.write(RESULTS_HEADER)
        f.write("\n" + text)
    return path


def default_json_path(env: dict, root: Optional[Path] = None) -> Path:
    """bench/results/<date>-<gpu>.json (a time suffix is added rather than overwrite)."""
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", env.get("gpu") or env["device"]).strip("-")
    folder = (root or Path.cwd()) / "bench" / "results"
    path = folder / f"{env['date']}-{tag}.json"
    if path.exists():
        path = folder / f"{env['date']}-{tag}-{env['timestamp'][11:19].replace(':', '')}.json"
    return path


def write_json(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _jsonable(v):
    """Plain JSON: non-finite floats as the strings "inf"/"nan", dtypes and paths as strings."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, torch.dtype):
        return _dtype_name(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def output_paths(env: dict, json_path=None, markdown_path=None) -> Tuple[Path, Path]:
    """JSON: the option, else $FASTLEGO_BENCH_JSON, else `default_json_path`; markdown: the
    option, else $FASTLEGO_BENCH_MARKDOWN, else bench/RESULTS.md."""
    jp = Path(json_path or os.environ.get("FASTLEGO_BENCH_JSON") or default_json_path(env))
    mp = Path(markdown_path or os.environ.get("FASTLEGO_BENCH_MARKDOWN") or Path.cwd() / "bench" / "RESULTS.md")
    return jp, mp


def save_report(report: dict, json_path=None, markdown_path=None, markdown: bool = True) -> Tuple[Path, Optional[Path]]:
    """Write the JSON report and append the markdown section (paths: `output_paths`)."""
    jp, mp = output_paths(report["environment"], json_path, markdown_path)
    write_json(report, jp)
    return jp, (append_results_markdown(report, mp) if markdown else None)


# =============================================================================================
# Command line: `fastlego bench` / `python -m fastlego.benchmark`
# =============================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlego bench",
        description="Benchmark fastlego against the reference ops, torch.compile and the floor (BASELINE.md).")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--presets", default=None,
                   help="comma-separated presets, NAME or NAME:BATCH, for every mode (default: inference lego_S_PG_64:256, "
                        "lego_L_PG_64:128, lego_XL_U_32:128; training " + ", ".join(f"{n}:{b}" for n, b in DEFAULT_TRAIN_CASES) + ")")
    p.add_argument("--batch", type=int, default=None, help="batch size for every preset without NAME:BATCH")
    p.add_argument("--depths", default=None, help="comma-separated depth per brick replacing the presets' (smoke tests only)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a full GPU run in about 5 minutes with compile)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes: lego_S_PG_64 at batch 1, 2 repeats (for --device cpu)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    g.add_argument("--compile", action="store_true", help="time torch.compile also on the CPU (skipped there by default)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
    p.add_argument("--no-bf16-weights", action="store_true", help="skip the fastlego_bf16 variant")
    p.add_argument("--checkpoint-blocks", type=int, default=None,
                   help="fastlego_graph_ckpt: checkpoint the first N DiT blocks (default: all)")
    p.add_argument("--modes", default="infer",
                   help=f"comma-separated modes: {','.join(MODES)} (train: forward + EDM loss + backward + AdamW step, "
                        "variants reference, fastlego, compile; the floor and kernels are of infer only)")
    p.add_argument("--autocast", default="bf16", choices=sorted(AUTOCAST_DTYPES), help="autocast dtype (none: fp32)")
    p.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls in full fp32")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-kernel benchmarks")
    p.add_argument("--no-floor", action="store_true", help="skip the floor")
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference forward (errors) and the FLOP count check")
    p.add_argument("--cuda-graphs", action="store_true", help="time kernels as CUDA-graph replays")
    p.add_argument("--kernel-inputs", default=None,
                   help="kernel arguments as the ops get them in: autocast (the fastlego variant), bf16 (fastlego_bf16); "
                        "default both (autocast only with --no-bf16-weights)")
    p.add_argument("--warmup", type=int, default=None, help="end-to-end warm-up rounds")
    p.add_argument("--repeats", type=int, default=None, help="end-to-end timed rounds (median reported)")
    p.add_argument("--iters", type=int, default=None, help="forwards per end-to-end round")
    p.add_argument("--op-repeats", type=int, default=None, help="timed rounds per kernel and floor matmul")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="JSON report path (default $FASTLEGO_BENCH_JSON or bench/results/<date>-<gpu>.json)")
    p.add_argument("--markdown", default=None, help="markdown file to append to (default $FASTLEGO_BENCH_MARKDOWN or bench/RESULTS.md)")
    p.add_argument("--no-markdown", action="store_true", help="do not append to a markdown file")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = BenchConfig.for_mode(quick=args.quick, tiny=args.tiny, device=device, seed=args.seed,
                               warmup=args.warmup, repeats=args.repeats, iters=args.iters, op_repeats=args.op_repeats,
                               compile_mode=args.compile_mode, json_path=args.json, markdown_path=args.markdown)
    if args.presets:
        cfg.cases = parse_cases(args.presets, args.batch)
        cfg.train_cases = None  # the train mode runs the named workloads too
    elif args.batch:
        cfg.cases = [dataclasses.replace(c, batch=args.batch) for c in cfg.cases]
        if cfg.train_cases is not None:
            cfg.train_cases = list(dict.fromkeys(dataclasses.replace(c, batch=args.batch) for c in cfg.train_cases))
    if args.depths:
        cfg.cases = [with_depths(c, args.depths.split(",")) for c in cfg.cases]
        if cfg.train_cases is not None:
            cfg.train_cases = [with_depths(c, args.depths.split(",")) for c in cfg.train_cases]
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else list(DEFAULT_VARIANTS)
    skip_compile = args.no_compile or (not device.startswith("cuda") and not args.compile)
    if skip_compile:
        variants = [v for v in variants if v != "compile"]
    if not device.startswith("cuda") and not args.variants:  # CUDA graphs are CUDA's
        variants = [v for v in variants if v not in GRAPH_VARIANTS]
    if args.no_bf16_weights:
        variants = [v for v in variants if v != "fastlego_bf16"]
    cfg.variants = tuple(variants)
    cfg.checkpoint_blocks = args.checkpoint_blocks
    cfg.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    cfg.autocast_dtype = AUTOCAST_DTYPES[args.autocast]
    cfg.tf32 = not args.no_tf32
    cfg.kernels, cfg.floor, cfg.check = not args.no_kernels, not args.no_floor, not args.no_check
    cfg.cuda_graphs = args.cuda_graphs
    if args.kernel_inputs:
        cfg.kernel_inputs = tuple(k.strip() for k in args.kernel_inputs.split(",") if k.strip())
    elif "fastlego_bf16" not in cfg.variants:
        cfg.kernel_inputs = ("autocast",)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`fastlego bench [options]`: run, write the JSON report, append the markdown table."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        session = BenchSession(cfg)
    except (ValueError, RuntimeError) as exc:
        print(f"fastlego bench: {exc}", file=sys.stderr)
        return 2
    if cfg.modes == ("infer",):
        print(f"[bench] {len(cfg.cases)} workload(s): " + "; ".join(c.describe() for c in cfg.cases)
              + f" | variants {', '.join(cfg.variants)} | {cfg.profile} run on {cfg.device}", flush=True)
    else:
        for mode in cfg.modes:
            cases = cfg.cases_for(mode)
            print(f"[bench] {mode}: {len(cases)} workload(s): " + "; ".join(c.describe() for c in cases)
                  + f" | variants {', '.join(cfg.variants_for(mode))} | {cfg.profile} run on {cfg.device}", flush=True)
    t0 = time.perf_counter()
    jp, _ = output_paths(session.env, cfg.json_path, cfg.markdown_path)
    # SIGTERM (e.g. `timeout`) ends the run like Ctrl-C: what was measured is still saved
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    interrupted = None
    try:
        report = session.run(log=lambda s: print(s, flush=True), checkpoint=lambda r: write_json(r, jp))
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "KeyboardInterrupt"
        session.close()
        report = session.report()
        report["interrupted"] = interrupted
        print(f"[bench] interrupted ({interrupted}): saving what was measured", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    report["wall_s"] = time.perf_counter() - t0
    jp, mp = save_report(report, jp, cfg.markdown_path, markdown=not args.no_markdown)
    print(results_markdown(report))
    print(f"[bench] JSON report: {jp}" + (f"; markdown appended to {mp}" if mp else "")
          + f"; {report['wall_s']:.0f} s in all", flush=True)
    return 130 if interrupted else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
