"""Weights cast once for inference: the cache of fp32 weights' bf16 / fp16 copies under autocast.

A model that holds fp32 weights (what training checkpoints hold) and runs under bf16 autocast
casts every weight to bf16 at every call: F.linear under autocast does it (its own cache lives
for one autocast context and is off while a CUDA graph is captured, since the graph would point
at memory the context frees), and so do the Triton launchers (`weight.to(dtype)`). A weight of
N parameters then costs 6N bytes of traffic per call on top of the GEMM's 2N (read 4N, write 2N)
and one launch. At small batches, where the weights dominate the bytes, that is a large share of
a call.

Inside `frozen_weights()` the casts are made once and reused: `cast_weight(w, dtype)` returns the
cached copy while the weight is unchanged. The rule:
- a copy is keyed on the weight tensor (weakly: it goes when the weight goes) and the dtype, and
  is valid while the weight's version counter (`w._version`, bumped by every in-place write:
  an optimizer step, `load_state_dict`, `copy_`) and its storage address are those it was made
  from; otherwise it is made again;
- a copy is never made while a CUDA graph is being captured (it would live in the graph's private
  pool): a capture reuses the copies its eager warm-up made and casts inside the graph only what
  it did not see;
- the copies are released when the outermost `frozen_weights()` block exits: a CUDA graph
  captured inside the block reads them, so it must be replayed inside the block too (as
  `fastlego.sample` does). A graph replay does not check versions: weights changed in place
  under a captured graph are not seen by it, with or without this cache;
- outside the block `cast_weight` is `w.to(dtype)` (what the code did before), and the ops that
  rely on autocast's own cast (`autocast_weights`) get the weights unchanged; training never
  enters the block (its weights change every step, and its casts must carry gradients).

The values are exactly those of the uncached casts (the same fp32 -> bf16 rounding), so the
results are bit for bit those without the cache.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .dispatch import autocast_dtype

_lock = threading.Lock()
_depth = 0                      # nesting depth of frozen_weights() blocks (process-wide)
# weight (by identity, weakly) -> {dtype: (version, data_ptr, copy)}
_copies: "WeakIdKeyDictionary[torch.Tensor, Dict[torch.dtype, Tuple[int, int, torch.Tensor]]]" = WeakIdKeyDictionary()
# owner (weakly) -> {name: (stamp: dtype and (version, data_ptr) of each part, stacked copy)}; see `stacked`
_stacks: "weakref.WeakKeyDictionary[object, Dict[str, Tuple[tuple, torch.Tensor]]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def frozen_weights() -> Iterator[None]:
    """Within the block, `cast_weight` reuses one cast copy per weight and dtype (see the module
    docstring); the copies are freed when the outermost block exits. Re-entrant."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _copies.clear()
                _stacks.clear()


def frozen() -> bool:
    """Whether a `frozen_weights()` block is open."""
    return _depth > 0


def _capturing(w: torch.Tensor) -> bool:
    return w.is_cuda and torch.cuda.is_current_stream_capturing()


def cast_weight(w: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """`w.to(dtype)`, made once per weight version inside `frozen_weights()` (None stays None)."""
    if w is None or w.dtype == dtype:
        return w
    if not _depth or (w.requires_grad and torch.is_grad_enabled()):
        return w.to(dtype)
    version, ptr = w._version, w.data_ptr()
    per_dtype = _copies.get(w)
    hit = None if per_dtype is None else per_dtype.get(dtype)
    if hit is not None and hit[0] == version and hit[1] == ptr:
        return hit[2]
    if _capturing(w):
        return w.to(dtype)
    copy = w.detach().to(dtype)
    with _lock:
        if _depth:
            _copies.setdefault(w, {})[dtype] = (version, ptr, copy)
    return copy


def stacked(owner: object, name: str, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Inside `frozen_weights()`: `torch.cat(tensors)` in `dtype`, made once while every one of
    `tensors` keeps its version and storage (the rule of `cast_weight`), kept under
    (`owner`, `name`) while `owner` lives. None outside the block, for tensors autograd records,
    and while a CUDA graph is captured without the copy (the caller then takes its unstacked
    path). For ops that run several small GEMMs on the same input as one (a brick's adaLN
    modulations: one launch instead of one per block)."""
    if not _depth or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    stamp = (dtype,) + tuple((t._version, t.data_ptr()) for t in tensors)
    per_owner = _stacks.get(owner)
    hit = None if per_owner is None else per_owner.get(name)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if _capturing(tensors[0]):
        return None
    copy = torch.cat([t.detach().to(dtype) for t in tensors])
    with _lock:
        if _depth:
            _stacks.setdefault(owner, {})[name] = (stamp, copy)
    return copy


def constant(owner: object, name: str, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Inside `frozen_weights()`: `make()`, a tensor that depends only on `owner`'s configuration
    and `device` (a table of frequencies), made once and kept under (`owner`, `name`, device)
    while `owner` lives. Outside the block, under torch.compile and while a CUDA graph is captured
    without it (a captured kernel would not have run when the table was read later), `make()`
    itself. The values are those of `make()`: only launches are saved."""
    if not _depth or torch.compiler.is_compiling():
        return make()
    key = f"{name}@{device}"
    per_owner = _stacks.get(owner)
    hit = None if per_owner is None else per_owner.get(key)
    if hit is not None:
        return hit[1]
    value = make()
    if _capturing(value):
        return value
    with _lock:
        if _depth:
            _stacks.setdefault(owner, {})[key] = ((), value)
    return value


def autocast_weights(like: torch.Tensor, *weights: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The weights an op computing on `like` under autocast should pass to F.linear: inside
    `frozen_weights()` their cached casts to the autocast dtype of like's device, otherwise the
    weights unchanged (autocast casts them as before)."""
    if not _depth:
        return weights
    dtype = autocast_dtype(like)
    if dtype is None:
        return weights
    return tuple(cast_weight(w, dtype) for w in weights)


def cached_bytes() -> int:
    """Bytes held by cast copies now (0 outside `frozen_weights()`)."""
    return (sum(c.numel() * c.element_size() for d in list(_copies.values()) for (_, _, c) in d.values())
            + sum(c.numel() * c.element_size() for d in list(_stacks.values()) for (_, c) in d.values()))
