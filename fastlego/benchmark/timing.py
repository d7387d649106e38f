"""The one timer of the benchmarks: `measure`, and what it is built from.

Every timing in `fastlego bench`, `pytest bench/` and the scripts of bench/ goes through
`measure`: rounds of calls between two CUDA events (a perf_counter pair on the CPU), each round
ending with a sync, the median round reported per call. A `Runner` decides how the rounds are
driven: a plain loop by default, pytest-benchmark's `benchmark.pedantic` under `pytest bench/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .environment import l2_bytes

# A runner calls `target` (one timed round) `warmup + rounds` times.
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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(body: Callable[[], None], device: torch.device):
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
            sync(device)
            t0 = time.perf_counter()
            fn(*arg_sets[0])
            sync(device)
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
                graph = capture_graph(body, device)
                run_round = graph.replay
            except Exception as exc:  # e.g. an op that syncs: time it eagerly instead
                note = f"CUDA graph capture failed, timed eagerly ({type(exc).__name__}: {first_line(exc)})"
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


def time_once(fn: Callable[[], Any], device) -> Tuple[Any, float]:
    """(fn(), seconds) of one call, synced: a first call's cost (compilation, autotuning)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def host_us(fn: Callable[[], Any], device, calls: int = 50, rounds: int = 5) -> float:
    """The host's cost of a call: median over `rounds` of the us per call to enqueue `calls` calls,
    the device idle at each round's start (synced before and after, outside the timed span), so
    that no call waits on the GPU unless the launch queue fills. For small-batch work where the
    host, not the GPU, sets the time."""
    device = torch.device(device)
    fn()
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        sync(device)
    return statistics.median(times)


def copies_for(nbytes: int, device: torch.device, cap: int = 16) -> int:
    """How many input sets to rotate through so their total is >= 3x the L2 cache."""
    l2 = l2_bytes(device)
    if l2 == 0 or nbytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(3 * l2 / nbytes)))


def free_memory(device: torch.device, collect: bool = True) -> None:
    """Return freed memory to the device between large pieces (gc.collect is slow: not per kernel)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:limit]


def failure_text(exc: BaseException, limit: int = 2000) -> str:
    """How a failed measurement is recorded in a report: "Type: message", truncated."""
    return f"{type(exc).__name__}: {str(exc).strip()}"[:limit]
