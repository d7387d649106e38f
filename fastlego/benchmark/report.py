"""Writing a report: the JSON file (everything measured) and the dated markdown section appended
to bench/RESULTS.md (the tables a person reads)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .config import result_key
from .numerics import dtype_name
from .summary import fastest_compile, is_compiled

SCHEMA_VERSION = 1

RESULTS_HEADER = """# fastlego benchmark results

Appended by `fastlego bench` and `pytest bench/` (`fastlego.benchmark.append_results_markdown`);
the full numbers of each run are in its JSON report. Each run is one dated section:

- **Limits**: the bf16 matrix peak (TFLOP/s of an 8192^3 matmul) and the copy bandwidth (GB/s of
  a large device-to-device copy, read + write), measured in the same run.
- **End to end** (inference, `torch.no_grad()`, TF32 on): `reference` = the reference ops eager
  (`use_backend("reference")`), `fastlego` = the auto backend, and `torch.compile` of the
  reference model three ways: `compile` (torch's default mode), `compile_max_autotune`
  (mode="max-autotune-no-cudagraphs") and `compile_graph` (the default-mode compiled forward
  captured once as a CUDA graph; CUDA only); these keep fp32 weights under bf16 autocast, as the released code was measured.
  `fastlego_bf16` = the auto backend with weights held in bf16 (no autocast); `reference_bf16`
  and `compile_bf16` (opt-in, `--variants`) are the baselines with bf16 weights. Random weights
  (every parameter non-zero), random inputs. img/s and ms are medians (CUDA events) of the timed
  rounds. TFLOP/s uses our FLOP count (adaLN once per image); "TFLOP/s rel." uses the release's
  count (adaLN once per region, as FlopCounterMode counts the released model), so it compares
  with TFLOP/s measured on the released code.
  "% peak" = TFLOP/s / matrix peak; "% floor" = floor ms / ms; "x fastest compile" = the ms of
  the fastest compile variant holding its weights the same way / ms; "err" = relative L2 error
  against the fp32 reference forward (TF32 off). "peak GiB" = the variant's weights + the peak of
  what its forwards allocate (torch.cuda.max_memory_allocated).
- **torch.compile** lines (under each table): every compile variant's ms, first-call time (the
  compilation) and graph breaks; the fastest is picked among those that compiled within the
  run's budget (`--compile-budget`; one that did not is marked and still shown), and fastlego's
  speed-up is given against it and against each.
- **Floor**: every matmul of the forward timed with cuBLAS in bf16 + global attention with SDPA
  + local window attention as its bytes at the copy bandwidth; everything else free.
  Targets: fastlego >= 80% of the floor; on H200 also >= 1.9x / 1.5x / 1.4x the fastest
  compile variant on S_PG_64 / L_PG_64 / XL_U_32.
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
  (`randomize_` at a small scale), data and labels; AdamW fused on CUDA in every variant.
  Variants `reference`, `fastlego` (auto backend; the backends it chose are listed below the
  tables), `fastlego_graph` (the fastlego step captured once as a CUDA graph), `compile` and
  `compile_max_autotune` (`torch.compile` of the reference EDMPrecond, default mode /
  "max-autotune-no-cudagraphs", then eager loss, backward, AdamW) and `compile_graph` (the
  default-mode compiled EDMPrecond inside the whole step captured once as a CUDA graph, with a
  capturable AdamW). TFLOP/s = 3 x the forward's FLOPs over the step time. "x fastest compile" =
  the fastest compile variant's ms / ms (target: fastlego >= 1.5x). "peak GiB" = everything the
  variant allocates (weights, gradients, AdamW state, activations). "loss" = the first and last
  timed steps' losses (finite). A failure (out of memory, a crash) is an error row.
- **Latency** (`--modes latency`): ms per network call (one backbone forward, fp32 weights under
  bf16 autocast) at small batches (sampling one to a few images at a time): `reference` eager,
  `compile_graph` (`torch.compile`'s forward captured once as a CUDA graph), `fastlego` eager and
  `fastlego_graph` (its forward captured once with torch.cuda.graph, replayed on static inputs).
  Targets: fastlego_graph >= 1.5x compile_graph at batch 16, >= 1.25x at batches 1 and 4;
  fastlego eager never slower than the reference eager.
"""


def fmt(v, spec: str = ".1f", missing: str = "-") -> str:
    """A number for a table cell: `missing` for None, "inf" for a non-finite float."""
    if v is None:
        return missing
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return format(v, spec)


def pct(v) -> str:
    """A fraction as a whole percentage ("57%"), "-" for None."""
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
    has_latency = any(r.get("mode") == "latency" for res in report["cases"] for r in res.get("end_to_end", {}).values())
    if has_infer or not (has_train or has_latency):
        lines += ["", "| preset (batch) | variant | img/s | ms | TFLOP/s (rel.) | % peak | % floor | x fastest compile | peak GiB | err |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in report["cases"]:
        name = f"{res['name']} ({res['case']['batch']})"
        e2e = res.get("end_to_end", {})
        for variant, r in e2e.items():
            if r.get("mode", "infer") != "infer":
                continue
            if "ms" not in r:
                lines.append(f"| {name} | {variant} | error: {md_escape(r.get('error', '?'))[:160]} | - | - | - | - | - | - | - |")
                continue
            comp = fastest_compile(e2e, "infer", r.get("weights_dtype", "float32"))["ms"]
            lines.append(
                f"| {name} | {variant} | {r['img_per_s']:.1f} | {r['ms']:.2f} | {fmt(r.get('tflops'))} ({fmt(r.get('tflops_release_count'))}) "
                f"| {pct(r.get('frac_peak'))} | {pct(r.get('frac_floor'))} | {fmt(comp / r['ms'] if comp else None, '.2f')} "
                f"| {fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('rel_err_vs_fp32'), '.1e')} |")
    if has_infer:
        lines += compile_lines(report, "infer")
    if has_train:
        lines += _train_markdown(report)
        lines += compile_lines(report, "train")
    if has_latency:
        lines += latency_markdown(report)
    floor_rows = []
    for res in report["cases"]:
        fl, fp, tg = res.get("floor"), res.get("flops", {}), res.get("targets", {})
        if not fl:
            continue
        ff, vc = tg.get("floor_fraction"), tg.get("vs_fastest_compile")
        floor_rows.append(
            f"| {res['name']} ({res['case']['batch']}) | {fl['ms']:.2f} ({fl['matmul_ms']:.2f} / {fl['global_attention_ms']:.2f} / "
            f"{fl['local_attention_ms']:.2f}) | {fl['img_per_s']:,.0f} | {fmt(fp.get('gflop_per_image'))} ({fmt(fp.get('gflop_per_image_release'))}) "
            f"| {pct(ff['value']) if ff else '-'}{' (met)' if ff and ff['met'] else ''} "
            f"| {fmt(vc['value'], '.2f') if vc else '-'} ({fmt(vc['target'], '.1f') if vc else '-'})"
            f"{' vs ' + vc['against'] if vc else ''} |")
    if floor_rows:
        lines += ["", "| preset (batch) | floor ms (matmul / global attn / local attn) | floor img/s | GFLOP/img (rel.) | fastlego / floor | x fastest compile (target) |",
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
                        f"| {fmt(r['reference_ms'] if done else None, '.3f')} | {fmt(r['auto_ms'] if done else None, '.3f')} "
                        f"| {fmt(r.get('speedup'), '.2f')} | {fmt(r['floor_ms'] if done else None, '.3f')} | {pct(r.get('frac_floor'))} "
                        f"| {fmt(r.get('gbps'), '.0f')} | {fmt(r.get('tflops'), '.1f')} |")
                if tot["auto_backend_ms"]:
                    lines.append(f"| {res['name']} | {kind}: all ops{'' if tot['complete'] else ' (incomplete)'} |  |  | "
                                 f"{tot['reference_ms']:.2f} | {tot['auto_backend_ms']:.2f} | {tot['reference_ms'] / tot['auto_backend_ms']:.2f} "
                                 f"| {tot['floor_ms']:.2f} | {pct(tot['floor_ms'] / tot['auto_backend_ms'])} |  |  |")
    backends = _backend_lines(report)
    if backends:
        lines += [""] + backends
    return "\n".join(lines) + "\n"


def _train_markdown(report: dict) -> List[str]:
    """The training table: one row per (workload, variant) timed in train mode."""
    lines = ["", "| preset (batch), train step | variant | img/s | ms / step | TFLOP/s (rel.) | % peak | x fastest compile "
                 "| peak GiB | loss (first / last) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for res in report["cases"]:
        name = f"{res['name']} ({res['case']['batch']})"
        e2e = res.get("end_to_end", {})
        comp = fastest_compile(e2e, "train")["ms"]
        for key, r in e2e.items():
            if r.get("mode") != "train":
                continue
            variant = r["variant"]
            if "checkpointed_blocks" in r:
                variant += f" ({r['checkpointed_blocks']} blocks)"
            if "ms" not in r:
                lines.append(f"| {name} | {variant} | error: {md_escape(r.get('error', '?'))[:160]} | - | - | - | - | - | - |")
                continue
            lines.append(
                f"| {name} | {variant} | {r['img_per_s']:.1f} | {r['ms']:.2f} | {fmt(r.get('tflops'))} ({fmt(r.get('tflops_release_count'))}) "
                f"| {pct(r.get('frac_peak'))} | {fmt(comp / r['ms'] if comp else None, '.2f')} "
                f"| {fmt(r.get('peak_gib'), '.1f')} | {fmt(r.get('loss'), '.3g')} / {fmt(r.get('loss_last'), '.3g')} |")
    return lines


def compile_lines(report: dict, mode: str) -> List[str]:
    """Under a table: per workload, each torch.compile variant of `mode` (ms, first call, graph
    breaks, budget mark or error), the fastest within the budget and fastlego's speed-ups over it
    and over each."""
    out = []
    mine = ("fastlego",) if mode == "infer" else ("fastlego", "fastlego_graph", "fastlego_graph_ckpt")
    for res in report["cases"]:
        e2e = res.get("end_to_end", {})
        comps = [r for r in e2e.values() if r.get("mode", "infer") == mode and is_compiled(r)]
        if not comps:
            continue
        parts = []
        for r in comps:
            how = f"`{r['variant']}` ({r.get('compile_mode', 'default')}{', CUDA graph' if r.get('cuda_graph') else ''})"
            if "ms" not in r:
                parts.append(f"{how}: {md_escape(r.get('error', '?'))[:160]}")
                continue
            first = f", first call {r['first_call_s']:.0f} s" if "first_call_s" in r else ""
            breaks = f", {r['graph_breaks']} graph breaks" if "graph_breaks" in r else ""
            mark = f" ({r['compile_budget_note']})" if r.get("over_compile_budget") else ""
            parts.append(f"{how}: {r['ms']:.2f} ms{first}{breaks}{mark}")
        fastest = fastest_compile(e2e, mode)
        where = f"{res['name']} ({res['case']['batch']})" + ("" if mode == "infer" else f", {mode}")
        text = f"torch.compile in {where}: " + "; ".join(parts) + ". "
        if fastest["variant"] is None:
            text += "No compile variant was timed within the budget."
        else:
            text += f"Fastest within the budget: `{fastest['variant']}` ({fastest['ms']:.2f} ms)"
            speedups = []
            for variant in mine:
                f = e2e.get(result_key(variant, mode), {})
                if "ms" in f:
                    each = ", ".join(f"{r['variant']} {r['ms'] / f['ms']:.2f}" for r in comps
                                     if "ms" in r and r.get("weights_dtype", "float32") == "float32")
                    speedups.append(f"`{variant}` x{fastest['ms'] / f['ms']:.2f} (against each: {each})")
            text += ("; " + "; ".join(speedups) if speedups else "") + "."
        out.append(text)
    return [""] + out if out else []


def latency_markdown(report: dict) -> List[str]:
    """The latency table: per workload (preset, batch), ms per network call of each variant and
    the two speed-ups held against their targets."""
    def cell(r: Optional[dict]) -> str:
        if r is None:
            return "not run"
        if "ms" not in r:
            return "refused (needs CUDA)" if "refused" in r else f"error: {md_escape(r.get('error', '?'))[:100]}"
        return f"{r['ms']:.3f}"

    def verdict(t: Optional[dict]) -> str:
        if not t:
            return "-"
        return f"{t['value']:.2f} ({'met' if t['met'] else 'missed'}: >= {t['target']:g})"

    lines = ["", "| preset (batch), latency | reference eager ms | compile_graph ms (compiled + CUDA graph) | fastlego eager ms "
                 "| fastlego_graph ms | fastlego_graph x compile_graph | fastlego x reference eager |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for res in report["cases"]:
        lat = {r["variant"]: r for r in res.get("end_to_end", {}).values() if r.get("mode") == "latency"}
        if not lat:
            continue
        tg = res.get("targets", {})
        lines.append(f"| {res['name']} ({res['case']['batch']}) | {cell(lat.get('reference'))} "
                     f"| {cell(lat.get('compile_graph'))} | {cell(lat.get('fastlego'))} | {cell(lat.get('fastlego_graph'))} "
                     f"| {verdict(tg.get('latency_graph_vs_compile_graph'))} | {verdict(tg.get('latency_eager_vs_reference'))} |")
    return lines


def _backend_lines(report: dict) -> List[str]:
    out = []
    for res in report["cases"]:
        for mode in ("infer", "train", "latency"):
            fast = res.get("end_to_end", {}).get(result_key("fastlego", mode), {})
            chosen = fast.get("backends", {}).get("chosen")
            if chosen:
                desc = ", ".join(f"{op}: " + "/".join(f"{b} x{n}" for b, n in c.items()) for op, c in chosen.items())
                where = {"infer": res["name"], "train": f"the training step of {res['name']} ({res['case']['batch']})",
                         "latency": f"the latency forward of {res['name']} ({res['case']['batch']})"}[mode]
                out.append(f"Backends chosen by auto in {where}: {desc}.")
    return out


def md_escape(s: str) -> str:
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
        return dtype_name(v)
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
