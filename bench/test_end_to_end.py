"""End to end: fastlego (auto backend) vs the reference ops eager vs torch.compile of them (each
compile variant: default mode, max-autotune-no-cudagraphs, CUDA graphs), for inference against
the floor measured in the same run, with `--modes train` for training steps (forward + EDM loss +
backward + fused AdamW) and with `--modes latency` for one network call at small batches.
Run: `pytest bench/` on a GPU."""

from __future__ import annotations

import math

import pytest

from fastlego.benchmark import COMPILE_VARIANTS


def test_end_to_end(benchmark, runner, bench_session, bench_e2e):
    """images/s of one variant (pedantic rounds, CUDA-synced); errors of torch.compile are
    recorded in the report and skip the test, errors of fastlego fail it. In train mode, a
    reference step that fails too (the release's out-of-memory and crash cases) only skips."""
    case, mode, variant = bench_e2e
    benchmark.group = f"{case.name} B={case.batch} {mode}" if mode in ("train", "latency") else f"{case.name} {mode}"
    res = bench_session.end_to_end(case, variant, mode, runner=runner)
    if "refused" in res:
        pytest.skip(f"{variant} cannot run here (recorded in the report): {res['refused']}")
    if "error" in res:
        if variant in COMPILE_VARIANTS:
            pytest.skip(f"{variant} failed (recorded in the report): {res['error'][:300]}")
        if mode == "train" and variant == "reference":
            pytest.skip(f"the reference training step failed (recorded in the report): {res['error'][:300]}")
        pytest.fail(f"{variant} failed on {case.describe()} ({mode}): {res['error']}")
    benchmark.extra_info.update({k: res[k] for k in ("img_per_s", "ms", "tflops", "frac_peak", "frac_floor",
                                                     "peak_gib", "rel_err_vs_fp32", "loss") if k in res})
    assert res["img_per_s"] > 0
    if mode == "train":
        assert res["loss_finite"], f"{variant}: non-finite training loss {res['loss']} / {res['loss_last']}"
        return
    err = res.get("rel_err_vs_fp32")
    if err is not None:
        assert math.isfinite(err), f"{variant}: non-finite output"
        ref = bench_session.result(case)["end_to_end"].get("reference", {}).get("rel_err_vs_fp32")
        if variant == "fastlego" and ref is not None:
            # the project's tolerance rule at model level: <= 2x the same-dtype PyTorch error + atol
            assert err <= 2 * ref + 1e-3, f"fastlego error {err:.2e} > 2 x reference bf16 error {ref:.2e} + 1e-3"


def test_floor(bench_session, bench_case):
    """The floor of the workload: every matmul of the forward with cuBLAS, attention at library
    speed; and the forward's FLOP count (FlopCounterMode) equal to the matmul enumeration's."""
    floor = bench_session.floor(bench_case)
    assert floor["ms"] > 0 and floor["img_per_s"] > 0
    assert floor["matmul_ms"] > 0
    if "flops" not in bench_session.result(bench_case):
        bench_session.state(bench_case)  # builds the model and counts the FLOPs
    flops = bench_session.result(bench_case)["flops"]
    if flops["per_image_counted"] is not None:
        assert flops["per_image_counted"] == flops["per_image_analytic"], (
            "the floor's matmul/attention enumeration misses FLOPs that FlopCounterMode counts: "
            f"{flops['per_image_analytic']} analytic vs {flops['per_image_counted']} counted per image")
