"""Where a run happened: date, device, L2 size and library versions, recorded in every report."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
from typing import Optional

import torch

from .. import dispatch

GIB = float(1 << 30)


def library_version(dist: str) -> Optional[str]:
    """The installed version of distribution `dist`, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def l2_bytes(device: torch.device) -> int:
    """The L2 cache size of a CUDA device (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20)


def environment(device: str) -> dict:
    """Date, device and library versions (None for a library that is not installed)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    env = {
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "gpu": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": library_version("triton"),
        "flash_attn": library_version("flash-attn") or library_version("flash_attn"),
        "xformers": library_version("xformers"),
        "fastlego": library_version("fastlego"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "FASTLEGO_BACKEND": os.environ.get(dispatch.ENV_VAR),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    from .. import __version__
    env["fastlego"] = env["fastlego"] or __version__
    if device.startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / GIB, 1),
                   l2_cache_mib=round(l2_bytes(dev) / 2 ** 20, 1))
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env
