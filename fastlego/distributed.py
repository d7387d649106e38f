"""Joining the processes of a `torchrun` launch (one process per GPU), for training and sampling.

torchrun starts N copies of the program and describes each one's place in the environment
(WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); `setup_distributed` joins the default process
group they form and picks the process's device. Without torchrun the program is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """This process's place in the launch: its rank among `world` processes, its rank on this
    machine, its device, and whether `setup_distributed` created the default process group
    (then the caller destroys it at the end)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str]) -> DistributedContext:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL when training on CUDA, gloo on the CPU. Without torchrun: one process."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if device is None:
        dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but CUDA is not available; pass --device cpu")
    created = False
    if env_world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        created = True
    if dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, created)
    return DistributedContext(0, 1, local_rank, dev, False)
