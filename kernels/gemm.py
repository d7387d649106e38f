"""The tiled GEMM machinery that `modulated_linear` and `linear_gated_residual` share: program
order, edge clamping, tile configs (autotuned on the GPU, one fixed config under Triton's
interpreter), the shared-memory prune, the launch, and the key and candidates `fastlego.tune`
times (the path choice itself is `fastlego.tuning.lookup`).

Layout: tokens (..., K) are a row-major (M, K) matrix A (M = N_regions * T rows; the rows of one
image are contiguous, so row m belongs to image m // (M / B) for per-image (B, D) tensors); W is
(N, K) as nn.Linear stores it; out is (..., N), row-major.

Tiles: grouped (GROUP_M) program order so that consecutive programs share A row blocks and W in
L2; fp32 accumulation; a 64-bit offset for the tile's first row and 32-bit offsets inside the
tile (M * K passes 2^31 at large batches); rows/columns past the edge are clamped onto valid ones
so that main-loop loads need no M/N masks (the store is masked). A tile whose BLOCK_M rows all
belong to one image (rows per image a multiple of BLOCK_M, `TILE_IN_ONE_IMAGE`) loads its
per-image tables as one vector per step; otherwise as a (BLOCK_M, BLOCK_x) gather from the small
(B, D) tables (L1/L2 hits; it costs shared memory, so autotuning weighs it against BLOCK_M = 64).
On the GPU `triton.autotune` over a few Hopper configs, keyed on (next power of two of M, N, K,
rows per image); under Triton's interpreter one fixed small config.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastlego.dispatch import autocast_dtype, triton_interpreting

from .policy import cdiv, next_power_of_2


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: GROUP_M row blocks are swept across all column blocks
    before the next group starts, so W and the group's A rows stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_rows_cols(offs_m, offs_n, tile_m, M, N):
    """Rows of the tile relative to its first row, and absolute columns, with the rows/columns
    past the edge clamped onto valid ones: the main-loop loads then need no M/N masks (their
    extra results are dropped by the masked store), and all offsets inside a tile fit 32 bits
    (the tile's first row carries the 64-bit part, M * K may pass 2^31)."""
    local_m = tl.minimum(offs_m, M - 1) - tile_m
    cols = tl.minimum(offs_n, N - 1)
    return local_m, cols


@triton.jit
def load_k_step(a_rows, w_cols, offs_k, K, stride_ak, stride_wk, EVEN_K: tl.constexpr):
    """The A tile (BLOCK_M, BLOCK_K) at a_rows (BLOCK_M, 1) and the W^T tile (BLOCK_K, BLOCK_N) at
    w_cols (1, BLOCK_N) of the K step at columns offs_k. Past K both are 0 (masked loads unless K
    is a multiple of BLOCK_K), so the step adds nothing there, whatever a prologue makes of A."""
    if EVEN_K:
        x = tl.load(a_rows + offs_k[None, :] * stride_ak)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk)
    else:
        k_ok = offs_k < K
        x = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)
    return x, w


# --------------------------------------------------------------------------------------------
# Configs: autotuned on the GPU, one fixed config under the interpreter
# --------------------------------------------------------------------------------------------

def tile_config(bm, bn, bk, stages, warps, group_m=8):
    """A triton.Config of the tiled GEMMs' BLOCK_M / BLOCK_N / BLOCK_K / GROUP_M, stages and warps."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_stages=stages, num_warps=warps)


# Hopper (H100/H200, 228 KB shared memory per SM). The first five are 16-bit configs (wgmma
# tiles 128x256 / 256x128 / 128x128 / 64x256 / 64x128); the last two suit fp32 operands
# (BLOCK_K 32 keeps the staged tiles within shared memory).
GEMM_CONFIGS = [
    tile_config(128, 256, 64, 3, 8),
    tile_config(256, 128, 64, 3, 8),
    tile_config(128, 128, 64, 4, 8),
    tile_config(64, 256, 32, 4, 4),
    tile_config(64, 128, 64, 4, 4),
    tile_config(128, 128, 32, 3, 8),
    tile_config(64, 128, 32, 4, 4),
]
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}
_SMEM_BUDGET = 200 * 1024   # bytes of staged A + W tiles; the rest is left for the epilogue


def config_fits(config: triton.Config, a_bytes: int, w_bytes: int) -> bool:
    """Whether the pipelined A and W tiles of `config` fit the shared-memory budget, for A and W
    elements of these sizes (fp32 takes twice bf16's bytes; under autocast A may be fp32 while W
    is bf16). The gathered per-image tiles of straddling tiles are not counted: a config that
    overflows with them fails to launch and the autotuner skips it."""
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return config.num_stages * (bm * bk * a_bytes + bk * bn * w_bytes) <= _SMEM_BUDGET


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: keep the configs that fit shared memory (at least one)."""
    a = named_args["h_ptr"] if "h_ptr" in named_args else named_args["a_ptr"]
    w = named_args["w_ptr"]
    kept = [c for c in configs if config_fits(c, a.element_size(), w.element_size())]
    return kept or [configs[-1]]


_HEURISTICS = {
    # every tile lies in one image when rows per image is a multiple of BLOCK_M
    "TILE_IN_ONE_IMAGE": lambda args: args["rows_per_image"] % args["BLOCK_M"] == 0,
    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
}
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "rows_per_image"]


def gemm_variants(kernel):
    """(fixed, tuned) of a GEMM kernel: with the heuristics only (a given config), and autotuned
    over GEMM_CONFIGS. Its arguments must include M, N, K, rows_per_image, M_BUCKET (the next power
    of two of M: an autotune key only), h_ptr or a_ptr, w_ptr, and the constexprs of the heuristics
    and of triton.Config (BLOCK_M/N/K, GROUP_M)."""
    fixed = triton.heuristics(_HEURISTICS)(kernel)
    tuned = triton.autotune(configs=GEMM_CONFIGS, key=_AUTOTUNE_KEY,
                            prune_configs_by={"early_config_prune": _prune_configs})(fixed)
    return fixed, tuned


def launch_gemm(fixed, tuned, M, N, args, meta, config: Optional[triton.Config]):
    """Run a GEMM kernel: autotuned, or with `config` (a triton.Config: tuned or given by tests and
    benchmarks), or with the fixed interpreter config under TRITON_INTERPRET."""
    if triton_interpreting() and config is None:
        kw = dict(INTERPRETER_CONFIG)
        launch_kw = {}
    elif config is not None:
        kw = dict(config.kwargs)
        launch_kw = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    else:
        grid = lambda m: (cdiv(M, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]),)  # noqa: E731
        tuned[grid](*args, **meta)
        return
    grid = (cdiv(M, kw["BLOCK_M"]) * cdiv(N, kw["BLOCK_N"]),)
    fixed[grid](*args, **meta, **kw, **launch_kw)


# --------------------------------------------------------------------------------------------
# What `fastlego.tune` times and looks up (fastlego/tuning.py)
# --------------------------------------------------------------------------------------------

def shape_key(op, x, weight, per_image, extra) -> str:
    """The tuning key of a call: op, rows M (as the next power of two, the autotuner's bucket),
    N, K, rows per image, the dtypes (input, weight, autocast's) and the op's extra (activation,
    or residual and gate dtypes)."""
    M = x.numel() // x.shape[-1]
    amp = autocast_dtype(x)
    return (f"{op}|M<={next_power_of_2(max(M, 1))}|N={weight.shape[0]}|K={x.shape[-1]}"
            f"|rows={M // max(per_image.shape[0], 1)}|{x.dtype}|{weight.dtype}|amp={amp}|{extra}").replace("torch.", "")


def tuning_configs(x: torch.Tensor, weight: torch.Tensor) -> list:
    """The fused GEMM's tile configs worth timing for A = x and W = weight: those whose staged
    tiles fit shared memory (A in x's dtype, W in the compute dtype, as `_prune_configs` counts);
    under the interpreter only its fixed config (None)."""
    if triton_interpreting() or not x.is_cuda:
        return [None]
    w_bytes = torch.empty((), dtype=autocast_dtype(x) or x.dtype).element_size()
    kept = [c for c in GEMM_CONFIGS if config_fits(c, x.element_size(), w_bytes)]
    return kept or [GEMM_CONFIGS[-1]]
