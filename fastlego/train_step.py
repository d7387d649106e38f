"""One training step (forward, loss, backward, optimizer step), run eagerly or replayed as one
CUDA graph, and the optimizer helpers a captured step needs.

A CUDA graph records the step's kernels once and replays them with no Python, dispatch or
launch cost per op. Everything a replay reads must then live at fixed device addresses: the
inputs are copied into the graph's static tensors, and AdamW is made "capturable" (its step
counts and learning rate are device tensors, so `set_lr` changes the rate in place).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch


def make_capturable(optimizer: torch.optim.Optimizer, capturable: bool, device) -> None:
    """Switch an Adam/AdamW between its capturable form (state steps and the learning rate as
    device tensors, so a CUDA graph can replay `step()` with a changing rate) and its plain form
    (a fused one keeps its steps on the device either way). Also run after `load_state_dict`,
    which restores the flags and the step tensors as they were saved."""
    device = torch.device(device)
    on_device = set()
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device) if capturable else lr
        if capturable or group.get("fused"):
            on_device.update(id(p) for p in group["params"])
    for p, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(device if id(p) in on_device else "cpu", torch.float32)


def adamw(params, device, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on CUDA, PyTorch's default elsewhere."""
    return torch.optim.AdamW(params, fused=torch.device(device).type == "cuda" or None, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate, in place when it is a tensor (a captured step reads it)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class TrainStep:
    """Runs a training step `body(*tensors) -> outputs` (forward, loss, backward, optimizer step;
    the gradients start from None each step: this object clears them).

    With `cuda_graph=True` the first `warmup` calls run eagerly on a side stream (kernels compile,
    autotune and cache their dispatch decisions; the optimizer creates its state), then the step
    is captured once as a CUDA graph and every later call copies its tensors into the graph's
    static inputs and replays it: no Python, dispatch or kernel-launch cost per op, which is what
    bounds small batches. Every call is a real step, the capture's too (a capture records without
    running, so its call replays right after). Needs fixed shapes, an optimizer made capturable
    (`make_capturable`), autocast with `cache_enabled=False`, and nothing in the step that syncs
    with the host; the gradients then live in the graph's memory and stay set between calls.
    Outputs are the graph's static tensors, overwritten by the next call: copy what you keep.

    If the capture fails (an op that syncs, say) the step warns once, says why, and runs eagerly
    from then on: the same step, only slower."""

    def __init__(self, body: Callable[..., Any], optimizer: torch.optim.Optimizer, cuda_graph: bool = False,
                 warmup: int = 3):
        if cuda_graph and not torch.cuda.is_available():
            raise RuntimeError("cuda_graph=True needs a CUDA GPU: the graph is CUDA's; train without it on this machine")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer's state is created by an eager step), got {warmup}")
        self.body, self.optimizer, self.cuda_graph, self.warmup = body, optimizer, cuda_graph, warmup
        self.calls = 0
        self.graph = None
        self.static_inputs: Optional[tuple] = None
        self.static_outputs: Any = None
        self.fallback_reason: Optional[str] = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _eager(self, args):
        self.optimizer.zero_grad(set_to_none=True)
        return self.body(*args)

    def __call__(self, *args):
        self.calls += 1
        if self.graph is not None:
            for static, value in zip(self.static_inputs, args):
                if static is not None:
                    static.copy_(value)
            self.graph.replay()
            return self.static_outputs
        if not self.cuda_graph:
            return self._eager(args)
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(args)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._capture_and_replay(args)

    def _capture_and_replay(self, args):
        bad = [type(a).__name__ for a in args if a is not None and not (torch.is_tensor(a) and a.is_cuda)]
        if bad:
            raise TypeError(f"a CUDA-graph step takes CUDA tensors (or None) only, got {', '.join(bad)}")
        static = tuple(None if a is None else a.detach().clone() for a in args)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        self.optimizer.zero_grad(set_to_none=True)   # backward then allocates the gradients in the graph's pool
        try:
            with torch.cuda.graph(graph):
                outputs = self.body(*static)
        except Exception as exc:  # the step cannot be captured: say why, then keep training eagerly
            torch.cuda.synchronize()
            self.cuda_graph = False
            self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"fastlego: the training step could not be captured as a CUDA graph "
                          f"({self.fallback_reason}); it runs eagerly from now on", RuntimeWarning, stacklevel=3)
            return self._eager(args)
        self.graph, self.static_inputs, self.static_outputs = graph, static, outputs
        graph.replay()
        return outputs
