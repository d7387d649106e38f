"""Can a Triton GEMM with the MLP's GELU in its epilogue beat cuBLAS + fastlego's separate GELU pass,
at the MLP's shapes? (GPU only; the answers measured so far are in bench/RESULTS.md.)

    python3 bench/probe_gelu_gemm.py [--shapes 65536x1024,262144x384] [--ptr]

For each M x D (rows x model width; the MLP is D -> 4D -> D, bf16):
  bwd  dP = dY W2 (M x D times D x 4D), then `gelu_tanh_backward(dP, pre, act_into_pre=True)`:
       dpre = dP * GELU'(pre), GELU(pre) written over pre, fc1's bias-gradient partial sums.
       Fused: the same three outputs from the GEMM's epilogue, dP never stored.
  fwd  pre = X W1^T + b1, then act = GELU(pre) (F.linear + F.gelu). Fused: the epilogue writes pre
       (kept for the backward) and act.
  mm   the fused kernels' plain GEMM (no epilogue work), against cuBLAS's.
Variants: cuBLAS + the separate pass; a persistent Triton GEMM on TMA descriptors (tile, stages,
warps, warp specialization, epilogue in one or two column halves, fc1 bias sums on/off, the
pre tile loaded before the K loop); with --ptr also a pointer-based grouped GEMM. Each row prints
its median ms and the max error (relative to the max magnitude) of each output against an fp32
reference; a variant the compiler or the card refuses prints why. Full table last."""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastlego import reference  # noqa: E402
from fastlego.benchmark import measure  # noqa: E402
from fastlego.kernels.gelu import gelu_tanh_backward, gelu_tanh_exponent  # noqa: E402


@triton.jit
def _gelu_parts(a):
    """(s, GELU'(a)) for tanh-GELU, as `gelu_tanh_backward` computes them: GELU(a) = a s."""
    s = 1.0 / (1.0 + tl.exp2(tl.minimum(gelu_tanh_exponent(a), 126.0)))
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
    return s, s + 2.0 * a * s * (1.0 - s) * du


@triton.jit
def _tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    group = GROUP_M * num_pid_n
    gid = tile_id // group
    first = gid * GROUP_M
    gsz = tl.minimum(num_pid_m - first, GROUP_M)
    return first + (tile_id % group) % gsz, (tile_id % group) // gsz


@triton.jit
def ptr_kernel(a_ptr, b_ptr, c_ptr, pre_ptr, bias_ptr, parts_ptr, M, N, K,
               sbk, sbn, EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rk[:, None] * sbk + rn[None, :] * sbn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(0, K, BK):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BK
        b_ptrs += BK * sbk
    off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if EPI == 0:
        tl.store(c_ptr + off, acc.to(c_ptr.dtype.element_ty))
    elif EPI == 1:
        a = tl.load(pre_ptr + off).to(tl.float32)
        s, dg = _gelu_parts(a)
        da = (acc * dg).to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + off, da)
        tl.store(pre_ptr + off, (a * s).to(pre_ptr.dtype.element_ty))
        tl.store(parts_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(da.to(tl.float32), axis=0))
    else:
        pre = (acc + tl.load(bias_ptr + rn).to(tl.float32)[None, :]).to(pre_ptr.dtype.element_ty)
        tl.store(pre_ptr + off, pre)
        p = pre.to(tl.float32)
        s, _ = _gelu_parts(p)
        tl.store(c_ptr + off, (p * s).to(c_ptr.dtype.element_ty))


@triton.jit
def tma_kernel(a_desc, b_desc, c_desc, pre_desc, bias_ptr, parts_ptr, M, N, K,
               EPI: tl.constexpr, B_KN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr = False, SUMS: tl.constexpr = True,
               SPLIT: tl.constexpr = 2, PREFETCH: tl.constexpr = False):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BK)
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=not WS, warp_specialize=WS):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if PREFETCH:
            pre_tile = pre_desc.load([om, on])
        for ki in range(k_tiles):
            a = a_desc.load([om, ki * BK])
            if B_KN:
                b = b_desc.load([ki * BK, on])
            else:
                b = b_desc.load([on, ki * BK]).T
            acc = tl.dot(a, b, acc)
        if EPI == 0:
            c_desc.store([om, on], acc.to(c_desc.dtype))
        elif SPLIT == 1:
            if PREFETCH:
                _epilogue(acc, pre_tile, c_desc, pre_desc, bias_ptr, parts_ptr, om, on, pid_m, N, EPI, SUMS)
            else:
                _epilogue(acc, pre_desc.load([om, on]), c_desc, pre_desc, bias_ptr, parts_ptr, om, on, pid_m, N,
                          EPI, SUMS)
        else:   # two column halves: half the epilogue's registers at a time
            acc0, acc1 = acc.reshape(BM, 2, BN // 2).permute(0, 2, 1).split()
            for h in tl.static_range(2):
                on_h = on + h * (BN // 2)
                _epilogue(acc0 if h == 0 else acc1, pre_desc.load([om, on_h]), c_desc, pre_desc, bias_ptr,
                          parts_ptr, om, on_h, pid_m, N, EPI, SUMS)


@triton.jit
def _epilogue(g, pre, c_desc, pre_desc, bias_ptr, parts_ptr, om, on, pid_m, N, EPI: tl.constexpr, SUMS: tl.constexpr):
    """One (rows x W) chunk of the fused epilogue at (om, on); g is the chunk's fp32 accumulator.
    EPI 1 (backward): pre is the chunk's pre-activation; writes dpre = g * GELU'(pre) to c,
    GELU(pre) over pre, and (SUMS) the chunk's fc1 bias partial sums to row pid_m of parts.
    EPI 2 (forward): pre is unused; writes pre = g + bias and GELU(pre) to c."""
    W: tl.constexpr = g.shape[1]
    cols = on + tl.arange(0, W)
    if EPI == 1:
        a = pre.to(tl.float32)
        s, dg = _gelu_parts(a)
        da = (g * dg).to(c_desc.dtype)
        c_desc.store([om, on], da)
        pre_desc.store([om, on], (a * s).to(pre_desc.dtype))
        if SUMS:
            tl.store(parts_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(da.to(tl.float32), axis=0))
    else:
        out = (g + tl.load(bias_ptr + cols).to(tl.float32)[None, :]).to(pre_desc.dtype)
        pre_desc.store([om, on], out)
        p = out.to(tl.float32)
        s, _ = _gelu_parts(p)
        c_desc.store([om, on], (p * s).to(c_desc.dtype))

def bench(fn):
    """Median ms of one call: 20 calls timed with CUDA events after 5 warm-up calls."""
    return measure(fn, device="cuda", rounds=20, warmup=5, inner=1).median_ms


def err(x, ref):
    x = x.float()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).abs().max() / ref.abs().max()).item()


PTR_CONFIGS = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8),
               (128, 128, 64, 5, 4)]
TMA_CONFIGS = [
    (128, 256, 64, 3, 8, False, True, 2, (0, 1, 2)), (128, 256, 64, 3, 8, False, False, 2, (1,)),
    (128, 256, 64, 4, 8, False, True, 2, (2,)), (256, 128, 64, 4, 8, False, True, 2, (2,)),
    (128, 128, 64, 3, 8, False, True, 1, (1, 2)), (128, 128, 64, 3, 4, False, True, 1, (1, 2)),
    (128, 128, 64, 2, 8, False, True, 1, (1,)), (128, 128, 64, 2, 4, False, True, 1, (1,)),
    (64, 256, 64, 3, 4, False, True, 2, (1, 2)), (128, 128, 64, 3, 8, False, False, 1, (1,)),
    (128, 256, 64, 3, 8, True, True, 2, (0, 1, 2)), (128, 128, 64, 3, 8, True, True, 1, (0, 1)),
    (128, 128, 64, 4, 4, True, True, 1, (0, 1, 2)),
    (128, 128, 64, 3, 8, False, True, 1, (1,), True), (128, 128, 64, 4, 8, False, True, 1, (1,), True),
]


def probe_shape(shape: str, nsm: int, ptr: bool, rows: list) -> None:
    """Every variant at one M x D; appends (shape, kind, variant, ms, TFLOP/s, errors) to rows."""
    dev, dt = "cuda", torch.bfloat16
    M, D = map(int, shape.split("x"))
    N, K = 4 * D, D
    torch.manual_seed(0)
    dY = torch.randn(M, K, device=dev, dtype=dt)
    W2 = (torch.randn(K, N, device=dev) / K ** 0.5).to(dt)      # fc2.weight (D, 4D): B = W2 (K x N)
    W1 = (torch.randn(N, K, device=dev) / K ** 0.5).to(dt)      # fc1.weight (4D, D): B = W1^T
    b1 = torch.randn(N, device=dev).to(dt)
    pre0 = torch.randn(M, N, device=dev, dtype=dt)
    flops = 2 * M * N * K
    # references (fp32)
    mm_ref = dY.float() @ W2.float()
    dref, aref, bref = reference.gelu_tanh_backward(mm_ref.clone(), pre0.float())
    fwd_ref = F.gelu(dY.float() @ W1.float().t() + b1.float(), approximate="tanh")

    def report(kind, name, ms, e):
        rows.append((shape, kind, name, ms, flops / ms / 1e9, e))
        print(f"{shape:>12} {kind:4} {name:34} {ms:8.3f} ms {flops / ms / 1e9:7.0f} TFLOP/s  err {e}", flush=True)

    # ---- cuBLAS baselines
    buf = torch.empty(M, N, device=dev, dtype=dt)
    pre = pre0.clone()
    report("bwd", "cublas mm only", bench(lambda: torch.mm(dY, W2, out=buf)), "")
    report("bwd", "gelu_tanh_backward only", bench(lambda: gelu_tanh_backward(buf, pre, True)), "")

    def unfused_backward():
        torch.mm(dY, W2, out=buf)
        return gelu_tanh_backward(buf, pre, True)

    def unfused_forward():
        return F.gelu(F.linear(dY, W1, b1), approximate="tanh")

    pre.copy_(pre0)
    dp, act, db = unfused_backward()
    e = (err(dp, dref), err(act, aref), err(db, bref))   # before timing, which overwrites dp and act
    report("bwd", "cublas + gelu_tanh_backward", bench(unfused_backward), e)
    report("fwd", "cublas linear only", bench(lambda: F.linear(dY, W1, b1)), "")
    report("fwd", "cublas linear + F.gelu", bench(unfused_forward), err(unfused_forward(), fwd_ref))

    def check_and_time(name, epi, bm, launch, sums=True):
        """Run launch(parts) once on fresh inputs, check its outputs (the bias sums only if it writes
        them), then time it."""
        try:
            parts = torch.empty(triton.cdiv(M, bm), N, device=dev, dtype=torch.float32)
            pre.copy_(pre0)
            launch(parts)
            if epi == 0:
                e = err(buf, mm_ref)
            elif epi == 1:
                e = (err(buf, dref), err(pre, aref), err(parts.sum(0), bref) if sums else None)
            else:
                e = (err(buf, fwd_ref),)
            report(["mm", "bwd", "fwd"][epi], name, bench(lambda: launch(parts)), e)
        except Exception as ex:  # noqa: BLE001 - a variant the compiler or the card refuses: say why, go on
            print(f"{shape} {name} epi{epi} FAILED: {type(ex).__name__}: {str(ex)[:300]}", flush=True)

    for (bm, bn, bk, st, wp) in PTR_CONFIGS if ptr else []:
        for epi in (0, 1, 2):
            B, sbk, sbn = (W2, N, 1) if epi < 2 else (W1, 1, K)
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            check_and_time(f"ptr {bm}x{bn}x{bk} s{st} w{wp}", epi, bm, lambda parts: ptr_kernel[grid](  # noqa: B023
                dY, B, buf, pre, b1, parts, M, N, K, sbk, sbn, EPI=epi, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                num_stages=st, num_warps=wp))
    for (bm, bn, bk, st, wp, ws, sums, split, epis, *pf) in TMA_CONFIGS:
        pf = bool(pf and pf[0])
        name = (f"tma {bm}x{bn}x{bk} s{st} w{wp}" + (" ws" if ws else "") + ("" if sums else " nosums")
                + f" split{split}" + (" prefetch" if pf else ""))
        for epi in epis:
            a_d = TensorDescriptor.from_tensor(dY, [bm, bk])
            b_d = TensorDescriptor.from_tensor(W2, [bk, bn]) if epi < 2 else TensorDescriptor.from_tensor(W1, [bn, bk])
            c_d = TensorDescriptor.from_tensor(buf, [bm, bn if epi == 0 else bn // split])
            p_d = TensorDescriptor.from_tensor(pre, [bm, bn // split])
            # persistent: one program per SM, two for 128 x 128 tiles of <= 3 stages (two fit an SM)
            programs = nsm * (2 if bm * bn <= 128 * 128 and st <= 3 else 1)
            grid = (min(programs, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
            check_and_time(name, epi, bm, lambda parts: tma_kernel[grid](  # noqa: B023
                a_d, b_d, c_d, p_d, b1, parts, M, N, K, EPI=epi, B_KN=epi < 2, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                NUM_SMS=grid[0], WS=ws, SUMS=sums, SPLIT=split, PREFETCH=pf, num_stages=st, num_warps=wp), sums)

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="65536x1024,262144x384,65536x384")
    p.add_argument("--ptr", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("probe_gelu_gemm.py times kernels on a CUDA GPU (Hopper: TMA descriptors); "
                 "run it on one, without TRITON_INTERPRET")
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape in args.shapes.split(","):
        probe_shape(shape, nsm, args.ptr, rows)
        torch.cuda.empty_cache()
    print("\n| shape MxD | kind | variant | ms | TFLOP/s |")
    for shape, kind, name, ms, tf, e in rows:
        print(f"| {shape} | {kind} | {name} | {ms:.3f} | {tf:.0f} |")


if __name__ == "__main__":
    main()
