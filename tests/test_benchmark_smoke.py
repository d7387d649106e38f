"""CPU smoke test of the benchmark machinery (fastlego.benchmark) at tiny sizes.

The real benchmark runs on a GPU (`fastlego bench`, `pytest bench/`); this checks that the whole
pipeline works end to end: device limits, FLOP counts, the floor, the end-to-end variants (a
failing torch.compile recorded as an error string) with how each held its weights, the
per-kernel timings at the call sites the dispatcher's observer hook recorded, the JSON report,
the markdown table and the README tables generated from the report (bench/readme_tables.py);
the train mode (forward + EDM loss + backward + AdamW step), with a failing variant recorded as
an error while the run goes on; and that it runs without triton.
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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, _one_thread):
    """One tiny CLI run (with a torch.compile that fails on purpose) and its outputs."""
    out = tmp_path_factory.mktemp("bench")
    md = out / "RESULTS.md"
    rc = bm.main(TINY + ["--variants", "reference,fastlego,fastlego_bf16,compile,reference_bf16,compile_bf16", "--compile",
                         "--compile-mode", "no-such-mode", "--json", str(out / "r.json"), "--markdown", str(md)])
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
    assert set(e2e) == {"reference", "fastlego", "fastlego_bf16", "compile", "reference_bf16", "compile_bf16"}
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
    for name in ("compile", "compile_bf16"):
        assert "no-such-mode" in e2e[name]["error"] and "ms" not in e2e[name]
    # what ran, in the report: weight holding, autocast, dispatcher mode, compiled or not
    held = {name: (r["weights_dtype"], r["autocast_dtype"], r["dispatch_mode"], r["compiled"]) for name, r in e2e.items()}
    assert held == {"reference": ("float32", "bfloat16", "reference", False),
                    "fastlego": ("float32", "bfloat16", "auto", False),
                    "compile": ("float32", "bfloat16", "reference", True),
                    "fastlego_bf16": ("bfloat16", None, "auto", False),
                    "reference_bf16": ("bfloat16", None, "reference", False),
                    "compile_bf16": ("bfloat16", None, "reference", True)}
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
    rows each hold the variants that held their weights that way, a failed compile shows as
    such, the run's versions and date are named, and --write fills marked sections."""
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
    assert [r[1] for r in rows] == ["fp32 weights + bf16 autocast: `reference`, `compile`, `fastlego`",
                                    "bf16 weights, no autocast: `reference_bf16`, `compile_bf16`, `fastlego_bf16`"]
    fp32, bf16 = rows
    assert fp32[2:5] == [rt.rate_cell(e2e["reference"]), "failed (RuntimeError)", rt.rate_cell(e2e["fastlego"])]
    assert bf16[2:5] == [rt.rate_cell(e2e["reference_bf16"]), "failed (RuntimeError)", rt.rate_cell(e2e["fastlego_bf16"])]
    assert fp32[5] == bf16[5] == "-"   # no speed-up over a compile that failed
    assert fp32[6] == f"{100 * case['floor']['ms'] / e2e['fastlego']['ms']:.0f}%"
    assert bf16[6] == f"{100 * case['floor']['ms'] / e2e['fastlego_bf16']['ms']:.0f}%"
    env = report["environment"]
    for what in (f"torch {env['torch']}", f"triton {env['triton']}", env["date"], "tiny run", str(paths[0])):
        assert what in infer_text, what
    # training: the fastlego step beside the reference eager step and torch.compile (aot_eager here)
    t = train["cases"][0]["end_to_end"]
    [row] = [[c.strip() for c in line.strip("|").split("|")] for line in train_text.splitlines()
             if line.startswith(f"| {name} |")]
    assert row[1] == "`fastlego`, fp32 weights + bf16 autocast"
    assert row[5] == f"{t['compile@train']['ms'] / t['fastlego@train']['ms']:.2f}"
    assert row[6] == f"{t['reference@train']['ms'] / t['fastlego@train']['ms']:.2f}"
    assert row[7] == "-"   # no peak memory on the CPU
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:infer -->\nold\n<!-- /bench:infer -->\nb\n<!-- bench:train -->\nold\n<!-- /bench:train -->\nc\n")
    assert rt.main(["--write", "--readme", str(readme)] + [str(p) for p in paths]) == 0
    text = readme.read_text()
    assert "\nold\n" not in text and text.startswith("a\n<!-- bench:infer -->\nInference") and text.endswith("-->\nc\n")
    assert text.count(f"| {name} |") == 3


def test_bench_scripts_time_with_the_package_timer():
    """The scripts of bench/ import what they use from fastlego.benchmark, and every one that
    times something does it with its one timer (`measure`), not a loop of its own."""
    pytest.importorskip("triton")
    for name in ("attention_layouts", "checkpoint_memory", "gemm_shapes", "probe_gelu_gemm", "profile_train"):
        module = _bench_script(name)
        assert module.measure is bm.measure, name
        source = open(module.__file__).read()
        assert "Event(" not in source and "perf_counter" not in source and "do_bench" not in source, name
    for name in ("checkpoint_memory", "profile_train"):
        assert _bench_script(name).STEP_BUILDERS is bm.STEP_BUILDERS
    proc = subprocess.run([sys.executable, "-m", "fastlego.benchmark", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "fastlego bench" in proc.stdout and "compile_bf16" in proc.stdout, proc.stderr


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
    # the auto backend's choices in the training step are recorded (on the CPU: reference ops, and
    # token-major SDPA for global attention)
    chosen = e2e["fastlego@train"]["backends"]["chosen"]
    assert set(chosen) >= {"brick_embed", "modulated_linear", "final_layer"}
    assert {b for op, c in chosen.items() for b in c if op != "global_attention"} == {"reference"}
    assert set(chosen.get("global_attention", {"sdpa": 1})) == {"sdpa"}
    assert case["kernels"] == [] and "floor" not in case and "op_cases" not in case  # infer-only pieces skipped
    assert case["targets"]["train_vs_reference"]["value"] > 0


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
        cells = rows[variant]  # preset, variant, img/s, ms, TFLOP/s (rel.), % peak, x compile, peak GiB, loss
        assert cells[2] == f"{r['img_per_s']:.1f}" and cells[3] == f"{r['ms']:.2f}"
        assert cells[6] == f"{e2e['compile@train']['ms'] / r['ms']:.2f}"
        assert cells[8].startswith(f"{r['loss']:.3g} / {r['loss_last']:.3g}")


def test_every_train_variant_is_accepted_and_the_graph_one_needs_cuda(tmp_path):
    """Asked for on the CPU, fastlego_graph is a train variant like the others (not an unknown
    variant): its row records why it cannot run here; variant names are checked per mode."""
    rc = bm.main(TINY + ["--modes", "train", "--variants", "fastlego,fastlego_graph,fastlego_graph_ckpt",
                         "--checkpoint-blocks", "2", "--no-kernels", "--no-floor",
                         "--no-check", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")])
    assert rc == 0
    [case] = json.loads((tmp_path / "r.json").read_text())["cases"]
    e2e = case["end_to_end"]
    assert e2e["fastlego@train"]["img_per_s"] > 0
    for name in ("fastlego_graph", "fastlego_graph_ckpt"):
        graph = e2e[f"{name}@train"]
        assert "ms" not in graph and ("needs a CUDA GPU" in graph["error"] or torch.cuda.is_available())
    assert e2e["fastlego_graph_ckpt@train"]["checkpointed_blocks"] == 2
    assert "fastlego_graph_ckpt (2 blocks)" in (tmp_path / "R.md").read_text()
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
    assert parse("--modes", "train", "--compile").variants_for("train") == ("reference", "fastlego", "compile")
    assert [(c.preset, c.batch) for c in parse("--modes", "train", "--presets", "lego_XL_U_32:8").cases_for("train")] \
        == [("lego_XL_U_32", 8)]
    assert parse("--modes", "train", "--tiny").cases_for("train") == parse("--tiny").cases
    assert [(c.preset, c.batch) for c in parse("--modes", "train", "--batch", "4").cases_for("train")] \
        == [("lego_S_PG_64", 4), ("lego_L_PG_64", 4), ("lego_XL_U_32", 4)]
    deep = parse("--modes", "train", "--presets", "lego_S_PG_64:2", "--depths", "1,1,1")
    assert deep.cases_for("train")[0].depths == (1, 1, 1)
