"""What a report derives from its measurements: the fastest torch.compile variant of each
workload and mode (within the compile budget), the targets met or missed, and the per-kernel
timings summed per call site, per op role and per forward."""

from __future__ import annotations

from typing import Dict, List, Optional

from .config import (COMPILE_TARGETS, COMPILE_VARIANTS, FLOOR_TARGET, LATENCY_EAGER_TARGET, TRAIN_COMPILE_TARGET,
                     Case, latency_target, result_key)

BUDGET_NOTE = "did not compile within the budget"


def compile_budget_note(first_call_s: Optional[float], budget_s: float) -> Optional[str]:
    """The mark of a compile variant whose first call (the compilation) took longer than the
    budget, or None when it compiled within it (or was never called)."""
    if first_call_s is None or first_call_s <= budget_s:
        return None
    return f"{BUDGET_NOTE}: first call {first_call_s:.4g} s > {budget_s:.4g} s"


def is_compiled(result: dict) -> bool:
    """A torch.compile variant's result (reports before the `compiled` field: by its name)."""
    return bool(result.get("compiled", result.get("variant") in COMPILE_VARIANTS))


def fastest_compile(results, mode: str = "infer", weights_dtype: str = "float32") -> dict:
    """The fastest torch.compile variant among `results` (end-to-end records of one workload) of
    `mode` holding weights in `weights_dtype`: {"variant", "ms", "candidates": {variant: ms},
    "excluded": {variant: why}}; "variant" is None when none qualifies. A candidate has timings
    and compiled within the budget; the others are listed under "excluded", with the reason."""
    out = {"variant": None, "ms": None, "candidates": {}, "excluded": {}}
    for r in (results.values() if isinstance(results, dict) else results):
        if r.get("mode", "infer") != mode or not is_compiled(r) or r.get("weights_dtype", "float32") != weights_dtype:
            continue
        if r.get("over_compile_budget"):
            out["excluded"][r["variant"]] = r.get("compile_budget_note") or BUDGET_NOTE
        elif "ms" not in r:
            out["excluded"][r["variant"]] = r.get("error", "no timing")
        else:
            out["candidates"][r["variant"]] = r["ms"]
    if out["candidates"]:
        out["variant"] = min(out["candidates"], key=out["candidates"].get)
        out["ms"] = out["candidates"][out["variant"]]
    return out


def _vs_fastest(fast: dict, fastest: dict, target: Optional[float]) -> Optional[dict]:
    """fastlego's speed-up over the fastest compile variant, held against `target`."""
    if "ms" not in fast or fastest["variant"] is None:
        return None
    value = fastest["ms"] / fast["ms"]
    return {"against": fastest["variant"], "target": target, "value": value,
            "met": None if target is None else value >= target}


def targets(case: Case, res: dict, env: dict) -> dict:
    """The targets a workload's results are held against, and the speed-ups between variants.
    The compile targets are held against the fastest compile variant (`fastest_compile`);
    the speed-ups over each compile variant are listed too (`vs_compile_variants`)."""
    e2e = res.get("end_to_end", {})
    fast = e2e.get("fastlego", {})
    out = {}
    if "frac_floor" in fast:
        out["floor_fraction"] = {"target": FLOOR_TARGET, "value": fast["frac_floor"], "met": fast["frac_floor"] >= FLOOR_TARGET}
    infer = [r for r in e2e.values() if r.get("mode", "infer") == "infer"]
    if any(is_compiled(r) for r in infer):
        fastest = out["fastest_compile"] = fastest_compile(infer, "infer")
        vs = _vs_fastest(fast, fastest, COMPILE_TARGETS.get(case.preset))
        if vs:
            vs.update(target_gpu="H200", same_gpu_as_target=bool(env.get("gpu") and "H200" in env["gpu"]))
            out["vs_fastest_compile"] = vs
        if "ms" in fast:
            out["vs_compile_variants"] = {r["variant"]: r["ms"] / fast["ms"] for r in infer
                                          if is_compiled(r) and "ms" in r and r.get("weights_dtype", "float32") == "float32"}
    comp = e2e.get("compile", {})
    if "ms" in fast and "ms" in comp:  # against torch's default mode (the target is against the fastest)
        out["vs_compile"] = {"value": comp["ms"] / fast["ms"]}
    ref = e2e.get("reference", {})
    if "ms" in fast and "ms" in ref:
        out["vs_reference_eager"] = {"value": ref["ms"] / fast["ms"]}
    fast16, comp16 = e2e.get("fastlego_bf16", {}), e2e.get("compile_bf16", {})
    if "ms" in fast16 and "ms" in comp16:  # bf16 weights on both sides (compile_bf16 is opt-in)
        out["bf16_vs_compile_bf16"] = {"value": comp16["ms"] / fast16["ms"]}
    train = [r for r in e2e.values() if r.get("mode") == "train"]
    train_fastest = fastest_compile(train, "train") if any(is_compiled(r) for r in train) else None
    if train_fastest:
        out["fastest_compile@train"] = train_fastest
    for mine, prefix in (("fastlego", "train"), ("fastlego_graph", "graph_train"),
                         ("fastlego_graph_ckpt", "graph_ckpt_train")):  # training speed-ups
        fast_train = e2e.get(result_key(mine, "train"), {})
        for other in ("reference",) + COMPILE_VARIANTS:
            r = e2e.get(result_key(other, "train"), {})
            if "ms" in fast_train and "ms" in r:
                out[f"{prefix}_vs_{other}"] = {"value": r["ms"] / fast_train["ms"]}
        vs = _vs_fastest(fast_train, train_fastest, TRAIN_COMPILE_TARGET) if train_fastest else None
        if vs:
            out[f"{prefix}_vs_fastest_compile"] = vs
    # latency: fastlego's graph against torch.compile's (captured as a CUDA graph), eager against eager
    lat = {r["variant"]: r for r in e2e.values() if r.get("mode") == "latency"}
    graph, comp_graph = lat.get("fastlego_graph", {}), lat.get("compile_graph", {})
    if "ms" in graph and "ms" in comp_graph:
        value, target = comp_graph["ms"] / graph["ms"], latency_target(case.batch)
        out["latency_graph_vs_compile_graph"] = {"target": target, "value": value, "met": value >= target}
    eager, ref_eager = lat.get("fastlego", {}), lat.get("reference", {})
    if "ms" in eager and "ms" in ref_eager:
        value = ref_eager["ms"] / eager["ms"]
        out["latency_eager_vs_reference"] = {"target": LATENCY_EAGER_TARGET, "value": value,
                                             "met": value >= LATENCY_EAGER_TARGET}
    return out


def kernel_summary(kernels: List[dict]) -> dict:
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
    return {"sites": by_key, "ops": kernel_roles(by_key), "forward_total": totals}


def kernel_roles(sites: Dict[str, dict]) -> Dict[str, dict]:
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
