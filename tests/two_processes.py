"""Two CPU processes joined as ranks 0 and 1 (gloo), the way torchrun starts them: for the tests
that check a two-process run against one process."""

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(*args)


def run_two_processes(fn, *args) -> None:
    """Run `fn(*args)` (a module-level function: it is pickled by name) in two processes with the
    environment torchrun gives ranks 0 and 1 of 2; re-raises a rank's failure."""
    mp.spawn(_rank, args=(2, free_port(), fn, args), nprocs=2, join=True)
