"""Training and torch.compile for the fused ops: PyTorch custom ops with a backward.

Each fused op (brick_embed, modulated_linear, window_attention, linear_gated_residual, mlp,
final_layer) is a `torch.library` custom op `fastlego::<op>` with a fake (meta) implementation
and an autograd formula whose backward is a second custom op `fastlego::<op>_backward`. The
implementations run the dispatcher (`fastlego.dispatch.call`) on real tensors at run time
(linear_gated_residual's forward is cuBLAS + one fused gate/residual pass that keeps y), so:
- eager training runs the same implementations as a plain `autograd.Function` (`_EagerOp`: no
  torch.library dispatch per call): the Triton forward and backward kernels, each piece falling
  back to its reference twin (with the dispatcher's reasons and warning) where a kernel cannot
  take a call. `fastlego.ops` takes this path only when a non-reference backend takes the
  forward; otherwise autograd differentiates the reference ops;
- `torch.compile(model, fullgraph=True)` sees one opaque op per fused op (its fake
  implementation gives shapes and dtypes), never the dispatcher's Python, so there are no graph
  breaks. Under `use_backend("reference")` the compiler traces the reference ops instead.

What the backward of each op saves (no normalised or modulated activations are kept):
  modulated_linear       its inputs (h is the residual stream, alive anyway); LN statistics and
                         LN(h)*(1+scale)+shift are recomputed in the backward's Triton passes.
  linear_gated_residual  its inputs, + y = a W^T + b (needed for d gate) if `keep_y`; the
                         attention projection recomputes its y instead (keep_y=False: one
                         D x D matmul per block, the block's cheapest, for M x D bytes less).
                         In eager training, when a is a window attention's output, it keeps
                         that attention's qkv (kept anyway) instead of a, and reruns the
                         attention forward in its backward (see `_RECOMPUTE`).
  mlp                    (the DiT block's MLP half as one op: fc1 = modulated_linear, GELU, fc2
                         with gate and residual) its inputs + fc1's pre-activation (M x 4D) + fc2's
                         y (M x D); GELU's output (another M x 4D) is recomputed in the backward,
                         in the same pass as GELU's backward and fc1's bias gradient
                         (`gelu_tanh_backward`), and the residual's gradient is added inside the
                         LN-modulate backward: the elementwise work of both Linears' backward
                         in three passes. In eager training (CUDA-graph steps too) that pass
                         writes GELU(pre) over pre, its last reader, unless the backward keeps
                         the graph (retain_graph): one M x 4D buffer less at the peak.
  window_attention       qkv; the softmax is recomputed inside the backward kernel.
  brick_embed            its inputs (images, weights and external coordinates if any); the
                         patches are re-gathered. Coordinates get no gradient.
  final_layer            its inputs.
The backward's matmuls run on cuBLAS (dA = dY W, dW = dY^T A); the rest are the Triton kernels
`layernorm_modulate`, `layernorm_modulate_backward`, `gated_residual_backward`,
`gelu_tanh_backward`, `window_attention_backward` and `brick_embed_input_grad`, dispatched like every op (reference
twins in `fastlego.reference`). None uses atomics, so with `fastlego.set_deterministic(True)`
gradients are bitwise reproducible (see `fastlego.dispatch.set_deterministic`).

Mixed precision: the autocast dtype of the inputs' device is taken at the call (by the traced
wrapper) and passed to the op, whose implementations re-enter exactly that autocast state, so the
compiled graph and eager agree on dtypes: under bf16/fp16 autocast the matmuls run in the
autocast dtype with fp32 LN statistics, softmax and reductions, as the reference ops do.

Backend choices: the same way, the dispatcher's settings in force at the call (mode, per-op
overrides, deterministic switch: `fastlego.dispatch.Settings`, as its text `token`) are the last
argument of each op, saved on the autograd context and passed to the backward op, whose pieces
then run under exactly those settings (`fastlego.dispatch.scope`). PyTorch runs the backward of
CUDA tensors on its own threads, where the forward's `use_backend(...)` block is not open: a
forward forced to the reference runs every backward piece on the reference too. A compiled
graph keeps the settings it was traced under.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .dispatch import autocast_dtype, call, choose, current_mode, scope, settings_token

_NS = "fastlego"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _autocast_as(device_type: str, amp: Optional[torch.dtype]):
    """Re-enter the caller's autocast state inside an op implementation (a compiled graph may run
    the op outside the autocast region it was traced in)."""
    if device_type not in ("cuda", "cpu"):
        yield
    elif amp is None:
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        with torch.autocast(device_type, dtype=amp):
            yield


@contextlib.contextmanager
def _impl(device_type: str, amp: Optional[torch.dtype]):
    with torch.no_grad(), _autocast_as(device_type, amp):
        yield


def _carry(ctx, settings: str) -> None:
    """Keep the settings the forward ran under for its backward: the op's argument, else (a
    direct call of the custom op without it) the calling thread's."""
    ctx.settings = settings or settings_token()


def _empty(like: Tensor) -> Tensor:
    """A 0-element stand-in for an absent tensor (custom ops return tensors, never None)."""
    return like.new_empty((0,))


def _distinct(outputs, inputs):
    """Custom ops return fresh contiguous tensors (what their fake implementations promise) and
    never an input or two views of one buffer: make each output contiguous, and clone any that
    shares storage with an input or an earlier output (a backend's `.to()` can be a no-op, a
    reference op can return slices or transposed views of one tensor)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    result = []
    for t in outputs:
        t = t.contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(t)
    return tuple(result)


def wants_custom_op(op: str, args: Sequence) -> Optional[str]:
    """How `fastlego.ops` runs a fused op called with `args` (its dispatcher arguments):
    "custom" (the custom op: compiling, or autograd recording a call that a non-reference
    backend takes), "reference" (compiling under the reference backend: the compiler traces the
    reference op) or None (the dispatcher, eagerly; with autograd recording that means the
    reference op, differentiated by PyTorch's autograd)."""
    if torch.compiler.is_compiling():
        return "reference" if current_mode(op) == "reference" else "custom"
    if not torch.is_grad_enabled() or not any(isinstance(t, Tensor) and t.requires_grad for t in args):
        return None
    if current_mode(op) == "reference":
        return None
    with torch.no_grad():   # the forward kernels refuse grad-recording calls; ask as the custom op will
        backend, _ = choose(op, *args)
    return None if backend.name == "reference" else "custom"


# --------------------------------------------------------------------------------------------
# One mechanism for every op: a custom op for torch.compile, the same functions as an
# autograd.Function for eager training
# --------------------------------------------------------------------------------------------

_RAW = {}        # op name -> its Python implementation (forward and backward ops)
_AUTOGRAD = {}   # forward op name -> (setup_context, backward) as given to register_autograd


def _custom_op(name: str):
    """Register `fastlego::name` as a torch.library custom op, keeping the plain function too."""
    def wrap(fn):
        _RAW[name] = fn
        return torch.library.custom_op(f"{_NS}::{name}", fn, mutates_args=())
    return wrap


def _register_autograd(op, backward, setup_context) -> None:
    op.register_autograd(backward, setup_context=setup_context)
    _AUTOGRAD[op._name.split("::")[-1]] = (setup_context, backward)


def _backward(ctx, name: str):
    """The backward op to call from a backward formula: the plain function in eager (see
    `_EagerOp`), the custom op when torch.compile's AOTAutograd traces it."""
    return _RAW[name] if getattr(ctx, "eager", False) else getattr(torch.ops.fastlego, name)


class _EagerOp(torch.autograd.Function):
    """Eager training of a fused op: the custom op's own implementation, setup_context and
    backward, as a plain autograd.Function (no torch.library dispatch: its Python per call adds
    up over the hundreds of op calls of a training step)."""

    @staticmethod
    def forward(ctx, name, *inputs):
        ctx.set_materialize_grads(False)
        ctx.eager, ctx.op_name = True, name
        outputs = _RAW[name](*inputs)
        _AUTOGRAD[name][0](ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(_AUTOGRAD[ctx.op_name][1](ctx, *grads))


def _run(name: str, *args):
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fastlego, name)(*args)
    return _EagerOp.apply(name, *args)

# --------------------------------------------------------------------------------------------
# modulated_linear: act(Linear(LN(h) * (1 + scale[img]) + shift[img]))
# --------------------------------------------------------------------------------------------

@_custom_op("modulated_linear")
def _modulated_linear(h: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Optional[Tensor],
                      activation: Optional[str], amp: Optional[torch.dtype], settings: str = "") -> Tuple[Tensor, Tensor]:
    """(out, pre-activation or empty): the forward keeps fc1's pre-GELU output for its backward."""
    dt = amp or h.dtype
    with scope(settings), _impl(h.device.type, amp):
        y = call("modulated_linear", h, shift, scale, weight, bias, None).to(dt)
        if activation is None:
            return _distinct((y, _empty(y)), (h, shift, scale, weight, bias))
        return F.gelu(y, approximate="tanh"), y


@_modulated_linear.register_fake
def _(h, shift, scale, weight, bias, activation, amp, settings=""):
    out = h.new_empty((*h.shape[:-1], weight.shape[0]), dtype=amp or h.dtype)
    return out, (torch.empty_like(out) if activation is not None else out.new_empty((0,)))


@_custom_op("modulated_linear_backward")
def _modulated_linear_backward(grad_out: Tensor, h: Tensor, shift: Tensor, scale: Tensor, weight: Tensor,
                               pre: Optional[Tensor], activation: Optional[str], amp: Optional[torch.dtype],
                               has_bias: bool, settings: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, dshift, dscale, dweight, dbias or empty)."""
    dt = amp or h.dtype
    with scope(settings), _impl(h.device.type, None):
        g = grad_out.to(dt)
        if activation == "gelu_tanh":
            g = torch.ops.aten.gelu_backward(g, pre, approximate="tanh")
        g2 = g.reshape(-1, weight.shape[0])
        a = call("layernorm_modulate", h, shift, scale, dt)             # A recomputed, (M, K)
        dweight = torch.mm(g2.t(), a).to(weight.dtype)
        dbias = torch.sum(g2, 0, dtype=torch.float32).to(weight.dtype) if has_bias else _empty(weight)
        da = _mm_into(g2, weight.to(dt), a).view(h.shape)
        dh, dshift, dscale = call("layernorm_modulate_backward", h, shift, scale, da)
    return _distinct((dh, dshift, dscale, dweight, dbias), (grad_out, h, shift, scale, weight, pre))


@_modulated_linear_backward.register_fake
def _(grad_out, h, shift, scale, weight, pre, activation, amp, has_bias, settings=""):
    return (torch.empty_like(h), torch.empty_like(shift), torch.empty_like(scale), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,)))


def _modulated_linear_setup(ctx, inputs, output):
    h, shift, scale, weight, bias, activation, amp = inputs[:7]
    ctx.activation, ctx.amp, ctx.has_bias = activation, amp, bias is not None
    _carry(ctx, inputs[7] if len(inputs) > 7 else "")
    ctx.save_for_backward(h, shift, scale, weight, output[1] if activation is not None else None)


def _modulated_linear_grad(ctx, grad_out, _grad_pre):
    h, shift, scale, weight, pre = ctx.saved_tensors
    dh, dshift, dscale, dweight, dbias = _backward(ctx, "modulated_linear_backward")(
        grad_out, h, shift, scale, weight, pre, ctx.activation, ctx.amp, ctx.has_bias, ctx.settings)
    return dh, dshift, dscale, dweight, (dbias if ctx.has_bias else None), None, None, None


_register_autograd(_modulated_linear, _modulated_linear_grad, _modulated_linear_setup)


# The entry points `fastlego.ops` routes to (it decides when: see `wants_custom_op`); each returns
# the op's output only.

def modulated_linear(h, shift, scale, weight, bias, activation=None):
    return _run("modulated_linear", h, shift, scale, weight, bias, activation, autocast_dtype(h), settings_token())[0]


# --------------------------------------------------------------------------------------------
# linear_gated_residual: residual + gate[img] * Linear(a)
# --------------------------------------------------------------------------------------------

def _gated_out_dtype(dt: torch.dtype, gate: Tensor, residual: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(dt, gate.dtype), residual.dtype)


@_custom_op("linear_gated_residual")
def _linear_gated_residual(a: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor, residual: Tensor,
                           amp: Optional[torch.dtype], keep_y: bool = True, settings: str = "") -> Tuple[Tensor, Tensor]:
    """(out, y = a W^T + b, or empty unless keep_y): cuBLAS matmul, then one fused residual +
    gate * y pass. The backward needs y for d gate = sum g * y: kept (M x N), or recomputed by
    one more matmul when `keep_y` is False."""
    dt = amp or a.dtype
    with _impl(a.device.type, None):
        y = _linear_y(a, weight, bias, dt)
        out = _gated_residual(residual, gate, y, dt)
        return _distinct((out, y if keep_y else _empty(y)), (a, weight, bias, gate, residual))


def _gated_residual(residual: Tensor, gate: Tensor, y: Tensor, dt: torch.dtype) -> Tensor:
    """residual + gate[img] * y in one fused pass (addcmul over (B, rows per image, N) views), in
    the reference's output dtype."""
    B, N = gate.shape[0], y.shape[-1]
    out = torch.addcmul(residual.reshape(B, -1, N), gate[:, None, :], y.reshape(B, -1, N))
    return out.reshape(residual.shape).to(_gated_out_dtype(dt, gate, residual))


def _mm_into(a: Tensor, b: Tensor, buf: Tensor) -> Tensor:
    """a @ b (2-D), written over `buf`, a transient of the product's size and dtype that is dead
    from here on (the LN-modulate recompute once dW is taken): one such buffer less alive in the
    backward. A plain matmul when buf cannot take it."""
    if (buf.is_contiguous() and buf.dtype == a.dtype == b.dtype and buf.device == a.device
            and buf.numel() == a.shape[0] * b.shape[1]):
        return torch.mm(a, b, out=buf.view(a.shape[0], b.shape[1]))
    return torch.mm(a, b)


def _linear_y(a: Tensor, weight: Tensor, bias: Optional[Tensor], dt: torch.dtype, gelu_input: bool = False):
    """y = a W^T + b in the compute dtype, or GELU(a) W^T + b (GELU(a) transient)."""
    x = a.to(dt)
    if gelu_input:
        x = F.gelu(x, approximate="tanh")
    return F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))


@_linear_gated_residual.register_fake
def _(a, weight, bias, gate, residual, amp, keep_y=True, settings=""):
    dt = amp or a.dtype
    y = a.new_empty((*a.shape[:-1], weight.shape[0]) if keep_y else (0,), dtype=dt)
    return residual.new_empty(residual.shape, dtype=_gated_out_dtype(dt, gate, residual)), y


@_custom_op("linear_gated_residual_backward")
def _linear_gated_residual_backward(grad_out: Tensor, a: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor,
                                    y: Tensor, amp: Optional[torch.dtype],
                                    has_bias: bool, settings: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(da, dweight, dbias or empty, dgate); d residual is grad_out itself. An empty `y` (not kept
    by the forward) is recomputed from a, weight and bias."""
    dt = amp or a.dtype
    with scope(settings), _impl(a.device.type, None):
        x = a.to(dt)
        if y.numel() == 0 and a.numel():
            y = _linear_y(x, weight, bias, dt)
        dy, dgate, dbias = call("gated_residual_backward", grad_out, y, gate, dt)
        del y
        dy2 = dy.reshape(-1, weight.shape[0])
        dweight = torch.mm(dy2.t(), x.reshape(-1, x.shape[-1])).to(weight.dtype)
        del x
        da = torch.mm(dy2, weight.to(dt)).view(a.shape).to(a.dtype)
        dbias = dbias.to(weight.dtype) if has_bias else _empty(weight)
    return _distinct((da, dweight, dbias, dgate), (grad_out, a, weight, bias, gate))


@_linear_gated_residual_backward.register_fake
def _(grad_out, a, weight, bias, gate, y, amp, has_bias, settings=""):
    return (torch.empty_like(a), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,)), torch.empty_like(gate))


def _linear_gated_residual_setup(ctx, inputs, output):
    a, weight, bias, gate, residual, amp = inputs[:6]
    ctx.amp, ctx.has_bias, ctx.residual_dtype = amp, bias is not None, residual.dtype
    _carry(ctx, inputs[7] if len(inputs) > 7 else "")
    recipe = _RECOMPUTE.get(a) if getattr(ctx, "eager", False) else None
    ctx.a_recipe = recipe[1:] if recipe is not None else None
    ctx.save_for_backward(a if recipe is None else recipe[0], weight, bias, gate, output[1])


def _linear_gated_residual_grad(ctx, grad_out, _grad_y):
    a, weight, bias, gate, y = ctx.saved_tensors
    if ctx.a_recipe is not None:   # a (a window attention's output) was not kept: rerun it from qkv
        a = _RAW["window_attention"](a, *ctx.a_recipe)
    da, dweight, dbias, dgate = _backward(ctx, "linear_gated_residual_backward")(
        grad_out, a, weight, bias, gate, y, ctx.amp, ctx.has_bias, ctx.settings)
    return da, dweight, (dbias if ctx.has_bias else None), dgate, grad_out.to(ctx.residual_dtype), None, None, None


_register_autograd(_linear_gated_residual, _linear_gated_residual_grad, _linear_gated_residual_setup)


def linear_gated_residual(a, weight, bias, gate, residual, keep_y: bool = True):
    """residual + gate[img] * Linear(a); `keep_y` False recomputes y in the backward instead of
    keeping it (see `fastlego.ops.linear_gated_residual`)."""
    return _run("linear_gated_residual", a, weight, bias, gate, residual, autocast_dtype(a), keep_y,
                settings_token())[0]


# --------------------------------------------------------------------------------------------
# mlp: h + gate[img] * fc2(GELU(fc1(LN(h) * (1 + scale[img]) + shift[img]))), the training op
# --------------------------------------------------------------------------------------------

@_custom_op("mlp")
def _mlp(h: Tensor, shift: Tensor, scale: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
         fc2_weight: Tensor, fc2_bias: Optional[Tensor], gate: Tensor,
         amp: Optional[torch.dtype], settings: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    """(out, pre = fc1's pre-activation, y = fc2's output before the gate): modulated_linear
    without its GELU, then cuBLAS fc2 on GELU(pre) (transient) and one fused gate/residual pass.
    The backward keeps pre (M x 4D) and y (M x D) besides the inputs; GELU's output is recomputed."""
    dt = amp or h.dtype
    with scope(settings), _impl(h.device.type, amp):
        pre = call("modulated_linear", h, shift, scale, fc1_weight, fc1_bias, None).to(dt)
    with _impl(h.device.type, None):
        y = _linear_y(pre, fc2_weight, fc2_bias, dt, gelu_input=True)
        out = _gated_residual(h, gate, y, dt)
    return _distinct((out, pre, y), (h, shift, scale, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate))


@_mlp.register_fake
def _(h, shift, scale, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, amp, settings=""):
    dt = amp or h.dtype
    pre = h.new_empty((*h.shape[:-1], fc1_weight.shape[0]), dtype=dt)
    return (h.new_empty(h.shape, dtype=_gated_out_dtype(dt, gate, h)), pre,
            h.new_empty((*h.shape[:-1], fc2_weight.shape[0]), dtype=dt))


@_custom_op("mlp_backward")
def _mlp_backward(grad_out: Tensor, h: Tensor, shift: Tensor, scale: Tensor, fc1_weight: Tensor, pre: Tensor,
                  fc2_weight: Tensor, gate: Tensor, y: Tensor, amp: Optional[torch.dtype], has_fc1_bias: bool,
                  has_fc2_bias: bool, settings: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, dshift, dscale, dW1, db1 or empty, dW2, db2 or empty, dgate). Order, so that each
    elementwise pass is fused with its neighbours: gated residual backward (dy, dgate, db2 in one
    pass), dP = dy W2 (cuBLAS), then one GELU pass (dP <- dP * GELU'(pre) in place, GELU(pre) for
    dW2, db1), dW2 = dy^T GELU(pre), LN-modulate recompute, dW1 and dA (cuBLAS), and the
    LN-modulate backward, which also adds the residual branch's gradient (grad_out) into dh."""
    return _mlp_backward_impl(grad_out, h, shift, scale, fc1_weight, pre, fc2_weight, gate, y, amp,
                              has_fc1_bias, has_fc2_bias, overwrite_pre=False, settings=settings)


def _mlp_backward_impl(grad_out, h, shift, scale, fc1_weight, pre, fc2_weight, gate, y, amp, has_fc1_bias,
                       has_fc2_bias, overwrite_pre: bool, settings: str = ""):
    """`mlp_backward`; with `overwrite_pre` GELU(pre) is written over `pre` (its last use): one
    M x 4D buffer less at the backward's peak. Only eager autograd passes True, for a graph that
    is not kept (see `_mlp_grad`); the custom op stays functional."""
    dt = amp or h.dtype
    with scope(settings), _impl(h.device.type, None):
        dy, dgate, db2 = call("gated_residual_backward", grad_out, y, gate, dt)
        dy2 = dy.reshape(-1, fc2_weight.shape[0])
        dpre = torch.mm(dy2, fc2_weight.to(dt))                         # (M, 4D)
        pre = pre.to(dt)
        overwrite = overwrite_pre and pre.is_contiguous()
        dpre, act, db1 = call("gelu_tanh_backward", dpre, pre.reshape(dpre.shape), overwrite)
        dw2 = torch.mm(dy2.t(), act).to(fc2_weight.dtype)
        del act, dy, dy2
        a = call("layernorm_modulate", h, shift, scale, dt)             # fc1's input recomputed, (M, D)
        dw1 = torch.mm(dpre.t(), a).to(fc1_weight.dtype)
        da = _mm_into(dpre, fc1_weight.to(dt), a).view(h.shape)
        del a, dpre
        dh, dshift, dscale = call("layernorm_modulate_backward", h, shift, scale, da, grad_out.to(h.dtype))
    db1 = db1.to(fc1_weight.dtype) if has_fc1_bias else _empty(fc1_weight)
    db2 = db2.to(fc2_weight.dtype) if has_fc2_bias else _empty(fc2_weight)
    return _distinct((dh, dshift, dscale, dw1, db1, dw2, db2, dgate),
                     (grad_out, h, shift, scale, fc1_weight, pre, fc2_weight, gate, y))


@_mlp_backward.register_fake
def _(grad_out, h, shift, scale, fc1_weight, pre, fc2_weight, gate, y, amp, has_fc1_bias, has_fc2_bias, settings=""):
    def bias_grad(w, has):
        return w.new_empty((w.shape[0],) if has else (0,))
    return (torch.empty_like(h), torch.empty_like(shift), torch.empty_like(scale), torch.empty_like(fc1_weight),
            bias_grad(fc1_weight, has_fc1_bias), torch.empty_like(fc2_weight), bias_grad(fc2_weight, has_fc2_bias),
            torch.empty_like(gate))


def _mlp_setup(ctx, inputs, output):
    h, shift, scale, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, amp = inputs[:9]
    ctx.amp, ctx.has_b1, ctx.has_b2 = amp, fc1_bias is not None, fc2_bias is not None
    _carry(ctx, inputs[9] if len(inputs) > 9 else "")
    ctx.save_for_backward(h, shift, scale, fc1_weight, output[1], fc2_weight, gate, output[2])


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the autograd graph (retain_graph / create_graph): then
    saved tensors may be read again and must stay intact. True where torch cannot tell."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if keep is None else bool(keep())
    except RuntimeError:   # not inside a backward
        return True


def _mlp_grad(ctx, grad_out, _grad_pre, _grad_y):
    h, shift, scale, fc1_weight, pre, fc2_weight, gate, y = ctx.saved_tensors
    args = (grad_out, h, shift, scale, fc1_weight, pre, fc2_weight, gate, y, ctx.amp, ctx.has_b1, ctx.has_b2)
    if getattr(ctx, "eager", False):
        # pre is this op's private output, saved for this backward only: unless the graph is
        # kept, GELU(pre) may overwrite it (the custom op, under torch.compile, stays functional)
        grads = _mlp_backward_impl(*args, overwrite_pre=not _graph_is_kept(), settings=ctx.settings)
    else:
        grads = torch.ops.fastlego.mlp_backward(*args, ctx.settings)
    dh, dshift, dscale, dw1, db1, dw2, db2, dgate = grads
    return (dh, dshift, dscale, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, dgate, None, None)


_register_autograd(_mlp, _mlp_grad, _mlp_setup)


def mlp(h, shift, scale, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate):
    """h + gate[img] * fc2(GELU(fc1(LN(h) * (1 + scale[img]) + shift[img]))) with the fused backward."""
    return _run("mlp", h, shift, scale, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, autocast_dtype(h),
                settings_token())[0]


# --------------------------------------------------------------------------------------------
# window_attention: softmax attention inside regions of <= 64 tokens
# --------------------------------------------------------------------------------------------

@_custom_op("window_attention")
def _window_attention(qkv: Tensor, num_heads: int, amp: Optional[torch.dtype], op: str = "window_attention",
                      settings: str = "") -> Tensor:
    """Attention inside regions; `op` is the dispatched forward ("global_attention" for regions of
    more than 64 tokens in deterministic mode, whose backward is then the reference's)."""
    with scope(settings), _impl(qkv.device.type, amp):
        return _distinct((call(op, qkv, num_heads).to(amp or qkv.dtype),), (qkv,))[0]


@_window_attention.register_fake
def _(qkv, num_heads, amp, op="window_attention", settings=""):
    return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3), dtype=amp or qkv.dtype)


@_custom_op("window_attention_backward")
def _window_attention_backward(grad_out: Tensor, qkv: Tensor, num_heads: int, amp: Optional[torch.dtype],
                               op: str = "window_attention", settings: str = "") -> Tensor:
    dt = amp or qkv.dtype
    with scope(settings), _impl(qkv.device.type, None):
        if op == "global_attention":   # deterministic mode's global attention: the fixed-order reference
            dqkv = reference.window_attention_backward(qkv.to(dt), grad_out.to(dt), num_heads).to(qkv.dtype)
        else:
            dqkv = call("window_attention_backward", qkv.to(dt), grad_out.to(dt), num_heads).to(qkv.dtype)
        return _distinct((dqkv,), (grad_out, qkv))[0]


@_window_attention_backward.register_fake
def _(grad_out, qkv, num_heads, amp, op="window_attention", settings=""):
    return torch.empty_like(qkv)


def _window_attention_setup(ctx, inputs, output):
    qkv, num_heads, amp = inputs[:3]
    ctx.num_heads, ctx.amp = num_heads, amp
    ctx.op = inputs[3] if len(inputs) > 3 else "window_attention"
    _carry(ctx, inputs[4] if len(inputs) > 4 else "")
    ctx.save_for_backward(qkv)


def _window_attention_grad(ctx, grad_out):
    (qkv,) = ctx.saved_tensors
    dqkv = _backward(ctx, "window_attention_backward")(grad_out, qkv, ctx.num_heads, ctx.amp, ctx.op, ctx.settings)
    return dqkv, None, None, None, None


_register_autograd(_window_attention, _window_attention_grad, _window_attention_setup)


def window_attention(qkv, num_heads, op: str = "window_attention"):
    amp, settings = autocast_dtype(qkv), settings_token()
    out = _run("window_attention", qkv, num_heads, amp, op, settings)
    if op == "window_attention" and out.requires_grad and not torch.compiler.is_compiling():
        _RECOMPUTE[out] = (qkv, num_heads, amp, op, settings)
    return out


# Activations cheaper to recompute than to keep. A window attention's output (regions of <= 64
# tokens: one light, memory-bound kernel) is the projection's input, which
# its backward needs for dW; its qkv is kept anyway (the attention's backward needs it). So an
# eager projection whose input is listed here keeps qkv instead and reruns the same forward (the
# same kernel on the same qkv: the same bits) in its backward: M x D bytes less per block. Keyed
# weakly by the output: an entry lives as long as the output does. An entry is (qkv, the rest of
# the forward's arguments, its settings token included).
_RECOMPUTE = torch.utils.weak.WeakIdKeyDictionary()


# --------------------------------------------------------------------------------------------
# brick_embed: coordinates + concat + unfold + patch embedding + bias + position table
# --------------------------------------------------------------------------------------------

# `coords` (external coordinate channels, Patch Diffusion's crops) comes last, after `settings`,
# so calls written before it existed keep their meaning.
@_custom_op("brick_embed")
def _brick_embed(x: Tensor, prev: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                 region: int, amp: Optional[torch.dtype], settings: str = "", coords: Optional[Tensor] = None) -> Tensor:
    with scope(settings), _impl(x.device.type, amp):
        out = call("brick_embed", x, prev, weight, bias, pos_embed, region, coords).to(amp or x.dtype)
        return _distinct((out,), (x, prev, weight, bias, pos_embed, coords))[0]


@_brick_embed.register_fake
def _(x, prev, weight, bias, pos_embed, region, amp, settings="", coords=None):
    B, C, H, W = x.shape
    L, T = (H // region) * (W // region), (region // weight.shape[-1]) ** 2
    return x.new_empty((B * L, T, weight.shape[0]), dtype=amp or x.dtype)


@_custom_op("brick_embed_backward")
def _brick_embed_backward(grad_out: Tensor, x: Tensor, prev: Optional[Tensor], weight: Tensor, pos_embed: Tensor,
                          region: int, amp: Optional[torch.dtype], has_bias: bool, settings: str = "",
                          coords: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dprev or empty, dweight, dbias or empty, dpos); `coords` (no gradient) enter dweight."""
    dt = amp or x.dtype
    D, _, p, _ = weight.shape
    with scope(settings), _impl(x.device.type, None):
        g = grad_out.to(dt)
        g2 = g.reshape(-1, D)
        dprev, dx = call("brick_embed_input_grad", g, weight.to(dt), tuple(x.shape), prev is not None, region)
        a = reference.patches(x, prev, p, region, dt, coords)              # (M, Cin p p), re-gathered
        dweight = torch.mm(g2.t(), a).view(weight.shape).to(weight.dtype)
        dbias = torch.sum(g2, 0, dtype=torch.float32).to(weight.dtype) if has_bias else _empty(weight)
        dpos = torch.sum(g, 0, dtype=torch.float32).reshape(pos_embed.shape).to(pos_embed.dtype)
        dprev = dprev.to(prev.dtype) if prev is not None else _empty(x)
    return _distinct((dx.to(x.dtype), dprev, dweight, dbias, dpos), (grad_out, x, prev, weight, pos_embed, coords))


@_brick_embed_backward.register_fake
def _(grad_out, x, prev, weight, pos_embed, region, amp, has_bias, settings="", coords=None):
    return (torch.empty_like(x), torch.empty_like(prev) if prev is not None else x.new_empty((0,)),
            torch.empty_like(weight), weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,)),
            torch.empty_like(pos_embed))


def _brick_embed_setup(ctx, inputs, output):
    x, prev, weight, bias, pos_embed, region, amp = inputs[:7]
    ctx.region, ctx.amp, ctx.has_bias, ctx.has_prev = region, amp, bias is not None, prev is not None
    _carry(ctx, inputs[7] if len(inputs) > 7 else "")
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(x, prev, weight, pos_embed, inputs[8] if len(inputs) > 8 else None)


def _brick_embed_grad(ctx, grad_out):
    x, prev, weight, pos_embed, coords = ctx.saved_tensors
    dx, dprev, dweight, dbias, dpos = _backward(ctx, "brick_embed_backward")(
        grad_out, x, prev, weight, pos_embed, ctx.region, ctx.amp, ctx.has_bias, ctx.settings, coords)
    grads = (dx, dprev if ctx.has_prev else None, dweight, dbias if ctx.has_bias else None, dpos)
    return grads + (None,) * (ctx.n_inputs - len(grads))   # region, amp, settings, coords: no gradient


_register_autograd(_brick_embed, _brick_embed_grad, _brick_embed_setup)


def brick_embed(x, prev, weight, bias, pos_embed, region, coords=None):
    return _run("brick_embed", x, prev, weight, bias, pos_embed, region, autocast_dtype(x), settings_token(), coords)


# --------------------------------------------------------------------------------------------
# final_layer: LN + modulate + Linear + fold back to (B, C, H, W)
# --------------------------------------------------------------------------------------------

@_custom_op("final_layer")
def _final_layer(h: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Optional[Tensor], region: int,
                 image_shape: List[int], amp: Optional[torch.dtype], settings: str = "") -> Tensor:
    with scope(settings), _impl(h.device.type, amp):
        out = call("final_layer", h, shift, scale, weight, bias, region, tuple(image_shape)).to(amp or h.dtype)
        return _distinct((out,), (h, shift, scale, weight, bias))[0]


@_final_layer.register_fake
def _(h, shift, scale, weight, bias, region, image_shape, amp, settings=""):
    return h.new_empty(tuple(image_shape), dtype=amp or h.dtype)


@_custom_op("final_layer_backward")
def _final_layer_backward(grad_out: Tensor, h: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, region: int,
                          amp: Optional[torch.dtype], has_bias: bool,
                          settings: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, dshift, dscale, dweight, dbias or empty)."""
    dt = amp or h.dtype
    C = grad_out.shape[1]
    p = int(round((weight.shape[0] // C) ** 0.5))
    with scope(settings), _impl(h.device.type, None):
        dy = reference.patchify_image_grad(grad_out.to(dt), p, region)     # (M, p p C)
        a = call("layernorm_modulate", h, shift, scale, dt)
        dweight = torch.mm(dy.t(), a).to(weight.dtype)
        dbias = torch.sum(dy, 0, dtype=torch.float32).to(weight.dtype) if has_bias else _empty(weight)
        da = _mm_into(dy, weight.to(dt), a).view(h.shape)
        dh, dshift, dscale = call("layernorm_modulate_backward", h, shift, scale, da)
    return _distinct((dh, dshift, dscale, dweight, dbias), (grad_out, h, shift, scale, weight))


@_final_layer_backward.register_fake
def _(grad_out, h, shift, scale, weight, region, amp, has_bias, settings=""):
    return (torch.empty_like(h), torch.empty_like(shift), torch.empty_like(scale), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,)))


def _final_layer_setup(ctx, inputs, output):
    h, shift, scale, weight, bias, region, image_shape, amp = inputs[:8]
    ctx.region, ctx.amp, ctx.has_bias = region, amp, bias is not None
    _carry(ctx, inputs[8] if len(inputs) > 8 else "")
    ctx.save_for_backward(h, shift, scale, weight)


def _final_layer_grad(ctx, grad_out):
    h, shift, scale, weight = ctx.saved_tensors
    dh, dshift, dscale, dweight, dbias = _backward(ctx, "final_layer_backward")(
        grad_out, h, shift, scale, weight, ctx.region, ctx.amp, ctx.has_bias, ctx.settings)
    return dh, dshift, dscale, dweight, (dbias if ctx.has_bias else None), None, None, None, None


_register_autograd(_final_layer, _final_layer_grad, _final_layer_setup)


def final_layer(h, shift, scale, weight, bias, region, image_shape):
    return _run("final_layer", h, shift, scale, weight, bias, region, [int(s) for s in image_shape], autocast_dtype(h),
                settings_token())
