"""The floor a forward is held against, and the FLOPs it is counted in.

- Device limits, measured in the run: the matrix peak (TFLOP/s of a size^3 matmul) and the copy
  bandwidth (GB/s of a large device-to-device copy).
- The forward as matmuls and attentions, from the model configuration alone: its FLOPs
  (`analytic_flops`, checked against FlopCounterMode by `count_forward_flops`).
- The floor (`measure_floor`): every matmul of the forward timed with cuBLAS, global attention
  with SDPA, local window attention as the bytes it moves at the measured bandwidth; everything
  else free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import dispatch, ops
from .. import reference as R
from ..model import LegoBackbone
from ..presets import BRICK_TYPES, get_preset
from .config import Case
from .numerics import dtype_name, element_size
from .timing import Runner, copies_for, free_memory, measure


# ---------------------------------------------------------------------------------------------
# Device limits: the matrix peak and the copy bandwidth
# ---------------------------------------------------------------------------------------------

def measure_matmul_peak(device, size: int = 8192, dtype=torch.bfloat16, rounds: int = 20, warmup: int = 3,
                        runner: Optional[Runner] = None) -> dict:
    """TFLOP/s of a size^3 matmul (cuBLAS on CUDA) in `dtype`: the matrix peak of this run."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    t = measure(torch.mm, [(a, b)], device=device, rounds=rounds, warmup=warmup, inner=1, runner=runner)
    flops = 2 * size ** 3
    del a, b
    return {"size": size, "dtype": dtype_name(dtype), "ms": t.median_ms,
            "tflops": flops / (t.median_ms * 1e-3) / 1e12, "timing": t.to_dict()}


def measure_copy_bandwidth(device, mib: int = 1024, rounds: int = 20, warmup: int = 3,
                           runner: Optional[Runner] = None) -> dict:
    """GB/s of a device-to-device copy of `mib` MiB (bytes moved = read + write = 2 x size)."""
    device = torch.device(device)
    n = mib * 2 ** 20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, rounds=rounds, warmup=warmup, inner=1, runner=runner)
    moved = 2 * n * 4
    return {"mib": mib, "bytes_moved": moved, "ms": t.median_ms,
            "gbps": moved / (t.median_ms * 1e-3) / 1e9, "timing": t.to_dict()}


# ---------------------------------------------------------------------------------------------
# The forward as matmuls and attentions, from the model configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BrickGeometry:
    index: int
    region: int
    patch: int
    width: int
    heads: int
    depth: int
    in_channels: int      # the brick's patch-embedding input channels (C + 2, or 2C + 2)
    regions_per_image: int  # L
    tokens_per_region: int  # T

    @property
    def attention_op(self) -> str:
        return "window_attention" if self.tokens_per_region <= ops.WINDOW_MAX_TOKENS else "global_attention"


def brick_geometry(case: Case) -> List[BrickGeometry]:
    preset = get_preset(case.preset)
    depths = case.depths if case.depths is not None else preset.depths
    out = []
    for i, (region, kind, depth) in enumerate(zip(preset.regions, preset.model_type, depths)):
        width, patch, heads = BRICK_TYPES[kind]
        if case.resolution % region:
            raise ValueError(f"{case.preset}: resolution {case.resolution} is not a multiple of region {region}")
        cin = case.in_channels + 2 if i == 0 else 2 * case.in_channels + 2
        out.append(BrickGeometry(i, region, patch, width, heads, depth, cin,
                                 (case.resolution // region) ** 2, (region // patch) ** 2))
    return out


@dataclass(frozen=True)
class Matmul:
    """`count` matmuls (M, K) x (K, N) in one forward."""

    name: str
    m: int
    k: int
    n: int
    count: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


@dataclass(frozen=True)
class AttentionShape:
    """`count` attentions over `regions` independent sequences of `tokens` tokens."""

    name: str
    kind: str  # "global" (timed with SDPA) or "local" (counted as bytes at the copy bandwidth)
    regions: int
    heads: int
    tokens: int
    head_dim: int
    count: int

    @property
    def flops(self) -> int:  # q k^T and p v
        return 4 * self.regions * self.heads * self.tokens ** 2 * self.head_dim * self.count

    def min_bytes(self, elem: int = 2) -> int:  # read qkv, write the output, per call
        return self.regions * self.tokens * self.heads * self.head_dim * 4 * elem


def forward_matmuls(case: Case, per_region_adaln: bool = False) -> List[Matmul]:
    """Every matmul of one forward (patch embedding as a matmul). `per_region_adaln`: the
    release's count, where the adaLN Linears run once per region instead of once per image."""
    B = case.batch
    D0 = brick_geometry(case)[0].width  # the conditioning width
    mm = [Matmul("t_embed.fc1", B, 256, D0, 1), Matmul("t_embed.fc2", B, D0, D0, 1)]
    if case.label_dim:
        mm.append(Matmul("y_embed", B, case.label_dim, D0, 1))
    for g in brick_geometry(case):
        D, M = g.width, B * g.regions_per_image * g.tokens_per_region
        ada_m = B * g.regions_per_image if per_region_adaln else B
        p = f"b{g.index}."
        mm += [
            Matmul(p + "patch_embed", M, g.in_channels * g.patch ** 2, D, 1),
            Matmul(p + "adaLN", ada_m, D, 6 * D, g.depth),
            Matmul(p + "qkv", M, D, 3 * D, g.depth),
            Matmul(p + "proj", M, D, D, g.depth),
            Matmul(p + "fc1", M, D, 4 * D, g.depth),
            Matmul(p + "fc2", M, 4 * D, D, g.depth),
            Matmul(p + "final_adaLN", ada_m, D, 2 * D, 1),
            Matmul(p + "final", M, D, g.patch ** 2 * case.in_channels, 1),
        ]
    return mm


def forward_attentions(case: Case) -> List[AttentionShape]:
    out = []
    for g in brick_geometry(case):
        kind = "local" if g.attention_op == "window_attention" else "global"
        out.append(AttentionShape(f"b{g.index}.attention", kind, case.batch * g.regions_per_image, g.heads,
                                  g.tokens_per_region, g.width // g.heads, g.depth))
    return out


def analytic_flops(case: Case, per_region_adaln: bool = False) -> int:
    """Matmul + attention FLOPs of one forward (what FlopCounterMode counts)."""
    return (sum(m.flops for m in forward_matmuls(case, per_region_adaln))
            + sum(a.flops for a in forward_attentions(case)))


def count_forward_flops(model: LegoBackbone, inputs: tuple) -> int:
    """FLOPs of one reference forward, as torch.utils.flop_counter counts them (SDPA forced to
    its math path so that attention is counted on every device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), dispatch.use_backend("reference"), sdpa_kernel(SDPBackend.MATH), counter:
        model(*inputs)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------------------------

def measure_floor(case: Case, device, bandwidth_gbps: float, *, rounds: int, warmup: int,
                  min_round_ms: float, dtype=torch.bfloat16, runner: Optional[Runner] = None) -> dict:
    """The floor: every matmul of the forward with cuBLAS (each distinct shape timed once, times
    its count), global attention with SDPA, local attention as its bytes at `bandwidth_gbps`;
    everything else free."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(2)
    shape_ms: Dict[Tuple[int, int, int], float] = {}
    items = []
    for mm in forward_matmuls(case):
        key = (mm.m, mm.k, mm.n)
        if key not in shape_ms:
            nbytes = (mm.m * mm.k + mm.k * mm.n) * element_size(dtype)
            sets = [(torch.randn(mm.m, mm.k, device=device, dtype=dtype, generator=g),
                     torch.randn(mm.n, mm.k, device=device, dtype=dtype, generator=g))
                    for _ in range(copies_for(nbytes, device))]
            t = measure(F.linear, sets, device=device, rounds=rounds, warmup=warmup, min_round_ms=min_round_ms)
            shape_ms[key] = t.median_ms
            del sets
        items.append({"name": mm.name, "kind": "matmul", "shape": list(key), "count": mm.count,
                      "ms_each": shape_ms[key], "ms": shape_ms[key] * mm.count})
    attn_ms: Dict[tuple, float] = {}
    for at in forward_attentions(case):
        if at.kind == "global":
            key = (at.regions, at.heads, at.tokens, at.head_dim)
            if key not in attn_ms:
                nbytes = at.regions * at.heads * at.tokens * at.head_dim * 3 * element_size(dtype)
                sets = [tuple(torch.randn(*key, device=device, dtype=dtype, generator=g) for _ in range(3))
                        for _ in range(copies_for(nbytes, device))]
                t = measure(R.sdpa, sets, device=device, rounds=rounds, warmup=warmup, min_round_ms=min_round_ms)
                attn_ms[key] = t.median_ms
                del sets
            ms_each = attn_ms[key]
        else:
            ms_each = at.min_bytes(element_size(dtype)) / (bandwidth_gbps * 1e9) * 1e3
        items.append({"name": at.name, "kind": at.kind + "_attention",
                      "shape": [at.regions, at.heads, at.tokens, at.head_dim], "count": at.count,
                      "ms_each": ms_each, "ms": ms_each * at.count})
    free_memory(device, collect=False)
    sums = {k: sum(i["ms"] for i in items if i["kind"] == k) for k in ("matmul", "global_attention", "local_attention")}
    total = sum(sums.values())
    matmul_flops = sum(m.flops for m in forward_matmuls(case))
    return {"ms": total, "img_per_s": case.batch / (total * 1e-3),
            "matmul_ms": sums["matmul"], "global_attention_ms": sums["global_attention"],
            "local_attention_ms": sums["local_attention"],
            "matmul_tflops": matmul_flops / (sums["matmul"] * 1e-3) / 1e12 if sums["matmul"] else None,
            "dtype": dtype_name(dtype), "bandwidth_gbps": bandwidth_gbps, "items": items}
