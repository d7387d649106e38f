"""Where a small-batch inference call spends its time, on one CUDA GPU: host (Python, dispatch,
launch) against GPU (kernels).

    python3 bench/profile_small_batch.py [--cases lego_S_PG_64:1,lego_L_PG_64:1,...] [--out DIR]

For each workload (the bench's inference model: random non-zero fp32 weights under bf16 autocast,
auto backend, tuned first as `fastlego sample` does), in each weight-cast setting (casting every
weight at every call, and `fastlego.frozen_weights()`, the cast made once):
- the eager call's time and the same call replayed as a CUDA graph (`fastlego.benchmark.measure`);
- the GPU busy time of one eager call (sum of its kernels' times, torch.profiler) and the number
  of kernels it launches, so host overhead = eager time - GPU busy time;
- the Python functions that take the host's time in one eager call (cProfile, by own time),
  written with the full kernel list to DIR/small_batch_*.txt;
- the release-style model eager (`use_backend('reference')`) for the same call, as the
  yardstick eager fastlego must not lose to;
- with `--per-op`: the host cost of each op call of one eager forward (us to enqueue it, the GPU
  never waited on), taken four ways: through the dispatcher (`dispatch.call`), the chosen backend
  called directly (its launcher with its checks), the reference twin, and for scale one empty
  Triton launch and one PyTorch elementwise op.
Profiling, not a benchmark: the timed comparisons live in `fastlego bench --mode latency`."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import collections
import io
import json
import os
import pstats
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlego import dispatch, frozen_weights, tune  # noqa: E402
from fastlego.benchmark import build_model, host_us, make_inputs, measure, parse_cases, precision  # noqa: E402

DEFAULT_CASES = "lego_S_PG_64:1,lego_S_PG_64:16,lego_L_PG_64:1,lego_L_PG_64:16"


def gpu_profile(call, dev):
    """(GPU busy ms, kernel count, [(kernel name, ms, calls)]) of one call."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(dev)
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name][0] += ev.device_time / 1e3
            kernels[ev.name][1] += 1
    rows = sorted(((k, v[0], v[1]) for k, v in kernels.items()), key=lambda r: -r[1])
    return sum(r[1] for r in rows), sum(r[2] for r in rows), rows


def host_profile(call, top: int = 25) -> str:
    """cProfile of one call: the functions with the most own time."""
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def time_ms(fn, dev, rounds: int, cuda_graph: bool = False) -> float:
    """Median ms of one call (one call per timed round; `cuda_graph`: the call replayed as a graph)."""
    return measure(fn, device=dev, rounds=rounds, warmup=3, inner=1, cuda_graph=cuda_graph).median_ms


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    """Does nothing: its launch is the cost of any Triton launch (the yardstick of per-op costs)."""
    pass


def per_op_host_costs(model, inputs, dev) -> dict:
    """Host us per op call of one eager forward, by op and shape: dispatcher, backend, reference."""
    from fastlego import reference

    calls = []
    with dispatch.record(on_call=lambda d, a, k: calls.append((d, a, k))):
        model(*inputs)
    rows, seen = [], set()
    for decision, args, kwargs in calls:
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        key = (decision.op, decision.chosen, shapes)
        if key in seen:
            continue
        seen.add(key)
        backend = next(b for b in dispatch.backends(decision.op) if b.name == decision.chosen)
        ref = getattr(reference, decision.op)
        rows.append({"op": decision.op, "backend": decision.chosen, "shapes": shapes,
                     "calls": sum(1 for d, a, k in calls if (d.op, d.chosen) == key[:2]
                                  and tuple(tuple(x.shape) for x in a if isinstance(x, torch.Tensor)) == shapes),
                     "dispatch_us": host_us(lambda: dispatch.call(decision.op, *args, **kwargs), dev),
                     "backend_us": host_us(lambda: backend(*args, **kwargs), dev),
                     "reference_us": host_us(lambda: ref(*args, **kwargs), dev)})
    x = torch.zeros(1024, device=dev)
    y = torch.zeros(1024, device=dev)
    scale = {"empty_triton_launch_us": host_us(lambda: _empty_kernel[(1,)](x, 1024, BLOCK=128), dev),
             "torch_add_us": host_us(lambda: torch.add(x, 1.0, out=y), dev),
             "op_calls_per_forward": len(calls)}
    return {"ops": rows, **scale}


def profile_case(case, dev, rounds: int, out_dir: str, per_op: bool = False) -> dict:
    model = build_model(case, dev)
    inputs = make_inputs(case, dev)
    res = {"case": case.describe()}
    with torch.no_grad(), precision(dev, torch.bfloat16), torch.autocast("cuda", dtype=torch.bfloat16,
                                                                           cache_enabled=False):
        with dispatch.use_backend("reference"):
            res["reference_eager_ms"] = time_ms(lambda: model(*inputs), dev, rounds)
        for cached in (False, True):
            tag = "frozen" if cached else "cast_each_call"
            with frozen_weights() if cached else contextlib.nullcontext():
                tune(model, *inputs)
                eager = lambda: model(*inputs)   # noqa: E731
                r = {"eager_ms": time_ms(eager, dev, rounds)}
                busy, launches, kernels = gpu_profile(eager, dev)
                r.update(gpu_busy_ms=busy, kernels=launches, host_overhead_ms=r["eager_ms"] - busy)
                text = host_profile(eager)
                r["graph_ms"] = time_ms(eager, dev, rounds, cuda_graph=True)
                if per_op and cached:
                    r["per_op"] = per_op_host_costs(model, inputs, dev)
            res[tag] = r
            name = f"small_batch_{case.preset}_B{case.batch}_{tag}.txt"
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(f"{case.describe()} {tag}: {json.dumps(r)}\n\nkernels (name, ms, calls):\n")
                f.writelines(f"{ms:9.4f} {n:5d}  {k}\n" for k, ms, n in kernels)
                f.write("\nhost, one eager call (cProfile, own time):\n" + text)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"preset:batch,... (default {DEFAULT_CASES})")
    ap.add_argument("--rounds", type=int, default=30, help="timed calls per figure (default 30)")
    ap.add_argument("--per-op", action="store_true", help="also time each op call's host cost (see above)")
    ap.add_argument("--out", default=".", help="folder for the full profiles and small_batch.json (default .)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_small_batch: needs a CUDA GPU (it profiles kernels and CUDA graphs)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    results = []
    print(f"{'workload':24} {'cast':>14} {'ref eager':>9} {'eager':>8} {'GPU busy':>8} {'host':>8} {'kernels':>7} "
          f"{'graph':>8}   (ms per call)")
    for case in parse_cases(args.cases):
        res = profile_case(case, dev, args.rounds, args.out, per_op=args.per_op)
        results.append(res)
        for tag in ("cast_each_call", "frozen"):
            r = res[tag]
            print(f"{case.preset + ' B=' + str(case.batch):24} {tag:>14} {res['reference_eager_ms']:9.2f} "
                  f"{r['eager_ms']:8.2f} {r['gpu_busy_ms']:8.2f} {r['host_overhead_ms']:8.2f} {r['kernels']:7d} "
                  f"{r['graph_ms']:8.3f}")
    for res in results if args.per_op else ():
        p = res["frozen"]["per_op"]
        print(f"\n{res['case']}: {p['op_calls_per_forward']} op calls; empty Triton launch "
              f"{p['empty_triton_launch_us']:.1f} us, torch.add {p['torch_add_us']:.1f} us (host us per call)")
        print(f"{'op':24} {'backend':9} {'calls':>5} {'dispatch':>8} {'backend':>8} {'reference':>9}  shapes")
        for r in p["ops"]:
            print(f"{r['op']:24} {r['backend']:9} {r['calls']:5d} {r['dispatch_us']:8.1f} {r['backend_us']:8.1f} "
                  f"{r['reference_us']:9.1f}  {r['shapes']}")
    with open(os.path.join(args.out, "small_batch.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "results": results}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
