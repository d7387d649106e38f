"""Do cuBLASLt's own GEMM epilogues beat a GEMM + a separate elementwise pass at the DiT MLP's
shapes? (GPU only: CUDA and the libcublasLt of torch's CUDA build; `fastlego.kernels.cublaslt`.)

    python3 bench/probe_cublaslt_epilogues.py [--shapes S:262144x384,...] [--algos 1] [--json OUT]

For each MLP of M rows and width D (D -> 4D -> D, bf16; default: the MLPs of lego_S_PG_64 at batch
256, lego_L_PG_64 at 64 and lego_XL_U_32 at 128):
  fwd   fc1 forward, outputs y = GELU(x W1^T + b1) and (for the backward) pre = x W1^T + b1:
        cuBLASLt GELU_AUX_BIAS (y and pre from one GEMM) vs torch._addmm_activation(use_gelu=True)
        (GELU epilogue, y only: pre is not kept) vs F.linear + F.gelu (pre, then y).
  bwd   the dP GEMM of fc2 -> GELU: dpre = (dY W2) * GELU'(pre) and fc1's bias gradient:
        cuBLASLt DGELU_BGRAD (dP never stored) vs torch.mm + fastlego's Triton gelu_tanh_backward
        (which also writes GELU(pre) over pre: fc2's input for its weight gradient, which the
        cuBLASLt route must have kept from the forward instead).
  wgrad a weight gradient and its bias gradient, fc1's (dpre, x) and fc2's (dY, act):
        cuBLASLt BGRADB (dW contiguous) and BGRADA (dW as a transposed view) vs torch.mm + sum.
Each row: median ms (`fastlego.benchmark.measure`: 20 rounds after 5 warm-up calls), TFLOP/s of
the GEMM (2 M N K), TB/s (the section's minimum bytes: inputs read once, outputs written once,
over the row's time), the speed-up over the section's unfused PyTorch baseline, and the max error
of each output relative to the largest magnitude of its fp32 reference. A variant the library
refuses prints why. --algos N times the heuristic's first N algorithms of each cuBLASLt variant."""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastlego.benchmark import environment, measure  # noqa: E402

# name: M x D (rows = batch x tokens of the MLP; width)
DEFAULT_SHAPES = "lego_S_PG_64/B256:262144x384,lego_L_PG_64/B64:65536x1024,lego_XL_U_32/B128:32768x1152"


def bench(fn) -> float:
    """Median ms of one call: 20 rounds of one call timed with CUDA events after 5 warm-up calls."""
    return measure(fn, device="cuda", rounds=20, warmup=5, inner=1).median_ms


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (nan if x holds NaN or inf)."""
    x = x.float()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


class Section:
    """The rows of one section (fwd, bwd, wgrad...) of one shape: timing, rates, errors, speed-up."""

    def __init__(self, shape: str, kind: str, flops: float, min_bytes: float, rows: list):
        self.shape, self.kind, self.flops, self.min_bytes, self.rows = shape, kind, flops, min_bytes, rows
        self.baseline_ms = None

    def add(self, name: str, fn, errors: dict, baseline: bool = False) -> None:
        ms = bench(fn)
        if baseline:
            self.baseline_ms = ms
        row = {"shape": self.shape, "kind": self.kind, "variant": name, "ms": ms,
               "tflops": self.flops / ms / 1e9, "tbps": self.min_bytes / ms / 1e9,
               "speedup": None, "errors": errors, "baseline": baseline}
        self.rows.append(row)
        print(f"{self.shape:>24} {self.kind:6} {name:44} {ms:8.3f} ms {row['tflops']:6.0f} TFLOP/s "
              f"{row['tbps']:5.2f} TB/s  err {fmt_errors(errors)}", flush=True)

    def refused(self, name: str, why: str) -> None:
        self.rows.append({"shape": self.shape, "kind": self.kind, "variant": name, "ms": None, "refused": why})
        print(f"{self.shape:>24} {self.kind:6} {name:44} refused: {why}", flush=True)

    def finish(self) -> None:
        for row in self.rows:
            if row["kind"] == self.kind and row["shape"] == self.shape and row.get("ms") and self.baseline_ms:
                row["speedup"] = self.baseline_ms / row["ms"]


def fmt_errors(errors: dict) -> str:
    return " ".join(f"{k}={v:.1e}" for k, v in errors.items()) or "-"


def lt_variants(section: Section, name: str, fn_of_algo, check, count: int, algos: int) -> None:
    """Check and time a cuBLASLt variant with the heuristic's algorithms 0..algos-1."""
    for i in range(min(algos, count)):
        try:
            errors = check(i)
            section.add(f"{name}" + (f" algo {i}" if algos > 1 else ""), lambda: fn_of_algo(i), errors)  # noqa: B023
        except Exception as exc:  # noqa: BLE001 - a variant the library refuses: say why, go on
            section.refused(name + (f" algo {i}" if algos > 1 else ""), f"{type(exc).__name__}: {str(exc)[:300]}")


def fwd_section(lt, shape, x, W1, b1, algos, rows) -> None:
    """fc1 + GELU: cuBLASLt GELU_AUX_BIAS vs torch._addmm_activation vs F.linear + F.gelu."""
    M, D = x.shape
    N, dt = W1.shape[0], x.dtype
    sec = Section(shape, "fwd", 2 * M * N * D, x.element_size() * (M * D + N * D + N + 2 * M * N), rows)
    y_ref, pre_ref = lt.linear_gelu_aux_reference(x, W1, b1)

    def unfused():
        pre = F.linear(x, W1, b1)
        return F.gelu(pre, approximate="tanh"), pre

    y_u, pre_u = unfused()
    sec.add("F.linear + F.gelu (y, pre)", unfused, {"y": rel_err(y_u, y_ref), "pre": rel_err(pre_u, pre_ref)},
            baseline=True)
    del y_u, pre_u
    sec.add("F.linear only (pre; the GEMM floor)", lambda: F.linear(x, W1, b1), {})
    y_a = torch._addmm_activation(b1, x, W1.t(), use_gelu=True)
    sec.add("torch._addmm_activation GELU (y only)", lambda: torch._addmm_activation(b1, x, W1.t(), use_gelu=True),
            {"y": rel_err(y_a, y_ref)})
    del y_a
    y_buf, pre_buf = torch.empty(M, N, device=x.device, dtype=dt), torch.empty(M, N, device=x.device, dtype=dt)

    def run(i):
        return lt.linear_gelu_aux(x, W1, b1, out=y_buf, pre_out=pre_buf, algo_index=i)

    def check(i):
        y_buf.fill_(float("nan"))   # poisoned: an unwritten element shows as NaN
        pre_buf.fill_(float("nan"))
        run(i)
        return {"y": rel_err(y_buf, y_ref), "pre": rel_err(pre_buf, pre_ref)}

    name = "cuBLASLt GELU_AUX_BIAS (y, pre)"
    reasons = lt.linear_gelu_aux_not_supported_reasons(x, W1, b1)
    if reasons:
        sec.refused(name, "; ".join(reasons))
    else:
        count = lt.heuristic_count(lt.lt_call("linear_gelu_aux", M, N, D),
                                   {"x": x, "weight": W1, "bias": b1, "y": y_buf, "pre": pre_buf})
        lt_variants(sec, name, run, check, count, algos)
    sec.finish()


def bwd_section(lt, shape, dY, W2, pre0, algos, rows) -> torch.Tensor:
    """dP = dY W2, GELU' and fc1's bias gradient: cuBLASLt DGELU_BGRAD vs torch.mm +
    gelu_tanh_backward. Returns dpre (the fp32 reference's, in pre's dtype)."""
    from fastlego.kernels.gelu import gelu_tanh_backward

    M, D = dY.shape
    N, dt = W2.shape[1], dY.dtype
    sec = Section(shape, "bwd", 2 * M * N * D, dY.element_size() * (M * D + D * N + 2 * M * N + N), rows)
    dpre_ref, db_ref = lt.dgelu_bgrad_reference(dY, W2, pre0)
    buf, pre = torch.empty(M, N, device=dY.device, dtype=dt), pre0.clone()

    def unfused():
        torch.mm(dY, W2, out=buf)
        return gelu_tanh_backward(buf, pre, act_into_pre=True)   # pre <- GELU(pre): the timing is unaffected

    dpre_u, _, db_u = unfused()
    sec.add("torch.mm + gelu_tanh_backward (dpre, db, act)", unfused,
            {"dpre": rel_err(dpre_u, dpre_ref), "db": rel_err(db_u, db_ref)}, baseline=True)
    del dpre_u, db_u
    sec.add("torch.mm only (dP; the GEMM floor)", lambda: torch.mm(dY, W2, out=buf), {})
    pre.copy_(pre0)
    sec.add("gelu_tanh_backward only", lambda: gelu_tanh_backward(buf, pre, act_into_pre=True), {})
    dpre_buf, db_buf = torch.empty(M, N, device=dY.device, dtype=dt), torch.empty(N, device=dY.device, dtype=dt)

    def run(i):
        return lt.dgelu_bgrad(dY, W2, pre0, out=dpre_buf, dbias_out=db_buf, algo_index=i)

    def check(i):
        dpre_buf.fill_(float("nan"))
        db_buf.fill_(float("nan"))
        run(i)
        return {"dpre": rel_err(dpre_buf, dpre_ref), "db": rel_err(db_buf, db_ref)}

    name = "cuBLASLt DGELU_BGRAD (dpre, db)"
    reasons = lt.dgelu_bgrad_not_supported_reasons(dY, W2, pre0)
    if reasons:
        sec.refused(name, "; ".join(reasons))
    else:
        count = lt.heuristic_count(lt.lt_call("dgelu_bgrad", M, N, D),
                                   {"grad_act": dY, "weight2": W2, "pre": pre0, "dpre": dpre_buf, "dbias": db_buf})
        lt_variants(sec, name, run, check, count, algos)
    sec.finish()
    return dpre_ref.to(dt)


def wgrad_section(lt, shape, layer, G, X, algos, rows) -> None:
    """dW = G^T X and db = sum_rows G: cuBLASLt BGRADB / BGRADA vs torch.mm + sum."""
    M, n_out = G.shape
    k_in = X.shape[1]
    sec = Section(shape, f"wgrad {layer}", 2 * M * n_out * k_in,
                  G.element_size() * (M * n_out + M * k_in + n_out * k_in + n_out), rows)
    dw_ref, db_ref = lt.weight_grad_bgrad_reference(G, X)

    def unfused():
        return torch.mm(G.t(), X), G.sum(0)

    dw_u, db_u = unfused()
    sec.add("torch.mm + sum (dW, db)", unfused, {"dW": rel_err(dw_u, dw_ref), "db": rel_err(db_u, db_ref)},
            baseline=True)
    del dw_u, db_u
    sec.add("torch.mm only (dW; the GEMM floor)", lambda: torch.mm(G.t(), X), {})
    for epilogue in ("bgradb", "bgrada"):
        epilogue_variant(lt, sec, epilogue, G, X, dw_ref, db_ref, algos)
    sec.finish()


def epilogue_variant(lt, sec, epilogue, G, X, dw_ref, db_ref, algos) -> None:
    M, n_out = G.shape
    call = lt.lt_call("weight_grad_" + epilogue, M, n_out, X.shape[1])
    storage = torch.empty(call.d_rowmajor_shape, device=G.device, dtype=G.dtype)
    dw_buf = storage.t() if call.d_transposed else storage
    db_buf = torch.empty(n_out, device=G.device, dtype=G.dtype)
    name = f"cuBLASLt {epilogue.upper()} (dW{' as (dW^T)^T' if call.d_transposed else ''}, db)"

    def run(i):
        return lt.weight_grad_bgrad(G, X, epilogue=epilogue, out=dw_buf, dbias_out=db_buf, algo_index=i)

    def check(i):
        dw_buf.fill_(float("nan"))
        db_buf.fill_(float("nan"))
        run(i)
        return {"dW": rel_err(dw_buf, dw_ref), "db": rel_err(db_buf, db_ref)}

    reasons = lt.weight_grad_bgrad_not_supported_reasons(G, X, epilogue=epilogue)
    if reasons:
        sec.refused(name, "; ".join(reasons))
        return
    count = lt.heuristic_count(call, {"grad_out": G, "inp": X, "dweight": storage, "dbias": db_buf})
    lt_variants(sec, name, run, check, count, algos)


def probe_shape(label: str, M: int, D: int, algos: int, rows: list) -> None:
    """Every pass of the MLP of M rows and width D (bf16, N = 4D hidden)."""
    from fastlego.kernels import cublaslt as lt

    dev, dt, N = "cuda", torch.bfloat16, 4 * D
    shape = f"{label} (M {M}, D {D})"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, D, device=dev, dtype=dt, generator=g)
    W1 = (torch.randn(N, D, device=dev, generator=g) / D ** 0.5).to(dt)   # fc1.weight (4D, D)
    b1 = (0.1 * torch.randn(N, device=dev, generator=g)).to(dt)
    W2 = (torch.randn(D, N, device=dev, generator=g) / N ** 0.5).to(dt)   # fc2.weight (D, 4D)
    dY = torch.randn(M, D, device=dev, dtype=dt, generator=g)            # dL/d fc2's output
    fwd_section(lt, shape, x, W1, b1, algos, rows)
    torch.cuda.empty_cache()
    pre0 = F.linear(x, W1, b1)   # fc1's pre-activation: the backward's input
    dpre = bwd_section(lt, shape, dY, W2, pre0, algos, rows)
    torch.cuda.empty_cache()
    wgrad_section(lt, shape, "fc1", dpre, x, algos, rows)
    del dpre
    torch.cuda.empty_cache()
    wgrad_section(lt, shape, "fc2", dY, F.gelu(pre0, approximate="tanh"), algos, rows)
    torch.cuda.empty_cache()


def parse_shapes(text: str):
    """"name:MxD,..." (or "MxD,...") -> [(name, M, D)]."""
    out = []
    for item in text.split(","):
        name, _, dims = item.rpartition(":")
        try:
            M, D = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not name:MxD (e.g. lego_L_PG_64/B64:65536x1024)")
        out.append((name or dims, M, D))
    return out


def print_table(rows: list, env: dict) -> None:
    """The Markdown table of every row, then the card, versions and date."""
    print("\n| MLP | pass | variant | ms | TFLOP/s | TB/s | speed-up | max rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("ms") is None:
            print(f"| {r['shape']} | {r['kind']} | {r['variant']} | refused: {r['refused'][:120]} | | | | |")
            continue
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"| {r['shape']} | {r['kind']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['tbps']:.2f} | "
              f"{speed} | {fmt_errors(r['errors'])} |")
    lib = env.get("cublaslt") or {}
    print(f"\n{env.get('gpu')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), cuBLASLt {lib.get('version')}, "
          f"{env.get('date')}. Speed-up: over the first (unfused PyTorch) row of each pass. TB/s: the pass's "
          f"minimum bytes over the row's time.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="name:MxD,... (rows x width of each MLP)")
    p.add_argument("--algos", type=int, default=1, help="time the heuristic's first N algorithms of each cuBLASLt variant")
    p.add_argument("--json", metavar="OUT", help="write the rows and the environment to this JSON file")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("probe_cublaslt_epilogues.py times cuBLASLt and Triton kernels on a CUDA GPU: run it on one, "
                         "without TRITON_INTERPRET")
    from fastlego.kernels import cublaslt as lt
    reasons = lt.not_supported_reasons()
    if reasons:
        raise SystemExit("cuBLASLt cannot be used here:\n  " + "\n  ".join(reasons))
    env = environment("cuda")
    env["cublaslt"] = lt.library_info()
    print(f"{env['gpu']} (sm {env['capability']}), torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
          f"cuBLASLt {env['cublaslt']['version']} ({env['cublaslt']['path']}), {env['date']}", flush=True)
    rows = []
    for name, M, D in shapes:
        probe_shape(name, M, D, max(1, args.algos), rows)
    print_table(rows, env)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
