"""Call sites: which op receives which arguments where in a forward, and which backend ran it.

`record_op_cases` runs one auto-backend forward inside `fastlego.dispatch.record`, whose
observer hook (`on_call`) sees every dispatched call with its arguments; each call site (brick,
role) becomes an `OpCase` holding the arguments' specs (shapes, strides, dtypes), the autocast
state, how often it runs and the backend `auto` chose. `expected_op_keys` derives the same keys
from the configuration alone (pytest collects the kernel benchmarks before any forward runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import dispatch
from ..model import LegoBackbone
from .config import Case
from .floor import brick_geometry
from .numerics import autocast, dtype_name, element_size


@dataclass
class TensorSpec:
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:  # the elements the op sees (a chunk view counts only its elements)
        return math.prod(self.shape) * element_size(self.dtype)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "stride": list(self.stride), "dtype": dtype_name(self.dtype)}


@dataclass
class OpCase:
    """One dispatched op at one call site (brick b, role): its arguments' specs and call count."""

    key: str
    op: str
    brick: int
    role: str
    count: int
    args: list  # TensorSpec or plain values
    autocast: Optional[torch.dtype]
    auto_backend: Optional[str]
    refused: Dict[str, List[str]]
    extra: bool = False

    def to_dict(self) -> dict:
        return {"key": self.key, "op": self.op, "brick": self.brick, "role": self.role, "count": self.count,
                "args": [a.to_dict() if isinstance(a, TensorSpec) else (None if a is None else repr(a)) for a in self.args],
                "autocast": dtype_name(self.autocast), "auto_backend": self.auto_backend,
                "refused": self.refused, "extra": self.extra}


def site_role(op: str, args: tuple) -> str:
    """What a call does inside a brick: the op, told apart where one op serves several Linears
    (qkv or fc1, proj or fc2) or several region sizes (attention over T tokens)."""
    if op == "modulated_linear":
        return "modulated_linear.fc1" if args[5] == "gelu_tanh" else "modulated_linear.qkv"
    if op == "linear_gated_residual":
        w = args[1]
        return "linear_gated_residual.proj" if w.shape[0] == w.shape[1] else "linear_gated_residual.fc2"
    if op in ("window_attention", "global_attention"):
        return f"{op}.T{args[0].shape[1]}"
    return op


def expected_op_keys(case: Case, kernel_inputs: Sequence[str] = ("autocast",)) -> List[Tuple[str, str]]:
    """(key, op) of every op case of a workload, from its configuration alone (for pytest's
    collection); `record_op_cases` finds the same keys in a real forward. A key reads
    `<inputs>:b<brick>.<role>`, e.g. `autocast:b0.modulated_linear.qkv`."""
    keys, extra = [], None
    for g in brick_geometry(case):
        p = f"b{g.index}."
        att = f"{g.attention_op}.T{g.tokens_per_region}"
        keys += [(p + "brick_embed", "brick_embed"), (p + "modulated_linear.qkv", "modulated_linear"),
                 (p + att, g.attention_op), (p + "linear_gated_residual.proj", "linear_gated_residual"),
                 (p + "modulated_linear.fc1", "modulated_linear"), (p + "linear_gated_residual.fc2", "linear_gated_residual"),
                 (p + "final_layer", "final_layer")]
        if extra is None and g.attention_op == "window_attention" and g.tokens_per_region < 16:
            extra = (p + "window_attention.T16", "window_attention")
    keys += [extra] if extra else []
    return [(f"{kind}:{key}", op) for kind in kernel_inputs for key, op in keys]


def _brick_of(site: str) -> int:
    """The brick index of a dispatcher site named under the backbone's ModuleList ("2.blocks.0"
    -> 2); -1 for a call outside every brick."""
    head = site.split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def record_op_cases(model: LegoBackbone, inputs: tuple, device, autocast_dtype,
                    prefix: str = "autocast:") -> Tuple[Dict[str, OpCase], torch.Tensor]:
    """Run one auto-backend forward, noting for each call site (brick, role) the argument specs,
    the autocast state, how often it runs and which backend auto chose (with the refusals).
    Returns the cases (keys `prefix` + `b<brick>.<role>`) and the forward's output."""
    device = torch.device(device)
    cases: Dict[str, OpCase] = {}

    def on_call(decision: dispatch.Decision, args: tuple, kwargs: dict) -> None:
        if kwargs:
            args = args + tuple(kwargs.values())
        brick = _brick_of(decision.site)
        role = site_role(decision.op, args)
        key = f"{prefix}b{brick}.{role}"
        if key in cases:
            cases[key].count += 1
            return
        specs = [TensorSpec(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a
                 for a in args]
        ac = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        cases[key] = OpCase(key, decision.op, brick, role, 1, specs, ac, decision.chosen,
                            {k: list(v) for k, v in decision.refused.items()})

    with torch.no_grad(), dispatch.use_backend("auto"), autocast(device, autocast_dtype), \
            dispatch.record(site_modules=model.model, on_call=on_call):
        out = model(*inputs)
    # Window attention at 16 tokens (not in these presets): the first T=4 site's tokens regrouped.
    for key, case in list(cases.items()):
        if case.op == "window_attention" and case.args[0].shape[1] < 16:
            qkv = case.args[0]
            N, T, C3 = qkv.shape
            n16 = N * T // 16
            if n16 >= 1:
                spec = TensorSpec((n16, 16, C3), (16 * C3, C3, 1), qkv.dtype)
                k16 = f"{prefix}b{case.brick}.window_attention.T16"
                cases[k16] = OpCase(k16, "window_attention", case.brick, "window_attention.T16", 0,
                                    [spec] + list(case.args[1:]), case.autocast, None, {}, extra=True)
            break
    return cases, out


def synthesize_args(case: OpCase, device, seed: int) -> tuple:
    """Random tensors with the recorded shapes, strides and dtypes (non-tensor args as recorded)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for a in case.args:
        if isinstance(a, TensorSpec):
            values = torch.randn(a.shape, generator=g, device=device, dtype=torch.float32).to(a.dtype)
            if 0 in a.stride:  # a broadcast (expanded) view: its elements share memory
                out.append(values)
                continue
            t = torch.empty_strided(a.shape, a.stride, dtype=a.dtype, device=device)
            out.append(t.copy_(values) if t.numel() else t)
        else:
            out.append(a)
    return tuple(out)


def decision_summary(decisions: Sequence[dispatch.Decision]) -> dict:
    """{op: {backend: calls}} and the first reasons each refused backend gave."""
    chosen: Dict[str, Dict[str, int]] = {}
    refused: Dict[str, Dict[str, List[str]]] = {}
    for d in decisions:
        chosen.setdefault(d.op, {}).setdefault(d.chosen, 0)
        chosen[d.op][d.chosen] += 1
        for name, reasons in d.refused.items():
            refused.setdefault(d.op, {}).setdefault(name, list(reasons))
    return {"chosen": chosen, "refused": refused}
