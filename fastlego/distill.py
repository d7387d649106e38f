"""One-step generation: Score identity Distillation (SiD) of a LEGO teacher, `fastlego distill`.

SiD (Zhou et al., ICML 2024, "Score identity Distillation: Exponentially Fast Distillation of
Pretrained Diffusion Models for One-Step Generation") turns an EDM-preconditioned diffusion model
(the teacher f_phi, frozen) into a generator G_theta that draws an image in ONE network
evaluation, without any training data. Two networks learn, both starting as copies of the
teacher's weights:

- the generator: `x_g = G_theta(sigma_init z; sigma_init)`, z ~ N(0, I), sigma_init = 2.5: the
  denoiser's output at sigma_init is the image (`one_step_generate`);
- the fake score f_psi: a denoiser of the generator's own distribution, trained with EDM's loss
  on the generator's (detached) samples: sigma = exp(P_mean + P_std u), u ~ N(0, 1), weight
  `lambda = (sigma^2 + s_d^2) / (sigma s_d)^2`, target x_g (`SiDLoss.fake_score_loss`).

The generator's loss compares the teacher's and the fake score's denoisers at a noisy copy of
its samples (`SiDLoss.generator_loss`): t ~ U(0, tmax / 1000), sigma = (sigma_max^(1/rho) +
(1 - t) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, y_t = x_g + sigma n,
y_real = f_phi(y_t; sigma), y_fake = f_psi(y_t; sigma), and per image

    loss = sum over pixels of (y_real - y_fake) ((y_real - x_g) - alpha (y_real - y_fake)) / w,
    w = mean over pixels of |x_g - y_real| (no gradient), clipped at 1e-5,

scaled by `loss_scale / batch`. Gradients reach theta through x_g only, also through both
networks' inputs (the teacher's backward with respect to its input runs on the fused kernels'
backward on a GPU); neither network's weights change in this step. At the data distribution the
fake score equals the teacher and the gradient vanishes. One fake-score step and one generator
step alternate, each on fresh noise and labels; Adam with betas (0, 0.999), eps 1e-8; an EMA of
the generator is what samples. Label dropout as in the teacher's training: a dropped image is
drawn, scored and judged without its label by all three networks alike. Samples (or network
outputs) that are not finite are left out of the losses and counted.

LEGO networks trained with intermediate stages return one output per brick in train mode; the
distillation uses the last brick's output only.

`distill(...)` / `fastlego distill --teacher CKPT --outdir DIR` runs on `fastlego train`'s
machinery: DDP through torchrun (every random draw from one generator, each rank keeping its
slice of the global batch), atomic checkpoints that resume to the same next steps, a progress
bar, a JSONL log, the whole step (both halves) replayed as one CUDA graph where it captures.
Its checkpoint.pt (format `DISTILL_FORMAT`) holds the generator, its EMA, the fake score, both
optimizers and the RNG states; `fastlego sample --network DIR/checkpoint.pt` and `fastlego eval`
detect the one-step generator in it (`load_network` gives an EDMPrecond with
`one_step_sigma` set) and draw each image in one evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import DistributedContext, setup_distributed
from .edm import EDMPrecond
from .ema import ema_beta, update_ema
from .networks import build_network, spec_from_network
from .progress import ProgressBar
from .run_folder import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, RunPlan, plan_run, start_metrics
from .train_step import TrainStep, adamw, make_capturable, set_lr
from .training import _autocast, _describe_target, _use_cuda_graph
from .training_checkpoint import atomic_save, global_rng_states_of_ranks, set_global_rng_state

DISTILL_FORMAT = "fastlego-distill-checkpoint"
DISTILL_VERSION = 1
# The attribute that marks an EDMPrecond as a one-step generator: its value is sigma_init.
ONE_STEP_ATTR = "one_step_sigma"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class DistillConfig:
    """Every setting of a SiD distillation run (saved in the checkpoint and in outdir/config.json)."""

    teacher: Optional[str] = None        # the teacher: a fastlego training checkpoint, a release .pkl or .safetensors
    which: str = "ema"                   # the teacher checkpoint's weights: ema or model
    outdir: str = "fastlego-distill"     # refused when it holds another run, unless resume/overwrite say what to do
    batch_size: int = 64                 # global batch of each half-step, split evenly over the processes
    steps: Optional[int] = 1000          # total step target (one fake-score + one generator update each);
                                         # None: no step target, run for max_seconds
    max_seconds: Optional[float] = None  # also stop after this much time
    lr: float = 1e-5                     # the generator's Adam rate (the paper's; 4e-6 at ImageNet scale)
    fake_lr: Optional[float] = None      # the fake score's rate (None: lr)
    betas: Sequence[float] = (0.0, 0.999)
    eps: float = 1e-8
    alpha: float = 1.2                   # SiD's alpha
    tmax: float = 800.0                  # generator-step noise: t ~ U(0, tmax / 1000)
    sigma_init: float = 2.5              # the generator's input noise level
    loss_scale: float = 100.0            # the generator loss's scale (over the batch)
    fake_loss_scale: float = 1.0         # the fake-score loss's scale (over the batch)
    sigma_min: float = 0.002             # the generator step's sigma schedule (EDM's)
    sigma_max: float = 80.0
    rho: float = 7.0
    P_mean: float = -1.2                 # the fake-score step's log-normal sigmas (EDM's)
    P_std: float = 1.2
    teacher_cfg: Optional[float] = None  # distill the teacher's guided denoiser, uncond + w (cond - uncond)
    class_dropout: Optional[float] = None  # label dropout (None: the teacher's class_dropout_prob)
    ema_halflife_kimg: float = 500.0     # the generator EMA's half-life, in thousands of images
    ema_rampup: Optional[float] = 0.05   # half-life <= rampup * images seen so far (None: off)
    grad_clip: Optional[float] = None    # max global gradient norm of each network (None: off)
    precision: str = "auto"              # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    seed: int = 0
    checkpoint_every: int = 500          # steps; also at the end
    log_every: int = 50
    resume: Optional[str] = None         # a checkpoint path, or "auto": outdir/checkpoint.pt if there
    overwrite: bool = False              # replace the run already in outdir
    device: Optional[str] = None         # default: cuda:LOCAL_RANK when there is a GPU, else cpu
    backend: Optional[str] = None        # fastlego dispatch mode (default: auto)
    progress: bool = True
    threads: Optional[int] = None        # torch CPU threads
    activation_checkpointing: Optional[str] = None  # None, "brick" or "block", on all three networks
    checkpoint_blocks: Optional[int] = None
    deterministic: bool = False          # bitwise-reproducible gradients (fastlego.set_deterministic)
    cuda_graph: Optional[bool] = None    # replay the whole step as a CUDA graph (None: on for one CUDA process)

    def validate(self) -> None:
        """Clear errors for bad values, before any work."""
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(bool(self.teacher), "distillation needs a teacher: pass --teacher CKPT (a fastlego training checkpoint, "
                                 "a release .pkl or a .safetensors file)")
        need(self.which in ("ema", "model"), f"which must be 'ema' or 'model', got {self.which!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.steps is None or self.steps >= 0, f"steps must be >= 0 or None, got {self.steps}")
        need(self.steps is not None or self.max_seconds is not None,
             "steps=None (no step target) needs max_seconds, the time budget")
        need(not (self.overwrite and self.resume == "auto"),
             "overwrite=True starts afresh and resume='auto' continues the run in outdir: pass one of them "
             "(--overwrite or --resume auto)")
        for name in ("lr", "eps", "sigma_init", "loss_scale", "fake_loss_scale", "sigma_min", "sigma_max", "rho",
                     "P_std"):
            value = getattr(self, name)
            need(value > 0 and math.isfinite(value), f"{name} must be a positive number, got {value}")
        need(self.fake_lr is None or (self.fake_lr > 0 and math.isfinite(self.fake_lr)),
             f"fake_lr must be a positive number or None, got {self.fake_lr}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), "
                                                                           f"got {tuple(self.betas)}")
        need(math.isfinite(self.alpha), f"alpha must be finite, got {self.alpha}")
        need(0 < self.tmax <= 1000, f"tmax must lie in (0, 1000] (t ~ U(0, tmax/1000)), got {self.tmax}")
        need(self.sigma_min < self.sigma_max, f"need sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        need(self.teacher_cfg is None or (self.teacher_cfg >= 0 and math.isfinite(self.teacher_cfg)),
             f"teacher_cfg must be >= 0 or None, got {self.teacher_cfg}")
        need(self.class_dropout is None or 0 <= self.class_dropout < 1,
             f"class_dropout must lie in [0, 1) or be None (the teacher's), got {self.class_dropout}")
        need(self.ema_halflife_kimg >= 0, f"ema_halflife_kimg must be >= 0, got {self.ema_halflife_kimg}")
        need(self.ema_rampup is None or self.ema_rampup > 0, f"ema_rampup must be > 0 or None, got {self.ema_rampup}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip}")
        need(self.precision in ("auto", "fp32", "bf16"),
             f"precision must be auto, fp32 or bf16, got {self.precision!r} (fp16 needs loss scaling; use bf16)")
        need(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")
        need(self.max_seconds is None or self.max_seconds > 0, f"max_seconds must be > 0, got {self.max_seconds}")
        need(self.activation_checkpointing in (None, "brick", "block"),
             f"activation_checkpointing must be None, 'brick' or 'block', got {self.activation_checkpointing!r}")
        need(self.checkpoint_blocks is None
             or (self.activation_checkpointing == "block" and self.checkpoint_blocks >= 0),
             f"checkpoint_blocks={self.checkpoint_blocks!r} needs activation_checkpointing='block' and a count >= 0")


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------

def _last(out):
    """A LEGO trained with intermediate stages returns one output per brick in train mode: the last."""
    return out[-1] if isinstance(out, (list, tuple)) else out


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: whether every value of image i is finite (no host sync)."""
    return torch.isfinite(x.detach()).flatten(1).all(1)


def denoise(net, x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None,
            drop_ids: Optional[torch.Tensor] = None, cfg_scale: Optional[float] = None) -> torch.Tensor:
    """`net`'s denoiser D(x; sigma) (the last brick's output), with the labels of `drop_ids == 1`
    dropped; with `cfg_scale` the guided one, uncond + w (cond - uncond) (a dropped image gets
    the unconditional denoiser)."""
    if cfg_scale is not None:
        if labels is not None and drop_ids is not None:
            labels = labels * (1 - drop_ids.reshape(-1, 1).to(labels.dtype))
        return _last(net(x, sigma, labels, cfg_scale=cfg_scale))
    kwargs = {} if drop_ids is None else {"force_drop_ids": drop_ids}
    return _last(net(x, sigma, labels, **kwargs))


@dataclass(frozen=True)
class SiDLoss:
    """SiD's two losses and their noise levels (see the module docstring for the formulas)."""

    alpha: float = 1.2
    tmax: float = 800.0
    sigma_init: float = 2.5
    loss_scale: float = 100.0
    fake_loss_scale: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    teacher_cfg: Optional[float] = None

    @classmethod
    def from_config(cls, cfg: DistillConfig, sigma_data: float) -> "SiDLoss":
        return cls(alpha=cfg.alpha, tmax=cfg.tmax, sigma_init=cfg.sigma_init, loss_scale=cfg.loss_scale,
                   fake_loss_scale=cfg.fake_loss_scale, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho,
                   P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=sigma_data,
                   teacher_cfg=None if cfg.teacher_cfg in (None, 1.0) else cfg.teacher_cfg)

    def fake_sigma(self, normal: torch.Tensor) -> torch.Tensor:
        """The fake-score step's sigma = exp(P_mean + P_std u) for standard normals u."""
        return (normal * self.P_std + self.P_mean).exp()

    def generator_sigma(self, uniform: torch.Tensor) -> torch.Tensor:
        """The generator step's sigma for u ~ U(0, 1): t = u tmax / 1000 and
        sigma = (sigma_max^(1/rho) + (1 - t) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        so t = 0 is sigma_min and larger t are noisier."""
        t = uniform * (self.tmax / 1000)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + (1 - t) * (lo - hi)) ** self.rho

    def generate(self, generator, z: torch.Tensor, labels=None, drop_ids=None) -> torch.Tensor:
        """x_g = G(sigma_init z; sigma_init) (float32)."""
        sigma = torch.full((z.shape[0],), self.sigma_init, dtype=torch.float32, device=z.device)
        return denoise(generator, z.to(torch.float32) * self.sigma_init, sigma, labels, drop_ids).to(torch.float32)

    def fake_score_loss(self, fake_score, x_g: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                        labels=None, drop_ids=None):
        """(objective, loss, skipped): EDM's loss of the fake score on the samples x_g (detached),
        `objective = fake_loss_scale / B * sum over images and pixels of lambda (f_psi(x_g + sigma n) - x_g)^2`
        (what is minimised), `loss` its per-pixel mean over the images kept (for logs, as
        `fastlego train` reports its loss) and `skipped` the number of images left out because
        x_g or the fake score's output is not finite. All three are tensors (no host sync)."""
        x = x_g.detach().to(torch.float32)
        B, pixels = x.shape[0], x[0].numel()
        finite_x = _finite_rows(x)
        x = torch.where(finite_x.view(-1, 1, 1, 1), x, torch.zeros((), device=x.device))
        s = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        weight = (s ** 2 + self.sigma_data ** 2) / (s * self.sigma_data) ** 2
        D = denoise(fake_score, x + s * noise.to(torch.float32), s.flatten(), labels, drop_ids).to(torch.float32)
        ok = finite_x & _finite_rows(D)
        # Left-out images: D replaced by the target, so their loss and every gradient through it are 0.
        D = torch.where(ok.view(-1, 1, 1, 1), D, x)
        per_image = (weight * (D - x) ** 2).flatten(1).sum(1)
        objective = per_image.sum() * (self.fake_loss_scale / B)
        kept = ok.sum()
        loss = per_image.detach().sum() / (kept.clamp(min=1) * pixels)
        return objective, loss, B - kept

    def generator_loss(self, teacher, fake_score, x_g: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                       labels=None, drop_ids=None):
        """(objective, loss, skipped): SiD's generator loss (module docstring) on samples x_g that
        carry the generator's graph: `objective = loss_scale / B * sum over images and pixels`,
        `loss` its per-pixel mean over the images kept (before loss_scale), `skipped` the images
        left out because x_g, y_real or y_fake is not finite (their gradient is exactly 0)."""
        x = x_g.to(torch.float32)
        B, pixels = x.shape[0], x[0].numel()
        finite_x = _finite_rows(x)
        x = torch.where(finite_x.view(-1, 1, 1, 1), x, torch.zeros((), device=x.device))
        s = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        y_t = x + s * noise.to(torch.float32)
        y_real = denoise(teacher, y_t, s.flatten(), labels, drop_ids, self.teacher_cfg).to(torch.float32)
        y_fake = denoise(fake_score, y_t, s.flatten(), labels, drop_ids).to(torch.float32)
        ok = finite_x & _finite_rows(y_real) & _finite_rows(y_fake)
        keep = ok.view(-1, 1, 1, 1)
        zero = torch.zeros((), device=x.device)
        y_real, y_fake, x = (torch.where(keep, v, zero) for v in (y_real, y_fake, x))
        with torch.no_grad():
            w = (x - y_real).abs().flatten(1).mean(1).clamp(min=1e-5).view(-1, 1, 1, 1)
        diff = y_real - y_fake
        per_image = (diff * ((y_real - x) - self.alpha * diff) / w).flatten(1).sum(1)
        objective = per_image.sum() * (self.loss_scale / B)
        kept = ok.sum()
        loss = per_image.detach().sum() / (kept.clamp(min=1) * pixels)
        return objective, loss, B - kept


# --------------------------------------------------------------------------------------------
# The two half-steps
# --------------------------------------------------------------------------------------------

def _guard_and_clip(params: List[torch.Tensor], grad_clip: Optional[float]) -> None:
    for p in params:  # EDM's guard: a NaN/inf gradient entry becomes 0 rather than poisoning the weights
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)


def fake_score_step(sid: SiDLoss, generator: nn.Module, fake_score_model: nn.Module, fake_params: List[torch.Tensor],
                    optimizer: torch.optim.Optimizer, z, labels, drop_ids, sigma, noise,
                    autocast: Callable = contextlib.nullcontext, grad_clip: Optional[float] = None):
    """One update of the fake score f_psi on fresh samples of the generator (drawn without a
    graph): EDM's loss, backward, gradient guard (and clip), optimizer step. `fake_score_model`
    is the fake score or its DDP wrapper. Returns (loss, skipped) tensors."""
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), autocast():
        x_g = sid.generate(generator, z, labels, drop_ids)
    with autocast():
        objective, loss, skipped = sid.fake_score_loss(fake_score_model, x_g, sigma, noise, labels, drop_ids)
    objective.backward()
    _guard_and_clip(fake_params, grad_clip)
    optimizer.step()
    return loss, skipped


def generator_step(sid: SiDLoss, generator_model: nn.Module, teacher: nn.Module, fake_score: nn.Module,
                   fake_params: List[torch.Tensor], generator_params: List[torch.Tensor],
                   optimizer: torch.optim.Optimizer, z, labels, drop_ids, sigma, noise,
                   autocast: Callable = contextlib.nullcontext, grad_clip: Optional[float] = None):
    """One update of the generator G_theta: SiD's loss through the frozen teacher and the fake
    score (its weights frozen for this step: no gradient is computed for them, only through their
    inputs), backward, gradient guard (and clip), optimizer step. `generator_model` is the
    generator or its DDP wrapper. Returns (loss, skipped) tensors."""
    optimizer.zero_grad(set_to_none=True)
    was_training = fake_score.training
    flags = [p.requires_grad for p in fake_params]
    fake_score.eval()
    for p in fake_params:
        p.requires_grad_(False)
    try:
        with autocast():
            x_g = sid.generate(generator_model, z, labels, drop_ids)
            objective, loss, skipped = sid.generator_loss(teacher, fake_score, x_g, sigma, noise, labels, drop_ids)
        objective.backward()
    finally:
        for p, flag in zip(fake_params, flags):
            p.requires_grad_(flag)
        fake_score.train(was_training)
    _guard_and_clip(generator_params, grad_clip)
    optimizer.step()
    return loss, skipped


# --------------------------------------------------------------------------------------------
# Random draws: one generator, the global batch, each rank its slice
# --------------------------------------------------------------------------------------------

@dataclass
class HalfStepDraws:
    """The random inputs of one half-step: latents z, one-hot labels, label-drop ids (B, 1),
    the noise levels' source (standard normals for the fake-score step, uniforms for the
    generator step) and the noise n."""

    z: torch.Tensor
    labels: Optional[torch.Tensor]
    drop_ids: Optional[torch.Tensor]
    u: torch.Tensor
    noise: torch.Tensor

    def tensors(self) -> tuple:
        """The fields in order, not copied (dataclasses.astuple would deep-copy every tensor)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def slice(self, lo: int, hi: int) -> "HalfStepDraws":
        return HalfStepDraws(*(None if v is None else v[lo:hi] for v in self.tensors()))


def draw_half_step(gen: torch.Generator, batch: int, shape: Sequence[int], label_dim: int, class_dropout: float,
                   uniform: bool, device) -> HalfStepDraws:
    """Draws for the whole global batch, in a fixed order: z, class ids (uniform over the
    classes: the distillation needs no data), label drops, the sigma source, the noise."""
    z = torch.randn(batch, *shape, generator=gen, device=device)
    labels = drop_ids = None
    if label_dim:
        ids = torch.randint(label_dim, (batch,), generator=gen, device=device)
        labels = torch.nn.functional.one_hot(ids, label_dim).to(torch.float32)
        drop_ids = (torch.rand(batch, generator=gen, device=device) < class_dropout).long().reshape(-1, 1)
    u = torch.rand(batch, generator=gen, device=device) if uniform else torch.randn(batch, generator=gen, device=device)
    noise = torch.randn(batch, *shape, generator=gen, device=device)
    return HalfStepDraws(z, labels, drop_ids, u, noise)


# --------------------------------------------------------------------------------------------
# The networks, the optimizers and the step
# --------------------------------------------------------------------------------------------

def teacher_fingerprint(net: nn.Module) -> List[float]:
    """A cheap check that a resumed run distills the same teacher: per state-dict tensor, the
    float64 sum of its values and of their squares."""
    with torch.no_grad():
        return [v for t in net.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()
                for v in (float(t.double().sum()), float(t.double().square().sum()))]


class Distiller:
    """The three networks, two optimizers, the generator's EMA and the SiD step, without files
    or a loop (`distill` adds those; `bench/distill_memory.py` measures this alone).

    The generator and the fake score are built from the teacher's network spec and start from
    its weights. `step(fake_draws, generator_draws)` runs one fake-score update then one
    generator update (eager, or replayed as one CUDA graph) and returns a tensor
    [fake-score loss, generator loss, fake-step skipped, generator-step skipped]; `update_ema`
    follows each step."""

    def __init__(self, teacher: EDMPrecond, cfg: DistillConfig, device, world: int = 1, spec: Optional[dict] = None):
        device = torch.device(device)
        self.cfg, self.device, self.world = cfg, device, world
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.spec = dict(spec or getattr(teacher, "network_spec", None) or spec_from_network(teacher))
        state = teacher.state_dict()
        nets = []
        for _ in range(2):
            net = build_network(self.spec).to(device)
            net.load_state_dict(state, strict=True)
            nets.append(net.train())
        self.generator, self.fake_score = nets
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        for net in (self.teacher, self.generator, self.fake_score):
            net.model.set_activation_checkpointing(cfg.activation_checkpointing, cfg.checkpoint_blocks)
        self.generator_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.fake_params = [p for p in self.fake_score.parameters() if p.requires_grad]
        adam = dict(betas=tuple(float(b) for b in cfg.betas), eps=float(cfg.eps), weight_decay=0.0)
        self.opt_generator = adamw(self.generator_params, device, lr=cfg.lr, **adam)
        self.opt_fake = adamw(self.fake_params, device, lr=cfg.fake_lr or cfg.lr, **adam)
        self.sid = SiDLoss.from_config(cfg, float(teacher.sigma_data))
        self.label_dim = int(teacher.label_dim or 0)
        self.class_dropout = (float(self.spec.get("class_dropout_prob", 0.0)) if cfg.class_dropout is None
                              else float(cfg.class_dropout))
        self.shape = (int(teacher.img_channels), int(teacher.img_resolution), int(teacher.img_resolution))
        self.graphed = _use_cuda_graph(cfg.cuda_graph, device, world)
        self.generator_model, self.fake_model = self.generator, self.fake_score
        self._runner: Optional[TrainStep] = None

    # state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "generator_ema": self.ema.state_dict(),
                "fake_score": self.fake_score.state_dict(), "optimizer_generator": self.opt_generator.state_dict(),
                "optimizer_fake_score": self.opt_fake.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a checkpoint's networks and optimizers (before `prepare`)."""
        self.generator.load_state_dict(ckpt["generator"])
        self.ema.load_state_dict(ckpt["generator_ema"])
        self.fake_score.load_state_dict(ckpt["fake_score"])
        self.opt_generator.load_state_dict(ckpt["optimizer_generator"])
        self.opt_fake.load_state_dict(ckpt["optimizer_fake_score"])

    def prepare(self) -> "Distiller":
        """Wrap for DDP (several processes), make the optimizers capturable for a CUDA graph, and
        build the step runner. Call once, after any `load_state_dict`."""
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.generator_model = nn.parallel.DistributedDataParallel(self.generator, device_ids=ids)
            self.fake_model = nn.parallel.DistributedDataParallel(self.fake_score, device_ids=ids)
        make_capturable(self.opt_generator, self.graphed, self.device)
        make_capturable(self.opt_fake, self.graphed, self.device)
        self._runner = TrainStep(self._body, self.opt_generator, cuda_graph=self.graphed)
        return self

    @property
    def captured(self) -> bool:
        return self._runner is not None and self._runner.captured

    def set_lr(self, lr: float, fake_lr: Optional[float] = None) -> None:
        set_lr(self.opt_generator, lr)
        set_lr(self.opt_fake, fake_lr or lr)

    # the step ------------------------------------------------------------------------------
    def autocast(self):
        return _autocast(self.cfg.precision, self.device, cache=not self.graphed)

    def _body(self, zf, yf, df, uf, nf, zg, yg, dg, ug, ng):
        sid, clip = self.sid, self.cfg.grad_clip
        loss_f, skipped_f = fake_score_step(sid, self.generator, self.fake_model, self.fake_params, self.opt_fake,
                                            zf, yf, df, sid.fake_sigma(uf), nf, self.autocast, clip)
        loss_g, skipped_g = generator_step(sid, self.generator_model, self.teacher, self.fake_score, self.fake_params,
                                           self.generator_params, self.opt_generator, zg, yg, dg,
                                           sid.generator_sigma(ug), ng, self.autocast, clip)
        return torch.stack([loss_f.float(), loss_g.float(), skipped_f.float(), skipped_g.float()])

    def draw(self, gen: torch.Generator, batch: int, rank: int = 0):
        """This rank's slices of one step's draws (both halves) for a global batch."""
        per_rank = batch // self.world
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        return tuple(draw_half_step(gen, batch, self.shape, self.label_dim, self.class_dropout, uniform, self.device)
                     .slice(lo, hi) for uniform in (False, True))

    def tune(self, fake: HalfStepDraws, gen: HalfStepDraws) -> None:
        """Choose each matmul's path for the step's shapes (CUDA only; before any capture)."""
        if self.device.type != "cuda":
            return
        from .tuning import tune
        sid = self.sid
        with self.autocast():
            tune(lambda: sid.fake_score_loss(self.fake_score, fake.z, sid.fake_sigma(fake.u), fake.noise, fake.labels,
                                             fake.drop_ids))
            if sid.teacher_cfg is not None:
                tune(lambda: denoise(self.teacher, gen.noise, sid.generator_sigma(gen.u), gen.labels, gen.drop_ids,
                                     sid.teacher_cfg))

    def step(self, fake: HalfStepDraws, gen: HalfStepDraws) -> torch.Tensor:
        """One fake-score update, then one generator update; the step's stats tensor (the
        graph's, when replayed: copy it to keep it)."""
        if self._runner is None:
            self.prepare()
        return self._runner(*fake.tensors(), *gen.tensors())

    def update_ema(self, batch: int, nimg: int) -> None:
        update_ema(self.ema, self.generator, ema_beta(batch, nimg, self.cfg.ema_halflife_kimg, self.cfg.ema_rampup))

    def one_step_generator(self, which: str = "ema") -> EDMPrecond:
        """A copy of the generator (EMA by default) marked as a one-step generator, in eval mode."""
        net = copy.deepcopy(self.ema if which == "ema" else self.generator).eval().requires_grad_(False)
        net.network_spec = dict(self.spec)
        return mark_one_step(net, self.sid.sigma_init)


# --------------------------------------------------------------------------------------------
# One-step generators: marking, detection, sampling, checkpoints
# --------------------------------------------------------------------------------------------

def mark_one_step(net: EDMPrecond, sigma_init: float) -> EDMPrecond:
    """Mark `net` as a one-step generator: `fastlego.sample` then draws each image as
    `net(sigma_init z; sigma_init)`, one evaluation. Returns `net`."""
    setattr(net, ONE_STEP_ATTR, float(sigma_init))
    return net


def one_step_sigma(net) -> Optional[float]:
    """sigma_init when `net` is a one-step generator (`mark_one_step`), else None."""
    value = getattr(net, ONE_STEP_ATTR, None)
    return None if value is None else float(value)


def one_step_generate(net, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                      denoiser: Optional[Callable] = None) -> torch.Tensor:
    """A one-step generator's images from standard-normal `latents`: `net(sigma_init z; sigma_init)`
    in one network evaluation (float32). `denoiser(x, sigma, stage)` replaces the call (CUDA graphs)."""
    sigma_init = one_step_sigma(net)
    if sigma_init is None:
        raise ValueError("this network is not a one-step generator (no one_step_sigma): sample it with the "
                         "Heun sampler, or mark a distilled generator with fastlego.distill.mark_one_step")
    x = latents.to(torch.float32) * sigma_init
    sigma = torch.full((x.shape[0],), sigma_init, dtype=torch.float32, device=x.device)
    out = denoiser(x, sigma, None) if denoiser is not None else net(x, sigma, class_labels)
    return _last(out).to(torch.float32)


def is_distill_checkpoint(obj) -> bool:
    """Whether a loaded object is a fastlego distillation checkpoint (`DISTILL_FORMAT`)."""
    return isinstance(obj, dict) and obj.get("format") == DISTILL_FORMAT


def check_distill_checkpoint(ckpt, path: str) -> dict:
    if not is_distill_checkpoint(ckpt):
        raise ValueError(f"{path} is not a fastlego distillation checkpoint (no format={DISTILL_FORMAT!r}): "
                         f"fastlego distill writes them to OUTDIR/{CHECKPOINT_NAME}")
    if ckpt.get("version", 0) > DISTILL_VERSION:
        raise ValueError(f"{path} was written by a newer fastlego (distillation checkpoint version "
                         f"{ckpt['version']} > {DISTILL_VERSION}); upgrade fastlego")
    return ckpt


def load_distill_checkpoint(path: str, map_location="cpu") -> dict:
    """A distillation checkpoint as a dict (`torch.load(weights_only=True)`: no code runs)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return check_distill_checkpoint(torch.load(path, map_location=map_location, weights_only=True), path)


def generator_from_checkpoint(path_or_ckpt, which: str = "ema", device="cpu") -> EDMPrecond:
    """The one-step generator of a distillation checkpoint (its EMA unless which="model"), in
    eval mode, marked with its sigma_init (`one_step_sigma`)."""
    ckpt = load_distill_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, str) else path_or_ckpt
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    net = build_network(ckpt["network"])
    net.load_state_dict(ckpt["generator_ema" if which == "ema" else "generator"], strict=True)
    net = net.eval().requires_grad_(False).to(device)
    return mark_one_step(net, ckpt["one_step"]["sigma_init"])


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

@dataclass
class DistillResult:
    """What a `distill` call did; `step` counts every step of the run (a resumed run's included)."""

    outdir: str
    checkpoint: Optional[str]
    step: int
    nimg: int
    losses: List[List[float]]              # per step this call ran: [fake-score loss, generator loss]
    skipped: List[int]                     # non-finite samples left out this call: [fake step, generator step]
    seconds: float
    images_per_second: float               # steps x batch per second (each step draws a batch for each half)
    generator: Optional[EDMPrecond] = None  # the EMA generator (eval mode, one-step marked), on rank 0
    cuda_graph: bool = False
    steps_run: int = 0
    last_losses: Dict[str, float] = dataclasses.field(default_factory=dict)  # means over the last logged window

    @property
    def start_step(self) -> int:
        return self.step - self.steps_run


RESUME_KEYS = ("batch_size", "seed", "sigma_init", "teacher_cfg", "class_dropout", "which")


def distill(config: Optional[DistillConfig] = None, **overrides) -> DistillResult:
    """Distill a teacher into a one-step generator with SiD; see `DistillConfig` and the module
    docstring. Under `torchrun --nproc_per_node N` each process takes `batch_size / N` images of
    every half-step and DDP averages the gradients. Writes `outdir/checkpoint.pt` (atomically,
    every `checkpoint_every` steps and at the end), `outdir/metrics.jsonl` and `outdir/config.json`;
    never into a folder that holds another run unless `resume="auto"` or `overwrite=True`."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else DistillConfig(**overrides)
    cfg.validate()
    if not os.path.exists(cfg.teacher):
        raise FileNotFoundError(f"teacher {cfg.teacher!r} does not exist: pass a fastlego training checkpoint "
                                f"(outdir/checkpoint.pt), a release .pkl or a .safetensors file")
    plan = plan_run(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dctx = setup_distributed(cfg.device)
    try:
        if dctx.world > 1:
            dist.barrier()  # no rank writes into outdir before every rank has checked it
        if cfg.batch_size % dctx.world:
            fit = cfg.batch_size - cfg.batch_size % dctx.world or dctx.world
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes "
                             f"{dctx.world}: pass e.g. --batch {fit}")
        from .dispatch import deterministic, use_backend
        backend = use_backend(cfg.backend) if cfg.backend else contextlib.nullcontext()
        determinism = deterministic() if cfg.deterministic else contextlib.nullcontext()
        with backend, determinism:
            result = _distill(cfg, dctx, plan)
        if dctx.world > 1:
            dist.barrier()   # every rank is through its last collective before any tears the group down
        return result
    finally:
        if dctx.created_group:
            dist.destroy_process_group()


def _load_teacher(cfg: DistillConfig, device) -> EDMPrecond:
    from .sampling import load_network
    teacher = load_network(cfg.teacher, which=cfg.which, device=device)
    if one_step_sigma(teacher) is not None:
        raise ValueError(f"{cfg.teacher} is a one-step generator (a distillation's output); the teacher must be a "
                         f"diffusion model: pass the checkpoint it was distilled from")
    process = getattr(teacher, "process", "edm")
    if not isinstance(teacher, EDMPrecond) or process != "edm":
        raise ValueError(f"SiD distills EDM-preconditioned diffusion networks; {cfg.teacher} is a "
                         f"{type(teacher).__name__} (process {process!r}): pass a network trained with EDM's loss")
    return teacher


def _distill(cfg: DistillConfig, dctx: DistributedContext, plan: RunPlan) -> DistillResult:
    device = dctx.device
    ckpt = load_distill_checkpoint(plan.resume_path) if plan.resume_path else None
    teacher = _load_teacher(cfg, device)
    fingerprint = teacher_fingerprint(teacher)
    if ckpt is not None:
        old = ckpt["config"]
        for key in RESUME_KEYS:
            if old.get(key) != getattr(cfg, key):
                raise ValueError(f"cannot resume {plan.resume_path}: it was distilled with {key}={old.get(key)!r} but "
                                 f"this run has {key}={getattr(cfg, key)!r}; pass the same value to continue exactly")
        if ckpt.get("teacher_fingerprint") != fingerprint:
            raise ValueError(f"cannot resume {plan.resume_path}: it distills another teacher than {cfg.teacher!r} "
                             f"(its weights differ); pass the teacher it was started with")

    torch.manual_seed(cfg.seed)
    distiller = Distiller(teacher, cfg, device, world=dctx.world,
                          spec=ckpt["network"] if ckpt is not None else None)
    spec = distiller.spec
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    step = nimg = 0
    if ckpt is not None:
        distiller.load_state_dict(ckpt)
        step, nimg = int(ckpt["step"]), int(ckpt["nimg"])
        gen.set_state(ckpt["rng"]["distill_generator"].to("cpu"))
        per_rank = ckpt["rng"]["per_rank"]
        set_global_rng_state(per_rank[dctx.rank] if len(per_rank) == dctx.world else per_rank[0])
        del ckpt
    else:
        torch.manual_seed(cfg.seed + 1000 + dctx.rank)
    distiller.prepare()

    total_steps = cfg.steps if cfg.steps is not None else sys.maxsize
    if dctx.main:
        os.makedirs(cfg.outdir, exist_ok=True)
        start_metrics(cfg, plan, step)
        with open(os.path.join(cfg.outdir, CONFIG_NAME), "w") as f:
            json.dump({"distill": dataclasses.asdict(cfg), "network": spec, "world_size": dctx.world,
                       "class_dropout": distiller.class_dropout, "sigma_data": distiller.sid.sigma_data}, f, indent=2)
    metrics_path = os.path.join(cfg.outdir, METRICS_NAME)
    ckpt_path = os.path.join(cfg.outdir, CHECKPOINT_NAME)
    bar = ProgressBar(cfg.steps or 0, "distill", enabled=cfg.progress and dctx.main, initial=step,
                      seconds=cfg.max_seconds)
    if dctx.main and cfg.progress:
        n_params = sum(p.numel() for p in distiller.generator_params)
        guide = f", teacher guidance {cfg.teacher_cfg}" if distiller.sid.teacher_cfg is not None else ""
        print(f"fastlego distill: SiD of {cfg.teacher} ({teacher.model_type}, {n_params / 1e6:.2f}M parameters) into a "
              f"one-step generator (sigma_init {cfg.sigma_init}, alpha {cfg.alpha}{guide}); {dctx.world} process(es) "
              f"on {device}, batch {cfg.batch_size}, {_describe_target(step, cfg.steps, cfg.max_seconds)}",
              file=sys.stderr)

    def save(at_step: int, at_nimg: int) -> None:
        states = global_rng_states_of_ranks(dctx.world)
        if dctx.main:
            atomic_save({
                "format": DISTILL_FORMAT, "version": DISTILL_VERSION, "network": spec,
                **distiller.state_dict(), "step": at_step, "nimg": at_nimg,
                "config": dataclasses.asdict(cfg), "world_size": dctx.world,
                "one_step": {"sigma_init": float(cfg.sigma_init)}, "teacher_fingerprint": fingerprint,
                "rng": {"distill_generator": gen.get_state(), "per_rank": states},
            }, ckpt_path)
        if dctx.world > 1:
            dist.barrier()

    pending: List[torch.Tensor] = []
    history: List[List[float]] = []
    skipped_total = [0, 0]
    last_losses: Dict[str, float] = {}
    t_start = time.perf_counter()
    t_log, n_log = t_start, 0
    steps_run = 0
    last_saved = step
    while step < total_steps:
        fake_draws, gen_draws = distiller.draw(gen, cfg.batch_size, dctx.rank)
        if steps_run == 0:
            # Each matmul's path (fused Triton GEMM or cuBLAS), chosen once before the first step and
            # any capture: a collective under DDP (every rank runs rank 0's choices).
            distiller.tune(fake_draws, gen_draws)
        stats = distiller.step(fake_draws, gen_draws)
        nimg += cfg.batch_size
        distiller.update_ema(cfg.batch_size, nimg)
        pending.append(stats.clone())
        step += 1
        steps_run += 1
        n_log += cfg.batch_size

        stop = False
        if cfg.max_seconds is not None:
            elapsed = torch.tensor([time.perf_counter() - t_start], dtype=torch.float64, device=device)
            if dctx.world > 1:  # every rank stops at the same step: rank 0's clock decides
                dist.broadcast(elapsed, 0)
            stop = elapsed.item() >= cfg.max_seconds
        last = step >= total_steps or stop
        if step % cfg.log_every == 0 or last:
            rows = torch.stack(pending).double()
            if dctx.world > 1:
                rows[:, :2] /= dctx.world       # losses: the mean over ranks; skipped counts: the sum
                dist.all_reduce(rows)
            rows = rows.cpu()
            pending.clear()
            history.extend(rows[:, :2].tolist())
            window_skips = [int(rows[:, 2].sum()), int(rows[:, 3].sum())]
            skipped_total = [a + b for a, b in zip(skipped_total, window_skips)]
            now = time.perf_counter()
            ips = n_log / max(now - t_log, 1e-9)
            t_log, n_log = now, 0
            mean = rows[:, :2].mean(0)
            last_losses = {"fake_score": float(mean[0]), "generator": float(mean[1])}
            bar.update(len(rows), loss_fake=float(mean[0]), loss_gen=float(mean[1]), img_s=f"{ips:.1f}")
            if dctx.main:
                record = {"step": step, "kimg": nimg / 1000, "loss_fake_score": float(mean[0]),
                          "loss_generator": float(mean[1]), "skipped_fake_score": window_skips[0],
                          "skipped_generator": window_skips[1], "lr": cfg.lr, "fake_lr": cfg.fake_lr or cfg.lr,
                          "images_per_s": ips, "seconds": now - t_start, "world_size": dctx.world}
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
    return DistillResult(outdir=cfg.outdir, checkpoint=ckpt_path, step=step, nimg=nimg, losses=history,
                         skipped=skipped_total, seconds=seconds,
                         images_per_second=steps_run * cfg.batch_size / max(seconds, 1e-9),
                         generator=distiller.one_step_generator() if dctx.main else None,
                         cuda_graph=distiller.captured, steps_run=steps_run, last_losses=last_losses)


# --------------------------------------------------------------------------------------------
# `fastlego demo --distill`
# --------------------------------------------------------------------------------------------

# The digits recipe: the demo network is small and distilled for minutes, so it learns 20x faster
# than the paper's rate (1e-5; 4e-6 at ImageNet scale), at batch 64, with the EMA of a short run.
DEMO_DISTILL = dict(lr=2e-4, batch_size=64, ema_halflife_kimg=5.0, ema_rampup=0.1)


def distill_demo(teacher_checkpoint: str, outdir: str, *, minutes: float = 3.0, steps: Optional[int] = None,
                 seeds: Sequence[int], class_ids: Sequence[int], cfg_scale: Optional[float], device,
                 batch: Optional[int] = None, teacher_result=None, teacher_report=None, overwrite: bool = False,
                 progress: bool = True, seed: int = 0) -> dict:
    """`fastlego demo --distill`: distill the demo's network (its guided denoiser when the demo
    samples with guidance) for `minutes` (or exactly `steps` steps) into `outdir`, draw the
    demo's seeds in one step each, measure them (fastlego.metrics) and print them next to the
    teacher's Heun samples (`teacher_result`, `teacher_report`). `batch`: the distillation's batch
    (default DEMO_DISTILL's). Returns a summary dict."""
    from . import metrics
    from .sampling import sample

    cfg = DistillConfig(teacher=teacher_checkpoint, outdir=outdir, steps=steps,
                        max_seconds=None if steps is not None else minutes * 60,
                        teacher_cfg=None if cfg_scale in (None, 1.0) else cfg_scale, device=str(device), seed=seed,
                        checkpoint_every=10 ** 9, log_every=25, overwrite=overwrite, progress=progress,
                        **dict(DEMO_DISTILL, **({"batch_size": batch} if batch else {})))
    res = distill(cfg)
    net = res.generator
    common = dict(class_ids=list(class_ids), device=device, progress=False, batch_size=len(seeds), overwrite=overwrite,
                  grid_columns=metrics.NUM_CLASSES, grid_pad=1, grid_scale=4)
    sample(net, list(seeds)[:metrics.NUM_CLASSES], **dict(common, class_ids=list(class_ids)[:metrics.NUM_CLASSES]))
    one = sample(net, list(seeds), outdir=outdir, prefix="one_step_", **common)
    report = metrics.evaluate_samples(one.images, list(class_ids), floor=False)
    print(f"  distilled (SiD) for {res.steps_run} steps (batch {cfg.batch_size}) in {res.seconds:.0f} s; "
          f"one-step samples of the same seeds:")
    print(f"    {'':26}{'seconds':>8}{'images/s':>10}{'agreement':>11}{'Frechet distance':>18}")
    if teacher_result is not None and teacher_report is not None:
        print(f"    {'teacher (Heun):':<26}{teacher_result.seconds:8.2f}{teacher_result.images_per_second:10.1f}"
              f"{100 * teacher_report.agreement:10.1f}%{teacher_report.frechet_distance:18.2f}")
    print(f"    {'one step:':<26}{one.seconds:8.2f}{one.images_per_second:10.1f}{100 * report.agreement:10.1f}%"
          f"{report.frechet_distance:18.2f}")
    print(f"  one-step grid: {one.files['grid']}; generator: {res.checkpoint}")
    return {"steps": res.steps_run, "seconds": res.seconds, "checkpoint": res.checkpoint,
            "last_losses": res.last_losses, "skipped": res.skipped,
            "one_step": {"seconds": one.seconds, "images_per_s": one.images_per_second, "grid": one.files["grid"],
                         **report.to_dict()}}
