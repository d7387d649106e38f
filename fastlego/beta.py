"""Beta diffusion (Zhou et al., NeurIPS 2023, "Beta Diffusion") on the LEGO backbone.

A second diffusion process beside EDM, for data in a bounded range. Pixels x in [-1, 1] become
x0 = ((x + 1) / 2).clamp(0, 1) * scale + shift in [shift, shift + scale] (0.60..0.99 by default),
and noise is multiplicative: with eta = 10000,

    forward    z_t ~ Beta(eta alpha_t x0, eta (1 - alpha_t x0)),
               E[z_t] = alpha_t x0, Var[z_t] = alpha_t x0 (1 - alpha_t x0) / (eta + 1),
    schedule   t = 1 + u (eps_t - 1), u ~ U(0, 1); logit alpha_t = s0 + (s1 - s0) t^p
               (s0 = 10, s1 = -13, p = 1: alpha from 0.99995 at t = 0 down to 2.3e-6 at t = 1),
    reverse    z_s = z_t + (1 - z_t) p_{s|t}, p_{s|t} ~ Beta(eta (alpha_s - alpha_t) x0, eta (1 - alpha_s x0))
               for alpha_s > alpha_t, which makes z_s ~ Beta(eta alpha_s x0, eta (1 - alpha_s x0)).

Everything random is drawn in logit space, where tiny concentrations (eta alpha x0 is 0.01 at
the start of sampling) do not underflow: a Beta(a, b) draw is u / (u + v) with u ~ Gamma(a),
v ~ Gamma(b), so its logit is log u - log v, and log Gamma(k) = log Gamma(k + 1) + log(U) / k
(U uniform) stays finite for any k > 0. A reverse step in logit space is
logit(z + (1 - z) p) = logsumexp(logit z, L, logit z + L) with L = logit p.

The network (`BetaPrecond` around a LegoBackbone) sees (logit z_t - E) / S, where E and S are the
mean and standard deviation of logit z_t when x0 is uniform on [shift, shift + scale] (closed
forms below, `logit_moments`), and the noise level c_noise = -logit(alpha_t) / 8; its output F
gives logit x0_hat = input + F and x0_hat = sigmoid(logit x0_hat) scale + shift.

The loss (`BetaLoss`) is the KLUB, with s = 0.95 t the earlier time and delta = alpha_s - alpha_t:

    0.99 KL(Beta(eta delta x0_hat, eta (1 - alpha_s x0_hat)) || Beta(eta delta x0, eta (1 - alpha_s x0)))
  + 0.01 KL(Beta(eta alpha_t x0_hat, eta (1 - alpha_t x0_hat)) || Beta(eta alpha_t x0, eta (1 - alpha_t x0))),

summed over pixels and averaged over the batch (over bricks too, when every brick is trained).
Each KL between betas with parameters linear in x is a Bregman divergence with x0 in its first
slot, so the expected KLUB is minimised by x0_hat = E[x0 | z_t], the posterior mean.

The sampler (`beta_sampler`, 200 steps by default) walks a geometric alpha grid from
sigmoid(s1) up to 1, starting from a beta draw around the training data's mean, one network call
per step (two batched halves under classifier-free guidance, which mixes the backbone's outputs,
i.e. logit x0_hat); brick skipping stops the late steps after an earlier brick as EDM sampling
does. Every image has its own generator (one per seed), so an image depends only on its seed.

`fastlego train --process beta` trains with this loss in the same loop as EDM (checkpoints,
resume, DDP, CUDA graphs); the process is recorded in the checkpoint's network spec, and
`fastlego sample` / `fastlego eval` use this sampler for such networks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .edm import DEFAULT_MODEL_TYPE, brick_stack_name, matching_preset, noise_levels_and_labels
from .model import LegoBackbone
from .presets import get_preset

# The paper's settings for images (its CIFAR-10 runs): the process's constants, stored in a beta
# network's spec (`fastlego.networks`) so that sampling uses the values the network was trained with.
BETA_DEFAULTS: Dict[str, float] = {
    "eta": 10000.0,             # concentration: Var[z_t] = alpha x0 (1 - alpha x0) / (eta + 1)
    "scale": 0.39,              # x0 = ((x + 1) / 2) scale + shift: data live in [0.60, 0.99]
    "shift": 0.60,
    "logit_alpha_start": 10.0,  # logit alpha at t = 0 (s0)
    "logit_alpha_end": -13.0,   # logit alpha at t = 1 (s1); sampling starts at sigmoid(s1)
    "schedule_power": 1.0,      # p in logit alpha_t = s0 + (s1 - s0) t^p
}
DEFAULT_SAMPLE_STEPS = 200
EPS_T = 1e-5                    # smallest training time: t = 1 + u (eps_t - 1)
EARLIER_TIME = 0.95             # s = 0.95 t, the reverse step the KLUB looks at
CONDITIONAL_WEIGHT = 0.99       # KLUB = 0.99 conditional + 0.01 marginal
QUADRATURE_NODES = 32           # Gauss-Legendre nodes for Var_x0[E[logit z_t | x0]]


# --------------------------------------------------------------------------------------------
# Data mapping and schedule
# --------------------------------------------------------------------------------------------

def to_beta_range(images: torch.Tensor, scale: float = BETA_DEFAULTS["scale"],
                  shift: float = BETA_DEFAULTS["shift"]) -> torch.Tensor:
    """Pixels in [-1, 1] -> x0 = ((x + 1) / 2).clamp(0, 1) scale + shift."""
    return ((images + 1) / 2).clamp(0, 1) * scale + shift


def from_beta_range(x0: torch.Tensor, scale: float = BETA_DEFAULTS["scale"],
                    shift: float = BETA_DEFAULTS["shift"]) -> torch.Tensor:
    """x0 in [shift, shift + scale] -> pixels in [-1, 1] (the inverse of `to_beta_range` there)."""
    return (x0 - shift) / scale * 2 - 1


def training_times(uniform: torch.Tensor, eps_t: float = EPS_T) -> torch.Tensor:
    """t = 1 + u (eps_t - 1): u ~ U(0, 1) -> t in (eps_t, 1], float64 (in float32 the times near
    eps_t would be rounded to multiples of 6e-8)."""
    return 1 + uniform.to(torch.float64) * (eps_t - 1)


def logit_alpha(t: torch.Tensor, start: float = BETA_DEFAULTS["logit_alpha_start"],
                end: float = BETA_DEFAULTS["logit_alpha_end"], power: float = BETA_DEFAULTS["schedule_power"]):
    """logit alpha_t = start + (end - start) t^power, in float64."""
    t = torch.as_tensor(t).to(torch.float64)
    return start + (end - start) * t ** power


def sigmoid_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sigmoid(a) - sigmoid(b) without cancellation: sigmoid(a) (1 - sigmoid(b)) (1 - exp(b - a)).

    (e^a - e^b) / ((1 + e^a)(1 + e^b)) factored; exact in float64 also when a and b are close
    and both large (alpha_s - alpha_t near t = 0 is 1e-9 next to alpha near 1)."""
    return torch.sigmoid(a) * torch.sigmoid(-b) * -torch.expm1(b - a)


# --------------------------------------------------------------------------------------------
# Random draws in logit space, one generator per image
# --------------------------------------------------------------------------------------------

def _generators(generators, batch: int) -> List[Optional[torch.Generator]]:
    gens = list(getattr(generators, "generators", generators) if generators is not None else [None] * batch)
    if len(gens) != batch:
        raise ValueError(f"{len(gens)} generators for a batch of {batch} images: pass one generator per image")
    return gens


def log_gamma(concentration: torch.Tensor, generators=None) -> torch.Tensor:
    """log of Gamma(concentration, 1) draws, finite for any concentration > 0.

    log G(k) = log G(k + 1) + log(U) / k with U ~ U(0, 1] (Gamma(k) = Gamma(k + 1) U^(1/k)): a
    plain float32 draw of G(0.001) falls below the smallest normal number 9 times in 10. Row i
    of the batch (dimension 0) is drawn from `generators[i]` (a list, or an object with
    `.generators` such as `fastlego.sampling.StackedRandomGenerator`), so each image depends
    only on its generator; None draws from the global generator."""
    k = concentration
    gens = _generators(generators, k.shape[0])
    rows = []
    for i, g in enumerate(gens):
        ki = k[i]
        # both draws of a row from one generator: the gamma draws first, then the uniforms
        gamma = torch._standard_gamma(ki + 1, generator=g)
        uniform = 1 - torch.rand(ki.shape, generator=g, device=ki.device, dtype=ki.dtype)  # (0, 1]
        rows.append(gamma.log() + uniform.log() / ki)
    return torch.stack(rows)


def sample_logit_beta(a: torch.Tensor, b: torch.Tensor, generators=None) -> torch.Tensor:
    """logit of Beta(a, b) draws: log u - log v with u ~ Gamma(a), v ~ Gamma(b) (per-image generators,
    u and v of an image from one call so that a row costs two draws)."""
    both = log_gamma(torch.cat([a, b], dim=1), generators)
    log_u, log_v = both.split([a.shape[1], b.shape[1]], dim=1)
    return log_u - log_v


def forward_sample(x0: torch.Tensor, alpha: torch.Tensor, eta: float = BETA_DEFAULTS["eta"],
                   generators=None) -> torch.Tensor:
    """logit z_t for z_t ~ Beta(eta alpha x0, eta (1 - alpha x0)); x0 (B, C, H, W), alpha (B,) or
    broadcastable to x0. Drawn in x0's dtype."""
    alpha = torch.as_tensor(alpha, device=x0.device).to(x0.dtype)
    if alpha.dim() == 1:
        alpha = alpha.reshape(-1, *([1] * (x0.dim() - 1)))
    ax = alpha * x0
    return sample_logit_beta(eta * ax, eta * (1 - ax), generators)


def reverse_step_logit(logit_z: torch.Tensor, logit_p: torch.Tensor) -> torch.Tensor:
    """logit(z + (1 - z) p) from logit z and logit p: log(e^a + e^L + e^(a + L)).

    z + (1 - z) p = 1 - (1 - z)(1 - p), so its odds are (z + p - z p) / ((1 - z)(1 - p)) =
    e^a + e^L + e^(a + L) for a = logit z, L = logit p (each term one of the three odds products)."""
    return torch.logsumexp(torch.stack([logit_z, logit_p, logit_z + logit_p]), dim=0)


# --------------------------------------------------------------------------------------------
# E and S: the moments of logit z_t under a uniform prior on x0
# --------------------------------------------------------------------------------------------

_NODES: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}


def _gauss_legendre(n: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nodes in [0, 1] and weights summing to 1 (float64), cached per device."""
    key = (n, str(device))
    if key not in _NODES:
        x, w = np.polynomial.legendre.leggauss(n)
        _NODES[key] = (torch.tensor((x + 1) / 2, dtype=torch.float64, device=device),
                       torch.tensor(w / 2, dtype=torch.float64, device=device))
    return _NODES[key]


def logit_moments(alpha: torch.Tensor, eta: float = BETA_DEFAULTS["eta"], scale: float = BETA_DEFAULTS["scale"],
                  shift: float = BETA_DEFAULTS["shift"], nodes: int = QUADRATURE_NODES):
    """(E, S): mean and standard deviation of logit z_t, z_t ~ Beta(eta alpha x0, eta (1 - alpha x0)),
    when x0 is uniform on [shift, shift + scale]; float64, shaped like alpha.

    With c = eta alpha, a = c x0, b = eta - c x0, logit z_t = log u - log v (u ~ Gamma(a), v ~ Gamma(b)):
      E[logit z | x0] = psi(a) - psi(b),  Var[logit z | x0] = psi'(a) + psi'(b)   (psi = digamma).
    Averaged over x0 ~ U[x_lo, x_hi] (d/dx lgamma(c x) = c psi(c x), d/dx psi(c x) = c psi'(c x)):
      E = [lgamma(c x_hi) - lgamma(c x_lo) + lgamma(eta - c x_hi) - lgamma(eta - c x_lo)] / (c scale),
      E[Var | x0] = [psi(c x_hi) - psi(c x_lo) + psi(eta - c x_lo) - psi(eta - c x_hi)] / (c scale),
    and S^2 = E[Var | x0] + Var_x0[psi(a) - psi(b)], the last term by Gauss-Legendre quadrature
    (no closed form; the integrand is smooth on the interval since c x0 > 0)."""
    alpha = torch.as_tensor(alpha).to(torch.float64)
    lo, hi = float(shift), float(shift + scale)
    c = eta * alpha
    denom = c * scale
    E = (torch.lgamma(c * hi) - torch.lgamma(c * lo) + torch.lgamma(eta - c * hi) - torch.lgamma(eta - c * lo)) / denom
    mean_var = (torch.digamma(c * hi) - torch.digamma(c * lo) + torch.digamma(eta - c * lo)
                - torch.digamma(eta - c * hi)) / denom
    x, w = _gauss_legendre(nodes, alpha.device)
    cx = c.unsqueeze(-1) * (lo + (hi - lo) * x)
    g = torch.digamma(cx) - torch.digamma(eta - cx)       # E[logit z | x0] at the nodes
    g_mean = (g * w).sum(-1, keepdim=True)
    var_of_mean = ((g - g_mean) ** 2 * w).sum(-1)
    return E, (mean_var + var_of_mean).sqrt()


# --------------------------------------------------------------------------------------------
# KL divergences and the KLUB
# --------------------------------------------------------------------------------------------

def kl_gamma(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """KL(Gamma(a1, 1) || Gamma(a2, 1)) = (a1 - a2) psi(a1) - lgamma(a1) + lgamma(a2)."""
    return (a1 - a2) * torch.digamma(a1) - torch.lgamma(a1) + torch.lgamma(a2)


def kl_beta(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """KL(Beta(a1, b1) || Beta(a2, b2)) = KL_G(a1, a2) + KL_G(b1, b2) - KL_G(a1 + b1, a2 + b2).

    (Beta = u / (u + v) of independent gammas; expanding the three gamma KLs gives the textbook
    lnB(a2, b2) - lnB(a1, b1) + (a1 - a2) psi(a1) + (b1 - b2) psi(b1) + (a2 - a1 + b2 - b1) psi(a1 + b1).)"""
    return kl_gamma(a1, a2) + kl_gamma(b1, b2) - kl_gamma(a1 + b1, a2 + b2)


def klub(x0: torch.Tensor, x0_hat: torch.Tensor, alpha_t: torch.Tensor, alpha_s: torch.Tensor,
         delta: Optional[torch.Tensor] = None, eta: float = BETA_DEFAULTS["eta"],
         conditional_weight: float = CONDITIONAL_WEIGHT) -> torch.Tensor:
    """The KLUB per element (float64): w KL(q(x0_hat) || q(x0)) of the reverse step t -> s plus
    (1 - w) KL of the marginal at t, each clamped at 0 (round-off only; both are >= 0).

    conditional: Beta(eta delta x, eta (1 - alpha_s x)), the law of p_{s|t} (delta = alpha_s - alpha_t);
    marginal:    Beta(eta alpha_t x, eta (1 - alpha_t x)), the law of z_t."""
    x0, x0_hat = x0.to(torch.float64), x0_hat.to(torch.float64)
    alpha_t, alpha_s = alpha_t.to(torch.float64), alpha_s.to(torch.float64)
    delta = alpha_s - alpha_t if delta is None else delta.to(torch.float64)
    conditional = kl_beta(eta * delta * x0_hat, eta * (1 - alpha_s * x0_hat),
                          eta * delta * x0, eta * (1 - alpha_s * x0)).clamp(min=0)
    marginal = kl_beta(eta * alpha_t * x0_hat, eta * (1 - alpha_t * x0_hat),
                       eta * alpha_t * x0, eta * (1 - alpha_t * x0)).clamp(min=0)
    return conditional_weight * conditional + (1 - conditional_weight) * marginal


# --------------------------------------------------------------------------------------------
# The network: preconditioning around a LegoBackbone
# --------------------------------------------------------------------------------------------

class BetaPrecond(nn.Module):
    """logit x0_hat = in + F(in, -logit(alpha_t) / 8) with in = (logit z_t - E) / S; the backbone is
    `.model` (state-dict keys as EDMPrecond's, `model.model.{i}...`).

    Called as `net(logit_z, logit_alpha, class_labels, cfg_scale=..., return_stage_idx=...,
    skip_bricks=...)`, the same order as EDMPrecond's `net(x, sigma, ...)`, so the CUDA-graph
    denoiser, guidance and brick skipping work unchanged. Returns logit x0_hat (float32), a list
    of them (one per brick) when the backbone trains its intermediate stages; `x0_from_logit`
    maps to [shift, shift + scale]. The process's constants (`BETA_DEFAULTS`) and the training
    data's per-channel mean (`data_mean`, in [0, 1], where sampling starts) are attributes."""

    process = "beta"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 eta: float = BETA_DEFAULTS["eta"], scale: float = BETA_DEFAULTS["scale"],
                 shift: float = BETA_DEFAULTS["shift"], logit_alpha_start: float = BETA_DEFAULTS["logit_alpha_start"],
                 logit_alpha_end: float = BETA_DEFAULTS["logit_alpha_end"],
                 schedule_power: float = BETA_DEFAULTS["schedule_power"], data_mean: Optional[Sequence[float]] = None,
                 model_type: Optional[str] = None, backbone: Optional[LegoBackbone] = None, **model_kwargs):
        super().__init__()
        check_beta_options(dict(eta=eta, scale=scale, shift=shift, logit_alpha_start=logit_alpha_start,
                                logit_alpha_end=logit_alpha_end, schedule_power=schedule_power))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.eta, self.scale, self.shift = float(eta), float(scale), float(shift)
        self.logit_alpha_start, self.logit_alpha_end = float(logit_alpha_start), float(logit_alpha_end)
        self.schedule_power = float(schedule_power)
        data_mean = [0.5] * img_channels if data_mean is None else [float(m) for m in data_mean]
        if len(data_mean) != img_channels or not all(0 <= m <= 1 for m in data_mean):
            raise ValueError(f"data_mean must hold {img_channels} per-channel means in [0, 1] (pixels mapped from "
                             f"[-1, 1]), got {data_mean}")
        self.data_mean = data_mean
        if backbone is not None and model_type is None:
            stack = (backbone.img_resolution, backbone.model_type, backbone.depths)
            model_type = matching_preset(*stack) or brick_stack_name(*stack)
        self.model_type = model_type if model_type is not None else DEFAULT_MODEL_TYPE
        if backbone is not None:
            if model_kwargs:
                raise TypeError(f"BetaPrecond got a backbone and backbone arguments {sorted(model_kwargs)}: "
                                f"pass one or the other")
            if (backbone.in_channels, backbone.label_dim) != (img_channels, label_dim):
                raise ValueError(f"the backbone has in_channels={backbone.in_channels}, label_dim={backbone.label_dim} "
                                 f"but BetaPrecond was given img_channels={img_channels}, label_dim={label_dim}")
            self.model = backbone
        else:
            get_preset(self.model_type)
            self.model = LegoBackbone.from_preset(self.model_type, in_channels=img_channels, label_dim=label_dim,
                                                  **model_kwargs)

    def options(self) -> dict:
        """The process's constants and data mean, as a network spec stores them."""
        return {"eta": self.eta, "scale": self.scale, "shift": self.shift, "logit_alpha_start": self.logit_alpha_start,
                "logit_alpha_end": self.logit_alpha_end, "schedule_power": self.schedule_power,
                "data_mean": list(self.data_mean)}

    def preconditioning(self, logit_alpha: torch.Tensor):
        """(E, S, c_noise) for logit alpha of shape (B, 1, 1, 1): E, S float64, c_noise float32."""
        E, S = logit_moments(torch.sigmoid(logit_alpha.to(torch.float64)), self.eta, self.scale, self.shift)
        return E, S, (-logit_alpha / 8).to(torch.float32)

    def x0_from_logit(self, logit_x0: torch.Tensor) -> torch.Tensor:
        """x0_hat = sigmoid(logit x0_hat) scale + shift."""
        return torch.sigmoid(logit_x0) * self.scale + self.shift

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None,
                cfg_scale: Optional[float] = None, return_stage_idx: Optional[int] = None,
                force_fp32: bool = False, skip_bricks=None, **model_kwargs):
        """logit x0_hat from `x` = logit z_t (B, C, H, W) and `sigma` = logit alpha_t (a number or (B,))."""
        logit_alpha, class_labels = noise_levels_and_labels(x, sigma, class_labels, self.label_dim, torch.float64,
                                                            "logit_alpha")
        E, S, c_noise = self.preconditioning(logit_alpha)
        inp = ((x.to(torch.float64) - E) / S).to(torch.float32)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.float16) if fp16 else contextlib.nullcontext()
        feed = inp.to(self.model.dtype) if not torch.is_autocast_enabled(x.device.type) and not fp16 else inp
        with autocast:
            if cfg_scale is None:
                F_x = self.model(feed, c_noise.flatten(), class_labels=class_labels,
                                 return_stage_idx=return_stage_idx, skip_bricks=skip_bricks, **model_kwargs)
            else:
                F_x = self.model.forward_with_cfg(feed, c_noise.flatten(), class_labels, cfg_scale,
                                                  return_stage_idx=return_stage_idx, skip_bricks=skip_bricks,
                                                  **model_kwargs)
        if isinstance(F_x, list):
            return [inp + f.to(torch.float32) for f in F_x]
        return inp + F_x.to(torch.float32)


def check_beta_options(options: dict) -> dict:
    """Clear errors for bad process constants; returns them as floats."""
    unknown = sorted(set(options) - set(BETA_DEFAULTS) - {"data_mean"})
    if unknown:
        raise TypeError(f"unknown beta-diffusion options {unknown}; expected some of {sorted(BETA_DEFAULTS)} "
                        f"and data_mean")
    o = {k: float(v) for k, v in options.items() if k != "data_mean"}
    if o.get("eta", 1) <= 0:
        raise ValueError(f"eta must be > 0, got {o['eta']}")
    scale, shift = o.get("scale", BETA_DEFAULTS["scale"]), o.get("shift", BETA_DEFAULTS["shift"])
    if not (scale > 0 and shift >= 0 and shift + scale < 1):
        raise ValueError(f"need scale > 0, shift >= 0 and shift + scale < 1 (x0 must stay inside (0, 1)), "
                         f"got scale={scale}, shift={shift}")
    if o.get("logit_alpha_start", 10.0) <= o.get("logit_alpha_end", -13.0):
        raise ValueError("logit_alpha_start (t = 0) must exceed logit_alpha_end (t = 1): alpha falls with t")
    if o.get("schedule_power", 1.0) <= 0:
        raise ValueError(f"schedule_power must be > 0, got {o['schedule_power']}")
    return o


def data_mean(dataset, max_images: int = 1024) -> List[float]:
    """Per-channel mean of a dataset's pixels mapped to [0, 1], over up to `max_images` images
    spread evenly over it (deterministic, cheap): where beta sampling starts."""
    n = len(dataset)
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
    total = torch.zeros(dataset.channels, dtype=torch.float64)
    for i in idx:
        total += dataset.image(int(i)).to(torch.float64).mean(dim=(1, 2)) / 255.0
    return [float(v) for v in total / len(idx)]


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BetaLoss:
    """The KLUB loss with the `loss_fn(net, images, t, logit_z_t, labels)` interface of the training loop.

    The loop draws t (`time(uniform)`) and the forward sample (`forward(images, t, generators)`)
    outside the step, so that a CUDA graph can replay the step and the draws follow the run's
    one-generator scheme; the step computes the network and the KLUB."""

    eta: float = BETA_DEFAULTS["eta"]
    scale: float = BETA_DEFAULTS["scale"]
    shift: float = BETA_DEFAULTS["shift"]
    logit_alpha_start: float = BETA_DEFAULTS["logit_alpha_start"]
    logit_alpha_end: float = BETA_DEFAULTS["logit_alpha_end"]
    schedule_power: float = BETA_DEFAULTS["schedule_power"]
    eps_t: float = EPS_T
    earlier: float = EARLIER_TIME
    conditional_weight: float = CONDITIONAL_WEIGHT

    @classmethod
    def from_options(cls, options: dict) -> "BetaLoss":
        """The loss for a network spec's beta options (`spec["beta"]`)."""
        return cls(**{k: float(v) for k, v in options.items() if k in BETA_DEFAULTS})

    def time(self, uniform: torch.Tensor) -> torch.Tensor:
        """t = 1 + u (eps_t - 1) for u ~ U(0, 1)."""
        return training_times(uniform, self.eps_t)

    def logit_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return logit_alpha(t, self.logit_alpha_start, self.logit_alpha_end, self.schedule_power)

    def forward(self, images: torch.Tensor, t: torch.Tensor, generators=None) -> torch.Tensor:
        """logit z_t (float32) for images in [-1, 1] at times t (B,), one generator per image."""
        x0 = to_beta_range(images.to(torch.float32), self.scale, self.shift)
        alpha = torch.sigmoid(self.logit_alpha(t.to(images.device)))
        return forward_sample(x0, alpha.to(torch.float32), self.eta, generators)

    def __call__(self, net: nn.Module, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 labels: Optional[torch.Tensor] = None, **net_kwargs):
        """(loss, per_brick): the batch mean of the KLUB summed over pixels.

        images (B, C, H, W) in [-1, 1]; sigma = t (B,); noise = logit z_t (B, C, H, W), drawn by
        `forward` from these images and times. When the network returns one output per brick,
        `loss` averages the bricks and `per_brick` lists each brick's loss (detached)."""
        t = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
        la_t = self.logit_alpha(t)
        la_s = self.logit_alpha(self.earlier * t)
        alpha_t, alpha_s = torch.sigmoid(la_t), torch.sigmoid(la_s)
        delta = sigmoid_difference(la_s, la_t)
        x0 = to_beta_range(images.to(torch.float64), self.scale, self.shift)
        out = net(noise, la_t.flatten(), labels, **net_kwargs)
        outputs = out if isinstance(out, (list, tuple)) else [out]
        losses = []
        for logit_x0_hat in outputs:
            x0_hat = torch.sigmoid(logit_x0_hat.to(torch.float64)) * self.scale + self.shift
            per_pixel = klub(x0, x0_hat, alpha_t, alpha_s, delta, self.eta, self.conditional_weight)
            losses.append(per_pixel.flatten(1).sum(1).mean().to(torch.float32))
        loss = torch.stack(losses).mean()
        return loss, [l.detach() for l in losses]


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

def sampling_alphas(num_steps: int = DEFAULT_SAMPLE_STEPS, logit_alpha_end: float = BETA_DEFAULTS["logit_alpha_end"],
                    device="cpu") -> torch.Tensor:
    """The geometric alpha grid, float64 (num_steps + 1,): alpha_k = alpha_min^((N - k) / N), from
    alpha_min = sigmoid(logit_alpha_end) up to alpha_N = 1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    log_min = torch.nn.functional.logsigmoid(torch.tensor(float(logit_alpha_end), dtype=torch.float64))
    k = torch.arange(num_steps + 1, dtype=torch.float64)
    return ((num_steps - k) / num_steps * log_min).exp().to(device)


def count_network_evaluations(num_steps: int = DEFAULT_SAMPLE_STEPS, t_break: float = 1.0) -> Dict[str, int]:
    """Network calls of the beta sampler: one per step; (full, skipped) = calls that run every brick
    and calls that stop early."""
    from .sampling import full_steps

    n_full = full_steps(num_steps, t_break)
    return {"full": n_full, "skipped": num_steps - n_full}


def beta_sampler(net, shape, class_labels: Optional[torch.Tensor] = None, generators=None, *,
                 num_steps: int = DEFAULT_SAMPLE_STEPS, cfg_scale: Optional[float] = None, t_break: float = 1.0,
                 skip_stage_idx: Optional[int] = None, denoiser: Optional[Callable] = None,
                 progress=None, device=None, return_z: bool = False, **process):
    """Beta diffusion's sampler: images (B, C, H, W) in [-1, 1], float32.

    `net` is a BetaPrecond (its constants and data mean are used; `process` overrides them, e.g.
    for a toy `denoiser` with net=None: eta, scale, shift, logit_alpha_end, data_mean). Starting
    from z ~ Beta(eta alpha_0 m, eta (1 - alpha_0 m)), m the data mean mapped to the beta range,
    every step k calls `denoiser(logit z, logit alpha_k, stage)` (default: the network, with
    guidance `cfg_scale` and brick skipping after a fraction `t_break` of the steps) for logit
    x0_hat, draws p ~ Beta(eta (alpha_{k+1} - alpha_k) x0_hat, eta (1 - alpha_{k+1} x0_hat)) and
    moves z to z + (1 - z) p, all in logit space. `generators`: one torch.Generator per image (or
    a StackedRandomGenerator). Returns x0_hat of the last step mapped to [-1, 1]; with
    `return_z`, also z / alpha_N (= z, alpha_N = 1) mapped the same way."""
    from .sampling import full_steps, resolve_skip_stage

    opts = dict(net.options()) if net is not None else dict(BETA_DEFAULTS)
    opts.update(process)
    eta, scale, shift = float(opts["eta"]), float(opts["scale"]), float(opts["shift"])
    C = int(shape[1])
    mean = opts.get("data_mean") or [0.5] * C
    if len(mean) != C:
        raise ValueError(f"data_mean holds {len(mean)} channel means but the images have {C} channels")
    if device is None:
        device = next(net.parameters()).device if net is not None else torch.device("cpu")
    alphas = sampling_alphas(num_steps, float(opts["logit_alpha_end"]), device)
    logit_alphas = torch.logit(alphas[:-1])                       # where the network is evaluated
    step_fraction = -torch.expm1(alphas[0].log() / num_steps)     # (alpha_{k+1} - alpha_k) / alpha_{k+1}
    n_full = full_steps(num_steps, t_break)
    stage_late = resolve_skip_stage(net, t_break, skip_stage_idx) if n_full < num_steps else None
    if cfg_scale is not None and float(cfg_scale) == 1.0:
        cfg_scale = None
    if denoiser is None:
        def denoiser(logit_z, logit_alpha, stage):
            return net(logit_z.to(torch.float32), logit_alpha, class_labels, cfg_scale=cfg_scale,
                       return_stage_idx=stage)

    # Start: a beta draw around the data mean at alpha_0 (its logit).
    m = torch.tensor(mean, dtype=torch.float64, device=device).reshape(1, C, 1, 1) * scale + shift
    start = (alphas[0] * m).expand(shape).contiguous()
    logit_z = sample_logit_beta(eta * start, eta * (1 - start), generators)
    x0_hat = None
    for k in range(num_steps):
        stage = None if k < n_full else stage_late
        logit_x0 = denoiser(logit_z, logit_alphas[k], stage).to(torch.float64)
        x0_hat = torch.sigmoid(logit_x0) * scale + shift
        alpha_next = alphas[k + 1]
        # p ~ Beta(eta (alpha_{k+1} - alpha_k) x0_hat, eta (1 - alpha_{k+1} x0_hat)), then z + (1 - z) p.
        logit_p = sample_logit_beta(eta * alpha_next * step_fraction * x0_hat, eta * (1 - alpha_next * x0_hat),
                                    generators)
        logit_z = reverse_step_logit(logit_z, logit_p)
        if progress is not None:
            progress.update(1)
    images = from_beta_range(x0_hat, scale, shift).to(torch.float32)
    if not return_z:
        return images
    z_over_alpha = torch.sigmoid(logit_z) / alphas[-1]
    return images, from_beta_range(z_over_alpha, scale, shift).to(torch.float32)
