"""pytest plumbing of the benchmark suite (`pytest bench/`; not part of the CI test run).

The tests time through pytest-benchmark's `benchmark.pedantic` (each round ends with a CUDA
sync; the machinery reads CUDA events around the same rounds), and the session, at its end,
writes the JSON report and appends the markdown table (`fastlego.benchmark.save_report`).

Options (`pytest bench/ --help`): `--bench-args="..."` takes any `fastlego bench` option, e.g.
`pytest bench/ --bench-args="--quick --no-compile --presets lego_S_PG_64"`, or the training
steps `pytest bench/ --bench-args="--modes train"` (default batches: `fastlego.benchmark.
DEFAULT_TRAIN_CASES`); the shortcuts below are appended to it. $FASTLEGO_BENCH_ARGS is read first. Without CUDA every test is skipped unless
`--bench-device cpu` is given (then e.g. `--bench-args=--tiny` for a CPU smoke run).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

from fastlego import benchmark as bm

BENCH_DIR = Path(__file__).resolve().parent
_SESSION = pytest.StashKey()
_CONFIG = pytest.StashKey()
_SAVED = pytest.StashKey()


def pytest_addoption(parser):
    g = parser.getgroup("fastlego bench")
    g.addoption("--bench-args", default="", help="options of `fastlego bench` (e.g. \"--quick --no-compile\")")
    g.addoption("--bench-device", default=None, help="cuda (default) or cpu")
    g.addoption("--bench-presets", default=None, help="NAME[:BATCH],... (default: the three BASELINE.md workloads)")
    g.addoption("--bench-quick", action="store_true", help="fewer repeats (`fastlego bench --quick`)")
    g.addoption("--bench-no-compile", action="store_true", help="skip the torch.compile variant")
    g.addoption("--bench-json", default=None, help="JSON report path (default bench/results/<date>-<gpu>.json)")
    g.addoption("--bench-markdown", default=None, help="markdown file to append to (default bench/RESULTS.md)")
    g.addoption("--bench-no-markdown", action="store_true", help="do not append to a markdown file")


def _argv(config) -> list:
    argv = shlex.split(os.environ.get("FASTLEGO_BENCH_ARGS", "")) + shlex.split(config.getoption("--bench-args") or "")
    for opt, flag in (("--bench-device", "--device"), ("--bench-presets", "--presets"),
                      ("--bench-json", "--json"), ("--bench-markdown", "--markdown")):
        value = config.getoption(opt)
        if value:
            argv += [flag, value]
    for opt, flag in (("--bench-quick", "--quick"), ("--bench-no-compile", "--no-compile"),
                      ("--bench-no-markdown", "--no-markdown")):
        if config.getoption(opt):
            argv.append(flag)
    return argv


def bench_args(config):
    """The parsed `fastlego bench` options of this pytest run."""
    if _CONFIG not in config.stash:
        args = bm.build_parser().parse_args(_argv(config))
        config.stash[_CONFIG] = (args, bm.config_from_args(args))
    return config.stash[_CONFIG]


def _unavailable_reason(config):
    args, cfg = bench_args(config)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        return "the benchmarks need a CUDA GPU (torch.cuda.is_available() is False)"
    if cfg.device == "cpu" and not args.device:
        return ("no CUDA GPU: the benchmarks are skipped; pass --bench-device cpu (with --bench-args=--tiny) "
                "for a CPU smoke run, or run `fastlego bench --device cpu --tiny`")
    return None


def pytest_generate_tests(metafunc):
    if "bench_e2e" not in metafunc.fixturenames and "bench_kernel" not in metafunc.fixturenames \
            and "bench_case" not in metafunc.fixturenames:
        return
    _, cfg = bench_args(metafunc.config)
    infer = "infer" in cfg.modes  # the floor and the kernels are of the inference forward
    if "bench_case" in metafunc.fixturenames:
        cases = cfg.cases if infer else []
        metafunc.parametrize("bench_case", cases, ids=[c.name for c in cases])
    if "bench_e2e" in metafunc.fixturenames:
        # infer: each workload, its variants; train / latency: their own workloads (batches)
        # unless --presets, the variants of that mode
        params = [(c, mode, v) for mode in cfg.modes for c in cfg.cases_for(mode) for v in cfg.variants_for(mode)]
        metafunc.parametrize("bench_e2e", params, ids=[f"{c.name}-B{c.batch}-{m}-{v}" if m != "infer" else f"{c.name}-{m}-{v}"
                                                       for c, m, v in params])
    if "bench_kernel" in metafunc.fixturenames:
        params = [] if not (cfg.kernels and infer) else [
            (c, key, op, backend) for c in cfg.cases for key, op in bm.expected_op_keys(c, cfg.kernel_inputs)
            for backend in bm.op_backend_names(op)]
        metafunc.parametrize("bench_kernel", params, ids=[f"{c.name}-{k}-{b}" for c, k, _, b in params])


def pytest_collection_modifyitems(config, items):
    reason = _unavailable_reason(config)
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if BENCH_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_session(request):
    """The run's `BenchSession`: device limits, models and results shared by every test."""
    reason = _unavailable_reason(request.config)
    if reason:
        pytest.skip(reason)
    _, cfg = bench_args(request.config)
    session = bm.BenchSession(cfg)
    request.config.stash[_SESSION] = session
    yield session
    session.close()


@pytest.fixture
def runner(benchmark):
    """Times through pytest-benchmark: `benchmark.pedantic`, one CUDA-synced round per call."""
    return bm.pedantic_runner(benchmark)


def pytest_sessionfinish(session, exitstatus):
    bench = session.config.stash.get(_SESSION, None)
    if bench is None or not bench.results:
        return
    args, cfg = bench_args(session.config)
    bench.close()
    report = bench.report()
    session.config.stash[_SAVED] = bm.save_report(report, cfg.json_path, cfg.markdown_path,
                                                  markdown=not args.no_markdown)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    saved = config.stash.get(_SAVED, None)
    if saved:
        jp, mp = saved
        terminalreporter.write_line(f"fastlego bench: JSON report {jp}" + (f"; markdown appended to {mp}" if mp else ""))
