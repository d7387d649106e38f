"""The benchmark suite: end-to-end and per-kernel timings against the floor.

Shared by `fastlego bench` (`main`) and `pytest bench/` (which passes pytest-benchmark's
`benchmark.pedantic` in as the `runner`, so both time the same rounds with CUDA events).
One concept a module, in the order a run uses them:

- `config`: the workloads (`Case`), variants, modes, targets and a run's settings (`BenchConfig`);
- `environment`: date, device, L2 size and library versions of the run;
- `numerics`: TF32 / autocast settings and dtype helpers;
- `timing`: the one timer, `measure` (CUDA events around rounds of calls; every timing of the
  suite and of the scripts in bench/ goes through it);
- `floor`: the device limits (matrix peak, copy bandwidth), the forward as matmuls and
  attentions (FLOPs), and the floor: every matmul with cuBLAS, attention at library speed;
- `models`: the networks and inputs of a workload;
- `sites`: which op gets which arguments at which call site, recorded through the
  dispatcher's observer hook (`fastlego.dispatch.record(on_call=...)`);
- `kernels`: one call site timed on one backend against its own floor;
- `steps`: what one timed step of a mode is (`STEP_BUILDERS`: infer, latency, train; and the
  forward captured as a CUDA graph, `graph_infer_step`);
- `session`: `BenchSession`, which runs the pieces and collects the report;
- `summary`: the fastest compile variant, the targets and per-kernel sums derived from the
  measurements;
- `report`: the JSON report and the markdown section appended to bench/RESULTS.md;
- `cli`: `fastlego bench`'s options and `main`.

Variants (the docstring of `config` says what each is, exactly). Inference: `reference` (the
reference ops eager), `fastlego` (the auto backend), and torch.compile of the reference model
three ways: `compile` (torch's default mode), `compile_max_autotune`
(mode="max-autotune-no-cudagraphs") and `compile_graph` (the compiled forward captured once as a
CUDA graph, CUDA only), all with fp32 weights under bf16 autocast, TF32 on; `fastlego_bf16` (the auto
backend, weights held in bf16) and the opt-in baselines holding their weights the same way,
`reference_bf16` and `compile_bf16`; `fastlego_fp8` (`fastlego.quantize(model, "fp8")`, FP8 tensor
cores; refused with the reasons where there are none). fastlego's variants run as `fastlego sample`
and `train` do: `fastlego.tune` picks each matmul's path for the workload's shapes before the first
timed call, and a forward casts each fp32 weight to bf16 once (`fastlego.frozen_weights`), where
torch.compile's graphs cast them at every call. Training: one step = forward of `EDMPrecond` + EDM loss +
backward + fused AdamW (on CUDA), fp32 weights under bf16 autocast, for `reference`, `fastlego`,
`fastlego_graph` (the step as one CUDA graph), `compile`, `compile_max_autotune`, `compile_graph`
(the default-mode compiled EDMPrecond inside the step captured as one CUDA graph, capturable
fused AdamW) and the opt-in `fastlego_graph_ckpt`; FLOPs = 3x the forward's. Latency: ms per
network call at batches 1, 4, 16 for `reference`, `compile_graph`, `fastlego` and
`fastlego_graph` (the forward captured with torch.cuda.graph). A compile variant whose first call
overruns `--compile-budget` is marked and is not a candidate for "the fastest compile variant",
which the targets are held against. The floor and the per-kernel timings are of the inference
forward.
"""

from .cli import build_parser, config_from_args, main
from .config import (ALL_VARIANTS, AUTOCAST_DTYPES, BF16_WEIGHT_VARIANTS, COMPILE_BUDGET_S, COMPILE_MODES,
                     COMPILE_TARGETS, COMPILE_VARIANTS, DEFAULT_CASES, DEFAULT_TRAIN_CASES, DEFAULT_VARIANTS,
                     FLOOR_TARGET, GRAPH_VARIANTS, KERNEL_INPUTS, LATENCY_BATCHES, LATENCY_EAGER_TARGET,
                     LATENCY_PRESETS, LATENCY_VARIANT_HELP, MODE_VARIANTS, MODES, OPT_IN_VARIANTS,
                     TRAIN_COMPILE_TARGET, TRAIN_INIT_SCALE, TRAIN_LR, TRAIN_VARIANT_HELP, VARIANT_HELP, VARIANTS,
                     BenchConfig, Case, compile_mode_of, default_case, default_latency_cases, default_train_cases,
                     latency_target, parse_cases, result_key, with_depths)
from .environment import GIB, environment
from .floor import (AttentionShape, BrickGeometry, Matmul, analytic_flops, brick_geometry, count_forward_flops,
                    forward_attentions, forward_matmuls, measure_copy_bandwidth, measure_floor, measure_matmul_peak)
from .kernels import bench_op, op_backend_names
from .models import bf16_copy, build_model, build_train_net, make_inputs, make_train_inputs
from .numerics import precision
from .report import (RESULTS_HEADER, SCHEMA_VERSION, append_results_markdown, default_json_path, output_paths,
                     results_markdown, save_report, write_json)
from .session import BenchSession
from .sites import OpCase, TensorSpec, expected_op_keys, record_op_cases, synthesize_args
from .steps import FLOP_MULTIPLIER, STEP_BUILDERS, graph_infer_step, infer_step, train_step
from .summary import compile_budget_note, fastest_compile, targets
from .timing import Runner, Timing, default_runner, host_us, measure, pedantic_runner, time_once

__all__ = [
    "ALL_VARIANTS", "AUTOCAST_DTYPES", "AttentionShape", "BF16_WEIGHT_VARIANTS", "BenchConfig", "BenchSession",
    "BrickGeometry", "COMPILE_BUDGET_S", "COMPILE_MODES", "COMPILE_TARGETS", "COMPILE_VARIANTS", "Case",
    "DEFAULT_CASES", "DEFAULT_TRAIN_CASES", "DEFAULT_VARIANTS", "FLOOR_TARGET", "FLOP_MULTIPLIER", "GIB",
    "GRAPH_VARIANTS", "KERNEL_INPUTS", "LATENCY_BATCHES", "LATENCY_EAGER_TARGET", "LATENCY_PRESETS",
    "LATENCY_VARIANT_HELP", "MODES", "MODE_VARIANTS", "Matmul", "OPT_IN_VARIANTS", "OpCase", "RESULTS_HEADER",
    "Runner", "SCHEMA_VERSION", "STEP_BUILDERS", "TRAIN_COMPILE_TARGET", "TRAIN_INIT_SCALE", "TRAIN_LR",
    "TRAIN_VARIANT_HELP", "TensorSpec", "Timing", "VARIANTS", "VARIANT_HELP", "analytic_flops",
    "append_results_markdown", "bench_op", "bf16_copy", "brick_geometry", "build_model", "build_parser",
    "build_train_net", "compile_budget_note", "compile_mode_of", "config_from_args", "count_forward_flops",
    "default_case", "default_json_path", "default_latency_cases", "default_runner", "default_train_cases",
    "environment", "expected_op_keys", "fastest_compile", "forward_attentions", "forward_matmuls",
    "graph_infer_step", "host_us", "infer_step", "latency_target", "main", "make_inputs", "make_train_inputs", "measure",
    "measure_copy_bandwidth", "measure_floor", "measure_matmul_peak", "op_backend_names", "output_paths",
    "parse_cases", "pedantic_runner", "precision", "record_op_cases", "result_key", "results_markdown",
    "save_report", "synthesize_args", "targets", "time_once", "train_step", "with_depths", "write_json",
]
