"""fastlego's training checkpoints (`checkpoint.pt` of `fastlego train`): written atomically,
read with `torch.load(weights_only=True)` (no code from the file runs), and the RNG states a
run saves so that a resumed run takes exactly the steps one that never stopped would take.

A checkpoint is a dict of tensors and plain values: "format" (CHECKPOINT_FORMAT) and "version",
"network" (the network spec, `fastlego.networks`), "model" and "ema" (state dicts),
"optimizer", "step", "nimg", "config" (the TrainConfig as a dict), "world_size", "rng" (the
step generator's state and every rank's global RNG states) and "data" (where the data order
stands). Release `.pkl` and safetensors files are `fastlego.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import os
import random
import uuid

import numpy as np
import torch

from .edm import EDMPrecond
from .networks import build_network

CHECKPOINT_FORMAT = "fastlego-training-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace onto `path`:
    a crash at any point leaves either the old file or the new one, never a torn one."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # A unique name in the same folder (so the rename is atomic), created with the umask's
    # permissions, unlike mkstemp's 0600.
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def global_rng_state() -> dict:
    """This process's global RNG states as tensors and plain Python values (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def global_rng_states_of_ranks(world: int) -> list:
    """Every process's `global_rng_state()`, in rank order (all ranks call it: a collective when
    world > 1), for a checkpoint that resumes each rank's streams."""
    mine = global_rng_state()
    if world == 1:
        return [mine]
    import torch.distributed as dist

    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state.get("torch_cuda") is not None and torch.cuda.is_available():
        cuda = state["torch_cuda"]
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def is_training_checkpoint(obj) -> bool:
    """Whether a loaded object is a fastlego training checkpoint (this module's format)."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_training_checkpoint(path: str, map_location="cpu") -> dict:
    """A fastlego training checkpoint as a dict (loaded with `weights_only=True`: no code runs)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return check_training_checkpoint(torch.load(path, map_location=map_location, weights_only=True), path)


def check_training_checkpoint(ckpt, path: str) -> dict:
    """`ckpt` (loaded from `path`) if it is a training checkpoint this fastlego can read."""
    if not is_training_checkpoint(ckpt):
        raise ValueError(f"{path} is not a fastlego training checkpoint (no format={CHECKPOINT_FORMAT!r}); "
                         f"release .pkl, .safetensors and state-dict files load with fastlego.load_checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer fastlego (checkpoint version {ckpt['version']} > "
                         f"{CHECKPOINT_VERSION}); upgrade fastlego")
    return ckpt


def network_from_checkpoint(path_or_ckpt, which: str = "ema", device="cpu") -> EDMPrecond:
    """The network of a training checkpoint, in eval mode: `which` = "ema" (default) or "model"."""
    ckpt = load_training_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, str) else path_or_ckpt
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    net = build_network(ckpt["network"])
    net.load_state_dict(ckpt[which], strict=True)
    return net.eval().requires_grad_(False).to(device)
