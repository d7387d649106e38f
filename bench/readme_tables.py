"""The README's benchmark tables, generated from `fastlego bench` JSON reports.

    python3 bench/readme_tables.py RESULT.json [RESULT.json ...]            # print the tables
    python3 bench/readme_tables.py --write RESULT.json [RESULT.json ...]    # replace them in README.md

Three tables, each between marker comments in README.md:

- `<!-- bench:infer -->` ... `<!-- /bench:infer -->`: inference images/s. One row per workload and
  weight holding (fp32 weights under autocast, or bf16 weights): the reference ops eager,
  torch.compile of them each way the run timed (torch's default mode, "max-autotune-no-cudagraphs",
  the compiled forward captured as a CUDA graph) and fastlego's auto backend, each cell the variant that held its weights
  that way (a bf16-weight baseline is only there when the run timed it: `--variants
  ...,reference_bf16,compile_bf16`). "x fastest compile" (naming that variant) and "/ floor" are
  computed from the report's milliseconds, fastlego against the baselines of the same row; a
  compile variant that did not compile within the run's budget is marked and is not the fastest.
- `<!-- bench:train -->` ... `<!-- /bench:train -->`: training steps. One row per workload and
  fastlego variant (eager, one CUDA graph, checkpointed blocks), beside the reference eager step
  and torch.compile of it each way (default mode, "max-autotune-no-cudagraphs", the compiled
  step captured as a CUDA graph): ms per step and peak GiB, speed-ups and memory ratio.
- `<!-- bench:latency -->` ... `<!-- /bench:latency -->`: ms per network call at small batches
  (`--modes latency`): the reference eager, torch.compile's forward captured as a CUDA graph,
  fastlego eager and
  fastlego replayed as a CUDA graph, and the two speed-ups against their targets.

Each table names the run it comes from: card, torch / CUDA / triton versions, date, the run's
profile and the report's path. A row's numbers all come from one report (several reports: a
workload's rows come from the last report given that has them). `--write` replaces only what is
between the markers, and refuses, changing nothing, when a table's markers are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastlego.benchmark.config import BF16_WEIGHT_VARIANTS, latency_target  # noqa: E402
from fastlego.benchmark.report import fmt, md_escape, pct  # noqa: E402
from fastlego.benchmark.summary import fastest_compile  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = {"infer": ("<!-- bench:infer -->", "<!-- /bench:infer -->"),
           "train": ("<!-- bench:train -->", "<!-- /bench:train -->"),
           "latency": ("<!-- bench:latency -->", "<!-- /bench:latency -->")}
# what a variant is, read from the report (see `role`): the torch.compile ways each have a column
ROLES = ("reference", "compile", "compile_max_autotune", "compile_graph", "fastlego")
COMPILE_COLUMNS = {"compile": "torch.compile(reference)", "compile_max_autotune": "max-autotune-no-cudagraphs",
                   "compile_graph": "torch.compile + CUDA graph"}


class TableError(Exception):
    """A report that cannot be read, or a README without the markers: the message says what to do."""


@dataclass
class Run:
    """One report: where it was read from and what it says about where it ran."""

    number: int
    path: str
    report: dict

    @property
    def env(self) -> dict:
        return self.report["environment"]

    @property
    def config(self) -> dict:
        return self.report.get("config", {})

    def describe(self) -> str:
        env = self.env
        where = env.get("gpu") or f"{env.get('device', '?')} ({env.get('cpu') or 'no GPU'})"
        libs = [f"torch {env.get('torch')}"] + [f"{name} {env[key]}" for name, key in
                                                (("CUDA", "cuda"), ("triton", "triton"), ("flash-attn", "flash_attn"),
                                                 ("xformers", "xformers")) if env.get(key)]
        profile = self.config.get("profile", "full")
        extra = ", interrupted" if self.report.get("interrupted") else ""
        return f"{where}, {', '.join(libs)}, {env.get('date', '?')}, {profile} run{extra} (`{self.path}`)"


def load_runs(paths: Sequence[str]) -> List[Run]:
    runs = []
    for i, path in enumerate(paths, 1):
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TableError(f"{path}: not a readable JSON report ({type(exc).__name__}: {exc}); pass the files "
                             "`fastlego bench --json PATH` writes") from exc
        if not isinstance(report, dict) or "environment" not in report or "cases" not in report:
            raise TableError(f"{path}: not a `fastlego bench` report (expected the keys 'environment' and 'cases')")
        runs.append(Run(i, path, report))
    return runs


# ---------------------------------------------------------------------------------------------
# What ran: a result's weight holding and role, from the report
# ---------------------------------------------------------------------------------------------

def holding(result: dict, config: dict) -> Tuple[str, Optional[str]]:
    """(weight dtype, autocast dtype or None) of an end-to-end result. Reports that predate the
    `weights_dtype` / `autocast_dtype` fields: bf16 weights without autocast for the `_bf16`
    variants, else fp32 weights under the run's autocast dtype."""
    if "weights_dtype" in result:
        return result["weights_dtype"], result.get("autocast_dtype")
    if result["variant"] in BF16_WEIGHT_VARIANTS:
        return "bfloat16", None
    return "float32", config.get("autocast_dtype")


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "e4m3 DiT-Linear"}
FP8_WEIGHTS = "float8_e4m3fn"   # fastlego_fp8: its baselines are the fp32-weight row's (fp32 + autocast elsewhere)


def holding_label(weights: str, autocast: Optional[str]) -> str:
    """"fp32 weights + bf16 autocast" / "bf16 weights, no autocast"."""
    w = _SHORT.get(weights, weights)
    return f"{w} weights + {_SHORT.get(autocast, autocast)} autocast" if autocast else f"{w} weights, no autocast"


def role(result: dict) -> str:
    """reference (the reference ops eager); torch.compile of them: compile (torch's default mode),
    compile_max_autotune ("max-autotune-no-cudagraphs") or compile_graph (the compiled forward, or
    in training the compiled step, captured as one CUDA graph; reports of before session 9:
    mode "reduce-overhead" for a forward); or fastlego
    (auto). Reports before the compile_mode / cuda_graph fields: compile variants are "compile"."""
    if result.get("compiled", result["variant"].startswith("compile")):
        if result.get("cuda_graph"):
            return "compile_graph"
        return "compile_max_autotune" if str(result.get("compile_mode", "")).startswith("max-autotune") else "compile"
    if result.get("dispatch_mode", "reference" if result["variant"].startswith("reference") else "auto") == "reference":
        return "reference"
    return "fastlego"


def latest_cases(runs: Sequence[Run], mode: str) -> List[Tuple[Run, dict]]:
    """(run, case) of every workload with results in `mode`, in the order first seen; a workload
    found in several reports is taken from the last one."""
    found: Dict[Tuple[str, int], Tuple[Run, dict]] = {}
    for run in runs:
        for case in run.report["cases"]:
            if any(r.get("mode", "infer") == mode for r in case.get("end_to_end", {}).values()):
                found[(case["name"], case["case"]["batch"])] = (run, case)
    return list(found.values())


def results_of(case: dict, mode: str) -> List[dict]:
    return [r for r in case.get("end_to_end", {}).values() if r.get("mode", "infer") == mode]


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------

def ratio(num: Optional[dict], den: Optional[dict], key: str = "ms") -> Optional[float]:
    """num[key] / den[key] when both results have it (a failed variant has no numbers)."""
    if not num or not den or key not in num or key not in den or not den[key]:
        return None
    return num[key] / den[key]


def _cell(result: Optional[dict], key: str, render: Callable[[dict], str]) -> str:
    """A variant's cell: "not run", "needs CUDA" when refused on the device, "failed (ErrorType)"
    when it has no `key`, else render(result), marked when it did not compile within the budget."""
    if result is None:
        return "not run"
    if "refused" in result:
        return "needs CUDA" if "CUDA" in result["refused"] else "refused"
    if key not in result:
        return f"failed ({md_escape(result.get('error', '?').split(':', 1)[0])})"
    budget = result.get("compile_budget_s")
    mark = (f" (over the {budget:.0f} s compile budget)" if budget else " (over the compile budget)") \
        if result.get("over_compile_budget") else ""
    return render(result) + mark


def rate_cell(result: Optional[dict]) -> str:
    """Images/s: whole numbers with thousands separators, one decimal below 100."""
    return _cell(result, "img_per_s", lambda r: f"{r['img_per_s']:,.0f}" if r["img_per_s"] >= 100
                 else f"{r['img_per_s']:,.1f}")


def ms_cell(result: Optional[dict]) -> str:
    """ms per call, three significant decimals below 10 ms."""
    return _cell(result, "ms", lambda r: f"{r['ms']:.3f} ms" if r["ms"] < 10 else f"{r['ms']:.2f} ms")


def fastest_of(by_role: Dict[str, dict], mode: str, hold: Tuple[str, Optional[str]]) -> dict:
    """The fastest compile variant among a row's (`fastest_compile`: timed, within the budget);
    the row's weight holding is theirs (reports before the holding fields do not say)."""
    found = [dict(by_role[r], weights_dtype=hold[0], mode=mode) for r in COMPILE_COLUMNS if r in by_role]
    return fastest_compile(found, mode, hold[0])


def fastest_cell(fast: Optional[dict], fastest: dict) -> str:
    """fastlego's speed-up over the fastest compile variant, naming it ("-" when there is none)."""
    if not fast or "ms" not in fast or fastest["variant"] is None:
        return "-"
    return f"{fastest['ms'] / fast['ms']:.2f} (`{fastest['variant']}`)"


def step_cell(result: Optional[dict]) -> str:
    """ms per step and, where measured (CUDA), the peak GiB."""
    def render(r):
        ms = f"{r['ms']:,.1f} ms" if r["ms"] >= 100 else f"{r['ms']:.2f} ms"
        return ms + (f", {r['peak_gib']:.1f} GiB" if "peak_gib" in r else "")
    return _cell(result, "ms", render)


def _table(header: Sequence[str], rows: List[Tuple[Run, List[str]]], runs_used: List[Run]) -> List[str]:
    """Markdown lines of a table; a `run` column when its rows come from several reports."""
    several = len(runs_used) > 1
    head = (["run"] if several else []) + list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run, cells in rows:
        lines.append("| " + " | ".join(([f"[{run.number}]"] if several else []) + cells) + " |")
    return lines


def _distinct(runs: List[Run]) -> List[Run]:
    return list({run.number: run for run in sorted(runs, key=lambda r: r.number)}.values())


def _tf32(runs_used: List[Run]) -> str:
    """", TF32 on" / ", TF32 off" when every run had it so, else nothing (each run's own setting)."""
    tf32 = {run.config.get("tf32", True) for run in runs_used}
    return "" if len(tf32) != 1 else (", TF32 on" if tf32 == {True} else ", TF32 off")


def _runs_text(runs_used: List[Run]) -> str:
    if len(runs_used) == 1:
        return runs_used[0].describe() + "."
    return " ".join(f"[{run.number}] {run.describe()}." for run in runs_used)


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------

def infer_section(runs: Sequence[Run]) -> Optional[str]:
    """The inference table (None when no report has inference results)."""
    rows = []
    for run, case in latest_cases(runs, "infer"):
        by_holding: Dict[Tuple[str, Optional[str]], Dict[str, dict]] = {}
        for r in results_of(case, "infer"):
            by_holding.setdefault(holding(r, run.config), {}).setdefault(role(r), r)
        floor = case.get("floor")
        for hold in sorted(by_holding, key=lambda h: (h[0] != "float32", str(h))):   # fp32 weights first
            cells = by_holding[hold]
            fast = cells.get("fastlego")
            base_hold = ("float32", hold[1]) if hold[0] == FP8_WEIGHTS else hold
            base = {r: c for r, c in by_holding.get(base_hold, {}).items() if r != "fastlego"}
            fastest = fastest_of(base, "infer", base_hold)
            names = ", ".join(f"`{c['variant']}`" for c in [base[r] for r in ROLES if r in base] + [fast] if c)
            rows.append((run, [f"{case['name']} ({case['case']['batch']})", f"{holding_label(*hold)}: {names}",
                               rate_cell(base.get("reference"))] + [rate_cell(base.get(r)) for r in COMPILE_COLUMNS]
                         + [rate_cell(fast), fastest_cell(fast, fastest), pct(ratio(floor, fast))]))
    if not rows:
        return None
    used = _distinct([run for run, _ in rows])
    text = ["Inference (`fastlego bench`, mode `infer`: one `torch.no_grad()` forward), images/s: the median of "
            f"timed rounds (CUDA events on a GPU){_tf32(used)}. Each row holds the weights one way; its variants "
            "are named. torch.compile of the reference model three ways: torch's default mode, "
            "mode=\"max-autotune-no-cudagraphs\", and the default-mode compiled forward captured once as a CUDA graph "
            "(torch.cuda.graph). \"x fastest compile\" = "
            "the ms of the fastest of them in the same row that compiled within the run's budget (named) / "
            "fastlego's ms; \"/ floor\" = the floor's ms (every matmul of the forward at cuBLAS speed in bf16 plus "
            "attention, measured in the same run) / fastlego's ms. " + _runs_text(used), ""]
    text += _table(["preset (batch)", "weights: variants", "reference eager"] + list(COMPILE_COLUMNS.values())
                   + ["fastlego", "x fastest compile", "/ floor"], rows, used)
    return "\n".join(text)


def train_section(runs: Sequence[Run]) -> Optional[str]:
    """The training table (None when no report has training results)."""
    rows = []
    for run, case in latest_cases(runs, "train"):
        results = results_of(case, "train")
        for fast in (r for r in results if role(r) == "fastlego"):
            hold = holding(fast, run.config)
            same = {role(r): r for r in results if holding(r, run.config) == hold and role(r) != "fastlego"}
            ref = same.get("reference")
            fastest = fastest_of(same, "train", hold)
            variant = f"`{fast['variant']}`"
            if "checkpointed_blocks" in fast:
                variant += f" ({fast['checkpointed_blocks']} blocks checkpointed)"
            rows.append((run, [f"{case['name']} ({case['case']['batch']})", f"{variant}, {holding_label(*hold)}",
                               step_cell(ref)] + [step_cell(same.get(r)) for r in COMPILE_COLUMNS]
                         + [step_cell(fast), fastest_cell(fast, fastest), fmt(ratio(ref, fast), ".2f"),
                            fmt(ratio(fast, ref, "peak_gib"), ".3f")]))
    if not rows:
        return None
    used = _distinct([run for run, _ in rows])
    text = ["Training step (`fastlego bench --modes train`: forward of EDMPrecond with every brick trained + EDM loss "
            f"+ backward + fused AdamW), ms per step: the median of timed rounds (CUDA events on a GPU){_tf32(used)}; "
            "GiB: the steady-state peak the variant allocates (weights, gradients, optimizer state, activations). "
            "torch.compile of the reference EDMPrecond three ways: torch's default mode, "
            "mode=\"max-autotune-no-cudagraphs\", and the default-mode compiled step captured as one CUDA graph "
            "(forward, loss, backward and a capturable AdamW). The baselines in a row hold their weights as its "
            "fastlego variant does. \"x fastest compile\" = the ms of the fastest compile variant that compiled "
            "within the run's budget (named) / fastlego's ms; \"x reference eager\" likewise; \"peak / eager\" = "
            "fastlego's peak GiB / the reference eager step's. " + _runs_text(used), ""]
    text += _table(["preset (batch)", "fastlego variant, weights", "reference eager"] + list(COMPILE_COLUMNS.values())
                   + ["fastlego", "x fastest compile", "x reference eager", "peak / eager"], rows, used)
    return "\n".join(text)


def _against(num: Optional[dict], den: Optional[dict], target: float) -> str:
    """num's ms / den's ms with the target and whether it is met ("-" without both timings)."""
    value = ratio(num, den)
    if value is None:
        return "-"
    return f"{value:.2f} ({'met' if value >= target else 'missed'}: >= {target:g})"


def latency_section(runs: Sequence[Run]) -> Optional[str]:
    """The latency table (None when no report has latency results)."""
    rows, holds = [], set()
    for run, case in latest_cases(runs, "latency"):
        by_variant = {r["variant"]: r for r in results_of(case, "latency")}
        holds.update(holding_label(*holding(r, run.config)) for r in by_variant.values())
        ref, comp = by_variant.get("reference"), by_variant.get("compile_graph")
        eager, graph = by_variant.get("fastlego"), by_variant.get("fastlego_graph")
        rows.append((run, [f"{case['name']} ({case['case']['batch']})", ms_cell(ref), ms_cell(comp), ms_cell(eager),
                           ms_cell(graph), _against(comp, graph, latency_target(case["case"]["batch"])),
                           _against(ref, eager, 1.0)]))
    if not rows:
        return None
    used = _distinct([run for run, _ in rows])
    hold = f", {holds.pop()}" if len(holds) == 1 else ""
    text = ["Latency (`fastlego bench --modes latency`): ms per network call (one backbone forward"
            f"{hold}) at small batches, as when sampling one to a few images at a time{_tf32(used)}: the "
            "median of timed rounds (CUDA events on a GPU). \"torch.compile + CUDA graph\" is torch.compile(reference)'s "
            "forward and \"fastlego CUDA graph\" fastlego's, each captured once with torch.cuda.graph and replayed on "
            "static inputs. Targets: fastlego's graph >= 1.5x torch.compile's from batch 16, >= 1.25x "
            "below; fastlego eager never slower than the reference eager. " + _runs_text(used), ""]
    text += _table(["preset (batch)", "reference eager", "torch.compile + CUDA graph", "fastlego eager",
                    "fastlego CUDA graph", "graph x compiled graph", "eager x reference eager"], rows, used)
    return "\n".join(text)


SECTIONS = {"infer": infer_section, "train": train_section, "latency": latency_section}


def replace_section(text: str, name: str, body: str, where: str = "README.md") -> str:
    """`text` with what lies between the `name` markers replaced by `body` (markers kept)."""
    start, end = MARKERS[name]
    if text.count(start) != 1 or text.count(end) != 1 or text.find(end) < text.find(start):
        found = f"found {start!r} {text.count(start)}x and {end!r} {text.count(end)}x"
        raise TableError(f"{where}: the {name} table needs its markers, once each, in this order: a line {start} "
                         f"before the table and a line {end} after it ({found}). Add them around the table "
                         f"(nothing outside them is changed), then run again.")
    i = text.index(start) + len(start)
    j = text.index(end)
    return text[:i] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="JSON reports of `fastlego bench` (--json)")
    p.add_argument("--write", action="store_true", help="replace the tables between the markers in the README")
    p.add_argument("--readme", default=str(README), help="the file --write edits (default: the repository's README.md)")
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.reports)
        sections = {name: make(runs) for name, make in SECTIONS.items()}
        if not any(sections.values()):
            raise TableError(f"no end-to-end results in {', '.join(args.reports)}: nothing to tabulate")
        if not args.write:
            for name, body in sections.items():
                if body:
                    print(f"{MARKERS[name][0]}\n{body}\n{MARKERS[name][1]}\n")
            return 0
        path = Path(args.readme)
        text = path.read_text(encoding="utf-8")
        for name, body in sections.items():
            if body:
                text = replace_section(text, name, body, str(path))
            else:
                print(f"readme_tables: no {name} results in the reports: the {name} table is left as it is",
                      file=sys.stderr)
        path.write_text(text, encoding="utf-8")
        print(f"readme_tables: wrote {', '.join(n for n, b in sections.items() if b)} table(s) into {path}")
        return 0
    except (TableError, OSError) as exc:
        print(f"readme_tables: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
