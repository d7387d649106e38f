"""EDM training of LEGO networks: `fastlego.training.train(...)` and `fastlego train`.

The objective is EDM's (Karras et al. 2022; `fastlego.loss.EDMLoss`): noise levels drawn
log-normally and a per-level weight that makes the raw backbone's target unit-variance.
With `intermediate=True` (the release's choice) every brick's output is a denoiser of its own
(`train_intermediate_stages`) and the loss is the average over bricks; that is what makes
stopping early at sampling time (brick skipping) give sensible images. `process="beta"`
(`fastlego train --process beta`) trains with beta diffusion's KLUB instead (`fastlego.beta`),
in the same loop: checkpoints, resume, DDP and CUDA graphs alike. `patch_diffusion=True`
(`fastlego train --patch-diffusion`) trains on random crops of res/4, res/2 or res that carry
their pixels' coordinates in the full image, with a batch 4x / 2x / 1x as large, running only the
bricks whose regions tile the crop (`fastlego.patch_diffusion` says which, and how images are
counted); sampling is unchanged.

Reproducibility: every random draw of a step (sigmas, noise, label dropout) comes from one
generator that all ranks advance identically over the whole global batch, each rank keeping its
slice, and the data order is a pure function of (seed, step) (`fastlego.data.DataOrder`). So
N processes with batch B/N compute exactly what one process with batch B computes, and a run
resumed from a checkpoint takes the same next steps as one that never stopped.

This module holds the settings (`TrainConfig`), the result (`TrainResult`) and the loop
(`train`); the parts of a run live in modules of their own:

    fastlego.networks             the network to train, as a plain dict (network_spec, build_network)
    fastlego.loss                 EDM's loss (EDMLoss)
    fastlego.beta                 beta diffusion: its loss (BetaLoss), network wrapper and sampler
    fastlego.patch_diffusion      Patch Diffusion: crop sizes, crops and their coordinates, bricks per crop size
    fastlego.train_step           one step, eager or replayed as a CUDA graph (TrainStep, adamw)
    fastlego.ema                  the EMA of the weights (ema_beta, update_ema)
    fastlego.training_checkpoint  checkpoint.pt: atomic writes, loading, RNG states
    fastlego.run_folder           the run's outdir and the rules for reusing one
    fastlego.distributed          torchrun's processes (setup_distributed)
    fastlego.progress             the progress bar

Every name this module offered before those modules existed is still importable from it.
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
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import DistributedContext, setup_distributed
from .edm import EDMPrecond
from .ema import ema_beta, update_ema
from .beta import BetaLoss, data_mean as beta_data_mean
from .loss import EDMLoss
from .networks import DEMO_BRICKS, build_network, network_spec, parse_bricks
from .patch_diffusion import (PatchSchedule, batches_consumed, check_patch_training, crop_coordinates, crop_images,
                              describe_bricks_per_crop_size, draw_offsets, step_indices)
from .presets import get_preset
from .progress import ProgressBar
from .run_folder import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, RunPlan, plan_run, start_metrics
from .train_step import TrainStep, adamw, make_capturable, set_lr
from .training_checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save,
                                  global_rng_states_of_ranks, load_training_checkpoint, set_global_rng_state)
from .tuning import tune

# Re-exported: names fastlego.training offered before its parts moved to the modules above.
from .networks import SPEC_DEFAULTS, _stack_from_dict, parse_brick_type, spec_from_network  # noqa: F401
from .run_folder import RUN_FILES, RunFolderInUse, existing_run_files  # noqa: F401
from .training_checkpoint import (check_training_checkpoint, global_rng_state, is_training_checkpoint,  # noqa: F401
                                  network_from_checkpoint)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every setting of a training run (saved in the checkpoint and in outdir/config.json)."""

    data: str = "digits"                 # a folder, an EDM-style zip, or "digits" (bundled)
    outdir: str = "fastlego-run"         # refused when it holds another run, unless resume/overwrite say what to do
    resolution: Optional[int] = None     # default: 16 for digits, else the first image's size
    preset: Optional[str] = None         # a name from fastlego.PRESETS ...
    bricks: Optional[str] = None         # ... or REGION:TYPE:DEPTH,... with TYPE a brick name or wWIDTHpPATCHhHEADS
                                         # (default DEMO_BRICKS)
    use_labels: bool = True              # condition on the dataset's labels when it has them
    xflip: bool = False                  # random horizontal flips
    max_images: Optional[int] = None
    batch_size: int = 64                 # global batch, split evenly over the processes
    steps: Optional[int] = 1000          # total step target (a resumed run counts its earlier steps);
                                         # None: no step target, train for max_seconds
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
    overwrite: bool = False              # replace the run already in outdir (fresh metrics, old checkpoint removed)
    workers: int = 0                     # DataLoader processes for image files
    device: Optional[str] = None         # default: cuda:LOCAL_RANK when there is a GPU, else cpu
    backend: Optional[str] = None        # fastlego dispatch mode (default: auto)
    progress: bool = True
    threads: Optional[int] = None        # torch CPU threads
    activation_checkpointing: Optional[str] = None  # None, "brick" or "block": recompute to save memory
    checkpoint_blocks: Optional[int] = None  # with "block": only the first N DiT blocks (None: all)
    deterministic: bool = False          # bitwise-reproducible gradients (fastlego.set_deterministic)
    cuda_graph: Optional[bool] = None    # replay the whole step as a CUDA graph (None: on for one CUDA process)
    process: str = "edm"                 # "edm", or "beta": beta diffusion's KLUB (fastlego.beta)
    patch_diffusion: bool = False        # train on random crops with global coordinates (fastlego.patch_diffusion;
                                         # its images load in the training process: `workers` is not used)
    real_p: float = 0.5                  # with patch_diffusion: probability of a full-size step
    progressive: bool = False            # with patch_diffusion: res/4, then res/2, then full images by progress

    def validate(self) -> None:
        """Clear errors for bad values, before any work."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.steps is None or self.steps >= 0, f"steps must be >= 0 or None, got {self.steps}")
        need(self.steps is not None or self.max_seconds is not None,
             "steps=None (no step target) needs max_seconds, the time budget")
        need(not (self.overwrite and self.resume == "auto"),
             "overwrite=True starts afresh and resume='auto' continues the run in outdir: pass one of them "
             "(--overwrite or --resume auto)")
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
        need(self.process in ("edm", "beta"), f"process must be 'edm' or 'beta' (beta diffusion), got {self.process!r}")
        need(isinstance(self.real_p, (int, float)) and not isinstance(self.real_p, bool) and 0 <= self.real_p <= 1,
             f"real_p is the probability of a full-size image and must lie in [0, 1], got {self.real_p!r}")
        need(self.patch_diffusion or (not self.progressive and self.real_p == 0.5),
             "real_p and progressive set how patch diffusion draws its crops: they need patch_diffusion=True "
             "(--patch-diffusion)")
        need(not (self.patch_diffusion and self.process != "edm"),
             f"patch_diffusion trains with EDM's loss on the crops; process={self.process!r} is not supported with "
             f"it: drop --patch-diffusion or use --process edm")
        if self.preset is not None:
            get_preset(self.preset)
        if self.bricks is not None:
            parse_bricks(self.bricks)
        if self.resolution is not None:
            need(self.resolution >= 1, f"resolution must be positive, got {self.resolution}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a `train` call did. `step` counts every step of the run (a resumed run's earlier
    steps included), `steps_run` the steps this call made, from `start_step` to `step`.

    `last_loss` is THE loss to report for a run: the mean training loss over the last logged
    window (the steps since the log before it: `log_every` steps, or fewer at the end), as the
    last line of metrics.jsonl holds it. One step's loss is noisy (each step draws its own noise
    levels); NaN when this call ran no step."""

    outdir: str
    checkpoint: Optional[str]
    step: int                      # steps done in total (resumed runs included)
    nimg: int
    losses: List[float]            # global mean loss of each step this call ran
    seconds: float
    images_per_second: float
    network: Optional[EDMPrecond] = None   # the EMA network (eval mode), on rank 0
    cuda_graph: bool = False               # whether the steps were replayed as a CUDA graph
    steps_run: int = 0                     # steps this call made
    last_loss: float = float("nan")        # mean loss over the last logged window (see above)

    @property
    def start_step(self) -> int:
        """The step this call started from (0, or the resumed checkpoint's)."""
        return self.step - self.steps_run


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


def _stage(dataset, device: torch.device):
    """The dataset, staged on a CUDA `device` when it is held in memory (the digits) and takes at
    most an eighth of the device's memory: each step's batch is then one gather on the device,
    with no copy from the host and nothing for the host to wait on. Otherwise as it is."""
    if device.type == "cuda" and dataset.in_memory and \
            dataset.nbytes <= torch.cuda.get_device_properties(device).total_memory // 8:
        return dataset.to_device(device)
    return dataset


def _describe_target(start: int, steps: Optional[int], max_seconds: Optional[float]) -> str:
    """The run's target for its header line: the step target when there is one, else (or also) the time budget."""
    budget = None
    if max_seconds is not None:
        budget = f"{max_seconds / 60:.1f} min" if max_seconds >= 60 else f"{max_seconds:.0f} s"
    if steps is None:
        return f"for {budget} from step {start}"
    if budget is None:
        return f"steps {start}->{steps}"
    return f"steps {start}->{steps} or {budget}, whichever comes first"


def train(config: Optional[TrainConfig] = None, **overrides) -> TrainResult:
    """Train a LEGO network with EDM's loss; see `TrainConfig` for the settings.

    Under `torchrun --nproc_per_node N`, each process takes `batch_size / N` images of every
    step and DDP averages the gradients. Writes `outdir/checkpoint.pt` (atomically, every
    `checkpoint_every` steps and at the end), `outdir/metrics.jsonl` and `outdir/config.json`.

    A run never overwrites another: an `outdir` that already holds a run is refused before any
    work unless `resume="auto"` (continue it: its metrics are kept) or `overwrite=True` (replace
    it: metrics start empty, its checkpoint is removed)."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    cfg.validate()
    plan = plan_run(cfg)   # every rank decides before any rank writes (see the barrier below)
    from .data import DataOrder, ImageDataset, images_to_float, step_batches

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dctx = setup_distributed(cfg.device)
    try:
        if dctx.world > 1:
            dist.barrier()  # no rank writes into outdir before every rank has checked it
        if cfg.batch_size % dctx.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes "
                             f"{dctx.world}: pass e.g. --batch {cfg.batch_size - cfg.batch_size % dctx.world or dctx.world}")
        from .dispatch import deterministic, use_backend
        backend = use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
        determinism = deterministic() if cfg.deterministic else contextlib.nullcontext()
        with backend, determinism:
            result = _train(cfg, dctx, plan, DataOrder, ImageDataset, images_to_float, step_batches)
        if dctx.world > 1:
            dist.barrier()   # every rank is through its last collective before any tears the group down
        return result
    finally:
        if dctx.created_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, dctx: DistributedContext, plan: RunPlan, DataOrder, ImageDataset, images_to_float,
           step_batches) -> TrainResult:
    from .data import to_device_async
    device = dctx.device
    resume_path = plan.resume_path
    ckpt = load_training_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        old = ckpt["config"]
        for key in ("batch_size", "seed", "data", "xflip"):
            if old.get(key) != getattr(cfg, key):
                raise ValueError(f"cannot resume {resume_path}: it was trained with {key}={old.get(key)!r} but this run "
                                 f"has {key}={getattr(cfg, key)!r}; pass the same value to continue exactly")
        trained = ckpt["network"].get("process", "edm")
        if trained != cfg.process:
            raise ValueError(f"cannot resume {resume_path}: it trains with process={trained!r} but this run has "
                             f"process={cfg.process!r}; pass --process {trained} to continue it")
        patch_then = {k: old.get(k, d) for k, d in (("patch_diffusion", False), ("real_p", 0.5), ("progressive", False))}
        patch_now = {k: getattr(cfg, k) for k in patch_then}
        if patch_then != patch_now:
            flags = (f"--patch-diffusion --real-p {patch_then['real_p']}" + (" --progressive" if patch_then["progressive"]
                                                                            else "")) \
                if patch_then["patch_diffusion"] else "no --patch-diffusion"
            raise ValueError(f"cannot resume {resume_path}: it was trained with {patch_then} but this run has "
                             f"{patch_now}; pass {flags} to continue it exactly")

    # Data.
    dataset = _stage(ImageDataset(cfg.data, resolution=cfg.resolution, use_labels=cfg.use_labels,
                                  max_images=cfg.max_images), device)
    order = DataOrder(len(dataset), cfg.batch_size, seed=cfg.seed, xflip=cfg.xflip)

    # Network: the checkpoint's, else a fresh one from the config (default: the demo stack).
    if ckpt is not None:
        spec = ckpt["network"]
        if spec["img_resolution"] != dataset.resolution or spec["img_channels"] != dataset.channels:
            raise ValueError(f"cannot resume: the checkpoint's network takes {spec['img_channels']}x{spec['img_resolution']}"
                             f"^2 images but the data are {dataset.channels}x{dataset.resolution}^2")
    else:
        bricks = cfg.bricks if cfg.preset is None and cfg.bricks is not None else (None if cfg.preset else DEMO_BRICKS)
        process = {"sigma_data": cfg.sigma_data} if cfg.process == "edm" else \
            {"process": "beta", "beta": {"data_mean": beta_data_mean(dataset)}}
        spec = network_spec(dataset.resolution, dataset.channels, dataset.label_dim, preset=cfg.preset, bricks=bricks,
                            intermediate=cfg.intermediate, class_dropout_prob=cfg.class_dropout, **process)
    # Patch Diffusion: which crop size each step trains and which bricks run on it (refused here,
    # before any work, when a crop size could train no brick).
    regions = list(get_preset(spec["preset"]).regions) if spec.get("preset") else list(spec["bricks"]["img_resolution"])
    patch = PatchSchedule(dataset.resolution, cfg.real_p, cfg.progressive, cfg.seed) if cfg.patch_diffusion else None
    crop_bricks = check_patch_training(regions, dataset.resolution, cfg.real_p, cfg.progressive,
                                       spec["train_intermediate_stages"]) if patch else {}
    # crop size -> the last brick a step of that size runs (sizes that run every brick are absent)
    stage_of = {size: run[-1] for size, run in crop_bricks.items() if len(run) < len(regions)}
    patch_gen = patch.generator() if patch else None
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
        if patch_gen is not None and "patch_generator" in ckpt["rng"]:
            patch_gen.set_state(ckpt["rng"]["patch_generator"].to("cpu"))
        per_rank = ckpt["rng"]["per_rank"]
        set_global_rng_state(per_rank[dctx.rank] if len(per_rank) == dctx.world else per_rank[0])
        del ckpt
    else:
        random.seed(cfg.seed + dctx.rank)
        np.random.seed((cfg.seed + dctx.rank) % 2 ** 32)
        torch.manual_seed(cfg.seed + 1000 + dctx.rank)

    model = net
    if dctx.world > 1:
        # a crop that runs a prefix of the bricks leaves the others without gradients that step
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=bool(stage_of))
    graphed = _use_cuda_graph(cfg.cuda_graph, device, dctx.world)
    make_capturable(opt, graphed, device)

    beta = spec.get("process", "edm") == "beta"
    loss_fn = BetaLoss.from_options(spec["beta"]) if beta else EDMLoss(cfg.P_mean, cfg.P_std, cfg.sigma_data)
    total_steps = cfg.steps if cfg.steps is not None else sys.maxsize   # None: until max_seconds
    per_rank = cfg.batch_size // dctx.world
    lo, hi = dctx.rank * per_rank, (dctx.rank + 1) * per_rank
    C, R = dataset.channels, dataset.resolution
    label_dim = dataset.label_dim

    if dctx.main:
        os.makedirs(cfg.outdir, exist_ok=True)
        start_metrics(cfg, plan, step)
        with open(os.path.join(cfg.outdir, CONFIG_NAME), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "network": spec, "world_size": dctx.world,
                       "dataset": dataset.describe()}, f, indent=2)
    metrics_path = os.path.join(cfg.outdir, METRICS_NAME)
    ckpt_path = os.path.join(cfg.outdir, CHECKPOINT_NAME)
    bar = ProgressBar(cfg.steps or 0, "train", enabled=cfg.progress and dctx.main, initial=step, seconds=cfg.max_seconds)
    if dctx.main and cfg.progress:
        n_params = sum(p.numel() for p in params)
        print(f"fastlego train: {dataset.describe()}; network {net.model_type} ({n_params / 1e6:.2f}M parameters), "
              f"{dctx.world} process(es) on {device}, batch {cfg.batch_size}, "
              f"{_describe_target(step, cfg.steps, cfg.max_seconds)}", file=sys.stderr)
        if patch is not None:
            how = "progressive schedule" if cfg.progressive else f"real_p {cfg.real_p}"
            graphs = "; CUDA graphs: one per crop size" if graphed else ""
            print(f"patch diffusion ({how}): {describe_bricks_per_crop_size(regions, R, cfg.real_p, cfg.progressive)}"
                  f"{graphs}", file=sys.stderr)

    def save(at_step: int, at_nimg: int) -> None:
        states = global_rng_states_of_ranks(dctx.world)
        if dctx.main:
            atomic_save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "network": spec, "model": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "step": at_step, "nimg": at_nimg,
                "config": dataclasses.asdict(cfg), "world_size": dctx.world,
                "rng": {"train_generator": gen.get_state(), "per_rank": states,
                        **({"patch_generator": patch_gen.get_state()} if patch_gen is not None else {})},
                "data": {"num_images": len(dataset), "batch_size": cfg.batch_size, "seed": cfg.seed,
                         "next_position": at_nimg if patch is not None else at_step * cfg.batch_size,
                         "xflip": cfg.xflip},
            }, ckpt_path)
        if dctx.world > 1:
            dist.barrier()

    loss_columns = len(regions) if spec["train_intermediate_stages"] else 1

    def net_kwargs(y, drop_ids, coords) -> dict:
        """The network's keyword arguments for a step on images y: label dropout, and for a crop its
        coordinates and the last brick that tiles it (`return_stage_idx`)."""
        kwargs = {} if drop_ids is None else {"force_drop_ids": drop_ids}
        if coords is not None:
            kwargs["coords"] = coords
        stage = stage_of.get(y.shape[-1])
        if stage is not None:
            kwargs["return_stage_idx"] = stage
        return kwargs

    def body(y, sigma, noise, labels, drop_ids, coords):
        """Forward, loss, backward, gradient guard and clip, optimizer step -> [loss, brick losses...]
        (NaN for the bricks a crop did not run)."""
        kwargs = net_kwargs(y, drop_ids, coords)
        with _autocast(cfg.precision, device, cache=not graphed):
            loss, per_brick = loss_fn(model, y, sigma, noise, labels, **kwargs)
        loss.backward()
        for p in params:  # EDM's guard: a NaN/inf gradient entry becomes 0 rather than poisoning the weights
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if patch is not None and len(per_brick) < loss_columns:
            per_brick = per_brick + [torch.full_like(loss.detach(), float("nan"))] * (loss_columns - len(per_brick))
        return torch.stack([loss.detach()] + per_brick)

    # One step object per image size: plain training has one; patch training one per crop size,
    # so that each replays its own CUDA graph (the shapes differ between crop sizes).
    train_steps = {}
    tuned = set()                              # image sizes `tune` has seen (CUDA)
    pending: List[torch.Tensor] = []           # per-step [loss, brick losses...] on the device
    history: List[float] = []
    last_loss = float("nan")                   # mean loss of the last logged window
    t_start = time.perf_counter()
    t_log, n_log = t_start, 0
    steps_run = images_run = 0
    elapsed_s = 0.0                            # training time after the last step (rank 0's clock)
    crop_counts = {}                           # crop size -> steps in the current log window
    last_saved = step

    def progress(s: int) -> float:
        """How far training is at step s (0..1), for the progressive schedule: step / steps, and
        with a time budget the time spent / max_seconds (the larger of the two)."""
        frac = s / cfg.steps if cfg.steps else 0.0
        return max(frac, elapsed_s / cfg.max_seconds) if cfg.max_seconds else frac

    def patch_batches(start_step: int, start_nimg: int):
        """(step, images, labels, flips, crop size) of this rank: each step draws its crop size,
        then takes that many batches (multiplier) of the data order, in order."""
        first = batches_consumed(start_nimg, cfg.batch_size)
        for s in range(start_step, total_steps):
            size = patch.draw(patch_gen, progress(s))
            m = patch.multiplier(size)
            idx, flips = step_indices(order, first, m, dctx.rank, dctx.world)
            first += m
            images, labels = dataset.batch(idx)
            yield s, images, labels, flips, size

    batches = ((s, im, lb, fl, R) for s, im, lb, fl in
               step_batches(dataset, order, step, total_steps, dctx.rank, dctx.world, cfg.workers,
                            pin_memory=device.type == "cuda")) \
        if patch is None else patch_batches(step, nimg)
    for step, images_u8, labels, flips, size in batches:
        # Random draws for the whole global batch (batch_size x the crop's multiplier images);
        # this rank keeps its slice: offsets (crops only), then sigmas, noise and label dropout.
        m = 1 if patch is None else patch.multiplier(size)
        B = cfg.batch_size * m
        glo, ghi = lo * m, hi * m
        offsets = None
        if beta:  # times, and one seed per image for its forward draw (the same draws at any world size)
            uniform = torch.rand(B, generator=gen, device=device)
            image_seeds = torch.randint(2 ** 62, (B,), generator=gen, device=device)
        else:
            if size < R:
                offsets = draw_offsets(B, size, R, gen, device)
            normal = torch.randn(B, generator=gen, device=device)
            noise = torch.randn(B, C, size, size, generator=gen, device=device)
        drop = torch.rand(B, generator=gen, device=device) < cfg.class_dropout
        y = images_to_float(to_device_async(images_u8, device), flips)
        coords = None
        if offsets is not None:   # each image's crop, and its pixels' coordinates in the full image
            y = crop_images(y, offsets[glo:ghi], size)
            coords = crop_coordinates(offsets[glo:ghi], size, R, device)
        if beta:
            sigma = loss_fn.time(uniform[lo:hi])   # t; the "noise" is the forward sample, logit z_t
            noise = torch.zeros(B, C, R, R, device=device)
            noise[lo:hi] = loss_fn.forward(y, sigma, [torch.Generator(device).manual_seed(int(s))
                                                      for s in image_seeds[lo:hi].tolist()])
        else:
            sigma = loss_fn.sigma(normal[glo:ghi])
        labels = to_device_async(labels, device) if label_dim else None
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        set_lr(opt, lr)
        drop_ids = drop[glo:ghi].long().reshape(-1, 1) if label_dim else None
        if size not in tuned and device.type == "cuda":
            # Choose each matmul's path (fused Triton GEMM or cuBLAS) once per image size, before
            # its first step and any CUDA-graph capture: a collective under DDP (every rank draws the
            # same crop size, so all call it together), every rank runs rank 0's choices.
            with _autocast(cfg.precision, device, cache=not graphed):
                tune(loss_fn, net, y, sigma, noise[glo:ghi], labels, **net_kwargs(y, drop_ids, coords))
        tuned.add(size)
        if size not in train_steps:
            train_steps[size] = TrainStep(body, opt, cuda_graph=graphed)
        losses = train_steps[size](y, sigma, noise[glo:ghi], labels, drop_ids, coords)
        nimg += B                 # images drawn: batch_size x the crop's multiplier
        update_ema(ema, net, ema_beta(B, nimg, cfg.ema_halflife_kimg, cfg.ema_rampup))
        pending.append(losses.clone())
        step += 1
        steps_run += 1
        n_log += B
        images_run += B
        crop_counts[size] = crop_counts.get(size, 0) + 1

        stop = False
        if cfg.max_seconds is not None:
            elapsed_s = time.perf_counter() - t_start   # the host's clock: no device sync in one process
            if dctx.world > 1:  # every rank must stop at the same step: rank 0's clock decides
                elapsed = torch.tensor([elapsed_s], dtype=torch.float64, device=device)   # NCCL: on the GPU
                dist.broadcast(elapsed, 0)
                elapsed_s = elapsed.item()
            stop = elapsed_s >= cfg.max_seconds
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
            if patch is not None:   # a brick's loss over the steps that ran it (None: no step did)
                mean[1:] = rows[:, 1:].nanmean(0)
            last_loss = float(mean[0])
            bar.update(len(rows), loss=float(mean[0]), img_s=f"{ips:.1f}")
            if dctx.main:
                record = {"step": step, "kimg": nimg / 1000, "loss": float(mean[0]),
                          "loss_per_brick": [float(v) for v in mean[1:]], "lr": lr, "images_per_s": ips,
                          "seconds": now - t_start, "world_size": dctx.world}
                if patch is not None:
                    record["loss_per_brick"] = [None if math.isnan(v) else v for v in record["loss_per_brick"]]
                    record["crop_steps"] = {str(k): v for k, v in sorted(crop_counts.items())}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            crop_counts.clear()
        if step % cfg.checkpoint_every == 0 or last:
            save(step, nimg)
            last_saved = step
        if stop:
            break
    if last_saved != step or (steps_run == 0 and not os.path.exists(ckpt_path)):
        save(step, nimg)
    bar.close()
    seconds = time.perf_counter() - t_start
    ips = images_run / max(seconds, 1e-9)
    return TrainResult(outdir=cfg.outdir, checkpoint=ckpt_path, step=step, nimg=nimg, losses=history,
                       seconds=seconds, images_per_second=ips, network=ema if dctx.main else None,
                       cuda_graph=any(ts.captured for ts in train_steps.values()), steps_run=steps_run,
                       last_loss=last_loss)
