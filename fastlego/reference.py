"""Reference ops: every computation LegoBackbone runs, in plain PyTorch.

These are the oracle. Every op the dispatcher routes (`fastlego.dispatch.ops()`) has its reference
twin here under the op's own name and with its signature (argument names and order), and each
Triton launcher in `fastlego.kernels` has the same name and signature; the tests compare the two.
The forward ops (`brick_embed`, `modulated_linear`, `window_attention`, `global_attention`,
`linear_gated_residual`, `final_layer`) are built from the small named functions above them; the
backward pieces (`layernorm_modulate`, `layernorm_modulate_backward`, `gated_residual_backward`,
`gelu_tanh_backward`, `window_attention_backward`, `brick_embed_input_grad`) follow.

Memory layout shared by every op:
- an image batch is `(B, C, H, W)`;
- a brick's tokens are `(N, T, D)` with `N = B * L` regions, region `n` belonging to image
  `n // L`, regions row-major over the region grid, tokens row-major over a region's patch grid;
- the conditioning of a block is per image, `(B, D)` (any strides); it is broadcast over the
  `L * T` tokens of each image by viewing the tokens as `(B, L * T, D)`, never repeated.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

LN_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Coordinates, regions and patches
# --------------------------------------------------------------------------------------------

def coordinate_channels(batch: int, height: int, width: int, dtype, device) -> torch.Tensor:
    """(B, 2, H, W): channel 0 the row index, channel 1 the column index, each mapped onto [-1, 1].

    The release writes `(i / (n - 1) - 0.5) * 2` in float32; the same formula is used here so
    the values agree bit for bit. Rows are normalised by H - 1 and columns by W - 1 (the release
    swaps the two, which only agrees for square inputs).
    """
    rows = (torch.arange(height, device=device, dtype=torch.float32) / (height - 1) - 0.5) * 2.0
    cols = (torch.arange(width, device=device, dtype=torch.float32) / (width - 1) - 0.5) * 2.0
    grid = torch.stack([rows[:, None].expand(height, width), cols[None, :].expand(height, width)])
    return grid.to(dtype)[None].expand(batch, 2, height, width)


def brick_input(x: torch.Tensor, prev: Optional[torch.Tensor], coords: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The brick's input image: `[prev, x, rows, cols]` along channels (`prev` may be None).

    `coords` (B, 2, H, W), row position first, are external coordinate channels (a crop's slice
    of the full image's grid, in Patch Diffusion training), cast to x's dtype as `prev` is; None
    builds `coordinate_channels` of x's own size."""
    if coords is None:
        coords = coordinate_channels(x.shape[0], x.shape[2], x.shape[3], x.dtype, x.device)
    else:
        coords = coords.to(x.dtype)
    parts = ([prev.to(x.dtype)] if prev is not None else []) + [x, coords]
    return torch.cat(parts, dim=1)


def unfold_regions(z: torch.Tensor, region: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * L, C, r, r): non-overlapping regions, row-major over the region grid."""
    B, C, H, W = z.shape
    r = region
    z = z.reshape(B, C, H // r, r, W // r, r).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(B * (H // r) * (W // r), C, r, r)


def fold_regions(regions: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """(B * L, C, r, r) -> (B, C, H, W): the inverse of `unfold_regions`."""
    N, C, r, _ = regions.shape
    z = regions.reshape(batch, height // r, width // r, C, r, r).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(batch, C, height, width)


def patch_embed(regions: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, Cin, r, r) -> (N, T, D): the strided conv (kernel = stride = p) of timm's PatchEmbed."""
    p = weight.shape[-1]
    y = F.conv2d(regions, weight.to(regions.dtype), None if bias is None else bias.to(regions.dtype), stride=p)
    return y.flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, r, r); each token's features are laid out (patch_row, patch_col, channel)."""
    N, T, _ = tokens.shape
    g = math.isqrt(T)
    z = tokens.reshape(N, g, g, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", z).reshape(N, channels, g * patch, g * patch)


def sincos_pos_embed(width: int, grid: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table (1, grid*grid, width): first half encodes the patch column,
    second half the patch row, each half `[sin(pos w), cos(pos w)]`, `w_k = 10000^(-k/(width/4))`.
    Computed in float64 as the release does (numpy), then stored as float32."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    cols = pos.repeat(grid)            # token t = row * grid + col
    rows = pos.repeat_interleave(grid)

    def half(p):
        out = p[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([half(cols), half(rows)], dim=1).float()[None]


# --------------------------------------------------------------------------------------------
# Normalisation, modulation, activations
# --------------------------------------------------------------------------------------------

def per_image(tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """View tokens (N, T, D) as (B, N/B * T, D), so that a per-image (B, D) tensor broadcasts."""
    B = cond.shape[0]
    return tokens.reshape(B, -1, tokens.shape[-1])


def layernorm(h: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim, no affine parameters, eps 1e-6."""
    return F.layer_norm(h, h.shape[-1:], eps=LN_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's `x * (1 + scale[img]) + shift[img]` for tokens x (N, T, D) and per-image shift/scale
    (B, D) (DiT's `modulate`, applied to `layernorm(h)`)."""
    y = per_image(x, shift)
    y = y * (1 + scale[:, None, :]) + shift[:, None, :]
    return y.reshape(x.shape)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`residual + gate[img] * y` for tokens (N, T, D) and a per-image gate (B, D)."""
    out = per_image(residual, gate) + gate[:, None, :] * per_image(y, gate)
    return out.reshape(residual.shape)


def adaln_modulation(c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`Linear(SiLU(c))`: the adaLN parameters, once per image (B, k*D)."""
    return F.linear(F.silu(c), weight, bias)


# --------------------------------------------------------------------------------------------
# The dispatched ops
# --------------------------------------------------------------------------------------------

def brick_embed(x, prev, weight, bias, pos_embed, region: int, coords=None) -> torch.Tensor:
    """Coordinates + concat + region unfold + patch embedding + bias + position table.

    x (B, C, H, W) the network input; prev (B, C, H, W) the previous brick's output or None;
    weight (D, Cin, p, p) with Cin = C + 2 (prev None) or 2C + 2; bias (D,); pos_embed (1, T, D);
    coords (B, 2, H, W) external coordinate channels (rows first; see `brick_input`) or None.
    Returns tokens (B * L, T, D), L = (H / r) * (W / r), T = (r / p) ** 2.
    """
    z = brick_input(x, prev, coords)
    tokens = patch_embed(unfold_regions(z, region), weight, bias)
    return tokens + pos_embed.to(tokens.dtype)


def modulated_linear(h, shift, scale, weight, bias, activation: Optional[str] = None) -> torch.Tensor:
    """`act(Linear(LN(h) * (1 + scale[img]) + shift[img]))`; activation None or "gelu_tanh"."""
    y = F.linear(modulate(layernorm(h), shift, scale), weight, bias)
    if activation == "gelu_tanh":
        y = gelu_tanh(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}: expected None or 'gelu_tanh'")
    return y


def linear_gated_residual(a, weight, bias, gate, residual) -> torch.Tensor:
    """`residual + gate[img] * Linear(a)`: the attention output projection and fc2 of a DiT block."""
    return gated_residual(residual, gate, F.linear(a, weight, bias))


def split_qkv(qkv: torch.Tensor, num_heads: int):
    """(N, T, 3D) laid out (3, heads, head_dim) along the last dim -> q, k, v each (N, heads, T, hd)."""
    N, T, three_d = qkv.shape
    hd = three_d // (3 * num_heads)
    q, k, v = qkv.reshape(N, T, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(N, heads, T, hd) -> (N, T, heads * hd)."""
    N, nh, T, hd = o.shape
    return o.transpose(1, 2).reshape(N, T, nh * hd)


# PyTorch's fused attention kernels take at most this many (batch * heads) rows per launch on
# CUDA (a grid limit: the release crashes at 65,536 four-token regions x 6 heads).
_SDPA_MAX_ROWS = 32768


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention over the T tokens of each region, scale head_dim^-0.5, heads merged.

    qkv (N, T, 3D) -> (N, T, D). PyTorch's `scaled_dot_product_attention`, as the release
    (through timm) runs it; chunked over regions so that no launch exceeds the kernels' grid.
    The math of both attention ops (`window_attention`, `global_attention`).
    """
    return merge_heads(sdpa(*split_qkv(qkv, num_heads)))


def window_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The `window_attention` op (regions of <= 64 tokens): `attention`."""
    return attention(qkv, num_heads)


def global_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The `global_attention` op (regions of more than 64 tokens): `attention`."""
    return attention(qkv, num_heads)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`scaled_dot_product_attention` on (N, heads, T, hd), in chunks of regions on CUDA so that
    no launch exceeds the fused kernels' grid."""
    rows = max(1, _SDPA_MAX_ROWS // q.shape[1])
    if q.shape[0] <= rows or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(qc, kc, vc)
                      for qc, kc, vc in zip(q.split(rows), k.split(rows), v.split(rows))])


def attention_math(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`attention` written out: softmax(q k^T / sqrt(hd)) v, in the input's dtype."""
    q, k, v = split_qkv(qkv, num_heads)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return merge_heads(s.softmax(-1) @ v)


def final_layer(h, shift, scale, weight, bias, region: int, image_shape: Sequence[int]) -> torch.Tensor:
    """LN + modulate + Linear(D, p*p*C) + unpatchify + fold regions -> (B, C, H, W)."""
    B, C, H, W = image_shape
    p = math.isqrt(weight.shape[0] // C)
    y = F.linear(modulate(layernorm(h), shift, scale), weight, bias)
    return fold_regions(unpatchify(y, p, C), B, H, W)


# --------------------------------------------------------------------------------------------
# Backward pieces: the oracle for the Triton backward kernels and the fallback of the backward
# of fastlego.custom_ops. Written out (not autograd) because a custom op's implementation runs
# below autograd; each is checked against autograd of the forward op above (gradcheck in fp64).
# --------------------------------------------------------------------------------------------

def layernorm_modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`modulate(layernorm(h), shift, scale)` in fp32 (fp64 for fp64 h) as an (M, K) matrix rounded
    once to `dtype` (default h's): the A operand of modulated_linear, recomputed by its backward."""
    work = torch.float64 if h.dtype == torch.float64 else torch.float32
    a = modulate(layernorm(h.to(work)), shift.to(work), scale.to(work))
    return a.reshape(-1, h.shape[-1]).to(dtype or h.dtype)


def layernorm_modulate_backward(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, grad_a: torch.Tensor,
                                grad_h: Optional[torch.Tensor] = None):
    """Gradients of a = LN(h) * (1 + scale[img]) + shift[img] given grad_a = dL/da:
    (grad_h, grad_shift, grad_scale) in the dtypes of h, shift, scale. fp32 math (fp64 for fp64).
        xhat = (h - mean) * rstd,  dxhat = grad_a * (1 + scale[img]),
        grad_h = rstd * (dxhat - mean_k dxhat - xhat * mean_k(dxhat * xhat)) [+ grad_h given],
        grad_shift[img] = sum_rows grad_a,  grad_scale[img] = sum_rows grad_a * xhat.
    A `grad_h` given (a residual branch's gradient to h) is added before the one rounding."""
    work = torch.float64 if h.dtype == torch.float64 else torch.float32
    B = shift.shape[0]
    x = h.to(work).reshape(B, -1, h.shape[-1])
    g = grad_a.to(work).reshape(x.shape)
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + LN_EPS)
    xhat = (x - mean) * rstd
    dxhat = g * (1 + scale.to(work)[:, None, :])
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    if grad_h is not None:
        dx = dx + grad_h.to(work).reshape(dx.shape)
    return (dx.reshape(h.shape).to(h.dtype), g.sum(1).to(shift.dtype), (g * xhat).sum(1).to(scale.dtype))


def gated_residual_backward(grad_out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                            dy_dtype: Optional[torch.dtype] = None):
    """The elementwise part of the backward of out = residual + gate[img] * (y = Linear(a)):
    (dy = grad_out * gate[img] in `dy_dtype` (default y's), dgate = sum over each image's rows of
    grad_out * y in gate's dtype, dbias = sum over all rows of dy (as rounded) in fp32, fp64 for
    fp64: the Linear's bias gradient); d residual = grad_out."""
    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    B = gate.shape[0]
    g = grad_out.to(work).reshape(B, -1, y.shape[-1])
    dy = (g * gate.to(work)[:, None, :]).reshape(y.shape).to(dy_dtype or y.dtype)
    dgate = (g * y.to(work).reshape(g.shape)).sum(1).to(gate.dtype)
    dbias = dy.reshape(-1, y.shape[-1]).sum(0, dtype=work)
    return dy, dgate, dbias


def gelu_tanh_backward(grad: torch.Tensor, pre: torch.Tensor, act_into_pre: bool = False):
    """The MLP's GELU backward with fc2's recomputed input and fc1's bias gradient:
    (grad_pre = grad * gelu'(pre), written into `grad` in place and returned; act = gelu(pre) in
    pre's dtype, written over `pre` (and `pre` returned) with `act_into_pre`; grad_bias = sum over
    rows of grad_pre as stored, fp32 (fp64 for fp64))."""
    if act_into_pre and not pre.is_contiguous():
        raise ValueError("gelu_tanh_backward: act_into_pre writes act over pre, which must then be contiguous: "
                         "pass pre.contiguous()")
    work = torch.float64 if grad.dtype == torch.float64 else torch.float32
    grad.copy_(torch.ops.aten.gelu_backward(grad.to(work), pre.to(work), approximate="tanh"))
    act = F.gelu(pre.to(work), approximate="tanh").to(pre.dtype)
    if act_into_pre:
        act = pre.copy_(act)
    return grad, act, grad.reshape(-1, grad.shape[-1]).sum(0, dtype=work)


def window_attention_backward(qkv: torch.Tensor, grad_out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """d qkv of `attention` (regions of any size) given grad_out (N, T, D): P = softmax(q k^T s) recomputed, then
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K s, dK = dS^T Q s; fp32 math
    (fp64 for fp64), chunked over regions so that P (T x T per region and head) stays bounded."""
    work = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    N, T, three_d = qkv.shape
    rows = max(1, (1 << 26) // max(1, num_heads * T * T))
    parts = []
    for qc, gc in zip(qkv.split(rows), grad_out.split(rows)):
        q, k, v = (t.to(work) for t in split_qkv(qc, num_heads))
        s = q.shape[-1] ** -0.5
        p = ((q @ k.transpose(-1, -2)) * s).softmax(-1)
        do = gc.to(work).reshape(qc.shape[0], T, num_heads, -1).transpose(1, 2)
        dv = p.transpose(-1, -2) @ do
        dp = do @ v.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq, dk = (ds @ k) * s, (ds.transpose(-1, -2) @ q) * s
        parts.append(torch.stack([dq, dk, dv], 2).permute(0, 3, 2, 1, 4).reshape(qc.shape))
    return torch.cat(parts).to(qkv.dtype) if parts else torch.zeros_like(qkv)


def patches(x: torch.Tensor, prev: Optional[torch.Tensor], patch: int, region: int,
            dtype: Optional[torch.dtype] = None, coords: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The brick input's patches as the (M, Cin * p * p) matrix that brick_embed multiplies by its
    (D, Cin * p * p) weight: rows (region, token) as brick_embed's tokens, columns (channel, row, col)."""
    z = brick_input(x if dtype is None else x.to(dtype), prev, coords)
    r = unfold_regions(z, region)
    Nr, C, _, _ = r.shape
    g = region // patch
    r = r.reshape(Nr, C, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5)
    return r.reshape(Nr * g * g, C * patch * patch)


def brick_embed_input_grad(grad_tokens: torch.Tensor, weight: torch.Tensor, image_shape: Sequence[int],
                           has_prev: bool, region: int):
    """(d prev or None, d x) of brick_embed: grad_tokens (B*L, T, D) @ weight (D, Cin*p*p) folded
    back onto the pixels (every pixel is in exactly one patch), the coordinate channels dropped.
    Returned in grad_tokens' dtype."""
    B, C, H, W = image_shape
    D, cin, p, _ = weight.shape
    dp = grad_tokens.reshape(-1, D) @ weight.reshape(D, -1).to(grad_tokens.dtype)   # (M, Cin p p)
    g = region // p
    L = (H // region) * (W // region)
    z = dp.reshape(B * L, g, g, cin, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B * L, cin, region, region)
    z = fold_regions(z, B, H, W)
    if has_prev:
        return z[:, :C], z[:, C:2 * C]
    return None, z[:, :C]


def patchify_image_grad(grad_image: torch.Tensor, patch: int, region: int) -> torch.Tensor:
    """The inverse of final_layer's unpatchify + fold for a gradient: (B, C, H, W) -> (M, p*p*C)
    token rows in final_layer's (patch_row, patch_col, channel) feature order."""
    B, C, H, W = grad_image.shape
    r = unfold_regions(grad_image, region)                       # (N, C, r, r)
    g = region // patch
    r = r.reshape(r.shape[0], C, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1)
    return r.reshape(-1, patch * patch * C)
