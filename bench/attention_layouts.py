"""Global attention in training: forward + backward of softmax attention on a DiT block's qkv
(N, T, 3D), for several ways of handing it to PyTorch's SDPA, on one CUDA GPU.

    python3 bench/attention_layouts.py [N T D heads]     (default: lego_L_PG_64 at batch 128)

The ways differ only in how q, k, v are cut from qkv and how the output is merged, which decides
the copies autograd makes around the attention kernels (an unbind over a permuted view comes back
as a stack plus a copy into qkv's layout; an unbind over the 3-axis of (N, T, 3, H, hd) comes back
as one stack straight into qkv's layout). Prints the median time of forward + backward and the
largest error against the first way's gradients."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastlego.benchmark import measure  # noqa: E402


def permuted(qkv, H):     # fastlego.reference.split_qkv / merge_heads
    N, T, three_d = qkv.shape
    q, k, v = qkv.reshape(N, T, 3, H, three_d // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(N, T, -1)


def token_major(qkv, H):  # unbind the 3-axis of (N, T, 3, H, hd): the backward stacks into qkv's layout
    N, T, three_d = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in qkv.view(N, T, 3, H, three_d // (3 * H)).unbind(2))
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(N, T, -1)


WAYS = {"permuted": permuted, "token_major": token_major}
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(fn, reps=10):
    """Median ms of one call (CUDA events, after warm-up): fastlego.benchmark.measure."""
    return measure(fn, device="cuda", rounds=reps, warmup=3, inner=1).median_ms


def main():
    N, T, D, H = (int(a) for a in sys.argv[1:5]) if len(sys.argv) >= 5 else (128, 1024, 1024, 16)
    torch.manual_seed(0)
    qkv = torch.randn(N, T, 3 * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(N, T, D, device="cuda", dtype=torch.bfloat16)
    ref = None
    print(f"N={N} T={T} D={D} heads={H}, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for bname, backend in BACKENDS.items():
        for wname, way in WAYS.items():
            try:
                with sdpa_kernel([backend]):
                    def step():
                        qkv.grad = None
                        way(qkv, H).backward(g)
                    ms = time_ms(step)
                    fwd = time_ms(lambda: way(qkv.detach(), H))
                    step()
            except Exception as exc:
                print(f"{bname:10s} {wname:12s} failed: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            grad = qkv.grad.float()
            if ref is None:
                ref = grad
            err = ((grad - ref).norm() / ref.norm()).item()
            print(f"{bname:10s} {wname:12s} fwd+bwd {ms:7.2f} ms  fwd {fwd:6.2f} ms  rel. diff of dqkv {err:.1e}")


if __name__ == "__main__":
    main()
