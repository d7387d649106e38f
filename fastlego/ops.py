"""The ops LegoBackbone runs, each routed through the dispatcher (`fastlego.dispatch`).

Backends are declared here, highest priority first; the reference op (`fastlego.reference`) is
always there and always last. Triton kernels live in `fastlego.kernels` (the repository's
`kernels/` folder) and are loaded only when first asked for.
"""

from __future__ import annotations

import torch

from . import custom_ops, reference
from .dispatch import call, is_deterministic, register

_K = "fastlego.kernels"

# Window attention serves regions of at most this many tokens; larger ones are "global".
WINDOW_MAX_TOKENS = 64

# op -> [(backend name, "module:launcher", "module:not_supported_reasons")] in priority order for
# `auto`; "reference" (fastlego.reference, always able) marks where the reference op stands.
_T = {op: (f"{_K}.{mod}:{fn}", f"{_K}.{mod}:{reasons}") for op, (mod, fn, reasons) in {
    "brick_embed": ("brick_embed", "brick_embed", "not_supported_reasons"),
    "modulated_linear": ("fused_linear", "modulated_linear", "modulated_linear_not_supported_reasons"),
    "attention": ("window_attention", "window_attention", "not_supported_reasons"),
    "linear_gated_residual": ("fused_linear", "linear_gated_residual", "linear_gated_residual_not_supported_reasons"),
    "final_layer": ("final_layer", "final_layer", "not_supported_reasons"),
}.items()}
_AB = "fastlego.attention_backends"
_BACKENDS = {
    "brick_embed": [("triton", *_T["brick_embed"]), ("reference", "fastlego.reference:brick_embed", None)],
    "modulated_linear": [("triton", *_T["modulated_linear"]),
                         ("reference", "fastlego.reference:modulated_linear", None)],
    "window_attention": [("triton", *_T["attention"]), ("reference", "fastlego.reference:attention", None)],
    # global attention: flash-attn, xformers, then PyTorch SDPA (its flash / cuDNN / efficient
    # kernels) on token-major views of qkv, then the reference (SDPA on timm's views: same values,
    # a slower backward); the Triton flash kernel is the last resort and can be forced
    "global_attention": [("flash_attn", f"{_AB}:flash_attn_attention", f"{_AB}:flash_attn_not_supported_reasons"),
                         ("xformers", f"{_AB}:xformers_attention", f"{_AB}:xformers_not_supported_reasons"),
                         ("sdpa", f"{_AB}:sdpa_attention", f"{_AB}:sdpa_not_supported_reasons"),
                         ("reference", "fastlego.reference:attention", None),
                         ("triton", *_T["attention"])],
    "linear_gated_residual": [("triton", *_T["linear_gated_residual"]),
                              ("reference", "fastlego.reference:linear_gated_residual", None)],
    "final_layer": [("triton", *_T["final_layer"]), ("reference", "fastlego.reference:final_layer", None)],
}
# The backward pieces of the fused ops (run by fastlego.custom_ops' backward): Triton kernels with
# their reference twins.
_FL = f"{_K}.fused_linear"
_BACKENDS.update({
    "layernorm_modulate": [("triton", f"{_FL}:layernorm_modulate", f"{_FL}:layernorm_modulate_not_supported_reasons"),
                           ("reference", "fastlego.reference:layernorm_modulate_as", None)],
    "layernorm_modulate_backward": [
        ("triton", f"{_FL}:layernorm_modulate_backward", f"{_FL}:layernorm_modulate_backward_not_supported_reasons"),
        ("reference", "fastlego.reference:layernorm_modulate_backward", None)],
    "gated_residual_backward": [
        ("triton", f"{_FL}:gated_residual_backward", f"{_FL}:gated_residual_backward_not_supported_reasons"),
        ("reference", "fastlego.reference:gated_residual_backward", None)],
    "gelu_tanh_backward": [
        ("triton", f"{_FL}:gelu_tanh_backward", f"{_FL}:gelu_tanh_backward_not_supported_reasons"),
        ("reference", "fastlego.reference:gelu_tanh_backward", None)],
    "window_attention_backward": [
        ("triton", f"{_K}.window_attention:window_attention_backward",
         f"{_K}.window_attention:backward_not_supported_reasons"),
        ("reference", "fastlego.reference:attention_backward", None)],
    "brick_embed_input_grad": [
        ("triton", f"{_K}.brick_embed:brick_embed_input_grad",
         f"{_K}.brick_embed:brick_embed_input_grad_not_supported_reasons"),
        ("reference", "fastlego.reference:brick_embed_input_grad", None)],
})
# Ops whose backends write into their arguments (gelu_tanh_backward overwrites grad, and pre with
# act_into_pre): a failed call is re-raised, never retried on another backend (see fastlego.dispatch).
_IN_PLACE = {"gelu_tanh_backward"}
for _op, _list in _BACKENDS.items():
    for _i, (_name, _target, _reasons) in enumerate(_list):
        register(_op, _name, _target, _reasons, priority=_i, in_place=_op in _IN_PLACE)


def _route(op: str, args: tuple, custom, reference_op):
    """The one routing rule of the fused ops (see `custom_ops.wants_custom_op`): when autograd
    records a call that a non-reference backend takes, or torch.compile traces it, the custom op
    with its Triton backward; the reference op when torch.compile traces under the reference
    backend; otherwise the dispatcher, eagerly."""
    how = custom_ops.wants_custom_op(op, args)
    if how == "custom":
        return custom(*args)
    if how == "reference":
        return reference_op(*args)
    return call(op, *args)


def brick_embed(x, prev, weight, bias, pos_embed, region: int):
    """(B,C,H,W) input [+ previous brick output] -> tokens (B*L, T, D); see reference.brick_embed."""
    return _route("brick_embed", (x, prev, weight, bias, pos_embed, region), custom_ops.brick_embed,
                  reference.brick_embed)


def modulated_linear(h, shift, scale, weight, bias, activation=None):
    """act(Linear(LN(h) * (1 + scale[img]) + shift[img])); see reference.modulated_linear."""
    return _route("modulated_linear", (h, shift, scale, weight, bias, activation), custom_ops.modulated_linear,
                  reference.modulated_linear)


def attention(qkv, num_heads: int):
    """Softmax attention inside each region: window attention for small regions, global otherwise."""
    if qkv.shape[1] > WINDOW_MAX_TOKENS:
        if is_deterministic() and qkv.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # forward by the dispatcher, backward by the fixed-order reference (see set_deterministic)
            return custom_ops.window_attention(qkv, num_heads, op="global_attention")
        if torch.compiler.is_compiling():
            # the compiler traces PyTorch's SDPA (flash / cuDNN / efficient kernels, their backward)
            return reference.attention(qkv, num_heads)
        return call("global_attention", qkv, num_heads)   # every backend but triton has a backward
    return _route("window_attention", (qkv, num_heads), custom_ops.window_attention, reference.attention)


def mlp(h, shift, scale, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate):
    """The MLP half of a DiT block: h + gate[img] * fc2(GELU(fc1(LN(h) * (1 + scale[img]) + shift[img]))).

    Inference: modulated_linear with the GELU epilogue, then linear_gated_residual (the fused
    kernels). Training on the custom ops: the one `mlp` custom op, which keeps fc1's
    pre-activation and fc2's output only (GELU's output, as large, is recomputed in the backward)
    and fuses the backward's elementwise work across both Linears (see custom_ops). Same values
    either way."""
    if custom_ops.wants_custom_op("modulated_linear", (h, shift, scale, fc1_weight, fc1_bias, "gelu_tanh")) == "custom":
        return custom_ops.mlp(h, shift, scale, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate)
    m = modulated_linear(h, shift, scale, fc1_weight, fc1_bias, "gelu_tanh")
    return linear_gated_residual(m, fc2_weight, fc2_bias, gate, h)


def linear_gated_residual(a, weight, bias, gate, residual, keep_y: bool = True):
    """residual + gate[img] * Linear(a); see reference.linear_gated_residual.

    Training on the custom op keeps y = Linear(a) for d gate = sum g * y unless `keep_y` is
    False, which recomputes y in the backward: one more matmul, M x N bytes less to keep. The
    DiT block's attention projection (N = D, where the matmul is cheapest) passes False."""
    return _route("linear_gated_residual", (a, weight, bias, gate, residual),
                  lambda *args: custom_ops.linear_gated_residual(*args, keep_y=keep_y), reference.linear_gated_residual)


def final_layer(h, shift, scale, weight, bias, region: int, image_shape):
    """LN + modulate + Linear + fold back to (B, C, H, W); see reference.final_layer."""
    return _route("final_layer", (h, shift, scale, weight, bias, region, tuple(image_shape)), custom_ops.final_layer,
                  reference.final_layer)
