"""CPU smoke test of the benchmark machinery (fastlego.benchmark) at tiny sizes.

The real benchmark runs on a GPU (`fastlego bench`, `pytest bench/`); this checks that the whole
pipeline works end to end: device limits, FLOP counts, the floor, the end-to-end variants (a
failing torch.compile recorded as an error string, a CUDA-graph variant refused on the CPU with
the reason) with how each held its weights, the per-kernel timings at the call sites the
dispatcher's observer hook recorded, the JSON report, the markdown table and the README tables
generated from the report (bench/readme_tables.py); the train mode (forward + EDM loss +
backward + AdamW step), with a failing variant recorded as an error while the run goes on; the
latency mode and its table; each compile variant's torch.compile mode, the compile budget and
the fastest compile variant the targets are held against (torch.compile replaced by a stand-in:
no compilation here); and that it runs without triton. The `cuda` tests run the CUDA-graph and
compile variants for real on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlego import benchmark as bm
from fastlego import dispatch

# lego_S_U_32 at batch 1 with one block per brick: global attention (T=256), window attention
# (T=4) and labels, at about 3 GFLOP a forward.
TINY = ["--device", "cpu", "--tiny", "--presets", "lego_S_U_32:1", "--depths", "1,1,1,1,1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops on a shared CPU: one thread is faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


INFER_VARIANTS = ("reference", "fastlego", "fastlego_bf16", "fastlego_fp8", "compile", "compile_max_autotune",
                  "compile_graph", "reference_bf16", "compile_bf16")


def _failing_compile(model, *args, **kwargs):
    raise RuntimeError(f"injected compile failure (mode={kwargs.get('mode')})")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, _one_thread):
    """One tiny CLI run with every inference variant: torch.compile fails on purpose (a
    stand-in that raises, saying which mode it was given), compile_graph is refused (CPU)."""
    out = tmp_path_factory.mktemp("bench")
    md = out / "RESULTS.md"
    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "compile", _failing_compile)
    try:
        rc = bm.main(TINY + ["--variants", ",".join(INFER_VARIANTS), "--compile",
                             "--json", str(out / "r.json"), "--markdown", str(md)])
    finally:
        mp.undo()
    return rc, json.loads((out / "r.json").read_text()), md


def test_cli_writes_report(tiny_run):
    rc, report, md = tiny_run
    assert rc == 0
    env = report["environment"]
    for key in ("date", "torch", "triton", "flash_attn", "xformers", "device"):
        assert key in env  # None when a library is absent
    assert env["torch"] == torch.__version__
    lim = report["limits"]
    assert lim["matmul_peak"]["tflops"] > 0 and lim["copy_bandwidth"]["gbps"] > 0
    [case] = report["cases"]
    assert case["case"]["depths"] == [1, 1, 1, 1, 1] and case["case"]["label_dim"] == 1000


def test_flops_and_floor(tiny_run):
    _, report, _ = tiny_run
    [case] = report["cases"]
    fl = case["flops"]
    # FlopCounterMode on the reference forward == the floor's enumeration of matmuls + attention
    assert fl["per_image_counted"] == fl["per_image_analytic"] == fl["per_image"] > 0
    assert fl["per_image_release"] > fl["per_image"]  # the release repeats adaLN per region
    floor = case["floor"]
    assert floor["ms"] > 0 and floor["img_per_s"] > 0
    assert floor["matmul_ms"] > 0 and floor["global_attention_ms"] > 0 and floor["local_attention_ms"] > 0
    assert math.isclose(floor["ms"], sum(i["ms"] for i in floor["items"]), rel_tol=1e-9)
    kinds = {i["kind"] for i in floor["items"]}
    assert kinds == {"matmul", "global_attention", "local_attention"}


def test_end_to_end_variants(tiny_run):
    _, report, _ = tiny_run
    [case] = report["cases"]
    e2e = case["end_to_end"]
    assert set(e2e) == set(INFER_VARIANTS)
    for name in ("reference", "fastlego", "fastlego_bf16", "reference_bf16"):
        r = e2e[name]
        assert "error" not in r, r.get("error")
        for key in ("ms", "img_per_s", "tflops", "tflops_release_count", "frac_peak", "frac_floor"):
            assert r[key] > 0, (name, key, r[key])
        assert r["timing"]["rounds"] == 2
        assert 0 < r["rel_err_vs_fp32"] < 0.05, (name, r["rel_err_vs_fp32"])  # bf16 against fp32
        assert sum(sum(c.values()) for c in r["backends"]["chosen"].values()) > 0
    # the auto backend's choices are recorded; on the CPU every op runs the reference
    assert set(e2e["fastlego"]["backends"]["chosen"]) >= {"brick_embed", "modulated_linear", "final_layer"}
    # each compile variant asked torch.compile for its own mode; the failure is its row's error
    for name, mode in (("compile", None), ("compile_bf16", None), ("compile_max_autotune", "max-autotune-no-cudagraphs")):
        assert e2e[name]["error"] == f"RuntimeError: injected compile failure (mode={mode})" and "ms" not in e2e[name]
        assert e2e[name]["compile_mode"] == (mode or "default") and e2e[name]["compile_budget_s"] == bm.COMPILE_BUDGET_S
    # CUDA graphs on the CPU: refused before anything is built, with the reason
    graph = e2e["compile_graph"]
    assert "ms" not in graph and "first_call_s" not in graph and "needs a CUDA GPU" in graph["refused"]
    assert graph["error"] == "refused: " + graph["refused"] and graph["compile_mode"] == "default"
    # FP8 on the CPU: refused before anything is built, naming why
    fp8_row = e2e["fastlego_fp8"]
    assert "ms" not in fp8_row and "FP8 tensor cores" in fp8_row["refused"] and "tuning" not in e2e["fastlego"]
    # what ran, in the report: weight holding, autocast, dispatcher mode, compiled or not, CUDA graph or not
    held = {name: (r["weights_dtype"], r["autocast_dtype"], r["dispatch_mode"], r["compiled"], r["cuda_graph"])
            for name, r in e2e.items()}
    assert held == {"reference": ("float32", "bfloat16", "reference", False, False),
                    "fastlego": ("float32", "bfloat16", "auto", False, False),
                    "compile": ("float32", "bfloat16", "reference", True, False),
                    "compile_max_autotune": ("float32", "bfloat16", "reference", True, False),
                    "compile_graph": ("float32", "bfloat16", "reference", True, True),
                    "fastlego_bf16": ("bfloat16", None, "auto", False, False),
                    "fastlego_fp8": ("float8_e4m3fn", "bfloat16", "auto", False, False),
                    "reference_bf16": ("bfloat16", None, "reference", False, False),
                    "compile_bf16": ("bfloat16", None, "reference", True, False)}
    assert e2e["compile_max_autotune"]["description"] == bm.VARIANT_HELP["compile_max_autotune"]
    # no compile variant was timed: no fastest, no speed-up target verdict
    fastest = case["targets"]["fastest_compile"]
    assert fastest["variant"] is None and set(fastest["excluded"]) == {"compile", "compile_max_autotune", "compile_graph"}
    assert "vs_fastest_compile" not in case["targets"]
    assert e2e["reference_bf16"]["weights_gib"] == pytest.approx(e2e["reference"]["weights_gib"] / 2, rel=0.01)
    assert case["targets"]["floor_fraction"]["target"] == bm.FLOOR_TARGET


def test_kernels(tiny_run):
    _, report, _ = tiny_run
    [case] = report["cases"]
    c = bm.with_depths(bm.default_case("lego_S_U_32", 1), [1] * 5)
    expected = bm.expected_op_keys(c, ("autocast", "bf16"))
    assert set(case["op_cases"]) == {k for k, _ in expected}  # collection-time keys == recorded sites
    assert len(expected) == 2 * (5 * 7 + 1)
    rows = {(k["key"], k["backend"]): k for k in case["kernels"]}
    for key, op in expected:
        ref = rows[(key, "reference")]
        assert ref["ms"] > 0 and ref["gbps"] > 0 and ref["floor_ms"] > 0 and ref["bytes"] > 0, ref
        assert ref["flops"] > 0 and ref["rel_err_vs_reference"] == 0
        assert rows[(key, "auto")]["ms"] > 0
        assert "refused" in rows[(key, "triton")]  # CPU tensors: Triton refuses, with its reasons
    att = rows[("autocast:b0.global_attention.T256", "reference")]
    assert att["flops"] == 4 * 1 * 256 * 256 * 384  # N * T^2 * D * 4 (q k^T and p v)
    oc = case["op_cases"]
    assert oc["autocast:b0.modulated_linear.qkv"]["count"] == 1 and oc["autocast:b1.window_attention.T16"]["extra"]
    # autocast: fp32 weights with bf16 activations; bf16: everything bf16
    dtypes = [a["dtype"] for a in oc["autocast:b0.modulated_linear.qkv"]["args"][:5]]  # h, shift, scale, weight, bias
    assert dtypes == ["bfloat16"] * 3 + ["float32"] * 2
    assert oc["autocast:b0.modulated_linear.qkv"]["autocast"] == "bfloat16"
    assert {a["dtype"] for a in oc["bf16:b0.modulated_linear.qkv"]["args"][:5]} == {"bfloat16"}
    assert oc["bf16:b0.modulated_linear.qkv"]["autocast"] is None
    ops = case["kernel_summary"]["ops"]
    for kind in ("autocast", "bf16"):
        assert ops[f"{kind}:modulated_linear.qkv"]["calls"] == 5 and ops[f"{kind}:modulated_linear.qkv"]["auto_ms"] > 0
        assert case["kernel_summary"]["forward_total"][kind]["complete"]


def test_markdown_appended(tiny_run, tmp_path):
    _, report, md = tiny_run
    text = md.read_text()
    assert text.startswith(bm.RESULTS_HEADER)
    assert f"## {report['environment']['date']}: cpu" in text
    assert "| lego_S_U_32[depths=1,1,1,1,1] (1) | fastlego |" in text
    assert "| lego_S_U_32[depths=1,1,1,1,1] (1) | compile | error: RuntimeError" in text
    assert "| lego_S_U_32[depths=1,1,1,1,1] (1) | compile_graph | error: refused: compile_graph needs a CUDA GPU" in text
    [line] = [x for x in text.splitlines() if x.startswith("torch.compile in lego_S_U_32")]
    assert "`compile_max_autotune` (max-autotune-no-cudagraphs): RuntimeError: injected" in line
    assert line.endswith("No compile variant was timed within the budget.")
    assert "| autocast:modulated_linear.qkv | 5 | reference |" in text
    assert "| bf16:modulated_linear.qkv | 5 | reference |" in text
    assert "| bf16: all ops |" in text
    # appending again keeps the header once and adds a second dated section
    again = tmp_path / "R.md"
    again.write_text(text)
    bm.append_results_markdown(report, again)
    assert again.read_text().count("# fastlego benchmark results") == 1
    assert again.read_text().count(f"## {report['environment']['date']}") == 2


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_script(name: str):
    """A script of bench/ imported as a module (its main is not run)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_readme_tables_from_a_cpu_run(tiny_run, train_run, tmp_path):
    """bench/readme_tables.py on the reports of a real (CPU) run: the fp32-weight and bf16-weight
    rows each hold the variants that held their weights that way, each compile variant in its
    own column, a failed compile shows as such and a refused one as needing CUDA, the run's
    versions and date are named, and --write fills marked sections."""
    rt = _bench_script("readme_tables")
    _, report, _ = tiny_run
    _, train, _ = train_run
    paths = [tmp_path / "infer.json", tmp_path / "train.json"]
    paths[0].write_text(json.dumps(report))
    paths[1].write_text(json.dumps(train))
    runs = rt.load_runs([str(p) for p in paths])
    infer_text, train_text = rt.infer_section(runs), rt.train_section(runs)
    [case] = report["cases"]
    e2e, name = case["end_to_end"], f"{case['name']} ({case['case']['batch']})"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in infer_text.splitlines()
            if line.startswith(f"| {name} |")]
    assert [r[1] for r in rows] == [
        "fp32 weights + bf16 autocast: `reference`, `compile`, `compile_max_autotune`, `compile_graph`, `fastlego`",
        "bf16 weights, no autocast: `reference_bf16`, `compile_bf16`, `fastlego_bf16`",
        # FP8: its baselines are the fp32-weight row's (fp32 weights under autocast outside the DiT Linears)
        "e4m3 DiT-Linear weights + bf16 autocast: `reference`, `compile`, `compile_max_autotune`, `compile_graph`, "
        "`fastlego_fp8`"]
    fp32, bf16, fp8_row = rows
    assert fp8_row[2:6] == fp32[2:6] and fp8_row[6] == rt.rate_cell(e2e["fastlego_fp8"]) != fp32[6]
    # reference, compile (default), max-autotune, compile + CUDA graph, fastlego, x fastest compile, / floor
    assert fp32[2:7] == [rt.rate_cell(e2e["reference"]), "failed (RuntimeError)", "failed (RuntimeError)", "needs CUDA",
                         rt.rate_cell(e2e["fastlego"])]
    assert bf16[2:7] == [rt.rate_cell(e2e["reference_bf16"]), "failed (RuntimeError)", "not run", "not run",
                         rt.rate_cell(e2e["fastlego_bf16"])]
    assert fp32[7] == bf16[7] == "-"   # no speed-up over compiles that failed
    assert fp32[8] == f"{100 * case['floor']['ms'] / e2e['fastlego']['ms']:.0f}%"
    assert bf16[8] == f"{100 * case['floor']['ms'] / e2e['fastlego_bf16']['ms']:.0f}%"
    env = report["environment"]
    for what in (f"torch {env['torch']}", f"triton {env['triton']}", env["date"], "tiny run", str(paths[0])):
        assert what in infer_text, what
    # training: the fastlego step beside the reference eager step and torch.compile (aot_eager here)
    t = train["cases"][0]["end_to_end"]
    [row] = [[c.strip() for c in line.strip("|").split("|")] for line in train_text.splitlines()
             if line.startswith(f"| {name} |")]
    assert row[1] == "`fastlego`, fp32 weights + bf16 autocast"
    assert row[4:6] == ["not run", "not run"]   # compile_max_autotune, compile_graph
    assert row[7] == f"{t['compile@train']['ms'] / t['fastlego@train']['ms']:.2f} (`compile`)"
    assert row[8] == f"{t['reference@train']['ms'] / t['fastlego@train']['ms']:.2f}"
    assert row[9] == "-"   # no peak memory on the CPU
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:infer -->\nold\n<!-- /bench:infer -->\nb\n<!-- bench:train -->\nold\n<!-- /bench:train -->\nc\n")
    assert rt.main(["--write", "--readme", str(readme)] + [str(p) for p in paths]) == 0
    text = readme.read_text()
    assert "\nold\n" not in text and text.startswith("a\n<!-- bench:infer -->\nInference") and text.endswith("-->\nc\n")
    assert text.count(f"| {name} |") == 4   # infer: fp32, bf16 and FP8 weights; train: one


def test_bench_scripts_time_with_the_package_timer():
    """The scripts of bench/ import what they use from fastlego.benchmark, and every one that
    times something does it with its one timer (`measure`), not a loop of its own."""
    pytest.importorskip("triton")
    for name in ("attention_layouts", "checkpoint_memory", "gemm_shapes", "probe_gelu_gemm", "profile_train",
                 "fp8_gemm", "profile_small_batch", "probe_cublaslt_epilogues"):
        module = _bench_script(name)
        assert module.measure is bm.measure, name
        source = open(module.__file__).read()
        assert "Event(" not in source and "perf_counter" not in source and "do_bench" not in source, name
    for name in ("checkpoint_memory", "profile_train"):
        assert _bench_script(name).STEP_BUILDERS is bm.STEP_BUILDERS
    proc = subprocess.run([sys.executable, "-m", "fastlego.benchmark", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "fastlego bench" in proc.stdout and "compile_bf16" in proc.stdout, proc.stderr


def test_train_end_to_end_reads_the_runs_steady_rate(monkeypatch, capsys):
    """bench/train_end_to_end.py: the run's images/s over the log windows after the skipped ones
    (each window's images = its rate x its span), a clear error when none is left, and a clear
    refusal without a GPU."""
    e2e = _bench_script("train_end_to_end")
    windows = [{"images_per_s": 100.0, "seconds": 5.0}, {"images_per_s": 200.0, "seconds": 6.0},
               {"images_per_s": 100.0, "seconds": 8.0}, {"event": "resumed"}]
    assert e2e.steady_images_per_s(windows, 1) == pytest.approx((200 * 1 + 100 * 2) / 3)
    assert e2e.steady_images_per_s(windows, 0) == pytest.approx((500 + 200 + 200) / 8)
    with pytest.raises(ValueError, match="logged 3 window.*train more steps"):
        e2e.steady_images_per_s(windows, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert e2e.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_fp8_training_emulation_rounds_each_gemm_operand_along_its_reduced_axis():
    """bench/fp8_training_quality.py: e4m3 rounding with one scale per slice of the reduced axis
    (an exact e4m3 value times a power of two survives; a zero slice stays zero), the linear's
    forward and three gradients within e4m3's few-percent error of the exact ones (so not exact:
    the rounding is applied), and the patch reaches exactly the block GEMMs' shapes."""
    q = _bench_script("fp8_training_quality")
    t = torch.tensor([[1.0, -0.5, 448.0], [0.0, 0.0, 0.0]])
    assert torch.equal(q.fake_e4m3(t, 1), t)
    # 3 mantissa bits: 17 lies halfway between 16 and 18 and rounds to even (16); per-slice scales
    rows = torch.tensor([[448.0, 17.0], [896.0, 34.0], [0.0, 0.0]])   # scales 1, 2 (exact), none
    assert torch.equal(q.fake_e4m3(rows, 1), torch.tensor([[448.0, 16.0], [896.0, 32.0], [0.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    w = torch.randn(96, 64, generator=g, requires_grad=True)
    b = torch.randn(96, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 96, generator=g)
    y = q.FP8RowwiseLinear.apply(x, w, b)
    got = [y] + list(torch.autograd.grad(y, (x, w, b), grad))
    y_exact = torch.nn.functional.linear(x, w, b)
    exact = [y_exact] + list(torch.autograd.grad(y_exact, (x, w, b), grad))
    for name, a, e in zip(("y", "dx", "dw"), got, exact):
        rel = ((a - e).norm() / e.norm()).item()
        assert 1e-3 < rel < 0.06, (name, rel)
    assert torch.allclose(got[3], exact[3])   # the bias gradient has no GEMM
    assert q.block_gemm_shapes("8:w128p4h4:1,16:w128p8h4:2") == {(384, 128), (128, 128), (512, 128), (128, 512)}


def test_dispatch_record_observer_sees_each_call_that_ran():
    """The site recorder's hook, `dispatch.record(on_call=...)`: each op call reported once, after
    it returned, with the decision that ran (a backend that failed at run time is not reported,
    the fallback that ran is), its arguments and the module it ran in; a nested block's calls go
    to the nested observer only."""
    op = "_bench_smoke_observed_op"

    def failing(x, scale=1.0):
        raise RuntimeError("injected run-time failure")

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(dispatch.call(op, x))

    class Inner(torch.nn.Module):
        def forward(self, x):
            return dispatch.call(op, x, scale=3.0)

    dispatch.register(op, "reference", lambda x, scale=1.0: x * scale)
    dispatch.register(op, "flaky", failing, priority=0)
    seen, nested = [], []
    try:
        x, model = torch.ones(2, 3), Outer()
        with dispatch.use_backend("auto"), pytest.warns(RuntimeWarning, match="injected run-time failure"), \
                dispatch.record(site_modules=model, on_call=lambda d, a, k: seen.append((d, a, k))) as rec:
            out = model(x)
            with dispatch.record(on_call=lambda d, a, k: nested.append(d)):
                dispatch.call(op, x)
        assert torch.equal(out, 3 * x)
        assert [(d.site, d.chosen) for d, _, _ in seen] == [("", "reference"), ("inner", "reference")]
        assert seen[0][0] is rec[0] and seen[1][0] is rec[1] and len(rec) == 2   # the failed attempt is gone
        assert seen[0][1][0] is x and seen[0][2] == {} and seen[1][2] == {"scale": 3.0}
        assert "failed at run time" in seen[1][0].refused["flaky"][0]   # retired after its failure
        assert len(nested) == 1 and nested[0].chosen == "reference"
    finally:
        dispatch.unregister(op)
    assert dispatch._observer is None and dispatch._recorder is None


def test_analytic_flops_match_baseline():
    """The release-equivalent count reproduces BASELINE.md's GFLOP/img (FlopCounterMode there)."""
    for name, gflop in (("lego_S_PG_64", 40.9), ("lego_L_PG_64", 550.9), ("lego_XL_U_32", 285.9)):
        case = dataclasses.replace(bm.default_case(name), batch=1)
        assert round(bm.analytic_flops(case, per_region_adaln=True) / 1e9, 1) == gflop, name
        assert bm.analytic_flops(case) < bm.analytic_flops(case, per_region_adaln=True)


def test_measure_tops_up_when_the_runner_skips_rounds():
    """pytest-benchmark disabled runs the target once: measure still times `rounds` rounds."""
    calls = []
    t = bm.measure(lambda: calls.append(1), device="cpu", rounds=4, warmup=2, inner=3,
                   runner=lambda target, rounds, warmup: target())
    assert t.rounds == 4 and t.inner == 3 and t.median_ms >= 0
    assert len(calls) == 3 * 6


def test_bad_options_fail_clearly(capsys):
    assert bm.main(["--device", "cpu", "--presets", "lego_S_PG_64:x"]) == 2
    assert "NAME:BATCH" in capsys.readouterr().err
    assert bm.main(["--device", "cpu", "--presets", "lego_S_PG_64", "--depths", "1,1"]) == 2
    assert "3 positive integers" in capsys.readouterr().err
    assert bm.main(["--device", "cpu", "--modes", "backward"]) == 2
    assert "not implemented" in capsys.readouterr().err
    assert bm.main(["--device", "cpu", "--modes", "train", "--variants", "fastlego_bf16"]) == 2
    assert "has a train mode" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown LEGO preset"):
        bm.parse_cases("lego_Q")


def test_runs_without_triton(tmp_path):
    """With triton unimportable, the benchmark still runs and records why Triton was refused."""
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        torch.set_num_threads(1)
        from fastlego import benchmark as bm
        rc = bm.main({TINY!r} + ["--variants", "fastlego", "--no-floor", "--no-check",
                                 "--json", {str(tmp_path / 'r.json')!r}, "--no-markdown"])
        r = json.load(open({str(tmp_path / 'r.json')!r}))
        case = r["cases"][0]
        assert rc == 0 and case["end_to_end"]["fastlego"]["img_per_s"] > 0
        refused = case["end_to_end"]["fastlego"]["backends"]["refused"]["modulated_linear"]["triton"]
        assert any("could not be loaded" in reason for reason in refused), refused
        triton_rows = [k for k in case["kernels"] if k["backend"] == "triton"]
        assert triton_rows and all("could not be loaded" in k["refused"][0] for k in triton_rows)
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_interrupted_run_keeps_its_numbers(tmp_path, monkeypatch, capsys):
    """Ctrl-C / SIGTERM mid-run: the JSON and markdown still hold what was measured."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt("test")
    monkeypatch.setattr(bm.BenchSession, "kernel", interrupt)
    rc = bm.main(TINY + ["--variants", "reference", "--no-floor", "--no-check",
                         "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")])
    assert rc == 130
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["interrupted"] == "test"
    assert report["cases"][0]["end_to_end"]["reference"]["img_per_s"] > 0
    assert "interrupted)" in (tmp_path / "R.md").read_text()
    # stopped while compiling (a long max-autotune cut by `timeout`): the variant's row says so
    monkeypatch.undo()
    monkeypatch.setattr(torch, "compile", interrupt)
    rc = bm.main(TINY + ["--variants", "reference,compile_max_autotune", "--compile", "--no-floor", "--no-check",
                         "--no-kernels", "--json", str(tmp_path / "c.json"), "--no-markdown"])
    assert rc == 130
    e2e = json.loads((tmp_path / "c.json").read_text())["cases"][0]["end_to_end"]
    assert e2e["reference"]["img_per_s"] > 0
    cut = e2e["compile_max_autotune"]
    assert "ms" not in cut and cut["error"].startswith("Interrupted: the run was stopped before this variant finished")
    assert cut["compile_mode"] == "max-autotune-no-cudagraphs"


# ---------------------------------------------------------------------------------------------
# Train mode
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_run(tmp_path_factory, _one_thread):
    """One tiny CLI run of the train mode: reference, fastlego and torch.compile (dynamo +
    AOTAutograd with the eager backend: the same graph capture, forward and backward, without
    inductor's minutes of code generation on a CPU)."""
    out = tmp_path_factory.mktemp("train")
    md = out / "RESULTS.md"
    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    try:
        rc = bm.main(TINY + ["--modes", "train", "--variants", "reference,fastlego,compile", "--compile",
                             "--json", str(out / "r.json"), "--markdown", str(md)])
    finally:
        mp.undo()
    return rc, json.loads((out / "r.json").read_text()), md


def test_train_rows(train_run):
    rc, report, _ = train_run
    assert rc == 0
    [case] = report["cases"]
    e2e = case["end_to_end"]
    assert set(e2e) == {"reference@train", "fastlego@train", "compile@train"}
    flops = case["flops"]["forward"]
    for key, r in e2e.items():
        assert "error" not in r, (key, r.get("error"))
        assert r["mode"] == "train" and r["batch"] == 1
        for k in ("ms", "img_per_s", "tflops", "tflops_release_count", "frac_peak", "weights_gib"):
            assert r[k] > 0, (key, k, r[k])
        assert "frac_floor" not in r  # the floor is of an inference forward
        # TFLOP/s counts a step as 3 forwards
        assert math.isclose(r["tflops"], 3 * flops / (r["ms"] * 1e-3) / 1e12, rel_tol=1e-9)
        assert math.isclose(r["img_per_s"], 1 / (r["ms"] * 1e-3), rel_tol=1e-9)
        assert r["timing"]["rounds"] == 2
        # EDM's whitened loss of a small random network: finite and about 1 (D(x) ~ c_skip x)
        assert r["loss_finite"] and 0.3 < r["loss"] < 3 and 0.3 < r["loss_last"] < 3, (key, r["loss"], r["loss_last"])
    # same weights, data and label-dropout draws: the variants' first steps agree
    ref = e2e["reference@train"]["loss"]
    assert math.isclose(e2e["fastlego@train"]["loss"], ref, rel_tol=1e-3)
    assert math.isclose(e2e["compile@train"]["loss"], ref, rel_tol=1e-2)
    # AdamW steps happened: the loss moved (the same batch every step)
    assert e2e["reference@train"]["loss_last"] != ref
    assert e2e["compile@train"]["graph_breaks"] == 0
    assert e2e["compile@train"]["compile_mode"] == "default" and e2e["compile@train"]["over_compile_budget"] is False
    # AdamW fused on CUDA only (here: PyTorch's default), not capturable without a CUDA graph
    for r in e2e.values():
        assert (r["optimizer_fused"], r["optimizer_capturable"]) == (False, False)
        assert r["optimizer"] == f"AdamW(lr={bm.TRAIN_LR}, fused=False, capturable=False)"
    # the auto backend's choices in the training step are recorded (on the CPU: reference ops, and
    # token-major SDPA for global attention)
    chosen = e2e["fastlego@train"]["backends"]["chosen"]
    assert set(chosen) >= {"brick_embed", "modulated_linear", "final_layer"}
    assert {b for op, c in chosen.items() for b in c if op != "global_attention"} == {"reference"}
    assert set(chosen.get("global_attention", {"sdpa": 1})) == {"sdpa"}
    assert case["kernels"] == [] and "floor" not in case and "op_cases" not in case  # infer-only pieces skipped
    assert case["targets"]["train_vs_reference"]["value"] > 0
    # the only compile variant timed is the fastest; the training target is held against it
    tg = case["targets"]
    assert tg["fastest_compile@train"]["variant"] == "compile"
    vs = tg["train_vs_fastest_compile"]
    assert vs["against"] == "compile" and vs["target"] == bm.TRAIN_COMPILE_TARGET
    assert vs["value"] == tg["train_vs_compile"]["value"] and vs["met"] == (vs["value"] >= bm.TRAIN_COMPILE_TARGET)


def test_train_markdown(train_run):
    _, report, md = train_run
    text = md.read_text()
    assert "| preset (batch), train step | variant |" in text
    for variant in ("reference", "fastlego", "compile"):
        assert f"| lego_S_U_32[depths=1,1,1,1,1] (1) | {variant} | " in text
    assert "| preset (batch) | variant | img/s | ms | TFLOP/s (rel.) |" not in text  # no inference rows: no table
    assert "Backends chosen by auto in the training step of lego_S_U_32[depths=1,1,1,1,1] (1)" in text
    rows = {line.split(" | ")[1]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| lego_S_U_32[depths=1,1,1,1,1] (1) | ")}
    e2e = report["cases"][0]["end_to_end"]
    for variant in ("reference", "fastlego", "compile"):
        r = e2e[f"{variant}@train"]
        cells = rows[variant]  # preset, variant, img/s, ms, TFLOP/s (rel.), % peak, x fastest compile, peak GiB, loss
        assert cells[2] == f"{r['img_per_s']:.1f}" and cells[3] == f"{r['ms']:.2f}"
        assert cells[6] == f"{e2e['compile@train']['ms'] / r['ms']:.2f}"
        assert cells[8].startswith(f"{r['loss']:.3g} / {r['loss_last']:.3g}")


def test_every_train_variant_is_accepted_and_the_graph_ones_need_cuda(tmp_path):
    """Asked for on the CPU, the CUDA-graph train variants (fastlego_graph, fastlego_graph_ckpt,
    compile_graph) are variants like the others (not unknown ones): each row records why it
    cannot run here, refused before anything is built, and the run goes on; variant names are
    checked per mode."""
    rc = bm.main(TINY + ["--device", "cpu", "--modes", "train", "--variants",
                         "fastlego,fastlego_graph,fastlego_graph_ckpt,compile_graph",
                         "--checkpoint-blocks", "2", "--no-kernels", "--no-floor",
                         "--no-check", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")])
    assert rc == 0
    [case] = json.loads((tmp_path / "r.json").read_text())["cases"]
    e2e = case["end_to_end"]
    assert e2e["fastlego@train"]["img_per_s"] > 0
    for name in ("fastlego_graph", "fastlego_graph_ckpt", "compile_graph"):
        graph = e2e[f"{name}@train"]
        assert "ms" not in graph and "loss" not in graph and graph["cuda_graph"] is True
        assert graph["refused"].startswith(f"{name} needs a CUDA GPU") and graph["error"] == "refused: " + graph["refused"]
    assert e2e["compile_graph@train"]["compiled"] and e2e["compile_graph@train"]["compile_mode"] == "default"
    assert e2e["compile_graph@train"]["description"] == bm.TRAIN_VARIANT_HELP["compile_graph"]
    assert "| lego_S_U_32[depths=1,1,1,1,1] (1) | compile_graph | error: refused: compile_graph needs a CUDA GPU" \
        in (tmp_path / "R.md").read_text()
    assert "fastlego_graph_ckpt" not in bm.DEFAULT_VARIANTS   # opt-in
    session = bm.BenchSession(bm.BenchConfig.for_mode(tiny=True, device="cpu"))
    with pytest.raises(ValueError, match="unknown infer variant 'fastlego_graph'"):
        session.end_to_end(bm.default_case("lego_S_PG_64", 1), "fastlego_graph", "infer")


def test_train_failure_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """One variant's step builder raises MemoryError (as an out-of-memory would): the report
    holds the error string for it, the other variant and the inference rows are measured."""
    build = bm.STEP_BUILDERS["train"]

    def failing(model, inputs, backend, device, autocast_dtype, **kw):
        if backend == "reference":
            raise MemoryError("injected: out of memory")
        return build(model, inputs, backend, device, autocast_dtype, **kw)
    monkeypatch.setitem(bm.STEP_BUILDERS, "train", failing)
    rc = bm.main(TINY + ["--modes", "infer,train", "--variants", "reference,fastlego", "--no-kernels", "--no-floor",
                         "--no-check", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")])
    assert rc == 0
    [case] = json.loads((tmp_path / "r.json").read_text())["cases"]
    e2e = case["end_to_end"]
    assert set(e2e) == {"reference", "fastlego", "reference@train", "fastlego@train"}
    assert e2e["reference@train"]["error"] == "MemoryError: injected: out of memory"
    assert "ms" not in e2e["reference@train"]
    assert e2e["fastlego@train"]["img_per_s"] > 0 and math.isfinite(e2e["fastlego@train"]["loss"])
    assert e2e["reference"]["img_per_s"] > 0 and e2e["fastlego"]["img_per_s"] > 0  # inference untouched
    text = (tmp_path / "R.md").read_text()
    # both tables: inference rows keep their format, the failure is a train row with its error
    assert "| lego_S_U_32[depths=1,1,1,1,1] (1) | fastlego | " in text
    assert "| preset (batch), train step | variant |" in text
    assert "| lego_S_U_32[depths=1,1,1,1,1] (1) | reference | error: MemoryError: injected: out of memory |" in text
    inference_table = text.split("| preset (batch), train step")[0]
    assert inference_table.count("| lego_S_U_32[depths=1,1,1,1,1] (1) |") == 2  # no train rows in it


def test_train_default_workloads():
    """`--modes train` without --presets: issue 4's training batches; --presets / --tiny name
    the workloads of every mode; --batch and --depths apply to the training workloads too."""
    parse = lambda *argv: bm.config_from_args(bm.build_parser().parse_args(["--device", "cpu", *argv]))  # noqa: E731
    cfg = parse("--modes", "train")
    got = [(c.preset, c.batch) for c in cfg.cases_for("train")]
    assert sorted(got) == sorted([("lego_S_PG_64", 32), ("lego_S_PG_64", 64), ("lego_S_PG_64", 256),
                                  ("lego_L_PG_64", 64), ("lego_L_PG_64", 128), ("lego_XL_U_32", 128)])
    assert got[-2:] == [("lego_S_PG_64", 256), ("lego_L_PG_64", 128)]  # the release's failures last
    s64 = next(c for c in cfg.cases_for("train") if c.preset == "lego_S_PG_64")
    xl = next(c for c in cfg.cases_for("train") if c.preset == "lego_XL_U_32")
    assert (s64.in_channels, s64.resolution, s64.label_dim) == (3, 64, 0)
    assert (xl.in_channels, xl.resolution, xl.label_dim) == (4, 32, 1000)
    assert [(c.preset, c.batch) for c in cfg.cases_for("infer")] == [(n, b) for n, b, *_ in bm.DEFAULT_CASES]
    assert cfg.variants_for("train") == ("reference", "fastlego")  # compile skipped on the CPU, no bf16 weights
    # --compile on the CPU: the compile variants that can run here (CUDA graphs only when named)
    assert parse("--modes", "train", "--compile").variants_for("train") == ("reference", "fastlego", "compile",
                                                                            "compile_max_autotune")
    assert [(c.preset, c.batch) for c in parse("--modes", "train", "--presets", "lego_XL_U_32:8").cases_for("train")] \
        == [("lego_XL_U_32", 8)]
    assert parse("--modes", "train", "--tiny").cases_for("train") == parse("--tiny").cases
    assert [(c.preset, c.batch) for c in parse("--modes", "train", "--batch", "4").cases_for("train")] \
        == [("lego_S_PG_64", 4), ("lego_L_PG_64", 4), ("lego_XL_U_32", 4)]
    deep = parse("--modes", "train", "--presets", "lego_S_PG_64:2", "--depths", "1,1,1")
    assert deep.cases_for("train")[0].depths == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Compile variants, the compile budget and the fastest compile variant
# ---------------------------------------------------------------------------------------------

def _record(variant, mode="infer", ms=None, **extra):
    """A synthetic end-to-end record, as the session writes one (fp32 weights)."""
    r = {"variant": variant, "mode": mode, "batch": 16, "weights_dtype": "float32",
         "compiled": variant in bm.COMPILE_VARIANTS, **extra}
    if ms is not None:
        r["ms"] = ms
    return r


def test_compile_budget_note():
    assert bm.compile_budget_note(None, 10.0) is None       # never called
    assert bm.compile_budget_note(10.0, 10.0) is None       # at the budget: within it
    assert bm.compile_budget_note(1234.5, 900.0) == "did not compile within the budget: first call 1234 s > 900 s"
    assert bm.COMPILE_MODES == {"compile": None, "compile_bf16": None, "compile_graph": None,
                                "compile_max_autotune": "max-autotune-no-cudagraphs"}
    # compile_graph compiles in the default mode: the CUDA graph is captured around it (forward or step)
    assert bm.compile_mode_of("compile_graph", "train") is None
    assert bm.compile_mode_of("compile_graph", "latency") is None
    with pytest.raises(ValueError, match="not a torch.compile variant"):
        bm.compile_mode_of("fastlego")


def test_fastest_compile_and_targets_on_synthetic_records():
    """The fastest compile variant of a workload: timed, within the budget, same mode and weight
    holding; the targets are held against it, the speed-ups over each compile variant listed."""
    over = "did not compile within the budget: first call 1000 s > 900 s"
    e2e = {"reference": _record("reference", ms=100.0), "fastlego": _record("fastlego", ms=20.0),
           "compile": _record("compile", ms=50.0),
           "compile_max_autotune": _record("compile_max_autotune", ms=30.0, over_compile_budget=True,
                                           compile_budget_note=over),
           "compile_graph": _record("compile_graph", ms=40.0, cuda_graph=True),
           "compile_bf16": _record("compile_bf16", ms=10.0, weights_dtype="bfloat16"),   # another holding
           "compile@train": _record("compile", "train", ms=5.0)}                            # another mode
    fastest = bm.fastest_compile(e2e, "infer")
    assert (fastest["variant"], fastest["ms"]) == ("compile_graph", 40.0)
    assert fastest["candidates"] == {"compile": 50.0, "compile_graph": 40.0}
    assert fastest["excluded"] == {"compile_max_autotune": over}
    assert bm.fastest_compile(e2e, "infer", "bfloat16")["variant"] == "compile_bf16"
    case = bm.default_case("lego_S_PG_64")
    tg = bm.targets(case, {"end_to_end": e2e}, {"gpu": "NVIDIA H200"})
    assert tg["vs_fastest_compile"] == {"against": "compile_graph", "target": 1.9, "value": 2.0, "met": True,
                                        "target_gpu": "H200", "same_gpu_as_target": True}
    assert tg["vs_compile"] == {"value": 2.5}    # against torch's default mode, no target of its own
    assert tg["vs_compile_variants"] == {"compile": 2.5, "compile_max_autotune": 1.5, "compile_graph": 2.0}
    # compiled within the budget, max-autotune is the fastest, and the target is missed
    e2e["compile_max_autotune"]["over_compile_budget"] = False
    vs = bm.targets(case, {"end_to_end": e2e}, {"gpu": "NVIDIA H100 80GB HBM3"})["vs_fastest_compile"]
    assert (vs["against"], vs["value"], vs["met"], vs["same_gpu_as_target"]) == ("compile_max_autotune", 1.5, False, False)
    # a failed compile is excluded with its error; none timed: no target verdict
    failed = {"fastlego": _record("fastlego", ms=20.0), "compile": _record("compile", error="RuntimeError: boom")}
    tg = bm.targets(case, {"end_to_end": failed}, {})
    assert tg["fastest_compile"] == {"variant": None, "ms": None, "candidates": {},
                                     "excluded": {"compile": "RuntimeError: boom"}}
    assert "vs_fastest_compile" not in tg and "vs_compile" not in tg


def test_training_and_latency_targets_on_synthetic_records():
    train = {"fastlego_graph@train": _record("fastlego_graph", "train", ms=20.0, cuda_graph=True),
             "reference@train": _record("reference", "train", ms=50.0),
             "compile@train": _record("compile", "train", ms=33.0),
             "compile_graph@train": _record("compile_graph", "train", ms=25.0, cuda_graph=True),
             "compile_max_autotune@train": _record("compile_max_autotune", "train", error="RuntimeError: x")}
    tg = bm.targets(bm.default_case("lego_S_PG_64", 32), {"end_to_end": train}, {})
    assert tg["fastest_compile@train"]["variant"] == "compile_graph"
    assert tg["fastest_compile@train"]["excluded"] == {"compile_max_autotune": "RuntimeError: x"}
    assert tg["graph_train_vs_fastest_compile"] == {"against": "compile_graph", "target": bm.TRAIN_COMPILE_TARGET,
                                                    "value": 1.25, "met": False}
    assert tg["graph_train_vs_compile"] == {"value": 33.0 / 20.0} and tg["graph_train_vs_compile_graph"] == {"value": 1.25}
    assert tg["graph_train_vs_reference"] == {"value": 2.5} and "train_vs_fastest_compile" not in tg
    lat = {"reference@latency": _record("reference", "latency", ms=4.0),
           "fastlego@latency": _record("fastlego", "latency", ms=5.0),
           "compile_graph@latency": _record("compile_graph", "latency", ms=3.0, cuda_graph=True),
           "fastlego_graph@latency": _record("fastlego_graph", "latency", ms=2.0, cuda_graph=True)}
    for batch, target in ((1, 1.25), (4, 1.25), (16, 1.5)):
        tg = bm.targets(bm.default_case("lego_L_PG_64", batch), {"end_to_end": lat}, {})
        assert tg["latency_graph_vs_compile_graph"] == {"target": target, "value": 1.5, "met": True}
        assert tg["latency_eager_vs_reference"] == {"target": 1.0, "value": 0.8, "met": False}   # eager slower: missed
        assert "fastest_compile" not in tg   # latency results do not make an inference comparison
    lat["compile_graph@latency"]["ms"] = 3.2    # 1.6x: met at 16, and 1.25x rule below 16
    assert bm.targets(bm.default_case("lego_L_PG_64", 16), {"end_to_end": lat}, {})["latency_graph_vs_compile_graph"]["met"]
    lat["compile_graph@latency"]["ms"] = 2.9    # 1.45x: missed at 16, met at 4
    assert not bm.targets(bm.default_case("lego_L_PG_64", 16), {"end_to_end": lat}, {})["latency_graph_vs_compile_graph"]["met"]
    assert bm.targets(bm.default_case("lego_L_PG_64", 4), {"end_to_end": lat}, {})["latency_graph_vs_compile_graph"]["met"]


def test_compile_variants_ask_for_their_mode_and_the_budget_marks_them(monkeypatch, _one_thread):
    """Each compile variant passes its own mode to torch.compile (replaced here by a stand-in
    that records the mode and returns the model: nothing compiles); a first call over the budget
    is recorded, marked and kept out of the fastest compile, which the report names."""
    seen = []

    def stand_in(model, *args, mode=None, **kwargs):
        seen.append(mode)
        return model
    monkeypatch.setattr(torch, "compile", stand_in)
    args = bm.build_parser().parse_args(TINY + ["--compile", "--variants", "fastlego,compile,compile_max_autotune",
                                                "--modes", "infer,train", "--no-check", "--no-floor", "--no-kernels"])
    session = bm.BenchSession(bm.config_from_args(args))
    case = session.config.cases[0]
    session.config.compile_budget_s = 1e-9    # every first call overruns it
    over = session.end_to_end(case, "compile", "infer")
    session.config.compile_budget_s = 1e9
    within = session.end_to_end(case, "compile_max_autotune", "infer")
    session.end_to_end(case, "fastlego", "infer")
    train = session.end_to_end(case, "compile_max_autotune", "train")
    assert seen == [None, "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"]
    assert over["first_call_s"] > 1e-9 and over["ms"] > 0 and over["over_compile_budget"] is True
    assert over["compile_budget_note"] == f"did not compile within the budget: first call {over['first_call_s']:.4g} s > 1e-09 s"
    assert within["over_compile_budget"] is False and "compile_budget_note" not in within
    assert train["compile_mode"] == "max-autotune-no-cudagraphs" and train["over_compile_budget"] is False
    assert train["loss_finite"] and train["ms"] > 0
    report = session.report()
    session.close()
    tg = report["cases"][0]["targets"]
    assert tg["fastest_compile"]["variant"] == "compile_max_autotune"
    assert tg["fastest_compile"]["excluded"] == {"compile": over["compile_budget_note"]}
    assert tg["vs_fastest_compile"]["against"] == "compile_max_autotune"
    assert tg["fastest_compile@train"]["variant"] == "compile_max_autotune"
    text = bm.results_markdown(report)
    [line] = [x for x in text.splitlines() if x.startswith("torch.compile in lego_S_U_32") and ", train" not in x]
    assert f"`compile` (default): {over['ms']:.2f} ms" in line and f"({over['compile_budget_note']})" in line
    assert f"Fastest within the budget: `compile_max_autotune` ({within['ms']:.2f} ms); `fastlego` x" in line
    assert "| x fastest compile |" in text


def test_latency_mode(tmp_path, _one_thread):
    """`--modes latency` on the CPU: the eager variants timed per network call (rounds filled to
    --latency-round-ms), the CUDA-graph ones refused with the reason; its own table in the
    markdown, its targets in the report."""
    rc = bm.main(TINY + ["--modes", "latency", "--compile", "--latency-round-ms", "0",
                         "--variants", "reference,compile_graph,fastlego,fastlego_graph",
                         "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["latency_cases"] == [report["cases"][0]["case"]] and "train_cases" not in report["config"]
    [case] = report["cases"]
    e2e = case["end_to_end"]
    assert set(e2e) == {"reference@latency", "compile_graph@latency", "fastlego@latency", "fastlego_graph@latency"}
    for name in ("reference", "fastlego"):
        r = e2e[f"{name}@latency"]
        assert r["mode"] == "latency" and r["ms"] > 0 and r["timing"]["rounds"] == 2 and r["timing"]["inner"] >= 1
        assert 0 < r["rel_err_vs_fp32"] < 0.05 and "frac_floor" not in r
    assert sum(sum(c.values()) for c in e2e["fastlego@latency"]["backends"]["chosen"].values()) > 0
    for name in ("compile_graph", "fastlego_graph"):
        assert e2e[f"{name}@latency"]["refused"].startswith(f"{name} needs a CUDA GPU")
    assert e2e["compile_graph@latency"]["compile_mode"] == "default" and e2e["compile_graph@latency"]["cuda_graph"]
    assert case["kernels"] == [] and "floor" not in case   # infer-only pieces skipped
    tg = case["targets"]
    eager = tg["latency_eager_vs_reference"]
    assert eager["value"] == e2e["reference@latency"]["ms"] / e2e["fastlego@latency"]["ms"] and eager["target"] == 1.0
    assert "latency_graph_vs_compile_graph" not in tg
    text = (tmp_path / "R.md").read_text()
    assert "| preset (batch), latency | reference eager ms | compile_graph ms (compiled + CUDA graph) |" in text
    [row] = [x for x in text.splitlines() if x.startswith("| lego_S_U_32[depths=1,1,1,1,1] (1) |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == [f"{e2e['reference@latency']['ms']:.3f}", "refused (needs CUDA)",
                          f"{e2e['fastlego@latency']['ms']:.3f}", "refused (needs CUDA)"]
    assert cells[5] == "-" and cells[6].startswith(f"{eager['value']:.2f} (")
    assert "| preset (batch) | variant | img/s |" not in text   # no inference rows: no inference table


def test_latency_workloads_and_compile_options():
    parse = lambda *argv: bm.config_from_args(bm.build_parser().parse_args(["--device", "cpu", *argv]))  # noqa: E731
    cfg = parse("--modes", "latency")
    got = [(c.preset, c.batch, c.in_channels, c.resolution, c.label_dim) for c in cfg.cases_for("latency")]
    assert got == [("lego_S_PG_64", b, 3, 64, 0) for b in (1, 4, 16)] + [("lego_L_PG_64", b, 3, 64, 1000) for b in (1, 4, 16)]
    assert cfg.variants_for("latency") == ("reference", "fastlego")   # on the CPU: no compile, no CUDA graphs unless named
    assert parse("--modes", "latency", "--variants", "reference,compile_graph,fastlego_graph").variants_for("latency") \
        == ("reference", "compile_graph", "fastlego_graph")   # named on the CPU: kept, to be refused with the reason
    named = parse("--modes", "latency", "--presets", "lego_S_PG_64,lego_L_PG_64:2").cases_for("latency")
    assert [(c.preset, c.batch) for c in named] == [("lego_S_PG_64", 1), ("lego_S_PG_64", 4), ("lego_S_PG_64", 16),
                                                    ("lego_L_PG_64", 2)]
    assert [(c.preset, c.batch) for c in parse("--modes", "latency", "--batch", "8").cases_for("latency")] \
        == [("lego_S_PG_64", 8), ("lego_L_PG_64", 8)]
    assert parse("--modes", "latency", "--tiny").cases_for("latency") == parse("--tiny").cases
    assert parse("--modes", "latency", "--quick").latency_round_ms < parse("--modes", "latency").latency_round_ms
    assert parse().compile_budget_s == bm.COMPILE_BUDGET_S and parse("--compile-budget", "60").compile_budget_s == 60.0
    assert "compile_max_autotune" in bm.DEFAULT_VARIANTS and "compile_graph" in bm.DEFAULT_VARIANTS
    assert set(bm.GRAPH_VARIANTS) == {"fastlego_graph", "fastlego_graph_ckpt", "compile_graph"}


def test_compile_options_fail_clearly(capsys):
    assert bm.main(["--device", "cpu", "--compile-mode", "max-autotune"]) == 2
    err = capsys.readouterr().err
    assert "--compile-mode was replaced by named variants" in err and "compile_max_autotune (mode max-autotune-no-cudagraphs)" in err
    assert bm.main(["--device", "cpu", "--compile-budget", "0"]) == 2
    assert "--compile-budget must be a positive number of seconds" in capsys.readouterr().err
    assert bm.main(["--device", "cpu", "--modes", "latency", "--variants", "fastlego_bf16"]) == 2
    assert "has a latency mode" in capsys.readouterr().err


@pytest.mark.cuda
def test_graph_and_compile_variants_on_a_gpu(tmp_path):
    """On a GPU, for real: every training variant steps a fused AdamW (capturable in the CUDA-graph
    ones); compile_graph's compiled step is captured and replayed, its first loss that of the
    reference step; the latency fastlego_graph replays a captured forward as accurate as the eager
    one, and torch.compile's forward captured as a CUDA graph is timed and as accurate."""
    rc = bm.main(["--device", "cuda", "--tiny", "--presets", "lego_S_U_32:2", "--depths", "1,1,1,1,1",
                  "--modes", "train,latency", "--variants", "reference,fastlego,fastlego_graph,compile_graph",
                  "--no-kernels", "--no-floor", "--json", str(tmp_path / "r.json"), "--no-markdown"])
    assert rc == 0
    [case] = json.loads((tmp_path / "r.json").read_text())["cases"]
    e2e = case["end_to_end"]
    for name in ("reference", "fastlego", "fastlego_graph", "compile_graph"):
        r = e2e[f"{name}@train"]
        assert "error" not in r, (name, r.get("error"))
        assert r["optimizer_fused"] is True and r["optimizer_capturable"] is (name in bm.GRAPH_VARIANTS), name
        assert r["loss_finite"] and r["ms"] > 0, name
    for name in ("fastlego_graph", "compile_graph"):
        assert e2e[f"{name}@train"]["captured"] is True and "capture_failed" not in e2e[f"{name}@train"]
    comp = e2e["compile_graph@train"]
    assert comp["first_call_s"] > 0 and comp["over_compile_budget"] is False and comp["compile_mode"] == "default"
    assert math.isclose(comp["loss"], e2e["reference@train"]["loss"], rel_tol=1e-2)
    for name in ("reference", "fastlego", "fastlego_graph", "compile_graph"):
        r = e2e[f"{name}@latency"]
        assert "error" not in r, (name, r.get("error"))
        assert r["ms"] > 0 and math.isfinite(r["rel_err_vs_fp32"]), name
    graph, eager = e2e["fastlego_graph@latency"], e2e["fastlego@latency"]
    assert graph["captured"] is True and graph["rel_err_vs_fp32"] <= 2 * eager["rel_err_vs_fp32"] + 1e-3
    comp = e2e["compile_graph@latency"]
    assert comp["compile_mode"] == "default" and comp["captured"] is True
    assert comp["rel_err_vs_fp32"] <= 2 * e2e["reference@latency"]["rel_err_vs_fp32"] + 1e-3
    tg = case["targets"]
    assert tg["latency_graph_vs_compile_graph"]["target"] == 1.25 and tg["latency_graph_vs_compile_graph"]["value"] > 0
    assert tg["fastest_compile@train"]["variant"] == "compile_graph"
    assert tg["graph_train_vs_fastest_compile"]["against"] == "compile_graph"
    # fastlego's variants choose their matmul paths (fastlego.tune) before the first timed call
    for key in ("fastlego@train", "fastlego_graph@train", "fastlego@latency", "fastlego_graph@latency"):
        assert e2e[key]["tuning"].startswith("tuned "), (key, e2e[key].get("tuning"))
    assert "tuning" not in e2e["reference@train"] and "tuning" not in e2e["compile_graph@latency"]


@pytest.mark.cuda
def test_fp8_variant_on_a_gpu(tmp_path):
    """fastlego_fp8 runs where FP8 tensor cores exist (tuned, near fp32), else is refused."""
    rc = bm.main(["--device", "cuda", "--tiny", "--presets", "lego_S_U_32:8", "--depths", "1,1,1,1,1",
                  "--variants", "fastlego,fastlego_fp8", "--no-kernels", "--no-floor", "--json",
                  str(tmp_path / "r.json"), "--no-markdown"])
    assert rc == 0
    [case] = json.loads((tmp_path / "r.json").read_text())["cases"]
    r, base = case["end_to_end"]["fastlego_fp8"], case["end_to_end"]["fastlego"]
    if torch.cuda.get_device_capability() < (8, 9):
        assert "compute capability" in r["refused"]
        return
    assert "error" not in r, r.get("error")
    assert r["weights_dtype"] == "float8_e4m3fn" and r["tuning"].startswith("tuned ") and r["ms"] > 0
    assert r["rel_err_vs_fp32"] < 10 * base["rel_err_vs_fp32"] + 0.02, (r["rel_err_vs_fp32"], base["rel_err_vs_fp32"])
