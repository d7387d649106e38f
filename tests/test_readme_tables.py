"""bench/readme_tables.py: the README's benchmark tables generated from `fastlego bench` JSON
reports, on hand-made reports whose every figure is known (the tables of a real CPU run are
checked in test_benchmark_smoke.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_readme_tables", ROOT / "bench" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


rt = _load_script()


def _e2e(variant, ms, batch, mode="infer", **extra):
    return {"variant": variant, "mode": mode, "batch": batch, "ms": ms, "img_per_s": batch / (ms * 1e-3), **extra}


def _env(gpu="NVIDIA H200", date="2026-12-01", torch="2.11.0+cu130"):
    return {"date": date, "device": "cuda", "gpu": gpu, "torch": torch, "cuda": "13.0", "triton": "3.6.0",
            "flash_attn": None, "xformers": None}


def _case(name, batch, end_to_end, floor_ms=None):
    case = {"name": name, "case": {"preset": name, "batch": batch}, "end_to_end": end_to_end}
    if floor_ms is not None:
        case["floor"] = {"ms": floor_ms}
    return case


def infer_report(**env):
    """The schema before the weight-holding fields: holding read from the variant names."""
    e2e = {"reference": _e2e("reference", 100.0, 256), "compile": _e2e("compile", 50.0, 256),
           "fastlego": _e2e("fastlego", 40.0, 256), "fastlego_bf16": _e2e("fastlego_bf16", 25.0, 256)}
    return {"schema": 1, "environment": _env(**env), "config": {"profile": "quick", "tf32": True,
                                                                  "autocast_dtype": "bfloat16"},
            "cases": [_case("lego_S_PG_64", 256, e2e, floor_ms=20.0)]}


def train_report(**env):
    fields = {"weights_dtype": "float32", "autocast_dtype": "bfloat16", "tf32": True}
    e2e = {"reference@train": _e2e("reference", 50.0, 32, "train", peak_gib=5.6, dispatch_mode="reference",
                                   compiled=False, **fields),
           "compile@train": _e2e("compile", 33.0, 32, "train", peak_gib=4.1, dispatch_mode="reference",
                                 compiled=True, **fields),
           "fastlego@train": _e2e("fastlego", 25.0, 32, "train", peak_gib=3.0, dispatch_mode="auto",
                                  compiled=False, **fields),
           "fastlego_graph@train": _e2e("fastlego_graph", 20.0, 32, "train", peak_gib=2.8, dispatch_mode="auto",
                                        compiled=False, **fields),
           "fastlego_graph_ckpt@train": _e2e("fastlego_graph_ckpt", 22.0, 32, "train", peak_gib=2.0,
                                             dispatch_mode="auto", compiled=False, checkpointed_blocks=6, **fields)}
    return {"schema": 1, "environment": _env(**env), "config": {"profile": "full", "tf32": True},
            "cases": [_case("lego_S_PG_64", 32, e2e)]}


def latency_report(**env):
    fields = {"weights_dtype": "float32", "autocast_dtype": "bfloat16", "tf32": True}
    cases = []
    for batch, (ref, comp, eager, graph) in ((1, (9.0, 4.0, 8.0, 3.0)), (16, (12.0, 6.0, 13.0, 4.5))):
        e2e = {"reference@latency": _e2e("reference", ref, batch, "latency", dispatch_mode="reference", compiled=False, **fields),
               "compile_graph@latency": _e2e("compile_graph", comp, batch, "latency", dispatch_mode="reference",
                                             compiled=True, compile_mode="default", cuda_graph=True, **fields),
               "fastlego@latency": _e2e("fastlego", eager, batch, "latency", dispatch_mode="auto", compiled=False, **fields),
               "fastlego_graph@latency": _e2e("fastlego_graph", graph, batch, "latency", dispatch_mode="auto",
                                              compiled=False, cuda_graph=True, **fields)}
        cases.append(_case("lego_S_PG_64", batch, e2e))
    return {"schema": 1, "environment": _env(**env), "config": {"profile": "quick", "tf32": True}, "cases": cases}


def _write(tmp_path, name, report) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return str(path)


def _rows(section: str, first_cell: str):
    """The cells of the table rows whose first cell is `first_cell`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_inference_rows_keep_weight_holdings_apart(tmp_path):
    """fastlego's fp32-weight row and its bf16-weight row are separate, each beside only the
    baselines that held their weights the same way; ratios come from the report's ms."""
    path = _write(tmp_path, "r.json", infer_report())
    text = rt.infer_section(rt.load_runs([path]))
    fp32, bf16 = _rows(text, "lego_S_PG_64 (256)")
    # reference, compile (default), max-autotune, compile + CUDA graph, fastlego, x fastest compile, / floor
    assert fp32 == ["lego_S_PG_64 (256)", "fp32 weights + bf16 autocast: `reference`, `compile`, `fastlego`",
                    "2,560", "5,120", "not run", "not run", "6,400", "1.25 (`compile`)", "50%"]
    # no bf16-weight baselines in this run: not borrowed from the fp32 row
    assert bf16 == ["lego_S_PG_64 (256)", "bf16 weights, no autocast: `fastlego_bf16`",
                    "not run", "not run", "not run", "not run", "10,240", "-", "80%"]
    for what in ("NVIDIA H200", "torch 2.11.0+cu130", "CUDA 13.0", "triton 3.6.0", "2026-12-01", "quick run", path):
        assert what in text, what
    assert "| run |" not in text  # one report: no run column


def test_bf16_baselines_and_failures(tmp_path):
    """With compile_bf16 timed, the bf16 row's speed-up is against it (not the fp32 compile); a
    failed variant shows its error type and gives no ratio."""
    report = infer_report()
    e2e = report["cases"][0]["end_to_end"]
    e2e["compile_bf16"] = _e2e("compile_bf16", 30.0, 256, weights_dtype="bfloat16", autocast_dtype=None,
                               dispatch_mode="reference", compiled=True)
    e2e["reference_bf16"] = {"variant": "reference_bf16", "mode": "infer", "batch": 256,
                             "error": "OutOfMemoryError: CUDA out of memory", "weights_dtype": "bfloat16",
                             "autocast_dtype": None, "dispatch_mode": "reference", "compiled": False}
    e2e["compile"] = {"variant": "compile", "mode": "infer", "batch": 256, "error": "RuntimeError: boom | x"}
    text = rt.infer_section(rt.load_runs([_write(tmp_path, "r.json", report)]))
    fp32, bf16 = _rows(text, "lego_S_PG_64 (256)")
    assert fp32[3] == "failed (RuntimeError)" and fp32[6:8] == ["6,400", "-"]
    assert bf16[1] == "bf16 weights, no autocast: `reference_bf16`, `compile_bf16`, `fastlego_bf16`"
    assert bf16[2:8] == ["failed (OutOfMemoryError)", "8,533", "not run", "not run", "10,240", "1.20 (`compile_bf16`)"]


def test_training_rows(tmp_path):
    text = rt.train_section(rt.load_runs([_write(tmp_path, "t.json", train_report())]))
    rows = {r[1]: r for r in _rows(text, "lego_S_PG_64 (32)")}
    assert set(rows) == {"`fastlego`, fp32 weights + bf16 autocast", "`fastlego_graph`, fp32 weights + bf16 autocast",
                         "`fastlego_graph_ckpt` (6 blocks checkpointed), fp32 weights + bf16 autocast"}
    graph = rows["`fastlego_graph`, fp32 weights + bf16 autocast"]
    # reference eager, compile, max-autotune, compile + CUDA graph, fastlego, x fastest compile (33/20),
    # x reference (50/20), peak / eager (2.8/5.6)
    assert graph[2:] == ["50.00 ms, 5.6 GiB", "33.00 ms, 4.1 GiB", "not run", "not run", "20.00 ms, 2.8 GiB",
                         "1.65 (`compile`)", "2.50", "0.500"]
    assert rows["`fastlego_graph_ckpt` (6 blocks checkpointed), fp32 weights + bf16 autocast"][-1] == "0.357"
    assert rt.infer_section(rt.load_runs([_write(tmp_path, "t.json", train_report())])) is None


def test_several_reports(tmp_path):
    """Each table names only the runs its rows come from; a workload in two reports is taken
    from the last one, all its numbers from that one report."""
    a = _write(tmp_path, "a.json", infer_report(gpu="NVIDIA H100 80GB HBM3", date="2026-11-01"))
    b = _write(tmp_path, "b.json", train_report(gpu="NVIDIA H200", date="2026-11-02"))
    newer = infer_report(date="2026-11-03", torch="2.12.0")
    newer["cases"][0]["end_to_end"]["fastlego"]["ms"] = 32.0
    c = _write(tmp_path, "c.json", newer)
    runs = rt.load_runs([a, b, c])
    infer, train = rt.infer_section(runs), rt.train_section(runs)
    assert "2026-11-03" in infer and "torch 2.12.0" in infer and "H100" not in infer and "2026-11-02" not in infer
    assert _rows(infer, "lego_S_PG_64 (256)")[0][7] == "1.56 (`compile`)"   # 50 / 32: compile and fastlego of report c
    assert "2026-11-02" in train and "2026-11-01" not in train and "2026-11-03" not in train
    # two workloads from two reports in one table: a run column and both runs named
    two = infer_report(date="2026-11-04")
    two["cases"][0].update(name="lego_L_PG_64", case={"preset": "lego_L_PG_64", "batch": 128})
    infer = rt.infer_section(rt.load_runs([a, _write(tmp_path, "d.json", two)]))
    assert infer.splitlines()[2].startswith("| run | preset (batch) |")
    assert "[1] NVIDIA H100" in infer and "[2] NVIDIA H200" in infer
    assert _rows(infer, "[2]")[0][1] == "lego_L_PG_64 (128)"


README_TEXT = """# title

intro, kept

<!-- bench:infer -->
an old caption

| old | table |
<!-- /bench:infer -->

between the tables, kept

<!-- bench:train -->
| old train |
<!-- /bench:train -->

after training, kept

<!-- bench:latency -->
| old latency |
<!-- /bench:latency -->

the end, kept
"""


def _outside(text: str):
    """The parts of a README outside the two marked sections."""
    parts = []
    for name, (start, end) in rt.MARKERS.items():
        head, _, rest = text.partition(start)
        parts.append(head)
        text = rest.partition(end)[2]
    return parts + [text]


def test_write_replaces_only_the_marked_sections(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    reports = [_write(tmp_path, "i.json", infer_report()), _write(tmp_path, "t.json", train_report())]
    assert rt.main(["--write", "--readme", str(readme), *reports]) == 0
    text = readme.read_text()
    assert _outside(text) == _outside(README_TEXT)
    assert "old caption" not in text and "| old | table |" not in text and "| old train |" not in text
    assert "| lego_S_PG_64 (256) | fp32 weights + bf16 autocast:" in text and "| lego_S_PG_64 (32) | `fastlego_graph`" in text
    assert text.index("<!-- bench:infer -->") < text.index("| lego_S_PG_64 (256) |") < text.index("<!-- /bench:infer -->")
    assert rt.main(["--write", "--readme", str(readme), *reports]) == 0
    assert readme.read_text() == text   # idempotent
    assert "| old latency |" in text   # no latency results: left as it is
    # a report with inference results only leaves the training table as it is
    readme.write_text(README_TEXT)
    assert rt.main(["--write", "--readme", str(readme), reports[0]]) == 0
    assert "| old train |" in readme.read_text() and "| old | table |" not in readme.read_text()
    assert "train table is left as it is" in capsys.readouterr().err
    # the latency report fills its own section only
    readme.write_text(README_TEXT)
    assert rt.main(["--write", "--readme", str(readme), _write(tmp_path, "l.json", latency_report())]) == 0
    text = readme.read_text()
    assert _outside(text) == _outside(README_TEXT) and "| old latency |" not in text
    assert "| old train |" in text and "| old | table |" in text
    assert text.index("<!-- bench:latency -->") < text.index("| lego_S_PG_64 (16) |") < text.index("<!-- /bench:latency -->")


@pytest.mark.parametrize("broken", ["missing", "reversed", "twice"])
def test_write_refuses_without_the_markers(tmp_path, capsys, broken):
    start, end = rt.MARKERS["train"]
    text = {"missing": README_TEXT.replace(start + "\n", ""),
            "reversed": README_TEXT.replace(start, "@@").replace(end, start).replace("@@", end),
            "twice": README_TEXT + start + "\n"}[broken]
    readme = tmp_path / "README.md"
    readme.write_text(text)
    reports = [_write(tmp_path, "i.json", infer_report()), _write(tmp_path, "t.json", train_report())]
    assert rt.main(["--write", "--readme", str(readme), *reports]) == 2
    err = capsys.readouterr().err
    assert start in err and end in err and "train table" in err
    assert readme.read_text() == text   # nothing written, the inference table neither


def test_unreadable_reports_fail_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert rt.main([str(bad)]) == 2
    assert "not a readable JSON report" in capsys.readouterr().err
    other = _write(tmp_path, "other.json", {"some": "thing"})
    assert rt.main([other]) == 2
    assert "not a `fastlego bench` report" in capsys.readouterr().err
    empty = _write(tmp_path, "empty.json", {"environment": _env(), "cases": []})
    assert rt.main([empty]) == 2
    assert "no end-to-end results" in capsys.readouterr().err


def test_the_repository_readme_has_the_markers():
    """`--write` on the real README finds both sections (checked without writing)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in rt.MARKERS:
        new = rt.replace_section(text, name, "GENERATED")
        assert "GENERATED" in new and _outside(new) == _outside(text)


def test_command_line_prints_the_sections(tmp_path):
    path = _write(tmp_path, "r.json", infer_report())
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_tables.py"), path], capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("<!-- bench:infer -->\n") and "<!-- /bench:infer -->" in out and "bench:train" not in out


def _all_compile_variants(report, over_budget=False, graph_error=None):
    """The inference report with every compile variant: default 50 ms, max-autotune 40 ms (over
    the budget when asked), compiled + CUDA graph 45 ms (or failed)."""
    e2e = report["cases"][0]["end_to_end"]
    fields = {"weights_dtype": "float32", "autocast_dtype": "bfloat16", "dispatch_mode": "reference", "compiled": True}
    e2e["compile_max_autotune"] = _e2e("compile_max_autotune", 40.0, 256, compile_mode="max-autotune-no-cudagraphs",
                                       cuda_graph=False, over_compile_budget=over_budget, compile_budget_s=900.0,
                                       **fields)
    e2e["compile_graph"] = _e2e("compile_graph", 45.0, 256, compile_mode="default", cuda_graph=True, **fields)
    if graph_error:
        del e2e["compile_graph"]["ms"], e2e["compile_graph"]["img_per_s"]
        e2e["compile_graph"]["error"] = graph_error
    return report


def test_compile_variants_each_have_a_column_and_the_fastest_is_named(tmp_path):
    """Each torch.compile way in its own column, read from the records' compile_mode and
    cuda_graph (not the names); "x fastest compile" against the fastest within the budget."""
    report = _all_compile_variants(infer_report())
    text = rt.infer_section(rt.load_runs([_write(tmp_path, "r.json", report)]))
    header = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert header == ["preset (batch)", "weights: variants", "reference eager", "torch.compile(reference)",
                      "max-autotune-no-cudagraphs", "torch.compile + CUDA graph", "fastlego", "x fastest compile",
                      "/ floor"]
    fp32 = _rows(text, "lego_S_PG_64 (256)")[0]
    assert fp32[1] == ("fp32 weights + bf16 autocast: `reference`, `compile`, `compile_max_autotune`, `compile_graph`, "
                       "`fastlego`")
    assert fp32[3:8] == ["5,120", "6,400", "5,689", "6,400", "1.00 (`compile_max_autotune`)"]   # 40 / 40
    # max-autotune over the budget: shown and marked, the fastest is then the compiled graph (45 / 40)
    report = _all_compile_variants(infer_report(), over_budget=True)
    fp32 = _rows(rt.infer_section(rt.load_runs([_write(tmp_path, "r.json", report)])), "lego_S_PG_64 (256)")[0]
    assert fp32[4] == "6,400 (over the 900 s compile budget)" and fp32[7] == "1.12 (`compile_graph`)"
    # and the compiled graph failed: the default mode is the fastest left
    report = _all_compile_variants(infer_report(), over_budget=True, graph_error="RuntimeError: capture")
    fp32 = _rows(rt.infer_section(rt.load_runs([_write(tmp_path, "r.json", report)])), "lego_S_PG_64 (256)")[0]
    assert fp32[5] == "failed (RuntimeError)" and fp32[7] == "1.25 (`compile`)"
    # a compile variant refused on the device (no CUDA)
    report = infer_report()
    report["cases"][0]["end_to_end"]["compile_graph"] = {
        "variant": "compile_graph", "mode": "infer", "batch": 256, "compiled": True, "cuda_graph": True,
        "compile_mode": "default", "refused": "compile_graph needs a CUDA GPU (it replays CUDA graphs)",
        "error": "refused: compile_graph needs a CUDA GPU"}
    fp32 = _rows(rt.infer_section(rt.load_runs([_write(tmp_path, "r.json", report)])), "lego_S_PG_64 (256)")[0]
    assert fp32[5] == "needs CUDA" and fp32[7] == "1.25 (`compile`)"
    # a report before the holding fields: compile_bf16 is the bf16 row's fastest (50 / 25), by its name
    report = infer_report()
    report["cases"][0]["end_to_end"]["compile_bf16"] = _e2e("compile_bf16", 50.0, 256)
    fp32, bf16 = _rows(rt.infer_section(rt.load_runs([_write(tmp_path, "r.json", report)])), "lego_S_PG_64 (256)")
    assert bf16[3] == "5,120" and bf16[7] == "2.00 (`compile_bf16`)" and fp32[7] == "1.25 (`compile`)"


def test_training_rows_against_the_fastest_compile(tmp_path):
    """The compiled step captured as a CUDA graph (cuda_graph, default mode) has its column and
    is the fastest here: "x fastest compile" names it."""
    report = train_report()
    fields = {"weights_dtype": "float32", "autocast_dtype": "bfloat16", "tf32": True, "dispatch_mode": "reference",
              "compiled": True}
    e2e = report["cases"][0]["end_to_end"]
    e2e["compile_graph@train"] = _e2e("compile_graph", 25.0, 32, "train", peak_gib=4.0, compile_mode="default",
                                      cuda_graph=True, **fields)
    e2e["compile_max_autotune@train"] = _e2e("compile_max_autotune", 30.0, 32, "train", peak_gib=4.1,
                                             compile_mode="max-autotune-no-cudagraphs", cuda_graph=False, **fields)
    text = rt.train_section(rt.load_runs([_write(tmp_path, "t.json", report)]))
    rows = {r[1]: r for r in _rows(text, "lego_S_PG_64 (32)")}
    graph = rows["`fastlego_graph`, fp32 weights + bf16 autocast"]
    assert graph[3:8] == ["33.00 ms, 4.1 GiB", "30.00 ms, 4.1 GiB", "25.00 ms, 4.0 GiB", "20.00 ms, 2.8 GiB",
                          "1.25 (`compile_graph`)"]
    assert "max-autotune-no-cudagraphs" in text.splitlines()[0] and "| torch.compile + CUDA graph |" in text


def test_latency_rows(tmp_path):
    """ms per network call of the four variants and the two speed-ups against their targets:
    1.25x below batch 16, 1.5x at 16; eager never slower than the reference eager."""
    path = _write(tmp_path, "l.json", latency_report())
    runs = rt.load_runs([path])
    text = rt.latency_section(runs)
    assert rt.infer_section(runs) is None and rt.train_section(runs) is None
    header = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert header == ["preset (batch)", "reference eager", "torch.compile + CUDA graph", "fastlego eager",
                      "fastlego CUDA graph", "graph x compiled graph", "eager x reference eager"]
    [b1] = _rows(text, "lego_S_PG_64 (1)")
    [b16] = _rows(text, "lego_S_PG_64 (16)")
    assert b1[1:] == ["9.000 ms", "4.000 ms", "8.000 ms", "3.000 ms", "1.33 (met: >= 1.25)", "1.12 (met: >= 1)"]
    assert b16[1:] == ["12.00 ms", "6.000 ms", "13.00 ms", "4.500 ms", "1.33 (missed: >= 1.5)",
                       "0.92 (missed: >= 1)"]
    for what in ("fp32 weights + bf16 autocast", "NVIDIA H200", "quick run", path):
        assert what in text, what
    # a variant refused on the device, one that failed
    report = latency_report()
    e2e = report["cases"][0]["end_to_end"]
    e2e["fastlego_graph@latency"] = {"variant": "fastlego_graph", "mode": "latency", "batch": 1,
                                     "refused": "fastlego_graph needs a CUDA GPU", "error": "refused: ..."}
    e2e["compile_graph@latency"] = {"variant": "compile_graph", "mode": "latency", "batch": 1, "compiled": True,
                                    "error": "BackendCompilerFailed: x"}
    [b1] = _rows(rt.latency_section(rt.load_runs([_write(tmp_path, "l.json", report)])), "lego_S_PG_64 (1)")
    assert b1[2] == "failed (BackendCompilerFailed)" and b1[4] == "needs CUDA" and b1[5] == "-"
