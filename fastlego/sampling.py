"""Sampling: EDM's Heun sampler with real brick skipping, classifier-free guidance, any H x W.

`edm_sampler` is EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2): noise levels
`sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`, then
`sigma_N = 0`; each step optionally "churns" (raises sigma by gamma and adds matching noise),
takes an Euler step along `dx/dsigma = (x - D(x; sigma)) / sigma`, and corrects it with the
slope at the end point (the trapezoidal rule), except on the last step, which ends at sigma 0.

Brick skipping (LEGO's policy): the first `round(t_break * N)` steps run every brick; the rest
stop after brick `skip_stage_idx` (default `num_bricks - 2`, i.e. the last brick is dropped while
the noise is low), both evaluations of a Heun step alike, also under guidance. `t_break=1` runs
every brick throughout (the release's sampler, which never actually skips).

Same seed, same image as the release's generate.py (EDM's sampler with LEGO's networks), for
the same weights, labels and sampler arguments, to float rounding, with or without guidance and
churn: each seed has its own generator, seeded with `seed mod 2^32`, and spends it in the
release's order: the latent (C, H, W) in float32; for a class-conditional network one class id
`randint(label_dim)`, drawn even when `class_idx` / `class_ids` replace it; then one float64
normal per sampler step, also on the steps that an S_min..S_max window leaves without churn
(only the draws after the last churning step, which change nothing, are left out). Guidance is
`uncond + cfg_scale (cond - uncond)` on the network's output, the unconditional half with
all-zero labels, in one batched call (cfg_scale 1 makes one conditional pass: the same to float
rounding). Deliberate differences, none of which changes a release-matching setting's images:
`t_break < 1` really skips bricks, also under guidance (the release's skip switch runs every
brick, so any of its settings is `t_break=1` here); non-square sizes (the release samples
squares); `num_steps=1` samples at sigma_max (the release's schedule divides by zero); the
samples come back in float32 (the release keeps float64 until the uint8 conversion).

`sample` adds the plumbing: per-image seeds (one generator per seed, so an image depends only on
its seed), batches, optional CUDA-graph replay of the network, PNG grids / per-image PNGs / an
.npz for FID tools (never replacing existing files unless asked), and the seeds split over
the processes of `torchrun` with the same files as one process.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .data import float_to_uint8, make_grid, write_png
from .progress import ProgressBar
from .training_checkpoint import check_training_checkpoint, is_training_checkpoint, network_from_checkpoint


# --------------------------------------------------------------------------------------------
# Randomness: one generator per seed
# --------------------------------------------------------------------------------------------

class StackedRandomGenerator:
    """A batch of independent generators, one per seed: image i's noise depends only on seeds[i]
    (EDM's scheme), so any subset of seeds, in any batch, reproduces the same images.

    Seeded with `seed mod 2^32` as the release's generate.py seeds them (so seed s and s + 2^32
    give the same image). Each call draws one tensor of `size[1:]` from every seed's generator,
    in the order the caller asks: `sample` draws the latent, then the class id, then the sampler
    one churn-noise tensor per step."""

    def __init__(self, device, seeds: Sequence[int]):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, dtype=torch.float32):
        if size[0] != len(self.generators):
            raise ValueError(f"randn size {list(size)} must start with the number of seeds, {len(self.generators)}")
        return torch.stack([torch.randn(size[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normals shaped and typed like x (float64 in the sampler), on the generators' device."""
        return self.randn(x.shape, dtype=x.dtype)

    def randint(self, high: int) -> torch.Tensor:
        """One class id in 0..high-1 per seed (int64)."""
        return torch.stack([torch.randint(high, (), generator=g, device=self.device) for g in self.generators])


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

def edm_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device="cpu") -> torch.Tensor:
    """EDM's noise levels, float64 (num_steps + 1,), ending with 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if num_steps == 1:
        t = torch.tensor([sigma_max], dtype=torch.float64, device=device)
    else:
        i = torch.arange(num_steps, dtype=torch.float64, device=device)
        t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def full_steps(num_steps: int, t_break: float) -> int:
    """How many of the first steps run every brick: round(t_break * num_steps)."""
    if not 0 <= t_break <= 1:
        raise ValueError(f"t_break must lie in [0, 1] (the fraction of steps that run every brick), got {t_break}")
    return int(math.floor(t_break * num_steps + 0.5))


def _num_bricks(net) -> Optional[int]:
    backbone = getattr(net, "model", None)
    return getattr(backbone, "num_bricks", None)


def resolve_skip_stage(net, t_break: float, skip_stage_idx: Optional[int]) -> Optional[int]:
    """The brick that late steps stop after (None when nothing is skipped)."""
    if t_break >= 1:
        return None
    n = _num_bricks(net)
    if skip_stage_idx is None:
        if n is None:
            raise ValueError("brick skipping (t_break < 1) needs a LEGO network (net.model.num_bricks), "
                             "or pass skip_stage_idx")
        if n < 2:
            raise ValueError(f"brick skipping needs at least 2 bricks; this network has {n}: use t_break=1")
        return n - 2
    if n is not None and not -n <= skip_stage_idx < n - 1 and skip_stage_idx != -2:
        raise ValueError(f"skip_stage_idx={skip_stage_idx} must name a brick before the last one (0..{n - 2})")
    return skip_stage_idx


def edm_sampler(net, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None, *,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                cfg_scale: Optional[float] = None, t_break: float = 1.0, skip_stage_idx: Optional[int] = None,
                randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                denoiser: Optional[Callable] = None, progress: Optional[ProgressBar] = None) -> torch.Tensor:
    """EDM's Heun sampler from standard-normal `latents` (B, C, H, W); returns float32 samples.

    `net(x, sigma, class_labels, cfg_scale=..., return_stage_idx=...)` is the denoiser (an
    EDMPrecond); `denoiser(x, sigma, stage)` overrides the call (CUDA graphs, toy models). The
    state is kept in float64 as EDM does. `cfg_scale` None or 1 means no guidance.

    `randn_like(x)` gives the churn noise. As in the release, every step draws one tensor, also
    the steps that the S_min..S_max window leaves without churn (they scale it by 0), so that a
    seed's later draws are the release's; only the draws after the last churning step, which
    cannot change any image, are left out (with S_churn = 0, none is drawn)."""
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0) or 0)) if net is not None else sigma_min
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", float("inf")))) if net is not None else sigma_max
    # The network's representable noise levels (EDM's `round_sigma`; the identity for EDMPrecond).
    round_sigma = getattr(net, "round_sigma", None) or (lambda s: s)
    t_steps = edm_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    t_steps = torch.cat([torch.as_tensor(round_sigma(t_steps[:-1])).to(t_steps), t_steps[-1:]])
    # gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= t_i <= S_max, else 0 (Algorithm 2).
    gammas = [min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(t) <= S_max else 0.0 for t in t_steps[:-1]]
    last_draw = max((i for i, g in enumerate(gammas) if g > 0), default=-1)
    n_full = full_steps(num_steps, t_break)
    stage_late = resolve_skip_stage(net, t_break, skip_stage_idx) if n_full < num_steps else None
    if cfg_scale is not None and float(cfg_scale) == 1.0:
        cfg_scale = None  # uncond + 1 * (cond - uncond) = cond: one pass is enough

    if denoiser is None:
        def denoiser(x, sigma, stage):
            return net(x.to(torch.float32), sigma, class_labels, cfg_scale=cfg_scale, return_stage_idx=stage)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        stage = None if i < n_full else stage_late
        x_cur = x_next
        # Churn: raise the noise level to t_hat = t_cur + gamma t_cur and add noise of variance
        # t_hat^2 - t_cur^2. The noise is drawn on every step up to the last churning one,
        # churning or not, to spend each seed's stream as the release does.
        gamma = gammas[i]
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur)).to(t_cur)
        noise = randn_like(x_cur) if i <= last_draw else None
        if gamma > 0:
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * noise
        else:
            x_hat = x_cur  # the release adds 0 * noise: the same values
        # Euler step from t_hat to t_next along d = (x - D(x)) / sigma.
        denoised = denoiser(x_hat, t_hat.to(torch.float32), stage).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Heun correction: average the slopes at both ends (not on the last step, which ends at 0).
        if i < num_steps - 1:
            denoised = denoiser(x_next, t_next.to(torch.float32), stage).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if progress is not None:
            progress.update(1)
    return x_next.to(torch.float32)


def count_network_evaluations(num_steps: int, t_break: float = 1.0) -> Dict[str, int]:
    """How many network calls the Heun sampler makes: (full, skipped) = calls that run every
    brick and calls that stop early (2 per step, 1 on the last)."""
    n_full = full_steps(num_steps, t_break)
    calls = [2 if i < num_steps - 1 else 1 for i in range(num_steps)]
    return {"full": sum(calls[:n_full]), "skipped": sum(calls[n_full:])}


# --------------------------------------------------------------------------------------------
# CUDA graphs: the network replayed for a fixed shape
# --------------------------------------------------------------------------------------------

class CudaGraphDenoiser:
    """Captures `net(x, sigma, labels, cfg_scale, return_stage_idx)` once per (shape, stage) as
    a CUDA graph and replays it: the per-step Python and launch overhead disappears, which
    matters for small batches. Inputs are copied into static buffers; outputs are cloned. The
    graphs share one memory pool (they never run at once, and each one's inputs and outputs stay
    referenced here, so only scratch memory is shared).

    `fallback=True` (sampling's default, when graphs were not asked for explicitly): a capture
    that fails for another reason than running out of memory is reported once on stderr with the
    reason, and the network then runs eagerly, same values; `fallback=False` raises."""

    def __init__(self, net, cfg_scale: Optional[float] = None, warmup: int = 2, fallback: bool = False):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA GPU; sample without cuda_graph on this machine")
        self.net, self.cfg_scale, self.warmup, self.fallback = net, cfg_scale, warmup, fallback
        self.graphs: Dict[tuple, tuple] = {}
        self.labels: Optional[torch.Tensor] = None
        self.pool = None
        self.failed: Optional[str] = None      # why capturing failed (fallback mode): eager from then on

    def set_labels(self, labels: Optional[torch.Tensor]) -> None:
        self.labels = labels

    def _eager(self, x, sigma, stage):
        return self.net(x.to(torch.float32), sigma, self.labels, cfg_scale=self.cfg_scale, return_stage_idx=stage)

    def _capture(self, shape, stage):
        dev = next(self.net.parameters()).device
        static_x = torch.zeros(shape, dtype=torch.float32, device=dev)
        static_sigma = torch.ones(shape[0], dtype=torch.float32, device=dev)
        static_labels = None if self.labels is None else self.labels.to(dev, torch.float32).clone()

        def run():
            return self.net(static_x, static_sigma, static_labels, cfg_scale=self.cfg_scale, return_stage_idx=stage)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):  # kernels compiled / autotuned outside the capture
                run()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = run()
        return graph, static_x, static_sigma, static_labels, out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, stage: Optional[int]) -> torch.Tensor:
        if self.failed is not None:
            return self._eager(x, sigma, stage)
        key = (tuple(x.shape), stage, self.labels is None)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(tuple(x.shape), stage)
            except Exception as exc:
                from .dispatch import _out_of_memory
                if not self.fallback or _out_of_memory(exc):
                    raise
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"fastlego sample: capturing the network as a CUDA graph failed ({self.failed}); sampling "
                      f"goes on eagerly with the same values (cuda_graph=False / --no-cuda-graph skips the "
                      f"attempt)", file=sys.stderr)
                torch.cuda.synchronize()
                return self._eager(x, sigma, stage)
        graph, sx, ss, sl, out = self.graphs[key]
        sx.copy_(x)
        ss.copy_(torch.as_tensor(sigma, dtype=torch.float32, device=ss.device).reshape(-1).expand(ss.shape[0]))
        if sl is not None:
            sl.copy_(self.labels)
        graph.replay()
        return out.clone()


# --------------------------------------------------------------------------------------------
# Loading networks and the high-level `sample`
# --------------------------------------------------------------------------------------------

def load_network(path: str, which: str = "ema", device="cpu"):
    """A network ready to sample (eval mode, no grads): a fastlego training checkpoint (its EMA
    weights unless which="model"), a `fastlego distill` checkpoint (its one-step generator, EMA
    unless which="model", marked with `one_step_sigma`), else whatever `fastlego.load_checkpoint`
    reads (a release .pkl, a .safetensors file, a torch.save'd state dict; `which` is the .pkl's key)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"network {path!r} does not exist: pass a fastlego training checkpoint "
                                f"(outdir/checkpoint.pt), a release .pkl or a .safetensors file")
    if not path.endswith((".pkl", ".pickle", ".safetensors")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a torch.save file: let load_checkpoint say what it is
            obj = None
        if is_training_checkpoint(obj):
            return network_from_checkpoint(check_training_checkpoint(obj, path), which=which, device=device)
        from .distill import generator_from_checkpoint, is_distill_checkpoint
        if is_distill_checkpoint(obj):   # fastlego distill's one-step generator (`one_step_sigma` set)
            return generator_from_checkpoint(obj, which=which, device=device)
    from .checkpoint import load_checkpoint

    net = load_checkpoint(path, key=which) if path.endswith((".pkl", ".pickle")) else load_checkpoint(path)
    return net.eval().requires_grad_(False).to(device)


def parse_seeds(text: Union[str, Sequence[int], range]) -> List[int]:
    """"0-63" / "1,5,9" / "0-3,10" (or a list of ints) -> a list of distinct seeds >= 0, in order."""
    if not isinstance(text, str):
        seeds = [int(s) for s in text]
    else:
        seeds = []
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            lo, sep, hi = part.partition("-")
            try:
                if sep:
                    a, b = int(lo), int(hi)
                    if b < a:
                        raise ValueError
                    seeds.extend(range(a, b + 1))
                else:
                    seeds.append(int(part))
            except ValueError:
                raise ValueError(f"bad seed range {part!r}: expected e.g. 0-63 or 1,5,9") from None
    if not seeds:
        raise ValueError("no seeds given: expected e.g. 0-63 or 1,5,9")
    if min(seeds) < 0:
        raise ValueError(f"seeds must be >= 0, got {min(seeds)}")
    if len(set(seeds)) != len(seeds):  # a seed's image twice: same file written twice, a biased set
        seen = set()
        twice = sorted({s for s in seeds if s in seen or seen.add(s)})
        raise ValueError(f"seeds listed more than once: {', '.join(map(str, twice[:5]))}; each seed gives one "
                         f"image, so list each once (e.g. 0-63)")
    return seeds


def output_size(net, height: Optional[int], width: Optional[int], resolution: Optional[int] = None):
    """(H, W): the given sizes (or the training resolution), checked against the brick regions."""
    default = int(getattr(net, "img_resolution", 0) or 0)
    H = height or resolution or default
    W = width or resolution or default
    if not H or not W:
        raise ValueError("give the output size: height and width (or resolution)")
    regions = list(getattr(getattr(net, "model", None), "img_resolution", []) or [])
    if regions:
        m = math.lcm(*regions)
        if H % m or W % m:
            raise ValueError(f"output size {H}x{W} is not a multiple of {m} (the bricks' region sizes {regions} must "
                             f"tile it): use e.g. {max(m, H - H % m)}x{max(m, W - W % m)}")
    return H, W


@dataclass
class SampleResult:
    images: torch.Tensor                   # float32 (N, C, H, W), nominally in [-1, 1], on the CPU
    seeds: List[int]
    labels: Optional[torch.Tensor]         # class ids (N,) or None
    seconds: float                         # sampler time (network + update), files excluded
    images_per_second: float
    files: Dict[str, object] = field(default_factory=dict)
    rank: int = 0                          # this process's rank under torchrun (0: one process)
    world: int = 1                         # processes that shared the seeds
    cuda_graph: bool = False               # the network ran as replayed CUDA graphs


# Sampling precisions: fp32, autocast to bf16 / fp16, and FP8 (`fastlego.fp8`: the DiT blocks'
# linears in e4m3 on FP8 tensor cores, or their numerics emulated with plain ops on any device),
# whose attention and residual stream run under bf16 autocast.
PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "fp8_fast", "fp8_emulated")


def _autocast(precision: str, device: torch.device, cuda_graph: bool = False):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.bfloat16)
    # Autocast's cache of cast weights is freed when the context exits; a captured CUDA graph
    # would keep pointing at it, so graphs run with the cache off (weights cast inside the graph).
    return torch.autocast(device.type, dtype=dtype, cache_enabled=not cuda_graph)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(network, seeds: Union[str, Sequence[int]] = "0-15", *, class_idx: Optional[int] = None,
           class_ids: Optional[Sequence[int]] = None, height: Optional[int] = None, width: Optional[int] = None,
           resolution: Optional[int] = None, batch_size: int = 64, num_steps: Optional[int] = None,
           sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
           S_max: float = float("inf"), S_noise: float = 1.0, cfg_scale: Optional[float] = None,
           t_break: float = 1.0, skip_stage_idx: Optional[int] = None, outdir: Optional[str] = None,
           prefix: str = "", grid: bool = True, grid_columns: Optional[int] = None, grid_pad: int = 0, grid_scale: int = 1,
           images: bool = False, npz: bool = False, device=None, precision: str = "fp32",
           cuda_graph: Optional[bool] = None, which: str = "ema", progress: bool = True, overwrite: bool = False,
           distributed: Optional[bool] = None, deterministic: bool = False) -> SampleResult:
    """Generate one image per seed with EDM's Heun sampler and write the requested files.

    network: an EDMPrecond or a path (see `load_network`). A beta-diffusion network
    (`fastlego.beta.BetaPrecond`, trained with `process="beta"`; its checkpoint says so) is sampled
    with `fastlego.beta.beta_sampler` instead: `num_steps` defaults to 200 there (18 Heun steps for
    EDM), guidance and brick skipping alike; the sigma and rho settings are EDM's, S_churn must be
    0. A one-step generator (`fastlego distill`'s; `one_step_sigma` set) draws each image in one
    evaluation, `G(sigma_init z; sigma_init)` from the seed's latent z: the Heun settings do not
    apply, and guidance, t_break < 1 and S_churn are refused. Labels: `class_idx` for every
    image, `class_ids` one per seed, else a random class per
    seed (drawn from the seed's generator); none for unconditional networks. Sizes: `height` x `width` (default the training
    resolution), any multiple of the bricks' region sizes, non-square included. Files in
    `outdir`: `{prefix}grid.png` (`grid_pad` gray pixels between images, enlarged `grid_scale`
    times), `{prefix}images/{seed:06d}.png` (images=True), and
    `{prefix}samples.npz` (npz=True; uint8 NHWC under `arr_0`, as FID tools read it).
    Networks with other than 1 or 3 channels (latents) write only the .npz of raw samples.
    Files that a run would replace make it stop before any sampling unless `overwrite=True`.
    `precision`: "fp32", "bf16" / "fp16" (autocast), "fp8" (`fastlego.quantize(net, "fp8")`: the
    DiT blocks' linears on FP8 tensor cores, compute capability 8.9 or later, else refused with
    the reasons before sampling; the rest under bf16 autocast), "fp8_fast" (the same with the
    tensor cores' fast accumulation, `fastlego.quantize(net, "fp8", fast_accumulation=True)`:
    faster GEMMs, about twice their rounding error) or "fp8_emulated" (fp8's numerics with plain
    PyTorch ops on any device: slow, for measuring FP8's effect on samples).
    `cuda_graph`: replay the network as a CUDA graph per batch shape (and brick-skipping stage),
    which removes the per-call Python and launch cost that dominates small batches. None (the
    default) means on for CUDA devices: a capture that fails then says why on stderr and sampling
    goes on eagerly with the same values; True insists (a failure raises); False runs eagerly.
    Weights are cast to the autocast dtype once for the whole call (`fastlego.frozen_weights`),
    not at every network evaluation.
    `deterministic=True` fixes every kernel choice by a fixed rule instead of the tuned table
    (`fastlego.set_deterministic`): the same bits run to run and process to process on GPUs.

    Several processes (`torchrun --nproc_per_node N`; distributed=None joins them when torchrun
    started this one, False samples everything here): the seeds are cut into batches of
    `batch_size` exactly as one process cuts them and the batches are dealt out in turn, so each
    image comes from the same batch and the files are those of one process (byte for byte on the
    CPU; on GPUs with deterministic=True, as autotuned kernels may pick other tilings). Rank 0
    gathers the images and writes every file; its result holds all images, the other ranks'
    results their own share."""
    seeds = parse_seeds(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if grid_scale < 1 or grid_pad < 0:
        raise ValueError(f"grid_scale must be >= 1 and grid_pad >= 0, got {grid_scale}, {grid_pad}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from .dispatch import deterministic as fixed_kernels

    from .weight_cache import frozen_weights

    procs = _Processes.join(device, distributed)
    try:
        with fixed_kernels() if deterministic else contextlib.nullcontext(), frozen_weights():
            return _sample(procs, network, seeds, class_idx=class_idx, class_ids=class_ids, height=height, width=width,
                           resolution=resolution, batch_size=batch_size, num_steps=num_steps, sigma_min=sigma_min,
                           sigma_max=sigma_max, rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                           cfg_scale=cfg_scale, t_break=t_break, skip_stage_idx=skip_stage_idx, outdir=outdir,
                           prefix=prefix, grid=grid, grid_columns=grid_columns, grid_pad=grid_pad,
                           grid_scale=grid_scale, images=images, npz=npz, precision=precision, cuda_graph=cuda_graph,
                           which=which, progress=progress, overwrite=overwrite)
    finally:
        procs.close()


@dataclass
class _Processes:
    """The processes that share a `sample` call: rank, world size and device (fastlego.distributed's
    torchrun setup), plus a gloo group for the Python-object collectives (CPU tensors, also
    when the sampling itself runs on NCCL)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False      # this call created the default process group: destroy it at the end
    objects: object = None           # the group for gather/broadcast of objects (None: the default group)
    created_objects: bool = False    # `objects` is a group of our own: destroy it at the end

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device, distributed: Optional[bool]) -> "_Processes":
        if distributed is None:
            distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not distributed:
            default = "cuda" if torch.cuda.is_available() else "cpu"
            dev = torch.device(device if device is not None else default)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {dev} asked for but CUDA is not available; pass device='cpu'")
            return cls(device=dev)
        import torch.distributed as dist
        from .distributed import setup_distributed

        dctx = setup_distributed(None if device is None else str(device))
        procs = cls(dctx.rank, dctx.world, dctx.device, dctx.created_group)
        if procs.world > 1 and dist.get_backend() != "gloo":
            procs.objects, procs.created_objects = dist.new_group(backend="gloo"), True
        return procs

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def gather(self, obj) -> Optional[list]:
        """Every rank's `obj` in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0, group=self.objects)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier(group=self.objects)

    def close(self) -> None:
        import torch.distributed as dist
        if self.created_objects and dist.is_initialized():
            dist.destroy_process_group(self.objects)
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_outputs(procs: _Processes, outdir: str, prefix: str, seeds: Sequence[int], grid: bool, images: bool,
                   npz: bool, channels: Optional[int]) -> None:
    """Refuse (on every rank alike: rank 0 looks, the others hear its answer) to replace files."""
    clashes = existing_outputs(outdir, prefix, seeds, grid=grid, images=images, npz=npz,
                               channels=channels) if procs.main else None
    refuse_overwrite(procs.broadcast(clashes), outdir)


def _sample(procs: _Processes, network, seeds: List[int], *, class_idx, class_ids, height, width, resolution,
            batch_size, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, cfg_scale, t_break,
            skip_stage_idx, outdir, prefix, grid, grid_columns, grid_pad, grid_scale, images, npz, precision,
            cuda_graph, which, progress, overwrite) -> SampleResult:
    dev = procs.device
    if cuda_graph and dev.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device (the graphs are CUDA's); drop it on the CPU")
    graph_fallback = cuda_graph is None        # on by default on CUDA, eager (with a message) if capture fails
    cuda_graph = dev.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    known_channels = None if isinstance(network, str) else int(getattr(network, "img_channels", 0) or 0) or None
    if outdir is not None and not overwrite:  # before the network is even read
        _check_outputs(procs, outdir, prefix, seeds, grid, images, npz, known_channels)
    net = load_network(network, which=which, device=dev) if isinstance(network, str) else network.eval().to(dev)
    H, W = output_size(net, height, width, resolution)
    C = int(net.img_channels)
    if outdir is not None and not overwrite and known_channels is None and C not in (1, 3):
        _check_outputs(procs, outdir, prefix, seeds, grid, images, npz, C)  # latents: samples.npz in any case
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if cfg_scale is not None and label_dim == 0:
        raise ValueError("cfg_scale needs a class-conditional network; this one is unconditional (label_dim=0)")
    if class_idx is not None and class_ids is not None:
        raise ValueError("give class_idx (one class for all) or class_ids (one per seed), not both")
    if (class_idx is not None or class_ids is not None) and label_dim == 0:
        raise ValueError("class labels given but the network is unconditional (label_dim=0)")
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError(f"class_idx must lie in 0..{label_dim - 1}, got {class_idx}")
    if class_ids is not None:
        class_ids = [int(c) for c in class_ids]
        if len(class_ids) != len(seeds):
            raise ValueError(f"class_ids has {len(class_ids)} entries but there are {len(seeds)} seeds")
        if any(not 0 <= c < label_dim for c in class_ids):
            raise ValueError(f"class_ids must lie in 0..{label_dim - 1}")
    # Value checks before any compute.
    beta = getattr(net, "process", "edm") == "beta"
    if num_steps is None:
        from .beta import DEFAULT_SAMPLE_STEPS
        num_steps = DEFAULT_SAMPLE_STEPS if beta else 18
    if beta and S_churn:
        raise ValueError(f"S_churn={S_churn}: churn is EDM's; a beta-diffusion network's sampler draws fresh noise "
                         f"every step already: drop it (S_churn=0)")
    one_step = getattr(net, "one_step_sigma", None)   # fastlego.distill's one-step generator
    if one_step is not None:
        _check_one_step(cfg_scale, t_break, S_churn)
        num_steps = 1   # one evaluation per image; the Heun schedule's settings do not apply
    if full_steps(num_steps, t_break) < num_steps:
        resolve_skip_stage(net, t_break, skip_stage_idx)
    edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    if precision in ("fp8", "fp8_fast", "fp8_emulated"):   # refused here, before any sampling, where FP8 cannot run
        from .fp8 import not_supported_reasons, quantize, refusal

        net = quantize(net, "fp8", emulate=precision == "fp8_emulated", fast_accumulation=precision == "fp8_fast")
        reasons = not_supported_reasons(net)
        if reasons:
            raise refusal(reasons + ["(sampling: precision='fp8_emulated', `--precision fp8_emulated`, is that "
                                     "emulation; precision='bf16' the unquantized model)"])

    # The batches one process would run, dealt out in turn: batch b goes to rank b % world.
    starts = list(range(0, len(seeds), batch_size))
    mine = starts[procs.rank::procs.world]
    if procs.main and len(starts) < procs.world:
        print(f"fastlego sample: {len(seeds)} seeds make {len(starts)} batch(es) of up to {batch_size} for "
              f"{procs.world} processes, so {procs.world - len(starts)} of them have nothing to do: pass a batch "
              f"size of at most {-(-len(seeds) // procs.world)} (--batch) to use them all", file=sys.stderr)
    if dev.type == "cuda":
        # Each matmul's path (fused Triton GEMM or cuBLAS), chosen once at the first batch's shape
        # before any timing or capture; a collective under torchrun (every rank reaches it).
        from .tuning import tune

        n0 = min(batch_size, len(seeds))
        with torch.no_grad(), _autocast(precision, dev, cuda_graph):
            tune(net, torch.zeros(n0, C, H, W, device=dev), torch.ones(n0, device=dev),
                 torch.zeros(n0, label_dim, device=dev) if label_dim else None, cfg_scale=cfg_scale)
    graph = CudaGraphDenoiser(net, cfg_scale if cfg_scale != 1.0 else None, fallback=graph_fallback) \
        if cuda_graph else None
    bar = ProgressBar(sum(len(seeds[s:s + batch_size]) for s in mine) * num_steps, "sample",
                      enabled=progress and procs.main, unit="step")
    outputs, all_labels = [], []
    seconds = 0.0
    for start in mine:
        batch_seeds = seeds[start:start + batch_size]
        rnd = StackedRandomGenerator(dev, batch_seeds)
        latents = None if beta else rnd.randn([len(batch_seeds), C, H, W])   # beta: its start is drawn later
        labels = ids = None
        if label_dim:
            # The random class is drawn even when a given class replaces it (as the release
            # does): each seed's churn noise then comes from the same place in its stream.
            ids = rnd.randint(label_dim)
            if class_idx is not None:
                ids = torch.full((len(batch_seeds),), class_idx, dtype=torch.long, device=dev)
            elif class_ids is not None:
                ids = torch.tensor(class_ids[start:start + batch_size], dtype=torch.long, device=dev)
            labels = torch.nn.functional.one_hot(ids, label_dim).to(torch.float32)
            all_labels.append(ids.cpu())
        denoiser = None
        if graph is not None:
            graph.set_labels(labels)
            denoiser = graph
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), _autocast(precision, dev, cuda_graph):
            if beta:   # fastlego.beta: the seed's generator draws the start and every step's noise
                from .beta import beta_sampler
                x = beta_sampler(net, (len(batch_seeds), C, H, W), labels, rnd, num_steps=num_steps,
                                 cfg_scale=cfg_scale, t_break=t_break, skip_stage_idx=skip_stage_idx,
                                 denoiser=denoiser, device=dev, progress=_Scaled(bar, len(batch_seeds)))
            elif one_step is not None:   # x = G(sigma_init z; sigma_init): one network evaluation
                from .distill import one_step_generate
                x = one_step_generate(net, latents, labels, denoiser=denoiser)
                bar.update(len(batch_seeds))
            else:
                x = edm_sampler(net, latents, labels, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                                rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                                cfg_scale=cfg_scale, t_break=t_break, skip_stage_idx=skip_stage_idx,
                                randn_like=rnd.randn_like, denoiser=denoiser, progress=_Scaled(bar, len(batch_seeds)))
        _sync(dev)
        seconds += time.perf_counter() - t0
        outputs.append(x.cpu())
    bar.close()

    my_seeds = [s for start in mine for s in seeds[start:start + batch_size]]
    graphed = graph is not None and graph.failed is None and bool(graph.graphs)
    empty = torch.empty(0, C, H, W)
    result = SampleResult(images=torch.cat(outputs) if outputs else empty, seeds=my_seeds,
                          labels=torch.cat(all_labels) if all_labels else None, seconds=seconds,
                          images_per_second=len(my_seeds) / max(seconds, 1e-9), rank=procs.rank, world=procs.world,
                          cuda_graph=graphed)
    if procs.world > 1:
        # Rank 0 puts the batches back in seed order; the sampling time is the slowest rank's.
        parts = procs.gather((mine, outputs, all_labels, seconds))
        if procs.main:
            by_start = {}
            for starts_r, outputs_r, labels_r, _ in parts:
                for i, start in enumerate(starts_r):
                    by_start[start] = (outputs_r[i], labels_r[i] if labels_r else None)
            ordered = [by_start[start] for start in starts]
            seconds = max(p[3] for p in parts)
            result = SampleResult(images=torch.cat([x for x, _ in ordered]), seeds=seeds,
                                  labels=torch.cat([y for _, y in ordered]) if label_dim else None, seconds=seconds,
                                  images_per_second=len(seeds) / max(seconds, 1e-9), rank=0, world=procs.world,
                                  cuda_graph=graphed)
    if outdir is not None and procs.main:
        result.files = write_samples(result, outdir, prefix=prefix, grid=grid, grid_columns=grid_columns,
                                     grid_pad=grid_pad, grid_scale=grid_scale, images=images, npz=npz,
                                     overwrite=overwrite)
    procs.barrier()  # every rank returns once the files exist
    return result


def _check_one_step(cfg_scale, t_break: float, S_churn: float) -> None:
    """Settings that a one-step generator (fastlego.distill) cannot take, refused before any compute."""
    if cfg_scale is not None and float(cfg_scale) != 1.0:
        raise ValueError(f"cfg_scale={cfg_scale}: this network is a one-step generator, whose guidance (if any) was "
                         f"fixed when it was distilled (fastlego distill --teacher-cfg): drop the guidance (--cfg)")
    if t_break < 1:
        raise ValueError(f"t_break={t_break}: a one-step generator makes each image in one evaluation of every brick, "
                         f"so there are no late steps to skip bricks on: drop --t-break")
    if S_churn:
        raise ValueError(f"S_churn={S_churn}: a one-step generator has no sampler steps to churn: drop --S-churn")


class _Scaled:
    """Progress in image-steps: one sampler step advances the bar by the batch size."""

    def __init__(self, bar: ProgressBar, k: int):
        self.bar, self.k = bar, k

    def update(self, n: int = 1):
        self.bar.update(n * self.k)


def planned_outputs(outdir: str, prefix: str, seeds: Sequence[int], grid: bool = True, images: bool = False,
                    npz: bool = False, channels: Optional[int] = None) -> List[str]:
    """The paths `write_samples` writes for these seeds and options (channels None: not known yet,
    taken as a picture network, 1 or 3 channels; other counts write only the .npz)."""
    pictures = channels is None or channels in (1, 3)
    paths = []
    if pictures and grid:
        paths.append(os.path.join(outdir, f"{prefix}grid.png"))
    if pictures and images:
        paths += [os.path.join(outdir, f"{prefix}images", f"{int(s):06d}.png") for s in seeds]
    if npz or not pictures:
        paths.append(os.path.join(outdir, f"{prefix}samples.npz"))
    return paths


def existing_outputs(outdir: str, prefix: str, seeds: Sequence[int], grid: bool = True, images: bool = False,
                     npz: bool = False, channels: Optional[int] = None) -> List[str]:
    """Those of `planned_outputs` that exist already (files a run would replace)."""
    if not os.path.isdir(outdir):
        return []
    listing: Dict[str, set] = {}  # one directory listing per folder instead of a stat per image
    clashes = []
    for path in planned_outputs(outdir, prefix, seeds, grid=grid, images=images, npz=npz, channels=channels):
        folder, name = os.path.split(path)
        if folder not in listing:
            listing[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if name in listing[folder]:
            clashes.append(path)
    return clashes


def refuse_overwrite(clashes: Sequence[str], outdir: str, what: str = "nothing was sampled") -> None:
    """Raise FileExistsError naming the files a run would replace (nothing when there are none)."""
    if not clashes:
        return
    shown = ", ".join(os.path.relpath(p, outdir) for p in clashes[:5])
    more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
    raise FileExistsError(f"{outdir} already holds {len(clashes)} of the files this run would write ({shown}{more}); "
                          f"{what}. Pass --overwrite (overwrite=True) to replace them, or choose "
                          f"another --outdir")


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez with fixed zip timestamps (np.savez stamps the current time, so the same arrays
    would give different bytes a second later), written to a temporary name and then renamed."""
    import zipfile

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_samples(result: SampleResult, outdir: str, prefix: str = "", grid: bool = True,
                  grid_columns: Optional[int] = None, grid_pad: int = 0, grid_scale: int = 1,
                  images: bool = False, npz: bool = False, overwrite: bool = False) -> Dict[str, object]:
    """Write a SampleResult's grid / per-image PNGs / npz; returns the paths written. Files that
    exist already are replaced only with overwrite=True (FileExistsError naming them otherwise).
    The bytes depend only on the images, seeds and labels (no timestamps)."""
    C = result.images.shape[1]
    if not overwrite:
        refuse_overwrite(existing_outputs(outdir, prefix, result.seeds, grid=grid, images=images, npz=npz,
                                          channels=C), outdir, "nothing was written")
    os.makedirs(outdir, exist_ok=True)
    files: Dict[str, object] = {}
    if C in (1, 3):
        u8 = float_to_uint8(result.images)
        if grid:
            path = os.path.join(outdir, f"{prefix}grid.png")
            g = make_grid(u8, grid_columns, pad=grid_pad, pad_value=128)
            if grid_scale > 1:  # nearest-neighbour enlargement, for small images
                g = g.repeat_interleave(grid_scale, 0).repeat_interleave(grid_scale, 1)
            write_png(path, g)
            files["grid"] = path
        if images:
            folder = os.path.join(outdir, f"{prefix}images")
            os.makedirs(folder, exist_ok=True)
            paths = []
            for seed, img in zip(result.seeds, u8):
                paths.append(os.path.join(folder, f"{seed:06d}.png"))
                write_png(paths[-1], img)
            files["images"] = paths
        if npz:
            path = os.path.join(outdir, f"{prefix}samples.npz")
            extra = {} if result.labels is None else {"labels": result.labels.numpy()}
            _save_npz(path, arr_0=u8.numpy(), seeds=np.asarray(result.seeds), **extra)
            files["npz"] = path
    else:
        # Latent-space samples (e.g. 4-channel Stable-Diffusion latents) need a VAE to become
        # pictures: keep the raw values for the decoder.
        path = os.path.join(outdir, f"{prefix}samples.npz")
        extra = {} if result.labels is None else {"labels": result.labels.numpy()}
        _save_npz(path, samples=result.images.numpy(), seeds=np.asarray(result.seeds), **extra)
        files["npz"] = path
        if grid or images:
            print(f"fastlego sample: the network makes {C}-channel samples (latents?); PNGs need 1 or 3 channels, "
                  f"so only {path} (raw float samples under 'samples') was written", file=sys.stderr)
    return files
