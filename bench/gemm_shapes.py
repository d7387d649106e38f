"""The training step's matmuls one by one: TFLOP/s of each cuBLAS call a DiT block makes, in the
layouts fastlego uses, against the card's square-GEMM peak measured in the same run.

    python3 bench/gemm_shapes.py [--rows 65536] [--width 1024]

For each Linear of a block (qkv D->3D, proj D->D, fc1 D->4D, fc2 4D->D) at M rows, bf16:
forward (F.linear with bias), the input gradient dX = dY W and the weight gradient
dW = dY^T X (as `torch.mm(dy.t(), x)`, and as `torch.mm(x.t(), dy).t()`), plus fc1 with
cuBLASLt's GELU epilogue (`torch._addmm_activation`). Profiling, not a benchmark."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastlego.benchmark import measure  # noqa: E402


def time_ms(fn, reps: int = 20) -> float:
    """Median ms of one call over `reps` CUDA-event-timed calls after 3 warm-up calls
    (fastlego.benchmark.measure)."""
    return measure(fn, device="cuda", rounds=reps, warmup=3, inner=1).median_ms


def square_peak(dev, dt, g, n: int = 8192) -> float:
    a = torch.randn(n, n, device=dev, dtype=dt, generator=g)
    return 2 * n ** 3 / time_ms(lambda: a @ a) / 1e9


def time_linear(name: str, M: int, nout: int, kin: int, dev, dt, g):
    """[(name, call, ms, TFLOP/s)] for one Linear (kin -> nout) at M rows."""
    x = torch.randn(M, kin, device=dev, dtype=dt, generator=g)
    w = torch.randn(nout, kin, device=dev, dtype=dt, generator=g) / kin ** 0.5
    b = torch.randn(nout, device=dev, dtype=dt, generator=g)
    dy = torch.randn(M, nout, device=dev, dtype=dt, generator=g)
    flop = 2 * M * nout * kin
    cases = {
        "forward F.linear(x, W, b)": lambda: F.linear(x, w, b),
        "forward F.linear(x, W)": lambda: F.linear(x, w),
        "dX = mm(dy, W)": lambda: torch.mm(dy, w),
        "dW = mm(dy.t(), x)": lambda: torch.mm(dy.t(), x),
        "dW = mm(x.t(), dy).t()": lambda: torch.mm(x.t(), dy).t(),
    }
    if name == "fc1":
        cases["forward + GELU epilogue (_addmm_activation)"] = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)
        cases["forward F.linear + F.gelu(tanh)"] = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")
        ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
        exact = F.gelu(F.linear(x.float(), w.float(), b.float()))
        print(f"_addmm_activation GELU: max |diff| to tanh-GELU {float((fused - ref).abs().max()):.3e}, "
              f"to erf-GELU {float((fused - exact).abs().max()):.3e}")
        del ref, fused, exact
    rows = []
    for case, fn in cases.items():
        ms = time_ms(fn)
        rows.append((name, case, ms, flop / ms / 1e9))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--width", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    dev, dt = torch.device("cuda"), torch.bfloat16
    M, D = args.rows, args.width
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; M={M}, D={D}, bf16")
    g = torch.Generator(device=dev).manual_seed(0)
    peak = square_peak(dev, dt, g)
    print(f"square 8192^3 GEMM: {peak:.0f} TFLOP/s")
    rows = []
    for name, nout, kin in (("qkv", 3 * D, D), ("proj", D, D), ("fc1", 4 * D, D), ("fc2", D, 4 * D)):
        rows += time_linear(name, M, nout, kin, dev, dt, g)
    print(f"\n| linear | call | ms | TFLOP/s | of peak ({peak:.0f}) |\n| --- | --- | --- | --- | --- |")
    for name, case, ms, tf in rows:
        print(f"| {name} | {case} | {ms:.3f} | {tf:.0f} | {tf / peak:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
