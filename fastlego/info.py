"""`fastlego.explain` (defined here): which backend runs each op call site of a model, and why the others don't.
`print_info` (also `python -m fastlego info`): the environment, the LEGO presets and that table."""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import dispatch

# The DiT block calls modulated_linear and linear_gated_residual twice each, in this order.
_CALL_NAMES = {
    ("modulated_linear", 0): "attn.qkv (LN + modulate + Linear)",
    ("modulated_linear", 1): "mlp.fc1 (LN + modulate + Linear + GELU)",
    ("linear_gated_residual", 0): "attn.proj (+ bias, gate, residual)",
    ("linear_gated_residual", 1): "mlp.fc2 (+ bias, gate, residual)",
}


@dataclass
class SiteChoice:
    site: str
    op: str
    what: str
    chosen: str
    refused: Dict[str, List[str]]


class Explanation(list):
    """A list of `SiteChoice`, one per op call site; `str()` renders a table."""

    def __str__(self) -> str:
        lines = [f"{'call site':<34} {'op':<22} {'backend':<10} refused (reasons)"]
        for r in self:
            why = "; ".join(f"{name}: {' / '.join(rs)}" for name, rs in r.refused.items()) or "-"
            lines.append(f"{r.site + ' ' + r.what:<34} {r.op:<22} {r.chosen:<10} {why}")
        return "\n".join(lines)


@torch.no_grad()
def explain(model: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
            class_labels: Optional[torch.Tensor] = None, **forward_kwargs) -> Explanation:
    """Run one forward of `model` (a LegoBackbone or EDMPrecond; for EDMPrecond `timesteps` is
    sigma) and return, per op call site, the backend chosen and the reasons the others refused."""
    with dispatch.record(model) as decisions:
        model(x, timesteps, class_labels, **forward_kwargs)
    rows, counts = Explanation(), {}
    for d in decisions:
        k = counts.get((d.site, d.op), 0)
        counts[(d.site, d.op)] = k + 1
        what = _CALL_NAMES.get((d.op, k), "") if ".blocks." in d.site else ""
        rows.append(SiteChoice(d.site, d.op, what, d.chosen, d.refused))
    return rows


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def environment() -> Dict[str, str]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "xformers": _version("xformers"),
        "backend mode": dispatch.current_mode(),
    }
    if dispatch.triton_interpreting():
        env["TRITON_INTERPRET"] = "1 (Triton kernels run in the CPU interpreter)"
    return env


def preset_table() -> str:
    """The LEGO presets as a table: name, region size / brick type / depth of each brick (in order),
    training resolution; then what each brick type is (width, patch size, heads)."""
    from .presets import BRICK_TYPES, PRESETS

    rows = [("preset", "regions", "brick types", "depths", "trained at")]
    for p in PRESETS.values():
        rows.append((p.name, " ".join(map(str, p.regions)), " ".join(p.model_type), " ".join(map(str, p.depths)),
                     f"{p.training_resolution}x{p.training_resolution}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    used = sorted({t for p in PRESETS.values() for t in p.model_type}, key=list(BRICK_TYPES).index)
    lines.append("")
    lines.append(f"{'brick type':<10}  width  patch  heads")
    for t in used:
        width, patch, heads = BRICK_TYPES[t]
        lines.append(f"{t:<10}  {width:>5}  {patch:>5}  {heads:>5}")
    return "\n".join(lines)


def print_info(preset: str = "lego_S_PG_64", batch: int = 2, device: Optional[str] = None) -> Explanation:
    """Print the environment, the presets and, for a small model of `preset`, which backend runs
    each op."""
    from .model import LegoBackbone
    from .presets import get_preset
    from .testing import randomize_

    get_preset(preset)  # an unknown name fails here, listing the known ones
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; pass --device cpu")
    for k, v in environment().items():
        print(f"{k:>14}: {v}")
    print("\npresets (fastlego.PRESETS; LegoBackbone.from_preset(name, label_dim=...)):")
    print("\n".join(("  " + line).rstrip() for line in preset_table().splitlines()))
    model = randomize_(LegoBackbone.from_preset(preset, label_dim=0)).to(device).eval()
    res = model.max_img_size
    x = torch.randn(batch, model.in_channels, res, res, device=device)
    t = torch.randn(batch, device=device)
    on_cuda = torch.device(device).type == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    with ctx:
        table = explain(model, x, t)
    print(f"\n{preset}, batch {batch}, {res}x{res}, {device}{' (bf16 autocast)' if on_cuda else ''}:")
    seen = set()
    for row in table:  # one line per distinct (op, what, brick kind)
        key = (row.op, row.what, row.chosen, tuple(sorted(row.refused)))
        if key in seen:
            continue
        seen.add(key)
        why = "; ".join(f"{n}: {' / '.join(rs)}" for n, rs in row.refused.items()) or "-"
        print(f"  {row.op:<22} {row.what:<40} -> {row.chosen:<10} refused: {why}")
    return table
