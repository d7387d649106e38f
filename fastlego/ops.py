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

# op -> [(backend name, "module:launcher", "module:not_supported_reasons")], highest priority first.
_BACKENDS = {
    "brick_embed": [("triton", f"{_K}.brick_embed:brick_embed", f"{_K}.brick_embed:not_supported_reasons")],
    "modulated_linear": [("triton", f"{_K}.fused_linear:modulated_linear", f"{_K}.fused_linear:modulated_linear_not_supported_reasons")],
    "window_attention": [("triton", f"{_K}.window_attention:window_attention", f"{_K}.window_attention:not_supported_reasons")],
    "global_attention": [
        ("flash_attn", "fastlego.attention_backends:flash_attn_attention", "fastlego.attention_backends:flash_attn_not_supported_reasons"),
        ("xformers", "fastlego.attention_backends:xformers_attention", "fastlego.attention_backends:xformers_not_supported_reasons"),
        # the reference (PyTorch SDPA: its flash / cuDNN / efficient kernels) comes next; the
        # Triton flash kernel is the last resort in auto and can be forced
        ("triton", f"{_K}.window_attention:window_attention", f"{_K}.window_attention:not_supported_reasons"),
    ],
    "linear_gated_residual": [("triton", f"{_K}.fused_linear:linear_gated_residual", f"{_K}.fused_linear:linear_gated_residual_not_supported_reasons")],
    "final_layer": [("triton", f"{_K}.final_layer:final_layer", f"{_K}.final_layer:not_supported_reasons")],
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
    register(_op, "reference", _REFERENCE[_op])
    for _name, _target, _reasons in _list:
        register(_op, _name, _target, _reasons)
# In auto, SDPA (the reference) beats the Triton flash kernel on global attention: put it last.
register("global_attention", "triton", *_BACKENDS["global_attention"][-1][1:], priority=len(_BACKENDS["global_attention"]))


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
