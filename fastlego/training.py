"""EDM training of LEGO networks: `fastlego.training.train(...)` and `fastlego train`.

The objective is EDM's (Karras et al. 2022): for an image y, `sigma = exp(P_mean + P_std * u)`
with u ~ N(0, 1), `n = sigma * N(0, I)`, and the loss is
`lambda(sigma) * |D(y + n; sigma) - y|^2` with `lambda = (sigma^2 + s_d^2) / (sigma * s_d)^2`,
which makes the effective training target of the raw backbone unit-variance at every sigma.
With `intermediate=True` (the release's choice) every brick's output is a denoiser of its own
(`train_intermediate_stages`) and the loss is the average over bricks; that is what makes
stopping early at sampling time (brick skipping) give sensible images.

Reproducibility: every random draw of a step (sigmas, noise, label dropout) comes from one
generator that all ranks advance identically over the whole global batch, each rank keeping its
slice, and the data order is a pure function of (seed, step) (`fastlego.data.DataOrder`). So
N processes with batch B/N compute exactly what one process with batch B computes, and a run
resumed from a checkpoint takes the same next steps as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .edm import EDMPrecond
from .model import LegoBackbone
from .presets import BRICK_TYPES, get_preset

CHECKPOINT_FORMAT = "fastlego-training-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"

# The demo's brick stack for 16x16 digits, in the PG ("progressive growth") order: a local brick
# (8x8 regions of four 4x4 patches, depth 1) then a global brick (the whole image, 16 patches,
# depth 2): 48 token-blocks per image, sized for a CPU. Skipping the last brick late in sampling
# leaves the local brick to finish the fine detail and saves about 2/3 of each skipped call.
DEMO_BRICKS = "8:lego_S_4:1,16:lego_S_4:2"


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EDMLoss:
    """EDM's loss: log-normal sigmas (P_mean, P_std) and the weight that whitens the target."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def sigma(self, normal: torch.Tensor) -> torch.Tensor:
        """sigma = exp(P_mean + P_std * u) for standard-normal draws u."""
        return (normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + s_d^2) / (sigma * s_d)^2 = 1 / c_out(sigma)^2."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net: nn.Module, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 labels: Optional[torch.Tensor] = None, **net_kwargs):
        """(loss, per_brick): the batch mean of `lambda * (D(y + sigma*noise; sigma) - y)^2`.

        images (B, C, H, W) in [-1, 1]; sigma (B,); noise (B, C, H, W) standard normal. When the
        network returns one output per brick, `loss` averages the bricks and `per_brick` lists
        each brick's loss (detached); otherwise `per_brick` holds the one loss."""
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        weight = self.weight(sigma)
        y = images.to(torch.float32)
        D = net(y + noise * sigma, sigma.flatten(), labels, **net_kwargs)
        outputs = D if isinstance(D, (list, tuple)) else [D]
        losses = [(weight * (d.to(torch.float32) - y) ** 2).mean() for d in outputs]
        loss = torch.stack(losses).mean()
        return loss, [l.detach() for l in losses]


# --------------------------------------------------------------------------------------------
# The training step, eager or replayed as one CUDA graph
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Networks: presets or an explicit brick stack, described by a plain dict (saved in checkpoints)
# --------------------------------------------------------------------------------------------

def parse_bricks(text: str) -> Dict[str, list]:
    """"4:lego_S_2:1,16:lego_S_2:2" -> LegoBackbone kwargs (region:brick_type:depth per brick)."""
    regions, types, depths = [], [], []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        fields = part.split(":")
        if len(fields) != 3:
            raise ValueError(f"brick {part!r}: expected REGION:TYPE:DEPTH, e.g. 4:lego_S_2:1 "
                             f"(types: {', '.join(sorted(BRICK_TYPES))})")
        r, t, d = fields
        if not (r.isdigit() and d.isdigit()) or int(r) < 1 or int(d) < 1:
            raise ValueError(f"brick {part!r}: region and depth must be positive integers")
        if t not in BRICK_TYPES:
            raise ValueError(f"brick {part!r}: unknown brick type {t!r}; expected one of {', '.join(sorted(BRICK_TYPES))}")
        if int(r) % BRICK_TYPES[t][1]:
            raise ValueError(f"brick {part!r}: region {r} is not a multiple of {t}'s patch size {BRICK_TYPES[t][1]}")
        regions.append(int(r)), types.append(t), depths.append(int(d))
    if not regions:
        raise ValueError(f"no bricks in {text!r}: expected e.g. {DEMO_BRICKS}")
    return {"img_resolution": regions, "model_type": types, "depths": depths}


def network_spec(img_resolution: int, img_channels: int, label_dim: int, preset: Optional[str] = None,
                 bricks: Union[str, dict, None] = None, intermediate: bool = True,
                 class_dropout_prob: float = 0.1) -> dict:
    """The plain-dict description of a network that `build_network` builds and checkpoints store."""
    if (preset is None) == (bricks is None):
        raise ValueError("give exactly one of preset (a name from fastlego.PRESETS) or bricks "
                         f"(REGION:TYPE:DEPTH,..., e.g. {DEMO_BRICKS})")
    if preset is not None:
        get_preset(preset)
        stack = None
    else:
        stack = parse_bricks(bricks) if isinstance(bricks, str) else {k: list(v) for k, v in bricks.items()}
    regions = list(get_preset(preset).regions) if preset else stack["img_resolution"]
    bad = [r for r in regions if img_resolution % r]
    if bad:
        raise ValueError(f"training resolution {img_resolution} is not a multiple of the region size(s) {bad} "
                         f"of this network (regions {regions}): use a resolution that is a multiple of "
                         f"{math.lcm(*regions)}, or a smaller stack")
    return {"img_resolution": int(img_resolution), "img_channels": int(img_channels), "label_dim": int(label_dim),
            "preset": preset, "bricks": stack, "train_intermediate_stages": bool(intermediate),
            "class_dropout_prob": float(class_dropout_prob)}


def build_network(spec: dict) -> EDMPrecond:
    """An EDMPrecond from `network_spec`'s dict; `net.network_spec` keeps the dict."""
    common = dict(label_dim=spec["label_dim"], train_intermediate_stages=spec["train_intermediate_stages"],
                  class_dropout_prob=spec["class_dropout_prob"])
    if spec.get("preset"):
        net = EDMPrecond(spec["img_resolution"], spec["img_channels"], model_type=spec["preset"], **common)
    else:
        name = "custom:" + ",".join(f"{r}:{t}:{d}" for r, t, d in zip(
            spec["bricks"]["img_resolution"], spec["bricks"]["model_type"], spec["bricks"]["depths"]))
        backbone = LegoBackbone(in_channels=spec["img_channels"], **spec["bricks"], **common)
        net = EDMPrecond(spec["img_resolution"], spec["img_channels"], label_dim=spec["label_dim"],
                         model_type=name, backbone=backbone)
    net.network_spec = dict(spec)
    return net


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every setting of a training run (saved in the checkpoint and in outdir/config.json)."""

    data: str = "digits"                 # a folder, an EDM-style zip, or "digits" (bundled)
    outdir: str = "fastlego-run"
    resolution: Optional[int] = None     # default: 16 for digits, else the first image's size
    preset: Optional[str] = None         # a name from fastlego.PRESETS ...
    bricks: Optional[str] = None         # ... or REGION:TYPE:DEPTH,... (default DEMO_BRICKS)
    use_labels: bool = True              # condition on the dataset's labels when it has them
    xflip: bool = False                  # random horizontal flips
    max_images: Optional[int] = None
    batch_size: int = 64                 # global batch, split evenly over the processes
    steps: int = 1000
    max_seconds: Optional[float] = None  # also stop after this much training time
    lr: float = 1e-4
    weight_decay: float = 0.0            # AdamW's decoupled decay (0: Adam, as the release)
    betas: Sequence[float] = (0.9, 0.999)
    warmup_steps: int = 0                # linear learning-rate warm-up
    grad_clip: Optional[float] = None    # max global gradient norm (None: off)
    ema_halflife_kimg: float = 500.0     # EDM's EMA half-life, in thousands of images
    ema_rampup: Optional[float] = 0.05   # half-life <= rampup * images seen so far (None: off)
    intermediate: bool = True            # train every brick as a denoiser (the release's joint loss)
    class_dropout: float = 0.1           # label dropout, for classifier-free guidance
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    precision: str = "auto"              # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    seed: int = 0
    checkpoint_every: int = 500          # steps; also at the end
    log_every: int = 50
    resume: Optional[str] = None         # a checkpoint path, or "auto": outdir/checkpoint.pt if there
    workers: int = 0                     # DataLoader processes for image files
    device: Optional[str] = None         # default: cuda:LOCAL_RANK when there is a GPU, else cpu
    backend: Optional[str] = None        # fastlego dispatch mode (default: auto)
    progress: bool = True
    threads: Optional[int] = None        # torch CPU threads
    activation_checkpointing: Optional[str] = None  # None, "brick" or "block": recompute to save memory
    checkpoint_blocks: Optional[int] = None  # with "block": only the first N DiT blocks (None: all)
    deterministic: bool = False          # bitwise-reproducible gradients (fastlego.set_deterministic)
    cuda_graph: Optional[bool] = None    # replay the whole step as a CUDA graph (None: on for one CUDA process)

    def validate(self) -> None:
        """Clear errors for bad values, before any work."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.ema_halflife_kimg >= 0, f"ema_halflife_kimg must be >= 0, got {self.ema_halflife_kimg}")
        need(self.ema_rampup is None or self.ema_rampup > 0, f"ema_rampup must be > 0 or None, got {self.ema_rampup}")
        need(0 <= self.class_dropout < 1, f"class_dropout must lie in [0, 1), got {self.class_dropout}")
        need(self.P_std > 0 and self.sigma_data > 0, "P_std and sigma_data must be positive")
        need(self.activation_checkpointing in (None, "brick", "block"),
             f"activation_checkpointing must be None, 'brick' or 'block', got {self.activation_checkpointing!r}")
        need(self.checkpoint_blocks is None or (self.activation_checkpointing == "block" and self.checkpoint_blocks >= 0),
             f"checkpoint_blocks={self.checkpoint_blocks!r} needs activation_checkpointing='block' and a count >= 0")
        need(self.precision in ("auto", "fp32", "bf16"),
             f"precision must be auto, fp32 or bf16, got {self.precision!r} (fp16 training needs loss scaling; use bf16)")
        need(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")
        need(self.max_seconds is None or self.max_seconds > 0, f"max_seconds must be > 0, got {self.max_seconds}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip}")
        need(self.preset is None or self.bricks is None, "give either preset or bricks, not both")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        if self.preset is not None:
            get_preset(self.preset)
        if self.bricks is not None:
            parse_bricks(self.bricks)
        if self.resolution is not None:
            need(self.resolution >= 1, f"resolution must be positive, got {self.resolution}")


# --------------------------------------------------------------------------------------------
# Small utilities: progress bar, atomic checkpoint writes, RNG state, EMA
# --------------------------------------------------------------------------------------------

class ProgressBar:
    """A dependency-free progress bar on stderr: `[####----] 40/100 1.2it/s loss=0.31`.

    Redraws in place on a terminal (at most every 0.2 s); elsewhere prints a line at most every
    `interval` seconds, so logs stay short."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None, interval: Optional[float] = None,
                 initial: int = 0, unit: str = "it", seconds: Optional[float] = None):
        self.total, self.desc, self.enabled, self.unit = max(int(total), 0), desc, enabled, unit
        self.seconds = seconds  # a time budget: the bar shows elapsed / budget when it ends first
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 15.0)
        self.n = self.start_n = int(initial)
        self.t0 = self.last = time.perf_counter()
        self.postfix: Dict[str, str] = {}
        self.closed = False
        self._drawn = None  # the count last drawn

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        for k, v in postfix.items():
            self.postfix[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.interval or self.n >= self.total):
            self.last = now
            self._draw()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        count = f"{self.n}/{self.total}"
        if self.seconds and (math.isnan(eta) or self.seconds - elapsed < eta):
            frac, eta, count = min(elapsed / self.seconds, 1.0), max(self.seconds - elapsed, 0.0), f"{self.n}"
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc} [{bar}] {count} {rate:.2f}{self.unit}/s "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s {extra}").strip()

    def _draw(self) -> None:
        self._drawn = self.n
        if self.tty:
            self.stream.write("\r" + self._line() + "\033[K")
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and not self.closed:
            if self._drawn != self.n:
                self._draw()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
        self.closed = True


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


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state.get("torch_cuda") is not None and torch.cuda.is_available():
        cuda = state["torch_cuda"]
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def ema_beta(batch_size: int, nimg: int, halflife_kimg: float, rampup: Optional[float]) -> float:
    """EDM's EMA decay per step: half-life in images, capped by `rampup * nimg` early on."""
    halflife = halflife_kimg * 1000
    if rampup is not None:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net for trained parameters; everything else copied."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), net.parameters())]
    trained = [(e, p) for e, p in pairs if p.requires_grad]
    if trained:
        torch._foreach_lerp_([e for e, _ in trained], [p.detach() for _, p in trained], 1.0 - beta)
    for e, p in pairs:
        if not p.requires_grad:
            e.copy_(p)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


# --------------------------------------------------------------------------------------------
# Distributed setup (torchrun: one process per GPU)
# --------------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: Optional[str]) -> _Dist:
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
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, created)
    return _Dist(0, 1, local_rank, dev, False)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    outdir: str
    checkpoint: Optional[str]
    step: int                      # steps done in total (resumed runs included)
    nimg: int
    losses: List[float]            # global mean loss of each step this call ran
    seconds: float
    images_per_second: float
    network: Optional[EDMPrecond] = None   # the EMA network (eval mode), on rank 0
    cuda_graph: bool = False               # whether the steps were replayed as a CUDA graph


def _autocast(precision: str, device: torch.device, cache: bool = True):
    # a CUDA graph must not keep pointing at autocast's cache of cast weights (freed on exit)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def _use_cuda_graph(asked: Optional[bool], device: torch.device, world: int) -> bool:
    """cuda_graph's value for this run: None means on for one CUDA process."""
    if asked is None:
        return device.type == "cuda" and world == 1
    if asked and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, but this run trains on {device}: drop --cuda-graph")
    if asked and world > 1:
        raise ValueError(f"cuda_graph=True is for one process; this run has {world} (DDP's all-reduce is not "
                         f"captured here): drop --cuda-graph, or train on one GPU")
    return bool(asked)


def train(config: Optional[TrainConfig] = None, **overrides) -> TrainResult:
    """Train a LEGO network with EDM's loss; see `TrainConfig` for the settings.

    Under `torchrun --nproc_per_node N`, each process takes `batch_size / N` images of every
    step and DDP averages the gradients. Writes `outdir/checkpoint.pt` (atomically, every
    `checkpoint_every` steps and at the end), `outdir/metrics.jsonl` and `outdir/config.json`."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    cfg.validate()
    from .data import DataOrder, ImageDataset, images_to_float, step_batches

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dctx = _setup_distributed(cfg.device)
    try:
        if cfg.batch_size % dctx.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes "
                             f"{dctx.world}: pass e.g. --batch {cfg.batch_size - cfg.batch_size % dctx.world or dctx.world}")
        from .dispatch import deterministic, use_backend
        backend = use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
        determinism = deterministic() if cfg.deterministic else contextlib.nullcontext()
        with backend, determinism:
            return _train(cfg, dctx, DataOrder, ImageDataset, images_to_float, step_batches)
    finally:
        if dctx.created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, dctx: _Dist, DataOrder, ImageDataset, images_to_float, step_batches) -> TrainResult:
    device = dctx.device
    resume_path = cfg.resume
    if resume_path == "auto":
        candidate = os.path.join(cfg.outdir, CHECKPOINT_NAME)
        resume_path = candidate if os.path.exists(candidate) else None
    ckpt = load_training_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        old = ckpt["config"]
        for key in ("batch_size", "seed", "data", "xflip"):
            if old.get(key) != getattr(cfg, key):
                raise ValueError(f"cannot resume {resume_path}: it was trained with {key}={old.get(key)!r} but this run "
                                 f"has {key}={getattr(cfg, key)!r}; pass the same value to continue exactly")

    # Data.
    dataset = ImageDataset(cfg.data, resolution=cfg.resolution, use_labels=cfg.use_labels, max_images=cfg.max_images)
    order = DataOrder(len(dataset), cfg.batch_size, seed=cfg.seed, xflip=cfg.xflip)

    # Network: the checkpoint's, else a fresh one from the config (default: the demo stack).
    if ckpt is not None:
        spec = ckpt["network"]
        if spec["img_resolution"] != dataset.resolution or spec["img_channels"] != dataset.channels:
            raise ValueError(f"cannot resume: the checkpoint's network takes {spec['img_channels']}x{spec['img_resolution']}"
                             f"^2 images but the data are {dataset.channels}x{dataset.resolution}^2")
    else:
        bricks = cfg.bricks if cfg.preset is None and cfg.bricks is not None else (None if cfg.preset else DEMO_BRICKS)
        spec = network_spec(dataset.resolution, dataset.channels, dataset.label_dim, preset=cfg.preset, bricks=bricks,
                            intermediate=cfg.intermediate, class_dropout_prob=cfg.class_dropout)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    net = build_network(spec).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    net.model.set_activation_checkpointing(cfg.activation_checkpointing, cfg.checkpoint_blocks)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = adamw(params, device, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    # One generator for every random draw of a step, advanced identically on every rank.
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    step = nimg = 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, nimg = int(ckpt["step"]), int(ckpt["nimg"])
        gen.set_state(ckpt["rng"]["train_generator"].to("cpu"))
        per_rank = ckpt["rng"]["per_rank"]
        set_global_rng_state(per_rank[dctx.rank] if len(per_rank) == dctx.world else per_rank[0])
        del ckpt
    else:
        random.seed(cfg.seed + dctx.rank)
        np.random.seed((cfg.seed + dctx.rank) % 2 ** 32)
        torch.manual_seed(cfg.seed + 1000 + dctx.rank)

    model = net
    if dctx.world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    graphed = _use_cuda_graph(cfg.cuda_graph, device, dctx.world)
    make_capturable(opt, graphed, device)

    loss_fn = EDMLoss(cfg.P_mean, cfg.P_std, cfg.sigma_data)
    total_steps = cfg.steps
    per_rank = cfg.batch_size // dctx.world
    lo, hi = dctx.rank * per_rank, (dctx.rank + 1) * per_rank
    C, R = dataset.channels, dataset.resolution
    label_dim = dataset.label_dim

    if dctx.main:
        os.makedirs(cfg.outdir, exist_ok=True)
        with open(os.path.join(cfg.outdir, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "network": spec, "world_size": dctx.world,
                       "dataset": dataset.describe()}, f, indent=2)
    metrics_path = os.path.join(cfg.outdir, METRICS_NAME)
    ckpt_path = os.path.join(cfg.outdir, CHECKPOINT_NAME)
    bar = ProgressBar(total_steps, "train", enabled=cfg.progress and dctx.main, initial=step, seconds=cfg.max_seconds)
    if dctx.main and cfg.progress:
        n_params = sum(p.numel() for p in params)
        print(f"fastlego train: {dataset.describe()}; network {net.model_type} ({n_params / 1e6:.2f}M parameters), "
              f"{dctx.world} process(es) on {device}, batch {cfg.batch_size}, steps {step}->{total_steps}",
              file=sys.stderr)

    def save(at_step: int, at_nimg: int) -> None:
        states = [None] * dctx.world
        mine = global_rng_state()
        if dctx.world > 1:
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        if dctx.main:
            atomic_save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "network": spec, "model": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "step": at_step, "nimg": at_nimg,
                "config": dataclasses.asdict(cfg), "world_size": dctx.world,
                "rng": {"train_generator": gen.get_state(), "per_rank": states},
                "data": {"num_images": len(dataset), "batch_size": cfg.batch_size, "seed": cfg.seed,
                         "next_position": at_step * cfg.batch_size, "xflip": cfg.xflip},
            }, ckpt_path)
        if dctx.world > 1:
            dist.barrier()

    def body(y, sigma, noise, labels, drop_ids):
        """Forward, loss, backward, gradient guard and clip, optimizer step -> [loss, brick losses...]."""
        kwargs = {} if drop_ids is None else {"force_drop_ids": drop_ids}
        with _autocast(cfg.precision, device, cache=not graphed):
            loss, per_brick = loss_fn(model, y, sigma, noise, labels, **kwargs)
        loss.backward()
        for p in params:  # EDM's guard: a NaN/inf gradient entry becomes 0 rather than poisoning the weights
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        return torch.stack([loss.detach()] + per_brick)

    train_step = TrainStep(body, opt, cuda_graph=graphed)
    pending: List[torch.Tensor] = []           # per-step [loss, brick losses...] on the device
    history: List[float] = []
    t_start = time.perf_counter()
    t_log, n_log = t_start, 0
    steps_run = 0
    last_saved = step
    for step, images_u8, labels, flips in step_batches(dataset, order, step, total_steps, dctx.rank, dctx.world, cfg.workers):
        # Random draws for the whole global batch; this rank keeps its slice.
        B = cfg.batch_size
        normal = torch.randn(B, generator=gen, device=device)
        noise = torch.randn(B, C, R, R, generator=gen, device=device)
        drop = torch.rand(B, generator=gen, device=device) < cfg.class_dropout
        y = images_to_float(images_u8.to(device, non_blocking=True), flips)
        sigma = loss_fn.sigma(normal[lo:hi])
        labels = labels.to(device, non_blocking=True) if label_dim else None
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        set_lr(opt, lr)
        drop_ids = drop[lo:hi].long().reshape(-1, 1) if label_dim else None
        losses = train_step(y, sigma, noise[lo:hi], labels, drop_ids)
        nimg += cfg.batch_size
        update_ema(ema, net, ema_beta(cfg.batch_size, nimg, cfg.ema_halflife_kimg, cfg.ema_rampup))
        pending.append(losses.clone())
        step += 1
        steps_run += 1
        n_log += cfg.batch_size

        stop = False
        if cfg.max_seconds is not None:
            elapsed = torch.tensor([time.perf_counter() - t_start], dtype=torch.float64, device=device)  # NCCL: on the GPU
            if dctx.world > 1:  # every rank must stop at the same step: rank 0's clock decides
                dist.broadcast(elapsed, 0)
            stop = elapsed.item() >= cfg.max_seconds
        last = step >= total_steps or stop
        if step % cfg.log_every == 0 or last:
            rows = torch.stack(pending).float()
            if dctx.world > 1:
                dist.all_reduce(rows)
                rows /= dctx.world
            rows = rows.cpu()
            pending.clear()
            history.extend(rows[:, 0].tolist())
            now = time.perf_counter()
            ips = n_log / max(now - t_log, 1e-9)
            t_log, n_log = now, 0
            mean = rows.mean(0)
            bar.update(len(rows), loss=float(mean[0]), img_s=f"{ips:.1f}")
            if dctx.main:
                record = {"step": step, "kimg": nimg / 1000, "loss": float(mean[0]),
                          "loss_per_brick": [float(v) for v in mean[1:]], "lr": lr, "images_per_s": ips,
                          "seconds": now - t_start, "world_size": dctx.world}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if step % cfg.checkpoint_every == 0 or last:
            save(step, nimg)
            last_saved = step
        if stop:
            break
    if last_saved != step or (steps_run == 0 and not os.path.exists(ckpt_path)):
        save(step, nimg)
    bar.close()
    seconds = time.perf_counter() - t_start
    ips = steps_run * cfg.batch_size / max(seconds, 1e-9)
    return TrainResult(outdir=cfg.outdir, checkpoint=ckpt_path, step=step, nimg=nimg, losses=history,
                       seconds=seconds, images_per_second=ips, network=ema if dctx.main else None,
                       cuda_graph=train_step.captured)
