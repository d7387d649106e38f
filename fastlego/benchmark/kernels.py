"""Per-kernel timings: one recorded call site (`OpCase`) on one backend, against its own floor
max(FLOPs / peak, minimum bytes / bandwidth)."""

from __future__ import annotations

from typing import List, Optional

import torch

from .. import dispatch
from .numerics import autocast, rel_err
from .sites import OpCase, TensorSpec, synthesize_args
from .timing import Runner, copies_for, failure_text, measure


def op_flops(case: OpCase, args: tuple, device: torch.device) -> int:
    """FLOPs of one call: attention by formula, the rest as FlopCounterMode counts the reference op."""
    if case.op in ("window_attention", "global_attention"):
        N, T, C3 = args[0].shape
        return 4 * N * T * T * (C3 // 3)
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    ref = registered_backend(case.op, "reference")
    with torch.no_grad(), autocast(device, case.autocast, cache=False), counter:
        ref(*args)
    return int(counter.get_total_flops())


def registered_backend(op: str, name: str) -> dispatch.Backend:
    """Backend `name` of `op` as the dispatcher registered it."""
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
    copies = copies_for(in_bytes, device)
    sets = [synthesize_args(case, device, seed + 17 * j) for j in range(copies)]
    ctx = lambda: autocast(device, case.autocast, cache=False)  # noqa: E731
    reference = registered_backend(case.op, "reference")
    try:
        if backend_name == "auto":
            fn = lambda *a: dispatch.call(case.op, *a)  # noqa: E731
            with dispatch.use_backend("auto"), ctx():
                chosen, refused = dispatch.choose(case.op, *sets[0])
            result["chosen"] = chosen.name
        else:
            fn = registered_backend(case.op, backend_name)
            with ctx():
                reasons = fn.not_supported_reasons(*sets[0])
            if reasons:
                result["refused"] = reasons
                return result
        with torch.no_grad(), dispatch.use_backend("auto"), ctx():
            ref_out = reference(*sets[0])
            out = fn(*sets[0])
            result["rel_err_vs_reference"] = rel_err(out.float(), ref_out.float())
            out_bytes = ref_out.numel() * ref_out.element_size()
            flops = op_flops(case, sets[0], device)
            del out, ref_out
        with torch.no_grad(), dispatch.use_backend("auto"):
            t = measure(fn, sets, device=device, rounds=rounds, warmup=warmup, min_round_ms=min_round_ms,
                        runner=runner, cuda_graph=cuda_graph, context=ctx)
    except Exception as exc:
        result["error"] = failure_text(exc)
        return result
    finally:
        del sets
    nbytes = in_bytes + out_bytes
    floor_ms = max(flops / (peak_tflops * 1e12), nbytes / (bandwidth_gbps * 1e9)) * 1e3
    s = t.median_ms * 1e-3
    result.update(ms=t.median_ms, flops=flops, bytes=nbytes, gbps=nbytes / s / 1e9, tflops=flops / s / 1e12,
                  floor_ms=floor_ms, frac_floor=floor_ms / t.median_ms, timing=t.to_dict())
    return result
