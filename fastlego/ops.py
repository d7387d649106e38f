"""The ops LegoBackbone runs, each routed through the dispatcher (`fastlego.dispatch`).

Backends are declared here, highest priority first. One name per op: its Triton launcher
`fastlego.kernels.<module>.<op>` (with `<op>_not_supported_reasons`, and `<op>_plan` where
the launcher's checks are worth doing once per decision, see `fastlego.dispatch.Backend`), its reference twin
`fastlego.reference.<op>` (always able; last, but for global_attention), its custom op
`fastlego::<op>` for the forward ops (`fastlego.custom_ops`), and here its entry point `<op>`.
Triton kernels live in `fastlego.kernels` (the repository's `kernels/` folder) and are loaded
only when first asked for.
"""

from __future__ import annotations

import torch

from . import custom_ops, reference
from .dispatch import call, is_deterministic, register

_K = "fastlego.kernels"

# Window attention serves regions of at most this many tokens; larger ones are "global".
WINDOW_MAX_TOKENS = 64

# Every op: its Triton kernel module (fastlego.kernels.<module>, launcher `<op>` and
# `<op>_not_supported_reasons`) and its reference twin `fastlego.reference.<op>`, one name for all.
KERNEL_MODULES = {
    "brick_embed": "brick_embed",
    "modulated_linear": "modulated_linear",
    "window_attention": "window_attention",
    "global_attention": "window_attention",
    "linear_gated_residual": "linear_gated_residual",
    "final_layer": "final_layer",
    # the backward pieces of the fused ops (run by fastlego.custom_ops' backward)
    "layernorm_modulate": "layernorm_modulate",
    "layernorm_modulate_backward": "layernorm_modulate",
    "gated_residual_backward": "gated_residual",
    "gelu_tanh_backward": "gelu",
    "window_attention_backward": "window_attention",
    "brick_embed_input_grad": "brick_embed",
}


def _triton(op: str):
    mod = f"{_K}.{KERNEL_MODULES[op]}"
    return ("triton", f"{mod}:{op}", f"{mod}:{op}_not_supported_reasons", f"{mod}:{op}_plan")


def _reference(op: str):
    return ("reference", f"fastlego.reference:{op}", None, None)


_AB = "fastlego.attention_backends"
# op -> [(backend name, "module:function", "module:not_supported_reasons")] in priority order for
# `auto`; the reference (always able) is last except for global_attention.
_BACKENDS = {op: [_triton(op), _reference(op)] for op in KERNEL_MODULES}
# global attention: flash-attn, xformers, then PyTorch SDPA (its flash / cuDNN / efficient kernels)
# on token-major views of qkv, then the reference (SDPA on timm's views: same values, a slower
# backward); the Triton flash kernel is the last resort (forward only) and can be forced
_BACKENDS["global_attention"] = [
    ("flash_attn", f"{_AB}:flash_attn_attention", f"{_AB}:flash_attn_not_supported_reasons", None),
    ("xformers", f"{_AB}:xformers_attention", f"{_AB}:xformers_not_supported_reasons", None),
    ("sdpa", f"{_AB}:sdpa_attention", f"{_AB}:sdpa_not_supported_reasons", None),
    _reference("global_attention"),
    _triton("global_attention"),
]
# Ops whose backends write into their arguments (gelu_tanh_backward overwrites grad, and pre with
# act_into_pre): a failed call is re-raised, never retried on another backend (see fastlego.dispatch).
_IN_PLACE = {"gelu_tanh_backward"}
for _op, _list in _BACKENDS.items():
    for _i, (_name, _target, _reasons, _plan) in enumerate(_list):
        register(_op, _name, _target, _reasons, priority=_i, in_place=_op in _IN_PLACE, plan=_plan)


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


def brick_embed(x, prev, weight, bias, pos_embed, region: int, coords=None):
    """(B,C,H,W) input [+ previous brick output] -> tokens (B*L, T, D); see reference.brick_embed.
    `coords` (B, 2, H, W): external coordinate channels (a crop's slice of the full grid) or None."""
    return _route("brick_embed", (x, prev, weight, bias, pos_embed, region, coords), custom_ops.brick_embed,
                  reference.brick_embed)


def modulated_linear(h, shift, scale, weight, bias, activation=None):
    """act(Linear(LN(h) * (1 + scale[img]) + shift[img])); see reference.modulated_linear."""
    return _route("modulated_linear", (h, shift, scale, weight, bias, activation), custom_ops.modulated_linear,
                  reference.modulated_linear)


def attention(qkv, num_heads: int):
    """Softmax attention inside each region: `window_attention` for regions of at most
    WINDOW_MAX_TOKENS tokens, `global_attention` for larger ones."""
    if qkv.shape[1] > WINDOW_MAX_TOKENS:
        return global_attention(qkv, num_heads)
    return window_attention(qkv, num_heads)


def window_attention(qkv, num_heads: int):
    """Attention inside regions of <= 64 tokens; see reference.window_attention."""
    return _route("window_attention", (qkv, num_heads), custom_ops.window_attention, reference.window_attention)


def global_attention(qkv, num_heads: int):
    """Attention inside regions of more than 64 tokens; see reference.global_attention. Every
    backend but triton has a backward of its own (autograd differentiates them)."""
    if is_deterministic() and qkv.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # forward by the dispatcher, backward by the fixed-order reference (see set_deterministic)
        return custom_ops.window_attention(qkv, num_heads, op="global_attention")
    if torch.compiler.is_compiling():
        # the compiler traces PyTorch's SDPA (flash / cuDNN / efficient kernels, their backward)
        return reference.global_attention(qkv, num_heads)
    return call("global_attention", qkv, num_heads)


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
