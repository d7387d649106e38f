"""Where a fastlego training step spends its time and memory, on one CUDA GPU.

    python3 bench/profile_train.py lego_S_PG_64:64,lego_L_PG_64:128 [--out DIR] [--steps 2]

For each workload (the bench's training step: EDMPrecond with every brick trained, EDM loss,
backward, AdamW; bf16 autocast, fp32 weights, TF32 on, random non-zero weights):
- the eager step's time (CUDA events around each step, `fastlego.benchmark.measure`: the gaps
  a host-bound step leaves on the GPU count) and the GPU time its kernels take (torch.profiler),
  so host overhead = step time - GPU busy time;
- the same step captured as one CUDA graph (`fastlego.training.TrainStep`): its time;
- the kernels grouped by family (GEMM, attention, each Triton kernel, elementwise, optimizer),
  ms per step and calls per step; the top kernels by time;
- memory: bytes held after the forward (what the backward needs) and the step's peak, both
  above the weights + gradients + optimizer state; what is alive at the peak of the eager step
  and of the graph's capture (whose peak the graph's private pool keeps), by allocation site.
Prints a short table per workload and writes the full kernel lists to DIR/profile_*.txt.
Profiling, not a benchmark: the timed comparisons live in `fastlego bench --modes train`."""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlego import dispatch  # noqa: E402
from fastlego.benchmark import (GIB, STEP_BUILDERS, build_train_net, make_train_inputs,  # noqa: E402
                                measure, parse_cases, precision)

FAMILIES = (  # first match wins; kernel names of cuBLAS / Triton / PyTorch on Hopper
    ("window attention (triton)", ("_packed_window", "window_attention")),
    ("flash/sdpa attention", ("sdpa", "cudnn", "flash", "fmha", "attention_kernel", "efficient_attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "wgmma", "splitk", "_modulated_linear", "_linear_gated")),
    ("layernorm_modulate (triton)", ("_layernorm_modulate",)),
    ("gated_residual_backward (triton)", ("_gated_residual",)),
    ("gelu_tanh_backward (triton)", ("_gelu_tanh_backward",)),
    ("brick_embed (triton)", ("_brick_embed",)),
    ("final_layer (triton)", ("_final",)),
    ("row stats (triton)", ("_row_stats", "_stats")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("reduce", ("reduce_kernel", "reduce")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "fill", "cat", "index")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def make_step(case, dev, cuda_graph: bool, record: Optional[dict] = None):
    """The bench's training step (`STEP_BUILDERS["train"]`: auto backend, bf16 autocast, fused
    AdamW) on a fresh network -> (network, its TrainStep, inputs). With `record`, hooks on the
    network note the bytes allocated before and after the first forward since `record` was
    last cleared."""
    net = build_train_net(case, dev)
    inputs = make_train_inputs(case, dev)
    if record is not None:   # the hooks return None: a value returned would replace the inputs / output
        def note(key):
            def hook(*_):
                record.setdefault(key, torch.cuda.memory_allocated(dev))
            return hook
        net.register_forward_pre_hook(note("before_forward"))
        net.register_forward_hook(note("after_forward"))
    step = STEP_BUILDERS["train"](net, inputs, "auto", dev, torch.bfloat16, cuda_graph=cuda_graph)
    return net, step.train_step, inputs


def step_ms(run, inputs, dev, n: int) -> float:
    """Median ms of one step `run(*inputs)` over n timed steps after one warm-up step."""
    return measure(run, [inputs], device=dev, rounds=n, warmup=1, inner=1).median_ms


def _where(frames) -> str:
    """The innermost fastlego (else the innermost Python) frame of an allocation's stack."""
    for f in frames:
        if "fastlego" in f.get("filename", ""):
            return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
    return "?"


def memory_at_peak(run, inputs, dev, top: int = 14):
    """One step under the allocator's history: the peak of the bytes allocated during the step
    (above what was held before it), and what was alive at that moment, by allocation site."""
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated(dev)
    torch.cuda.memory._record_memory_history(max_entries=400000, stacks="python")
    run(*inputs)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][dev.index or 0]
    live, total, peak, at_peak = {}, 0, 0, {}
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    sites = collections.defaultdict(lambda: [0, 0])
    for size, frames in at_peak.values():
        key = _where(frames)
        sites[key][0] += size
        sites[key][1] += 1
    rows = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return held, peak, rows


def profile_case(case, dev, steps: int, out_dir: str) -> dict:
    res = {"case": case.describe()}
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    record: dict = {}
    net, run, inputs = make_step(case, dev, False, record)
    weights = torch.cuda.memory_allocated(dev) - base
    for _ in range(3):
        run(*inputs)
    torch.cuda.synchronize()
    state = torch.cuda.memory_allocated(dev) - base          # weights + grads + AdamW state (+ inputs)
    record.clear()
    torch.cuda.reset_peak_memory_stats(dev)
    run(*inputs)
    torch.cuda.synchronize()
    res["weights_gib"] = weights / GIB
    res["state_gib"] = state / GIB
    res["saved_gib"] = (record["after_forward"] - record["before_forward"]) / GIB
    res["peak_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / GIB
    res["eager_ms"] = step_ms(run, inputs, dev, 5)
    held, peak, sites = memory_at_peak(run, inputs, dev)
    res["memory"] = {"held_gib": (held - base) / GIB, "step_peak_gib": peak / GIB,
                     "sites": [(k, v[0] / GIB, v[1]) for k, v in sites]}
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            run(*inputs)
        torch.cuda.synchronize()
    ops = []   # aten ops by the device time of the kernels they launched, with their input shapes
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key.startswith("aten::") and evt.device_type.name == "CPU":
            t = getattr(evt, "self_device_time_total", 0) or 0
            if t > 0:
                ops.append((t / 1e3 / steps, evt.count / steps, evt.key, str(evt.input_shapes)[:150]))
    ops.sort(reverse=True)
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        if evt.device_type.name == "CPU" or "#" in evt.key:   # "Optimizer.step#AdamW.step": an annotation's span
            continue
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = evt.self_cuda_time_total
        if t <= 0:
            continue
        kernels[evt.key][0] += t / 1e3 / steps
        kernels[evt.key][1] += evt.count / steps
    res["gpu_ms"] = sum(v[0] for v in kernels.values())
    fams = collections.defaultdict(lambda: [0.0, 0])
    for name, (ms, n) in kernels.items():
        f = family(name)
        fams[f][0] += ms
        fams[f][1] += n
    res["families"] = dict(sorted(fams.items(), key=lambda kv: -kv[1][0]))
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    with open(os.path.join(out_dir, f"profile_{case.preset}_{case.batch}.txt"), "w") as f:
        f.write(f"{case.describe()}: eager {res['eager_ms']:.2f} ms/step, GPU kernels {res['gpu_ms']:.2f} ms/step\n")
        for name, (ms, n) in top:
            f.write(f"{ms:9.3f} ms {n:7.1f} calls  [{family(name)}] {name[:200]}\n")
        f.write("\naten ops by their kernels' device time (self), with input shapes:\n")
        for ms, n, key, shapes in ops[:60]:
            f.write(f"{ms:9.3f} ms {n:7.1f} calls  {key} {shapes}\n")
    res["top"] = [(name[:90], ms, n) for name, (ms, n) in top[:12]]
    del net, run, inputs
    torch.cuda.empty_cache()
    net, run, inputs = make_step(case, dev, True)
    for _ in range(run.warmup):                      # eager warm-up steps on a side stream
        run(*inputs)
    held, peak, sites = memory_at_peak(run, inputs, dev)  # the capture (its allocations stay in the graph's pool)
    res["capture_memory"] = {"held_gib": (held - base) / GIB, "step_peak_gib": peak / GIB,
                             "sites": [(k, v[0] / GIB, v[1]) for k, v in sites]}
    run(*inputs)
    res["captured"] = run.captured
    res["graph_ms"] = step_ms(run, inputs, dev, 10)
    del net, run, inputs
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", help="PRESET:BATCH,...")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    rows = []
    with precision(dev, True), dispatch.use_backend("auto"):
        for case in parse_cases(args.cases):
            try:
                r = profile_case(case, dev, args.steps, args.out)
            except Exception as exc:  # report and go on
                print(f"{case.describe()}: {type(exc).__name__}: {exc}")
                continue
            rows.append(r)
            print(f"\n== {r['case']}: eager {r['eager_ms']:.2f} ms (GPU kernels {r['gpu_ms']:.2f} ms), "
                  f"graph {r['graph_ms']:.2f} ms (captured {r['captured']}); memory GiB: weights {r['weights_gib']:.2f}, "
                  f"weights+grads+adam {r['state_gib']:.2f}, saved by forward {r['saved_gib']:.2f}, peak {r['peak_gib']:.2f}")
            for what, m in (("eager step", r["memory"]), ("graph capture", r["capture_memory"])):
                print(f"   memory, {what}: held before it {m['held_gib']:.2f} GiB, its own peak {m['step_peak_gib']:.2f} GiB;"
                      f" alive at that peak, by allocation site:")
                for where, gib, n in m["sites"]:
                    print(f"      {gib:7.3f} GiB {n:5d}x {where}")
            for fam, (ms, n) in r["families"].items():
                print(f"   {fam:34s} {ms:8.2f} ms {n:7.0f} calls")
            for name, ms, n in r["top"]:
                print(f"   {ms:8.3f} ms {n:6.0f}x {name}")
    print("\n| workload | eager ms | GPU ms | graph ms | saved GiB | peak GiB |")
    for r in rows:
        print(f"| {r['case']} | {r['eager_ms']:.1f} | {r['gpu_ms']:.1f} | {r['graph_ms']:.1f} | "
              f"{r['saved_gib']:.2f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
