"""The command line: `fastlego bench [options]` (also `python -m fastlego.benchmark`)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import time
from typing import Optional, Sequence

import torch

from .config import (ALL_VARIANTS, AUTOCAST_DTYPES, BF16_WEIGHT_VARIANTS, COMPILE_BUDGET_S, COMPILE_MODES,
                     COMPILE_VARIANTS, DEFAULT_TRAIN_CASES, DEFAULT_VARIANTS, GRAPH_VARIANTS, LATENCY_BATCHES,
                     LATENCY_PRESETS, MODE_VARIANTS, MODES, OPT_IN_VARIANTS, BenchConfig, default_latency_cases,
                     parse_cases, with_depths)
from .report import output_paths, results_markdown, save_report, write_json
from .session import BenchSession


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlego bench",
        description="Benchmark fastlego against the reference ops, torch.compile and the floor (every matmul at "
                    "cuBLAS speed plus attention).")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--presets", default=None,
                   help="comma-separated presets, NAME or NAME:BATCH, for every mode (default: inference lego_S_PG_64:256, "
                        "lego_L_PG_64:128, lego_XL_U_32:128; training " + ", ".join(f"{n}:{b}" for n, b in DEFAULT_TRAIN_CASES)
                        + f"; latency {', '.join(LATENCY_PRESETS)} each at batches {', '.join(map(str, LATENCY_BATCHES))}, "
                        "which a NAME without :BATCH also gets in the latency mode)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every preset without NAME:BATCH (latency: in place of its batches)")
    p.add_argument("--depths", default=None, help="comma-separated depth per brick replacing the presets' (smoke tests only)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (the compile variants still take their compilation time)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes: lego_S_PG_64 at batch 1, 2 repeats (for --device cpu)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-compile", action="store_true", help=f"skip the torch.compile variants ({', '.join(COMPILE_VARIANTS)})")
    g.add_argument("--compile", action="store_true", help="time torch.compile also on the CPU (skipped there by default)")
    p.add_argument("--compile-mode", default=None, help=argparse.SUPPRESS)  # replaced by the named variants: an error
    p.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                   help=f"a compile variant whose first call (the compilation) takes longer is marked 'did not compile "
                        f"within the budget' and is not a candidate for the fastest compile (default {COMPILE_BUDGET_S:.0f})")
    p.add_argument("--fp8-fast-accumulation", action="store_true",
                   help="fastlego_fp8 quantizes with fast_accumulation=True: its GEMMs accumulate in the tensor "
                        "cores' own accumulator (faster, about twice the GEMMs' rounding error) (default: off)")
    modes = "; ".join(f"{mode}: {','.join(vs)}" for mode, vs in MODE_VARIANTS.items())
    compile_help = ", ".join(f"{v}: mode {m or 'default'}" for v, m in COMPILE_MODES.items())
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default "
                   f"{','.join(DEFAULT_VARIANTS)}; opt-in: {','.join(OPT_IN_VARIANTS)}). Per mode: {modes}. "
                   f"torch.compile of the reference model: {compile_help} (compile_graph in training: the default-mode "
                   f"compiled EDMPrecond inside the step captured as one CUDA graph). CUDA only, refused elsewhere with "
                   f"the reason: {','.join(GRAPH_VARIANTS)}")
    p.add_argument("--no-bf16-weights", action="store_true",
                   help=f"skip the variants with bf16 weights ({', '.join(BF16_WEIGHT_VARIANTS)})")
    p.add_argument("--checkpoint-blocks", type=int, default=None,
                   help="fastlego_graph_ckpt: checkpoint the first N DiT blocks (default: all)")
    p.add_argument("--modes", default="infer",
                   help=f"comma-separated modes: {','.join(MODES)} (train: forward + EDM loss + backward + fused AdamW step; "
                        "latency: ms per network call at small batches; the floor and kernels are of infer only)")
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
    p.add_argument("--iters", type=int, default=None, help="forwards per end-to-end round (latency: rounds of at least "
                   "--latency-round-ms instead)")
    p.add_argument("--latency-round-ms", type=float, default=None, help="latency mode: calls per round to fill this many ms")
    p.add_argument("--op-repeats", type=int, default=None, help="timed rounds per kernel and floor matmul")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="JSON report path (default $FASTLEGO_BENCH_JSON or bench/results/<date>-<gpu>.json)")
    p.add_argument("--markdown", default=None, help="markdown file to append to (default $FASTLEGO_BENCH_MARKDOWN or bench/RESULTS.md)")
    p.add_argument("--no-markdown", action="store_true", help="do not append to a markdown file")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.compile_mode is not None:
        named = ", ".join(f"{v} (mode {m or 'default'})" for v, m in COMPILE_MODES.items())
        raise ValueError(f"--compile-mode was replaced by named variants, each a way to run torch.compile: {named}; "
                         "pick them with --variants, e.g. --variants reference,fastlego,compile,compile_max_autotune")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = BenchConfig.for_mode(quick=args.quick, tiny=args.tiny, device=device, seed=args.seed,
                               warmup=args.warmup, repeats=args.repeats, iters=args.iters, op_repeats=args.op_repeats,
                               compile_budget_s=args.compile_budget, latency_round_ms=args.latency_round_ms,
                               fp8_fast_accumulation=args.fp8_fast_accumulation or None,
                               json_path=args.json, markdown_path=args.markdown)
    if args.presets:
        cfg.cases = parse_cases(args.presets, args.batch)
        cfg.train_cases = None  # the train mode runs the named workloads too
        cfg.latency_cases = default_latency_cases(args.presets, args.batch)   # at the latency batches unless named
    elif args.batch:
        cfg.cases = [dataclasses.replace(c, batch=args.batch) for c in cfg.cases]
        for name in ("train_cases", "latency_cases"):
            if getattr(cfg, name) is not None:
                setattr(cfg, name, list(dict.fromkeys(dataclasses.replace(c, batch=args.batch) for c in getattr(cfg, name))))
    if args.depths:
        cfg.cases = [with_depths(c, args.depths.split(",")) for c in cfg.cases]
        for name in ("train_cases", "latency_cases"):
            if getattr(cfg, name) is not None:
                setattr(cfg, name, [with_depths(c, args.depths.split(",")) for c in getattr(cfg, name)])
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else list(DEFAULT_VARIANTS)
    if args.no_compile:
        variants = [v for v in variants if v not in COMPILE_VARIANTS]
    elif not device.startswith("cuda") and not args.compile:
        # torch.compile is slow on the CPU: skipped there unless --compile; a named CUDA-graph
        # compile variant stays, to be refused with the reason (it compiles nothing here)
        variants = [v for v in variants if v not in COMPILE_VARIANTS or (args.variants and v in GRAPH_VARIANTS)]
    if not device.startswith("cuda") and not args.variants:  # CUDA graphs are CUDA's (named: refused with why)
        variants = [v for v in variants if v not in GRAPH_VARIANTS]
    if args.no_bf16_weights:
        variants = [v for v in variants if v not in BF16_WEIGHT_VARIANTS]
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
