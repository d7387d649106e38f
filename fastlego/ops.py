"""The ops LegoBackbone runs, each routed through the dispatcher (`fastlego.dispatch`).

Backends are declared here, highest priority first; the reference op (`fastlego.reference`) is
always there and always last. Triton kernels live in `fastlego.kernels` (the repository's
`kernels/` folder) and are loaded only when first asked for.
"""

from __future__ import annotations

from .dispatch import call, register

_K = "fastlego.kernels"

# Window attention serves regions of at most this many tokens; larger ones are "global".
WINDOW_MAX_TOKENS = 64

_BACKENDS = {
    "brick_embed": [],
    "modulated_linear": [],
    "window_attention": [],
    "global_attention": [],
    "linear_gated_residual": [],
    "final_layer": [],
}
_REFERENCE = {
    "brick_embed": "fastlego.reference:brick_embed",
    "modulated_linear": "fastlego.reference:modulated_linear",
    "window_attention": "fastlego.reference:attention",
    "global_attention": "fastlego.reference:attention",
    "linear_gated_residual": "fastlego.reference:linear_gated_residual",
    "final_layer": "fastlego.reference:final_layer",
}
for _op, _list in _BACKENDS.items():
    for _name, _target, _reasons in _list:
        register(_op, _name, _target, _reasons)
    register(_op, "reference", _REFERENCE[_op])


def brick_embed(x, prev, weight, bias, pos_embed, region: int):
    """(B,C,H,W) input [+ previous brick output] -> tokens (B*L, T, D); see reference.brick_embed."""
    return call("brick_embed", x, prev, weight, bias, pos_embed, region)


def modulated_linear(h, shift, scale, weight, bias, activation=None):
    """act(Linear(LN(h) * (1 + scale[img]) + shift[img])); see reference.modulated_linear."""
    return call("modulated_linear", h, shift, scale, weight, bias, activation)


def attention(qkv, num_heads: int):
    """Softmax attention inside each region: window attention for small regions, global otherwise."""
    op = "window_attention" if qkv.shape[1] <= WINDOW_MAX_TOKENS else "global_attention"
    return call(op, qkv, num_heads)


def linear_gated_residual(a, weight, bias, gate, residual):
    """residual + gate[img] * Linear(a); see reference.linear_gated_residual."""
    return call("linear_gated_residual", a, weight, bias, gate, residual)


def final_layer(h, shift, scale, weight, bias, region: int, image_shape):
    """LN + modulate + Linear + fold back to (B, C, H, W); see reference.final_layer."""
    return call("final_layer", h, shift, scale, weight, bias, region, tuple(image_shape))
