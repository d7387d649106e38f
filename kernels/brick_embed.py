"""A brick's input embedding in one kernel: coordinates + concat + region unfold + patchify +
patch-embedding matmul + bias + position table, read straight from the NCHW image(s).

Semantics of `fastlego.reference.brick_embed`. The brick input is the channel concatenation
`z = [prev, x, rows, cols]` (Cin = CP + C + 2 channels, CP = C when `prev` is given, else 0);
the rows/cols channels are `(i / (H - 1) - 0.5) * 2` and `(j / (W - 1) - 0.5) * 2` in fp32,
rounded to x's dtype (as `coordinate_channels` does), or, when `coords` (B, 2, H, W) is given,
that tensor's two channels, rounded to x's dtype likewise. No copy of z is ever made: the kernel
is a GEMM  out[m, d] = sum_k A[m, k] * Wt[k, d] + bias[d] + pos[t, d]  whose A operand is
gathered by pointer arithmetic from x / prev / coords (or computed, for the two coordinate
channels when coords is None):

  token row m of M = B * L * T:  region n = m // T, token t = m % T,
                                 image b = n // L, region (rh, rw) = divmod(n % L, W / r),
                                 patch (ph, pw) = divmod(t, r / p);
  column k of K = Cin * p * p:   channel ci = k // (p * p), pixel (kr, kc) = divmod(k % (p * p), p)
                                 (the conv weight (D, Cin, p, p) is a (D, K) matrix in this order);
  A[m, k] = z[b, ci, rh * r + ph * p + kr, rw * r + pw * p + kc].

Output: tokens (B * L, T, D) in the compute dtype (x's, or the autocast dtype under autocast, as
F.conv2d gives), row m at out[n, t, :]. fp32 accumulation; bias and position table are added in
fp32 and the sum is rounded once. fp32 dots follow `kernels/policy.py` (IEEE, or 3xTF32 when
PyTorch's TF32 matmul switch is on).

Cost (bf16, 2 bytes/element; weights, bias and pos are kilobytes). FLOPs = 2 M K D; minimum
bytes = read x (+ prev) once + write M * D outputs:
  lego_S_PG_64, B = 256 (C = 3, 64 x 64, D = 384):
    brick 0 (r 4,  p 2): M = 262,144, K = 20   4.03 GFLOP  207.6 MB
    brick 1 (r 16, p 8): M =  16,384, K = 512  6.44 GFLOP   25.6 MB
    brick 2 (r 64, p 2): M = 262,144, K = 32   6.44 GFLOP  214.7 MB
    all: 16.9 GFLOP, 448 MB -> 0.149 ms at 3 TB/s (the FLOPs take ~0.02 ms at 790 TFLOP/s)
  lego_XL_U_32, B = 128 (C = 4, 32 x 32 latents, D = 1152):
    bricks r 32/16/4/16/32, p 2/8/2/8/2: M = 32,768 / 2,048 / 32,768 / 2,048 / 32,768,
    K = 24 / 640 / 40 / 640 / 40: 1.81 + 3.02 x 4 = 13.9 GFLOP, 250 MB -> 0.083 ms at 3 TB/s.
Patch-2 bricks (~20 FLOP/byte) are bound by writing the tokens (M * D * 2 bytes, 94% of all
bytes); patch-8 bricks reach ~250 FLOP/byte, near the bf16 tensor-core ridge, but move only
8-26 MB. So tiles are chosen for store bandwidth without spills, not for MMA shape.

External coordinates (Patch Diffusion training on crops, `fastlego.patch_diffusion`): a crop's
pixels carry their positions in the full image, which its own size cannot give. The kernel
takes them as an optional `coords` pointer, gathered exactly like `prev` (a third source image
of 2 channels, any strides), rather than as per-image crop offsets plus the full resolution
computed in-kernel. Offsets would save the reads, but serve only axis-aligned crops of one grid;
a pointer serves any coordinates (crops of every size, tiles, other grids) with one code path
whose values are the reference's by construction (the same loads and casts). The reads are
cheap: 2 channels per pixel (8 bytes in fp32) against the tokens written, D * 2 bytes per
patch in bf16: for a patch-2 brick of width 384, 32 bytes read per 768 written (+4% bytes);
patch-8 bricks write fewer bytes but are a small share of the step. Without `coords` the grid
is computed as before (no reads). Coordinates carry no gradient: the input-gradient kernel
below is unchanged (it writes the image channels only).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from fastlego.dispatch import triton_interpreting

from .policy import (cast_weight, cdiv, compute_dtype, dot_precision, launch_problems, next_power_of_2, out_problems,
                     raise_if, triton_reasons)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _patch_origin(offs_m, L, REGIONS_PER_ROW, REGION: tl.constexpr, PATCH: tl.constexpr):
    """Token rows m -> (region n = m // T, token t = m % T, image b = n // L, top-left pixel
    (y0, x0) of the token's patch): region n % L is (rh, rw) = divmod(n % L, W / r) of its image
    and token t is patch (ph, pw) = divmod(t, r / p) of its region, so y0 = rh * r + ph * p and
    x0 = rw * r + pw * p."""
    GRID: tl.constexpr = REGION // PATCH          # patches per region side
    TOKENS: tl.constexpr = GRID * GRID            # T
    region_idx = offs_m // TOKENS
    t = offs_m % TOKENS
    img = (region_idx // L).to(tl.int64)           # int64: B * C * H * W may pass 2^31
    l = region_idx % L
    y0 = (l // REGIONS_PER_ROW) * REGION + (t // GRID) * PATCH
    x0 = (l % REGIONS_PER_ROW) * REGION + (t % GRID) * PATCH
    return region_idx, t, img, y0, x0


@triton.jit
def _brick_embed_kernel(
    x_ptr, prev_ptr, coords_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
    M, D, K, L, REGIONS_PER_ROW, H, W, C, CP,   # CP: channels taken from prev (0 or C)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_pb, stride_pc, stride_ph, stride_pw,
    stride_cb, stride_cc, stride_ch, stride_cw,  # coords (B, 2, H, W), read when HAS_COORDS
    stride_wd, stride_wk,                       # weight seen as (D, K)
    stride_pos_t, stride_pos_d,                 # pos_embed seen as (T, D)
    stride_on, stride_ot, stride_od,            # out (B * L, T, D)
    REGION: tl.constexpr, PATCH: tl.constexpr, HAS_PREV: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_COORDS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PP: tl.constexpr = PATCH * PATCH
    x_dtype = x_ptr.dtype.element_ty
    compute_dtype = out_ptr.dtype.element_ty      # x's dtype, or the autocast dtype

    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Token rows of this tile -> image and top-left pixel (y0, x0) of their patch.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    region_idx, t, img, y0, x0 = _patch_origin(offs_m, L, REGIONS_PER_ROW, REGION, PATCH)
    # Address of z[b, ci, y0 + kr, x0 + kc] = row part (b, y0, x0) + column part (ci, kr, kc):
    # the gather is one add per element.
    x_row = img * stride_xb + y0 * stride_xh + x0 * stride_xw
    p_row = img * stride_pb + y0 * stride_ph + x0 * stride_pw
    c_row = img * stride_cb + y0 * stride_ch + x0 * stride_cw

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D

    # Coordinate channels: fp32 division by H - 1 / W - 1 rounded to nearest (div_rn), so the
    # values equal torch's `arange / (n - 1)` bit for bit.
    h_last = (H - 1).to(tl.float32)
    w_last = (W - 1).to(tl.float32)
    first_coord_k = (CP + C) * PP                 # k of channel `rows`; `cols` follows

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        ch = offs_k // PP
        kr = (offs_k % PP) // PATCH
        kc = offs_k % PATCH

        # x channels ci - CP (clamped to 0 where masked so no address is negative); ci < CP + C
        # implies k < K.
        in_x = (ch >= CP) & (ch < CP + C)
        x_col = tl.maximum(ch - CP, 0) * stride_xc + kr * stride_xh + kc * stride_xw
        a = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=row_ok[:, None] & in_x[None, :],
                    other=0.0).to(compute_dtype)
        if HAS_PREV:
            # prev is cast to x's dtype first (`prev.to(x.dtype)` in the reference), then to the
            # compute dtype (autocast's cast of the conv input).
            in_prev = ch < CP
            p_col = ch * stride_pc + kr * stride_ph + kc * stride_pw
            pv = tl.load(prev_ptr + p_row[:, None] + p_col[None, :], mask=row_ok[:, None] & in_prev[None, :],
                         other=0.0)
            a = tl.where(in_prev[None, :], pv.to(x_dtype).to(compute_dtype), a)
        if k0 + BLOCK_K > first_coord_k:
            if HAS_COORDS:
                # External coordinates: channel ch - (CP + C) of coords, gathered like prev and
                # cast the same way (coords dtype -> x dtype -> compute dtype). Columns past K
                # are masked out (their channel index is clamped so no address leaves coords).
                in_coord = (ch >= CP + C) & k_ok
                c_col = tl.minimum(tl.maximum(ch - CP - C, 0), 1) * stride_cc + kr * stride_ch + kc * stride_cw
                cv = tl.load(coords_ptr + c_row[:, None] + c_col[None, :], mask=row_ok[:, None] & in_coord[None, :],
                             other=0.0)
                a = tl.where(in_coord[None, :], cv.to(x_dtype).to(compute_dtype), a)
            else:
                # This chunk holds (part of) the two coordinate channels. Column (rows, kr, kc) of
                # token m holds rows(y0[m] + kr), column (cols, kr, kc) holds cols(x0[m] + kc): p
                # per-row values each, computed as 1-D vectors (fp32 -> x dtype -> compute dtype)
                # and placed with selects, so no 2-D division or index tile stays live.
                is_rows = ch == CP + C
                is_cols = ch == CP + C + 1
                for i in tl.static_range(PATCH):
                    rows = ((tl.math.div_rn((y0 + i).to(tl.float32), h_last) - 0.5) * 2.0).to(x_dtype).to(compute_dtype)
                    cols = ((tl.math.div_rn((x0 + i).to(tl.float32), w_last) - 0.5) * 2.0).to(x_dtype).to(compute_dtype)
                    a = tl.where((is_rows & (kr == i))[None, :], rows[:, None], a)
                    a = tl.where((is_cols & (kc == i))[None, :], cols[:, None], a)

        # Wt[k, d] = weight[d, k]; columns past K are zero, so padded A columns add nothing.
        w_off = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wd
        w = tl.load(w_ptr + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(compute_dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    # Epilogue: + bias[d] + pos[t, d] in fp32, one rounding to the output dtype.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & n_ok[None, :]
    pos = tl.load(pos_ptr + t[:, None] * stride_pos_t + offs_n[None, :] * stride_pos_d, mask=out_mask, other=0.0)
    acc += pos.to(tl.float32)
    out_off = (region_idx.to(tl.int64) * stride_on + t * stride_ot)[:, None] + offs_n[None, :] * stride_od
    tl.store(out_ptr + out_off, acc.to(compute_dtype), mask=out_mask)


@triton.jit
def _brick_embed_input_grad_kernel(
    g_ptr, w_ptr, dx_ptr, dprev_ptr,
    M, D, K_IMG, L, REGIONS_PER_ROW, C, CP,
    stride_gm, stride_gd,                       # grad tokens seen as (M, D)
    stride_wd, stride_wk,                       # weight seen as (D, K)
    stride_xb, stride_xc, stride_xh, stride_xw,  # dx (B, C, H, W)
    stride_pb, stride_pc, stride_ph, stride_pw,  # dprev (B, C, H, W)
    REGION: tl.constexpr, PATCH: tl.constexpr, HAS_PREV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of the embedding's gather, to the images: dA[m, k] = sum_d g[m, d] W[d, k] for the
    image channels' columns k < K_IMG = (CP + C) p^2 (the coordinate channels have no gradient),
    each stored straight into its pixel z[b, ci, y0 + kr, x0 + kc] (the forward's index map run
    backwards). Patches do not overlap, so every pixel gets exactly one value: no atomics, no
    zero-fill, no (M, K) buffer."""
    PP: tl.constexpr = PATCH * PATCH
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    _, _, img, y0, x0 = _patch_origin(offs_m, L, REGIONS_PER_ROW, REGION, PATCH)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K_IMG
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        g = tl.load(g_rows + offs_d[None, :] * stride_gd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_k[None, :] * stride_wk,
                    mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g, w.to(g.dtype), acc, input_precision=PRECISION)
    ch = offs_k // PP
    kr = (offs_k % PP) // PATCH
    kc = offs_k % PATCH
    mask = row_ok[:, None] & k_ok[None, :]
    in_x = ch >= CP
    x_off = (img * stride_xb + y0 * stride_xh + x0 * stride_xw)[:, None] + \
        (tl.maximum(ch - CP, 0) * stride_xc + kr * stride_xh + kc * stride_xw)[None, :]
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty), mask=mask & in_x[None, :])
    if HAS_PREV:
        p_off = (img * stride_pb + y0 * stride_ph + x0 * stride_pw)[:, None] + \
            (tl.minimum(ch, CP - 1) * stride_pc + kr * stride_ph + kc * stride_pw)[None, :]
        tl.store(dprev_ptr + p_off, acc.to(dprev_ptr.dtype.element_ty), mask=mask & (ch < CP)[None, :])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _shape_problems(x, prev, weight, bias, pos_embed, region, coords=None) -> List[str]:
    """What is wrong with the shapes (empty: they are what `reference.brick_embed` takes)."""
    tensors = {"x": x, "weight": weight, "pos_embed": pos_embed}
    bad = [f"{name} is {type(t).__name__}" for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        return [f"expected tensors: {', '.join(bad)}"]
    if x.dim() != 4:
        return [f"x must be (B, C, H, W), got shape {tuple(x.shape)}"]
    B, C, H, W = x.shape
    problems = []
    if prev is not None and (not isinstance(prev, torch.Tensor) or tuple(prev.shape) != (B, C, H, W)):
        problems.append(f"prev must be None or the previous brick's output of x's shape ({B}, {C}, {H}, {W}), "
                        f"got {tuple(prev.shape) if isinstance(prev, torch.Tensor) else type(prev).__name__}")
    if coords is not None and (not isinstance(coords, torch.Tensor) or tuple(coords.shape) != (B, 2, H, W)
                               or not torch.is_floating_point(coords)):
        got = f"{coords.dtype} {tuple(coords.shape)}" if isinstance(coords, torch.Tensor) else type(coords).__name__
        problems.append(f"coords must be None or float coordinate channels (B, 2, H, W) = ({B}, 2, {H}, {W}) "
                        f"(row position first, column second), got {got}")
    cin = (2 * C if prev is not None else C) + 2
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] < 1:
        return problems + [f"weight must be the patch conv's (D, Cin, p, p), got shape {tuple(weight.shape)}"]
    D, w_cin, p, _ = weight.shape
    if w_cin != cin:
        problems.append(f"weight has {w_cin} input channels but [prev, x, rows, cols] has {cin} "
                        f"(C = {C}, prev {'given' if prev is not None else 'None'}): pass the matching brick's weight")
    if not isinstance(region, int) or isinstance(region, bool) or region < 1 or region % p:
        problems.append(f"region must be a positive multiple of the patch size {p}, got {region!r}")
        return problems
    if H % region or W % region:
        problems.append(f"x is {H}x{W}: H and W must be multiples of the region size {region}")
    if coords is None and (H < 2 or W < 2):
        problems.append(f"x is {H}x{W}: the coordinate channels divide by H - 1 and W - 1, so H, W >= 2 "
                        f"(or pass coords)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (D,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        problems.append(f"bias must be None or ({D},), got {got}")
    T = (region // p) ** 2
    if tuple(pos_embed.shape) not in ((1, T, D), (T, D)):
        problems.append(f"pos_embed must be (1, {T}, {D}) for region {region}, patch {p}, width {D}; "
                        f"got {tuple(pos_embed.shape)}")
    return problems


def brick_embed_not_supported_reasons(x, prev, weight, bias, pos_embed, region, coords=None) -> List[str]:
    """Why the Triton brick_embed kernel cannot take this call (empty list: it can). Crops with
    external `coords` of every size are taken: a crop never falls back to the reference."""
    problems = _shape_problems(x, prev, weight, bias, pos_embed, region, coords)
    if problems and (not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor)
                     or not isinstance(pos_embed, torch.Tensor)):
        return problems
    # Mixed dtypes are fine: like the reference, every operand is cast to the compute dtype (x's,
    # or autocast's) as it is loaded.
    return triton_reasons([x, prev, weight, bias, pos_embed, coords], mixed_dtypes_ok=True) + problems


def _config(K: int, D: int, patch: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).

    Under the interpreter: big tiles, few (slow, serial) programs. On the GPU the op is bound by
    storing the tokens, so the tile is one that stores without register spills, two CTAs per
    SM for 16-bit outputs. Checked by compiling for sm_90 (Triton 3.9, no GPU at hand; not timed) at the shapes of
    lego_S_PG_64 / lego_L / lego_XL_U_32: 64 x 64 with 8 warps takes 122-128 registers for
    bf16/fp16 and autocast (fp32 x and weight into bf16 dots), 126-165 for fp32, no spills,
    <= 80 KB of shared memory; 128 x 128 spills (the gathered A tile, its addresses and the coordinate
    selects are all live). Patch-8 bricks (K = 320..640, 5-10 K steps) take BLOCK_N = 128
    (139-219 registers; 24 bytes spilled for IEEE fp32 only) so the A tile is gathered for
    half as many N tiles.
    """
    block_k = max(16, min(64, next_power_of_2(K)))
    if triton_interpreting():
        return 64, max(16, min(64, next_power_of_2(D))), block_k, 4, 1
    block_n = 128 if patch >= 8 and D >= 128 else 64
    return 64, block_n, block_k, 8, 2


def brick_embed(x: torch.Tensor, prev: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                pos_embed: torch.Tensor, region: int, coords: Optional[torch.Tensor] = None, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[prev, x, rows, cols] -> regions -> patch tokens (B * L, T, D) + bias + pos_embed.

    Same result as `fastlego.reference.brick_embed`. `coords` (B, 2, H, W), if given, are the
    rows/cols channels (a crop's slice of the full image's grid), read instead of computed.
    `out`, if given, must be (B * L, T, D) of the compute dtype (the autocast dtype under
    autocast, else x's) on x's device; it is returned."""
    inputs = [x, prev, weight, bias, pos_embed, coords]
    raise_if(_shape_problems(x, prev, weight, bias, pos_embed, region, coords), "brick_embed")
    raise_if(launch_problems(inputs, mixed_dtypes_ok=True), "brick_embed")
    dtype = compute_dtype(x)
    B, C, H, W = x.shape
    D, cin, p, _ = weight.shape
    T = (region // p) ** 2
    L = (H // region) * (W // region)
    M, K = B * L * T, cin * p * p
    raise_if(out_problems(out, (B * L, T, D), dtype, x.device, inputs), "brick_embed")
    if out is None:
        out = torch.empty((B * L, T, D), device=x.device, dtype=dtype)
    if M == 0 or D == 0:
        return out

    if dtype != x.dtype:
        # Autocast: the reference rounds x (with prev and the coordinates, via x's dtype) and the
        # weight to the autocast dtype before its conv; doing it here gives the same values and lets
        # the kernel gather 16-bit pixels instead of fp32 ones (half the bytes of its reads).
        x, weight = x.to(dtype), cast_weight(weight, dtype)
    w2 = weight.reshape(D, K)                    # (channel, row, col) flattening = K order above
    pos2 = pos_embed[0] if pos_embed.dim() == 3 else pos_embed
    prev_t = prev if prev is not None else x     # never read when HAS_PREV is False
    coords_t = coords if coords is not None else x  # never read when HAS_COORDS is False
    bias_t = bias if bias is not None else w2
    precision = dot_precision(dtype)
    block_m, block_n, block_k, num_warps, num_stages = _config(K, D, p)
    args = (
        x, prev_t, coords_t, w2, bias_t, pos2, out,
        M, D, K, L, W // region, H, W, C, C if prev is not None else 0,
        *x.stride(), *prev_t.stride(), *coords_t.stride(), *w2.stride(), *pos2.stride(), *out.stride(),
    )
    grid = (cdiv(M, block_m), cdiv(D, block_n))
    _brick_embed_kernel[grid](
        *args, REGION=region, PATCH=p, HAS_PREV=prev is not None, HAS_BIAS=bias is not None,
        HAS_COORDS=coords is not None, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
    return out


def brick_embed_input_grad(grad_tokens: torch.Tensor, weight: torch.Tensor, image_shape, has_prev: bool,
                           region: int):
    """(d prev or None, d x) of brick_embed, in grad_tokens' dtype: grad_tokens (B*L, T, D) times
    the embedding weight (D, Cin, p, p), stored straight onto the pixels (see the kernel)."""
    raise_if(_input_grad_problems(grad_tokens, weight, image_shape, has_prev, region), "brick_embed_input_grad")
    raise_if(launch_problems([grad_tokens, weight], mixed_dtypes_ok=True, forward_only=False), "brick_embed_input_grad")
    B, C, H, W = (int(v) for v in image_shape)
    D, cin, p, _ = weight.shape
    dtype = grad_tokens.dtype
    dx = torch.empty((B, C, H, W), dtype=dtype, device=grad_tokens.device)
    dprev = torch.empty_like(dx) if has_prev else None
    g2 = grad_tokens.reshape(-1, D)
    M = g2.shape[0]
    cp = C if has_prev else 0
    k_img = (cp + C) * p * p
    if M == 0:
        return dprev, dx
    w2 = weight.reshape(D, cin * p * p)
    block_k = max(16, min(64, next_power_of_2(k_img)))
    block_d = max(16, min(64, next_power_of_2(D)))
    block_m = 64
    precision = dot_precision(dtype)
    dp = dprev if dprev is not None else dx
    grid = (cdiv(M, block_m), cdiv(k_img, block_k))
    _brick_embed_input_grad_kernel[grid](
        g2, w2, dx, dp, M, D, k_img, (H // region) * (W // region), W // region, C, cp,
        g2.stride(0), g2.stride(1), w2.stride(0), w2.stride(1), *dx.stride(), *dp.stride(),
        REGION=region, PATCH=p, HAS_PREV=has_prev, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4, num_stages=1 if triton_interpreting() else 2)
    return dprev, dx


def _input_grad_problems(grad_tokens, weight, image_shape, has_prev, region) -> List[str]:
    if not isinstance(grad_tokens, torch.Tensor) or not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return ["grad_tokens must be a tensor and weight the (D, Cin, p, p) embedding weight"]
    try:
        B, C, H, W = (int(v) for v in image_shape)
    except (TypeError, ValueError):
        return [f"image_shape must be (B, C, H, W), got {image_shape!r}"]
    D, cin, p, _ = weight.shape
    problems = []
    if cin != (2 * C if has_prev else C) + 2:
        problems.append(f"weight has {cin} input channels, expected {(2 * C if has_prev else C) + 2}")
    if region % p or H % region or W % region:
        problems.append(f"image {H}x{W} and region {region} do not fit patch {p}")
    else:
        M = B * (H // region) * (W // region) * (region // p) ** 2
        if grad_tokens.numel() != M * D:
            problems.append(f"grad_tokens must hold ({M} tokens, {D}); got {tuple(grad_tokens.shape)}")
    return problems


def brick_embed_input_grad_not_supported_reasons(grad_tokens, weight, image_shape, has_prev, region) -> List[str]:
    """Why `brick_embed_input_grad` cannot take this call (empty list: it can)."""
    return _input_grad_problems(grad_tokens, weight, image_shape, has_prev, region) or triton_reasons(
        [grad_tokens, weight], mixed_dtypes_ok=True, forward_only=False)
