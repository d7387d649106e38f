"""`BenchSession`: runs the pieces of a benchmark (device limits, FLOPs, the floor, end-to-end
variants of each mode, per-kernel timings) and collects them into one report.

Every variant is one record in the report; a failure (a compile error, out of memory, a CUDA
graph that cannot be captured) is recorded as an error string and the run goes on; a variant
that cannot run on the device (the CUDA-graph ones off CUDA) is recorded as refused, with why.
A torch.compile variant records its first call's time (`first_call_s`: the compilation) and,
when that exceeds the run's `compile_budget_s`, is marked `over_compile_budget` ("did not
compile within the budget"): still timed, but not a candidate for the fastest compile variant.

Both drivers use it: `run()` for the command line, the fixtures of bench/conftest.py for pytest.
Each piece is computed on first use and cached, so pytest tests can run in any order or alone.
Nothing here imports triton: without it the auto backend runs the reference ops, and the
recorded decisions say so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import dispatch
from ..edm import EDMPrecond
from ..loss import EDMLoss
from ..weight_cache import frozen_weights
from .config import (COMPILE_VARIANTS, FP8_VARIANT, GRAPH_VARIANTS, HELP_OF_MODE, MODE_VARIANTS, TRAIN_INIT_SCALE,
                     TRAIN_LR, BenchConfig, Case, compile_mode_of, result_key, variant_backend)
from .environment import GIB, environment
from .floor import (analytic_flops, count_forward_flops, measure_copy_bandwidth, measure_floor,
                    measure_matmul_peak)
from .kernels import bench_op, op_backend_names
from .models import bf16_copy, build_model, build_train_net, make_inputs, make_train_inputs
from .numerics import autocast, dtype_name, precision, rel_err
from .report import SCHEMA_VERSION
from .sites import OpCase, decision_summary, record_op_cases
from .steps import FLOP_MULTIPLIER, STEP_BUILDERS, graph_infer_step, infer_step
from .summary import compile_budget_note, kernel_summary, targets
from .timing import Runner, failure_text, first_line, free_memory, measure, sync, time_once


INTERRUPTED = "Interrupted: the run was stopped before this variant finished (compiling or timing)"


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
        free_memory(self.device)


def _first_call(step, variant: str, res: dict):
    """Run `step` once; outside torch.compile, record in `res` the backends the dispatcher chose
    (of one eager forward where the step is a CUDA graph: `step.eager`)."""
    if variant in COMPILE_VARIANTS:
        return step()
    eager = getattr(step, "eager", None)
    with dispatch.record() as decisions:
        out = (eager or step)()
    res["backends"] = decision_summary(decisions)
    return out if eager is None else step()


def _compile(model, mode: Optional[str]):
    """torch.compile(model) with dynamo's state and graph-break counters reset first."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    return torch.compile(model, mode=mode)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


class BenchSession:
    """Runs the pieces of a benchmark and collects them into one report (see the module docstring)."""

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
            free_memory(self.device)
        return self._limits

    @property
    def matrix_dtype(self) -> torch.dtype:
        """bf16 on the GPU (the floor's dtype); fp32 on the CPU, where bf16 is emulated."""
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
            free_memory(self.device)

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

    def _variant_record(self, variant: str, mode: str, case: Case) -> dict:
        """The fields every end-to-end result starts with: what ran, how its weights were held,
        torch.compile's mode ("default" for torch's default), replayed as a CUDA graph or not."""
        weights, ac = self.config.weights_of(variant, mode)
        res = {"variant": variant, "mode": mode, "description": HELP_OF_MODE[mode][variant], "batch": case.batch,
               "weights_dtype": dtype_name(weights), "autocast_dtype": dtype_name(ac),
               "dispatch_mode": variant_backend(variant), "compiled": variant in COMPILE_VARIANTS,
               "cuda_graph": variant in GRAPH_VARIANTS, "tf32": self.config.tf32}
        if variant in COMPILE_VARIANTS:
            res["compile_mode"] = compile_mode_of(variant, mode) or "default"
            res["compile_budget_s"] = self.config.compile_budget_s
        return res

    def refusal(self, variant: str) -> Optional[str]:
        """Why `variant` cannot run on this run's device, or None when it can."""
        if variant in GRAPH_VARIANTS and self.device.type != "cuda":
            return (f"{variant} needs a CUDA GPU (it replays CUDA graphs); this run is on {self.device}: "
                    "not run (the eager variants are)")
        if variant == FP8_VARIANT:
            from .. import fp8
            reasons = fp8.scaled_mm_not_supported_reasons(self.device, 16, 16) or fp8.triton_reasons()
            if reasons:
                return f"{variant}: " + "; ".join(reasons)
        return None

    def _tune(self, variant: str, res: dict, call: Callable, *inputs) -> None:
        """fastlego's matmul path choices for this workload's shapes (`fastlego.tune`), made before
        the variant's first timed call as `fastlego train` and `sample` make them; fastlego's
        variants on CUDA only (the reference and torch.compile take no such choice)."""
        if variant_backend(variant) != "auto" or self.device.type != "cuda":
            return
        from ..tuning import tune
        res["tuning"] = tune(call, *inputs).summary()

    def _after_compile(self, variant: str, res: dict) -> None:
        """A compile variant's graph breaks and, when its first call overran the budget, the mark."""
        if variant not in COMPILE_VARIANTS:
            return
        res["graph_breaks"] = _graph_breaks()
        note = compile_budget_note(res.get("first_call_s"), self.config.compile_budget_s)
        res["over_compile_budget"] = note is not None
        if note:
            res["compile_budget_note"] = note

    def end_to_end(self, case: Case, variant: str, mode: str = "infer", runner: Optional[Runner] = None) -> dict:
        """Time one variant of a workload in `mode`; an error (compile failure, out of memory) is
        recorded as a string in place of the numbers, a variant this device cannot run as refused."""
        if mode not in STEP_BUILDERS:
            raise ValueError(f"mode {mode!r} is not implemented: expected one of {sorted(STEP_BUILDERS)}")
        if variant not in MODE_VARIANTS[mode]:
            raise ValueError(f"unknown {mode} variant {variant!r}: expected one of {', '.join(MODE_VARIANTS[mode])}")
        reason = self.refusal(variant)
        if reason is not None:
            res = self._variant_record(variant, mode, case)
            res.update(refused=reason, error=f"refused: {reason}")
            self.result(case)["end_to_end"][result_key(variant, mode)] = res
            return res
        # until the variant's own record replaces it: what an interrupted run (Ctrl-C, SIGTERM,
        # `timeout`) reports for the variant it was compiling or timing
        self.result(case)["end_to_end"][result_key(variant, mode)] = {
            **self._variant_record(variant, mode, case), "error": INTERRUPTED}
        if mode == "train":
            return self._train_end_to_end(case, variant, runner)
        return self._forward_end_to_end(case, variant, mode, runner)

    def _forward_end_to_end(self, case: Case, variant: str, mode: str, runner: Optional[Runner] = None) -> dict:
        """Time forwards of one variant (infer: throughput; latency: ms per network call, each
        round filled to `latency_round_ms`)."""
        cfg, dev = self.config, self.device
        st = self.state(case)
        if cfg.floor and mode == "infer":
            self.floor(case)
        ref32 = self.reference_output(case) if cfg.check else None
        res = self._variant_record(variant, mode, case)
        weights_dtype, ac = cfg.weights_of(variant, mode)
        backend = res["dispatch_mode"]
        model, inputs = st.model, st.inputs
        compiled = step = None
        # fastlego's forwards cast each fp32 weight to the autocast dtype once (as sampling does),
        # for the whole variant: its warm-up, CUDA-graph capture and timed calls
        held = contextlib.ExitStack()
        try:
            if backend == "auto":
                held.enter_context(frozen_weights())
            if weights_dtype == torch.bfloat16:
                model, inputs = bf16_copy(st.model, st.inputs)
            elif variant == FP8_VARIANT:
                from ..fp8 import quantize
                model = quantize(st.model, "fp8", fast_accumulation=cfg.fp8_fast_accumulation)
            weights = model
            if backend == "auto":
                with torch.no_grad(), dispatch.use_backend(backend), autocast(dev, ac):
                    self._tune(variant, res, model, *inputs)
            if variant in COMPILE_VARIANTS:
                # load every reference backend first: dynamo then traces the dispatcher into one graph
                STEP_BUILDERS[mode](model, inputs, backend, dev, ac)()
                compiled = model = _compile(model, compile_mode_of(variant, mode))
            if variant in GRAPH_VARIANTS:   # fastlego_graph, compile_graph: the forward captured once
                step = graph_infer_step(model, inputs, backend, dev, ac)
            elif variant in COMPILE_VARIANTS:
                step = infer_step(model, inputs, backend, dev, ac)
            else:
                step = STEP_BUILDERS[mode](model, inputs, backend, dev, ac)
            weight_bytes = sum(t.numel() * t.element_size() for t in list(weights.parameters()) + list(weights.buffers()))
            if dev.type == "cuda":
                free_memory(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                start_bytes = torch.cuda.memory_allocated(dev)
            with precision(dev, cfg.tf32):
                out, res["first_call_s"] = time_once(lambda: _first_call(step, variant, res), dev)
                self._after_compile(variant, res)
                if variant in GRAPH_VARIANTS:
                    res["captured"] = step.captured
                if ref32 is not None:
                    res["rel_err_vs_fp32"] = rel_err(out.float(), ref32)
                del out
                if mode == "latency":  # rounds of at least latency_round_ms (calibrated by measure)
                    t = measure(step, device=dev, rounds=cfg.repeats, warmup=cfg.warmup,
                                min_round_ms=cfg.latency_round_ms, runner=runner)
                else:
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
            res["error"] = failure_text(exc)
        finally:
            model = inputs = weights = step = None
            held.close()
            if compiled is not None:
                compiled = None
                torch._dynamo.reset()
            free_memory(dev)
        self._derive(case, res)
        self.result(case)["end_to_end"][result_key(variant, mode)] = res
        return res

    def _train_end_to_end(self, case: Case, variant: str, runner: Optional[Runner] = None) -> dict:
        """Time training steps of one variant (see `steps.train_step`): a fresh EDMPrecond, inputs
        and AdamW per variant. Peak memory counts everything the variant allocates (weights,
        gradients, optimizer state, activations) over the timed steps (steady state); the first
        step's peak, which adds one-off work (the kernels' path timing and autotuning,
        compilation), is recorded apart as first_step_peak_gib. An error (out of memory, a kernel
        that refuses the size, a compile failure) is recorded as a string and the run goes on."""
        cfg, dev = self.config, self.device   # `end_to_end` checked the variant
        res = self._variant_record(variant, "train", case)
        res.update({"loss_fn": "EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5), averaged over bricks",
                    "optimizer": f"AdamW(lr={TRAIN_LR})", "init_scale": TRAIN_INIT_SCALE})
        backend = res["dispatch_mode"]
        net = inputs = model = step = None
        last: List[Optional[torch.Tensor]] = [None]
        try:
            if "flops" not in self.result(case):
                self.state(case)  # the forward's FLOP count (inside the try: a broken device is an error row too)
            if self._state is not None:  # the inference model is not needed here: free its memory
                self._state.close()
                self._state = None
            init = self._train_net(case)
            free_memory(dev)
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
            if variant in COMPILE_VARIANTS:
                # load every reference backend first (one image, no grad): dynamo then traces the
                # dispatcher into one graph
                images, sigma, _, labels = inputs
                with torch.no_grad(), dispatch.use_backend("reference"), autocast(dev, cfg.autocast_dtype):
                    net(images[:1], sigma[:1], None if labels is None else labels[:1])
                model = _compile(net, compile_mode_of(variant, "train"))
            if backend == "auto":   # the matmul paths for these shapes, before the first step (and capture)
                with dispatch.use_backend(backend), autocast(dev, cfg.autocast_dtype,
                                                             cache=variant not in GRAPH_VARIANTS):
                    self._tune(variant, res, EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5), model, *inputs)
            step = STEP_BUILDERS["train"](model, inputs, backend, dev, cfg.autocast_dtype,
                                          cuda_graph=variant in GRAPH_VARIANTS)
            group = step.train_step.optimizer.param_groups[0]
            res["optimizer_fused"] = bool(group.get("fused"))   # fused on CUDA in every variant
            res["optimizer_capturable"] = bool(group.get("capturable"))
            res["optimizer"] = (f"AdamW(lr={TRAIN_LR}, fused={res['optimizer_fused']}, "
                                f"capturable={res['optimizer_capturable']})")
            with precision(dev, cfg.tf32):
                loss, res["first_call_s"] = time_once(lambda: _first_call(step, variant, res), dev)
                res["loss"] = float(loss)  # the first step's: a sanity value (finite, about 1)
                self._after_compile(variant, res)

                def timed_step():
                    last[0] = step()
                if dev.type == "cuda":   # the first step's one-off allocations (path timing, autotune, compile) apart
                    sync(dev)
                    res["first_step_peak_gib"] = (torch.cuda.max_memory_allocated(dev) - start_bytes) / GIB
                    torch.cuda.reset_peak_memory_stats(dev)
                if variant in GRAPH_VARIANTS:
                    # the warm-up steps and the capture, before the timed rounds (counted in the
                    # steady-state peak: the graph keeps what its capture allocated)
                    ts = step.train_step
                    while ts.cuda_graph and not ts.captured:
                        timed_step()
                    if variant in COMPILE_VARIANTS and not ts.captured:
                        raise RuntimeError(f"the compiled training step could not be captured as a CUDA graph "
                                           f"({ts.fallback_reason}); compile_graph is not timed eagerly (the "
                                           f"`compile` variant is that step without a graph)")
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
            res["error"] = failure_text(exc)
        finally:
            # drop every reference to the variant's tensors before handing memory back
            net = inputs = model = step = None
            last[0] = None
            if variant in COMPILE_VARIANTS:
                torch._dynamo.reset()
            free_memory(dev)
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
        """Time one op case of a workload on one backend (see `kernels.bench_op`)."""
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
        the eager variants and the kernels; per training workload the training variants without
        torch.compile; per latency workload the same; then torch.compile of every workload, one
        compile variant at a time in the order of COMPILE_VARIANTS (last: it is the slowest and
        the least certain part; max-autotune the very last). `checkpoint(report)` is called after
        each piece, so an interrupted run still leaves its numbers."""
        cfg = self.config
        lim = self.limits()
        log(f"[bench] {self.env.get('gpu') or self.env['device']}: matmul peak {lim['matmul_peak']['tflops']:.1f} TFLOP/s "
            f"({cfg.peak_size}^3 {lim['matmul_peak']['dtype']}), copy {lim['copy_bandwidth']['gbps']:.0f} GB/s")
        eager = [v for v in cfg.variants_for("infer") if v not in COMPILE_VARIANTS]
        for case in (cfg.cases if "infer" in cfg.modes else []):
            self._run_inference_case(case, eager, log, checkpoint)
        if "train" in cfg.modes:
            eager = [v for v in cfg.variants_for("train") if v not in COMPILE_VARIANTS]
            log("[bench] training steps (forward + EDM loss + backward + AdamW), per workload:")
            for case in cfg.cases_for("train"):
                for variant in eager:
                    self._log_e2e(log, self.end_to_end(case, variant, "train"), case)
                if checkpoint:
                    checkpoint(self.report())
        if "latency" in cfg.modes:
            eager = [v for v in cfg.variants_for("latency") if v not in COMPILE_VARIANTS]
            log("[bench] latency (one network call at small batches), per workload:")
            for case in cfg.cases_for("latency"):
                for variant in eager:
                    self._log_e2e(log, self.end_to_end(case, variant, "latency"), case)
                if checkpoint:
                    checkpoint(self.report())
        for variant in COMPILE_VARIANTS:
            for mode in cfg.modes:
                if variant not in cfg.variants_for(mode):
                    continue
                log(f"[bench] {variant} ({HELP_OF_MODE[mode][variant]}), per workload"
                    + ("" if mode == "infer" else f" ({mode})") + f"; compile budget {cfg.compile_budget_s:.0f} s:")
                for case in cfg.cases_for(mode):
                    self._log_e2e(log, self.end_to_end(case, variant, mode), case)
                    if checkpoint:
                        checkpoint(self.report())
        self.close()
        return self.report()

    def _run_inference_case(self, case: Case, eager: List[str], log, checkpoint) -> None:
        """One inference workload: its floor, its eager variants, its kernels."""
        cfg = self.config
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

    @staticmethod
    def _log_e2e(log, r: dict, case: Optional[Case] = None) -> None:
        where = f"{case.name} " if case is not None else ""
        extra = (f"  (first call {r['first_call_s']:.1f} s, {r.get('graph_breaks', 0)} graph breaks"
                 + (f"; {r['compile_budget_note']}" if r.get("compile_budget_note") else "") + ")"
                 if r["variant"] in COMPILE_VARIANTS and "first_call_s" in r else "")
        if r["mode"] in ("train", "latency"):
            where = f"{case.name} B={case.batch} " if case is not None else ""
            if "ms" in r and "loss" in r:
                extra += f"  loss {r['loss']:.3g}"
            if "peak_gib" in r:
                extra += f", peak {r['peak_gib']:.1f} GiB"
        log(f"[bench]   {where}{result_key(r['variant'], r['mode']):22s} " + (
            f"{r['img_per_s']:9.1f} img/s  {r['ms']:8.3f} ms" + extra
            if "ms" in r else f"error: {first_line(Exception(r['error']), 200)}"))

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
            res["targets"] = targets(case, res, self.env)
            res["kernel_summary"] = kernel_summary(res.get("kernels", []))
            cases.append(res)
        return {"schema": SCHEMA_VERSION, "environment": self.env, "config": self.config.to_dict(),
                "limits": self._limits, "cases": cases}
