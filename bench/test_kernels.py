"""Per kernel: each dispatched op at each call site of the three workloads, with the arguments
the auto forward gives it, on every backend that takes it, against its own floor
max(FLOPs / peak, minimum bytes / bandwidth). Run: `pytest bench/` on a GPU."""

from __future__ import annotations

import math

import pytest


def test_kernel(benchmark, runner, bench_session, bench_kernel):
    case, key, op, backend = bench_kernel
    benchmark.group = f"{case.name} {key}"
    res = bench_session.kernel(case, key, backend, runner=runner)
    if "refused" in res:
        pytest.skip(f"{backend} does not take {key}: " + "; ".join(res["refused"]))
    if "error" in res:
        pytest.fail(f"{backend} on {case.name} {key}: {res['error']}")
    benchmark.extra_info.update({k: res[k] for k in ("ms", "gbps", "tflops", "floor_ms", "frac_floor",
                                                     "rel_err_vs_reference", "count") if k in res})
    assert res["ms"] > 0 and res["floor_ms"] > 0
    # a guard against garbage, not the accuracy test (tests/ does that): same inputs, same dtype
    err = res["rel_err_vs_reference"]
    assert math.isfinite(err) and err < 0.1, f"{backend} output differs from the reference op by {err:.2e} (relative L2)"
