"""FP8 GEMMs at the model's shapes: `torch._scaled_mm` and the Triton FP8 GEMM against bf16 cuBLAS
(GPU only: a CUDA GPU with FP8 tensor cores, compute capability 8.9 or later).

    python3 bench/fp8_gemm.py [--presets lego_S_PG_64,lego_L_PG_64,lego_XL_U_32] [--batch B]
                              [--json OUT] [--eager]

For every DiT-block Linear (qkv D->3D, proj D->D, fc1 D->4D, fc2 4D->D) of every brick of each
preset at its bench batch (`--batch` overrides it; M = batch x tokens of the brick), the paths:

  bf16            F.linear on bf16 x, W and bias (cuBLAS)
  scaled_mm       fastlego.fp8.fp8_linear_scaled_mm: torch._scaled_mm, row-wise scales, bf16 bias
                  and output, precise accumulation (what FP8 inference runs now)
  scaled_mm_fast  the same with use_fast_accum=True (tensor-core accumulation only)
  triton          fastlego.kernels.fp8_linear.fp8_linear, autotuned (warmed up before timing),
                  precise accumulation
  triton_fast     the same with fast_accum=True

Each timing is the median of CUDA-event-timed rounds (fastlego.benchmark.measure), inputs rotated
so that they are not served from L2, each round one CUDA graph of the calls (the GPU's time, not
Python's launch overhead; `--eager` times plain calls). Rows: ms, TFLOP/s, share of the peak
measured in the run (FP8 rows: the faster of two 8192^3 row-scaled _scaled_mm; bf16: an 8192^3
bf16 matmul, fastlego.benchmark.measure_matmul_peak), speed-up over bf16, the tile config the
autotuner chose, and the max error relative to the largest output on the first rows (FP8 paths
against fastlego.fp8.fp8_linear_reference, bf16 against fp32 F.linear of the same bf16 inputs).
Then per preset the four Linears' time of one forward (each shape times its count of blocks).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastlego import fp8  # noqa: E402
from fastlego.benchmark import DEFAULT_CASES, default_case, environment, forward_matmuls, measure  # noqa: E402
from fastlego.benchmark import measure_matmul_peak, write_json  # noqa: E402
from fastlego.benchmark.timing import copies_for, failure_text, free_memory  # noqa: E402
from fastlego.kernels import fp8_linear as FL  # noqa: E402
from fastlego.kernels.policy import tf32  # noqa: E402

LINEARS = ("qkv", "proj", "fc1", "fc2")
PATHS = ("bf16", "scaled_mm", "scaled_mm_fast", "triton", "triton_fast")
FP8_PATHS = PATHS[1:]
ERROR_ROWS = 4096   # rows checked against the reference


def refusal(device: str) -> Optional[str]:
    """Why this machine cannot run the benchmark (None: it can)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: this benchmark times compiled kernels on a GPU; run it without the interpreter"
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"--device {device}: this benchmark times FP8 GEMMs on a CUDA GPU; pass --device cuda"
    if not torch.cuda.is_available():
        return ("no CUDA GPU here: this benchmark needs one with FP8 tensor cores (compute capability 8.9 or "
                "later: Ada, Hopper, Blackwell)")
    reasons = FL.capability_reasons(dev) + fp8.scaled_mm_not_supported_reasons(dev, 16, 16)
    return "; ".join(dict.fromkeys(reasons)) or None


def model_shapes(preset: str, batch: Optional[int]) -> List[dict]:
    """The distinct (Linear, M, K, N) of a preset's DiT blocks, with how many blocks run each."""
    case = default_case(preset, batch)
    shapes: Dict[tuple, dict] = {}
    for mm in forward_matmuls(case):
        brick, _, linear = mm.name.partition(".")
        if not brick.startswith("b") or linear not in LINEARS:
            continue
        key = (linear, mm.m, mm.k, mm.n)
        row = shapes.setdefault(key, dict(preset=preset, batch=case.batch, linear=linear, M=mm.m, K=mm.k, N=mm.n,
                                          count=0))
        row["count"] += mm.count
    return list(shapes.values())


def scaled_mm_fast(x_q, x_scale, w_q, w_scale, bias):
    """torch._scaled_mm with row-wise scales and use_fast_accum=True, bf16 bias and output."""
    K, N = w_q.shape[1], w_q.shape[0]
    return torch._scaled_mm(x_q.reshape(-1, K), w_q.t(), scale_a=x_scale.reshape(-1, 1), scale_b=w_scale.reshape(1, N),
                            bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)


def fp8_peak(device, size: int, rounds: int, warmup: int) -> dict:
    """TFLOP/s of a size^3 _scaled_mm with row-wise scales, precise and fast accumulation; the
    faster is the FP8 peak of this run."""
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(size, size, device=device, generator=g)
    b = torch.randn(size, size, device=device, generator=g)
    a_q, a_s = fp8.quantize_rows(a)
    b_q, b_s = fp8.quantize_weight(b)
    del a, b
    out = {"size": size}
    for name, fast in (("precise", False), ("fast", True)):
        fn = lambda fast=fast: torch._scaled_mm(a_q, b_q.t(), scale_a=a_s[:, None], scale_b=b_s[None, :],  # noqa: E731
                                                out_dtype=torch.bfloat16, use_fast_accum=fast)
        t = measure(fn, device=device, rounds=rounds, warmup=warmup, inner=1)
        out[f"{name}_ms"] = t.median_ms
        out[f"{name}_tflops"] = 2 * size ** 3 / (t.median_ms * 1e-3) / 1e12
    out["tflops"] = max(out["precise_tflops"], out["fast_tflops"])
    return out


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench_shape(shape: dict, device, args, peaks: dict) -> List[dict]:
    """Every path at one shape: a result row per path (or the error that stopped it)."""
    M, K, N = shape["M"], shape["K"], shape["N"]
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(N, K, device=device, generator=g) / K ** 0.5
    bias = (torch.randn(N, device=device, generator=g) * 0.1).to(torch.bfloat16)
    w_bf16, (w_q, w_scale) = w.to(torch.bfloat16), fp8.quantize_weight(w)
    del w
    copies = copies_for(M * K * 2 + M * N * 2, device)
    xs = [torch.randn(M, K, device=device, generator=g).to(torch.bfloat16) for _ in range(copies)]
    qs = [fp8.quantize_rows(x) for x in xs]

    calls: Dict[str, tuple] = {
        "bf16": (lambda x: F.linear(x, w_bf16, bias), [(x,) for x in xs]),
        "scaled_mm": (lambda xq, xs_: fp8.fp8_linear_scaled_mm(xq, xs_, w_q, w_scale, bias), qs),
        "scaled_mm_fast": (lambda xq, xs_: scaled_mm_fast(xq, xs_, w_q, w_scale, bias), qs),
        "triton": (lambda xq, xs_: FL.fp8_linear(xq, xs_, w_q, w_scale, bias), qs),
        "triton_fast": (lambda xq, xs_: FL.fp8_linear(xq, xs_, w_q, w_scale, bias, fast_accum=True), qs),
    }
    flops = 2 * M * K * N
    rows = []
    r = min(M, ERROR_ROWS)
    with tf32(False):
        ref_fp8 = fp8.fp8_linear_reference(qs[0][0][:r], qs[0][1][:r], w_q, w_scale, bias, torch.float32)
        ref_bf16 = F.linear(xs[0][:r].float(), w_bf16.float(), bias.float())
    for path in PATHS:
        if args.paths and path not in args.paths:
            continue
        fn, arg_sets = calls[path]
        row = dict(shape, path=path)
        try:
            y = fn(*arg_sets[0])   # the first call: autotuning for the Triton paths
            torch.cuda.synchronize(device)
            row["rel_err"] = rel_error(y[:r], ref_bf16 if path == "bf16" else ref_fp8)
            if path.startswith("triton"):
                best = getattr(FL._fp8_linear_tuned, "best_config", None)
                row["config"] = str(best) if best is not None else None
            del y
            t = measure(fn, arg_sets, device=device, rounds=args.rounds, warmup=args.warmup,
                        min_round_ms=args.min_round_ms, cuda_graph=not args.eager)
            peak = peaks["bf16"]["tflops"] if path == "bf16" else peaks["fp8"]["tflops"]
            tflops = flops / (t.median_ms * 1e-3) / 1e12
            row.update(ms=t.median_ms, tflops=tflops, of_peak=tflops / peak, timing=t.to_dict())
        except Exception as exc:  # noqa: BLE001 - a path that cannot run this shape: say why, go on
            row["error"] = failure_text(exc)
        rows.append(row)
    base = next((x["ms"] for x in rows if x["path"] == "bf16" and "ms" in x), None)
    for row in rows:
        if base is not None and "ms" in row:
            row["speedup_vs_bf16"] = base / row["ms"]
    del xs, qs, calls
    free_memory(torch.device(device))
    return rows


def totals(rows: List[dict]) -> List[dict]:
    """Per preset and path: the four Linears' ms of one forward (each shape's ms x its count)."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        entry = {"preset": preset, "batch": mine[0]["batch"]}
        for path in PATHS:
            timed = [r for r in mine if r["path"] == path]
            if timed and all("ms" in r for r in timed):
                entry[path] = sum(r["ms"] * r["count"] for r in timed)
        if "bf16" in entry:
            for path in FP8_PATHS:
                if path in entry:
                    entry[f"{path}_speedup"] = entry["bf16"] / entry[path]
        out.append(entry)
    return out


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_tables(rows: List[dict], sums: List[dict]) -> None:
    print("\n| preset (batch) | linear | M x K x N | blocks | path | ms | TFLOP/s | of peak | vs bf16 | rel err "
          "| config |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} ({r['batch']}) | {r['linear']} | {r['M']}x{r['K']}x{r['N']} | {r['count']} | "
                  f"{r['path']} | error: {r['error'][:120]} | | | | | |")
            continue
        print(f"| {r['preset']} ({r['batch']}) | {r['linear']} | {r['M']}x{r['K']}x{r['N']} | {r['count']} | "
              f"{r['path']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['of_peak']:.2f} | "
              f"{fmt(r.get('speedup_vs_bf16'), '.2f')}x | {r['rel_err']:.1e} | {r.get('config') or ''} |")
    print("\nThe four Linears of one forward, ms (speed-up over bf16):\n")
    print("| preset (batch) | " + " | ".join(PATHS) + " |")
    print("| --- |" + " --- |" * len(PATHS))
    for s in sums:
        cells = [fmt(s.get(p)) + (f" ({s[p + '_speedup']:.2f}x)" if p + "_speedup" in s else "") for p in PATHS]
        print(f"| {s['preset']} ({s['batch']}) | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="a CUDA device with FP8 tensor cores (default cuda)")
    ap.add_argument("--presets", default=",".join(name for name, *_ in DEFAULT_CASES),
                    help="comma-separated presets (default: the three bench workloads)")
    ap.add_argument("--batch", type=int, default=None, help="batch for every preset (default: each one's bench batch)")
    ap.add_argument("--paths", default=None, help=f"comma-separated subset of {','.join(PATHS)} (default: all)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-round-ms", type=float, default=2.0, help="calls per timed round: enough to fill this")
    ap.add_argument("--peak-size", type=int, default=8192, help="size of the square GEMMs timed as the peaks")
    ap.add_argument("--eager", action="store_true", help="time plain calls (with Python launch overhead), "
                                                         "not CUDA graphs of them")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON to OUT")
    args = ap.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p] if args.paths else None
    bad = [p for p in args.paths or [] if p not in PATHS]
    if bad:
        ap.error(f"unknown path(s) {bad}: expected some of {', '.join(PATHS)}")
    why = refusal(args.device)
    if why:
        print(f"fp8_gemm.py cannot run here: {why}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.index is not None:
        torch.cuda.set_device(device)
    env = environment(str(device))
    print(f"{env['gpu']} (capability {env['capability']}), torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, {env['timestamp']}; timed {'eagerly' if args.eager else 'as CUDA graphs'}")
    peaks = {"bf16": measure_matmul_peak(device, args.peak_size, torch.bfloat16),
             "fp8": fp8_peak(device, args.peak_size, 20, 3)}
    print(f"peaks ({args.peak_size}^3): bf16 {peaks['bf16']['tflops']:.0f} TFLOP/s; FP8 _scaled_mm "
          f"{peaks['fp8']['precise_tflops']:.0f} (precise) / {peaks['fp8']['fast_tflops']:.0f} (fast accum) TFLOP/s")
    rows: List[dict] = []
    for preset in [p for p in args.presets.split(",") if p]:
        for shape in model_shapes(preset, args.batch):
            done = bench_shape(shape, device, args, peaks)
            for r in done:
                msg = r.get("error") or (f"{r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s "
                                         f"{fmt(r.get('speedup_vs_bf16'), '.2f')}x err {r['rel_err']:.1e}")
                print(f"{preset} {shape['linear']:4} {shape['M']}x{shape['K']}x{shape['N']} {r['path']:14} {msg}",
                      flush=True)
            rows += done
    sums = totals(rows)
    print_tables(rows, sums)
    if args.json:
        report = {"environment": env, "args": vars(args), "peaks": peaks, "rows": rows, "totals": sums}
        print(f"\nwrote {write_json(report, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
