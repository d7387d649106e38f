"""Beta diffusion (fastlego.beta): the forward process and one reverse step by Monte Carlo, the
logit-space identities, the beta KL against torch.distributions, the KLUB's minimiser, E and S
against Monte Carlo, the sampler with an oracle on a point mass, the preconditioning and the loss
through a tiny LEGO with random weights, training (resume, DDP) and sampling detection.

Monte Carlo tolerances are Z standard errors of the statistic at the sample size (Z = 5: a correct
implementation fails about once in 3 million checks; seeds are fixed, so a run either always passes
or always fails)."""

import json
import math
import os

import pytest
import torch
from torch.distributions import Beta, kl_divergence

from two_processes import run_two_processes
import fastlego.beta as beta_mod
from fastlego.beta import (BETA_DEFAULTS, BetaLoss, BetaPrecond, beta_sampler, forward_sample, from_beta_range, kl_beta,
                           klub, log_gamma, logit_alpha, logit_moments, reverse_step_logit, sample_logit_beta,
                           sampling_alphas, sigmoid_difference, to_beta_range)
from fastlego.networks import build_network, network_spec, spec_from_network
from fastlego.sampling import load_network, sample
from fastlego.testing import randomize_
from fastlego.training import TrainConfig, train
from fastlego.training_checkpoint import load_training_checkpoint

Z = 5.0
ETA, SCALE, SHIFT = BETA_DEFAULTS["eta"], BETA_DEFAULTS["scale"], BETA_DEFAULTS["shift"]
TINY = "4:w64p4h4:1,8:w64p8h4:1"   # two bricks (local 4x4 regions, then the 8x8 image), width 64


def gens(n, base=0, device="cpu"):
    return [torch.Generator(device).manual_seed(base + i) for i in range(n)]


def check_mean_and_variance(samples, mean, var, what):
    """samples (rows, n): each row's sample mean and variance against the exact ones, within Z
    standard errors (the variance's from the sample's fourth central moment)."""
    n = samples.shape[-1]
    m = samples.mean(-1)
    centered = samples - m.unsqueeze(-1)
    v = centered.pow(2).mean(-1)
    se_mean = (v / n).sqrt()
    se_var = ((centered.pow(4).mean(-1) - v ** 2) / n).sqrt()
    assert torch.all((m - mean).abs() <= Z * se_mean), (what, m, mean, se_mean)
    assert torch.all((v - var).abs() <= Z * se_var), (what, v, var, se_var)


def ks_two_sample(a, b):
    """The two-sample Kolmogorov-Smirnov statistic of 1-D samples."""
    both = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, both, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b.sort().values, both, right=True).double() / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def ks_critical(n, m, level=1e-4):
    """D above which two samples of sizes n, m differ at this level: sqrt(-ln(level/2)/2) sqrt((n+m)/(n m))."""
    return math.sqrt(-math.log(level / 2) / 2) * math.sqrt((n + m) / (n * m))


# --------------------------------------------------------------------------------------------
# Data mapping, schedule, draws
# --------------------------------------------------------------------------------------------

def test_data_mapping_and_schedule():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert torch.allclose(to_beta_range(x), torch.tensor([0.6, 0.6, 0.795, 0.99, 0.99]))
    assert torch.allclose(from_beta_range(to_beta_range(x[1:4])), x[1:4], atol=1e-6)
    la = logit_alpha(torch.tensor([0.0, 0.5, 1.0]))
    assert la.dtype == torch.float64 and la.tolist() == pytest.approx([10.0, -1.5, -13.0])
    assert logit_alpha(torch.tensor(0.5), power=2.0).item() == pytest.approx(10 - 23 * 0.25)
    t = BetaLoss().time(torch.tensor([0.0, 1.0]))
    assert t.tolist() == pytest.approx([1.0, 1e-5])
    # delta = alpha_s - alpha_t without cancellation, also where both are 0.99995
    a, b = torch.tensor([10.0, 3.0, -13.0], dtype=torch.float64), torch.tensor([10.0 - 1e-9, 2.0, -13.5], dtype=torch.float64)
    exact = torch.tensor([1e-9 * math.exp(10) / (1 + math.exp(10)) ** 2,
                          1 / (1 + math.exp(-3)) - 1 / (1 + math.exp(-2)),
                          1 / (1 + math.exp(13)) - 1 / (1 + math.exp(13.5))], dtype=torch.float64)
    assert torch.allclose(sigmoid_difference(a, b), exact, rtol=1e-6, atol=0)


def test_log_gamma_is_finite_and_right_for_tiny_concentrations():
    """log G(k) for k = 1e-3 (a plain float32 draw underflows most of the time): E = psi(k), Var = psi'(k)."""
    k = torch.tensor([1e-3, 0.05, 2.0, 5000.0], dtype=torch.float64)
    n = 40000
    plain = torch._standard_gamma(torch.full((n,), 1e-3), generator=torch.Generator().manual_seed(0))
    # why the draw is made in log space: most plain draws are clamped to float32's smallest normal
    assert (plain <= torch.finfo(torch.float32).tiny).float().mean() > 0.5
    draws = log_gamma(k.reshape(-1, 1).expand(-1, n).contiguous(), gens(4))
    assert torch.isfinite(draws).all()
    check_mean_and_variance(draws, torch.digamma(k), torch.polygamma(1, k), "log Gamma(k)")
    f32 = log_gamma(torch.full((2, 1000), 1e-3), gens(2))
    assert f32.dtype == torch.float32 and torch.isfinite(f32).all()


def test_each_image_depends_only_on_its_generator():
    a = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 50 + 0.01
    b = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 50 + 1
    full = sample_logit_beta(a, b, gens(3))
    alone = sample_logit_beta(a[1:2], b[1:2], gens(1, base=1))
    assert torch.equal(full[1:2], alone)
    assert not torch.equal(full[0], full[2])
    with pytest.raises(ValueError, match="2 generators for a batch of 3 images"):
        sample_logit_beta(a, b, gens(2))


# --------------------------------------------------------------------------------------------
# The process by Monte Carlo
# --------------------------------------------------------------------------------------------

def test_forward_marginals_by_monte_carlo():
    """z_t = sigmoid(logit z_t): mean alpha x0, variance alpha x0 (1 - alpha x0) / (eta + 1), from
    alpha = sigmoid(-13) (sampling's start) to sigmoid(10) (t = 0), x0 at both ends of the range."""
    alpha = torch.sigmoid(torch.tensor([-13.0, -4.0, 0.0, 4.0, 10.0], dtype=torch.float64))
    x0 = torch.tensor([0.6, 0.75, 0.99, 0.6, 0.99], dtype=torch.float64)
    n = 30000
    logits = forward_sample(x0.reshape(-1, 1, 1, 1).expand(-1, 1, 1, n), alpha, ETA, gens(5))
    assert torch.isfinite(logits).all()
    z = torch.sigmoid(logits).reshape(5, n)
    ax = alpha * x0
    check_mean_and_variance(z, ax, ax * (1 - ax) / (ETA + 1), "z_t")


@pytest.mark.parametrize("t", [0.02, 0.5, 0.999])
def test_one_reverse_step_maps_the_marginal_at_t_onto_the_marginal_at_s(t):
    """z_t ~ Beta(eta a_t x0, eta (1 - a_t x0)) and p ~ Beta(eta (a_s - a_t) x0, eta (1 - a_s x0)) give
    z_t + (1 - z_t) p ~ Beta(eta a_s x0, eta (1 - a_s x0)): two-sample KS against direct draws
    (in logit space: KS is invariant under the monotone map) and the exact mean and variance."""
    x0 = torch.tensor([0.62, 0.9], dtype=torch.float64).reshape(2, 1, 1, 1)
    la_t = logit_alpha(torch.tensor(t))
    la_s = logit_alpha(torch.tensor(0.95 * t))
    a_t, a_s, delta = torch.sigmoid(la_t), torch.sigmoid(la_s), sigmoid_difference(la_s, la_t)
    n = 20000
    x = x0.expand(-1, 1, 1, n).contiguous()
    logit_zt = sample_logit_beta(ETA * a_t * x, ETA * (1 - a_t * x), gens(2, 0))
    logit_p = sample_logit_beta(ETA * delta * x, ETA * (1 - a_s * x), gens(2, 10))
    stepped = reverse_step_logit(logit_zt, logit_p).reshape(2, n)
    direct = sample_logit_beta(ETA * a_s * x, ETA * (1 - a_s * x), gens(2, 20)).reshape(2, n)
    for i in range(2):
        assert ks_two_sample(stepped[i], direct[i]) < ks_critical(n, n), i
    ax = (a_s * x0).flatten()
    check_mean_and_variance(torch.sigmoid(stepped), ax, ax * (1 - ax) / (ETA + 1), "z_s")
    if t >= 0.5:   # where alpha moves far in one step, z_t itself is measurably not distributed as z_s
        assert ks_two_sample(logit_zt.reshape(2, n)[0], direct[0]) > 2 * ks_critical(n, n)


def test_logsumexp_identity_of_the_reverse_step():
    """logit(z + (1 - z) p) = logsumexp(logit z, logit p, logit z + logit p), also where the direct
    formula underflows (z, p below 1e-300)."""
    z = torch.linspace(1e-6, 1 - 1e-6, 301, dtype=torch.float64).reshape(-1, 1)
    p = torch.tensor([1e-9, 1e-3, 0.2, 0.5, 0.9, 1 - 1e-7], dtype=torch.float64).reshape(1, -1)
    # the odds of z + (1 - z) p, each factor computed without cancellation
    direct = torch.log(z + (1 - z) * p) - torch.log1p(-z) - torch.log1p(-p)
    torch.testing.assert_close(reverse_step_logit(torch.logit(z).expand_as(direct), torch.logit(p).expand_as(direct)),
                               direct, rtol=1e-9, atol=1e-9)
    a = torch.tensor([-900.0, -1200.0, 40.0], dtype=torch.float64)
    L = torch.tensor([-905.0, -1200.0, -800.0], dtype=torch.float64)
    out = reverse_step_logit(a, L)
    # tiny z, p: odds = e^a + e^L (e^(a + L) vanishes); z near 1: odds = e^a (1 + e^L)
    expected = torch.stack([torch.logaddexp(a[0], L[0]), a[1] + math.log(2), a[2] + torch.log1p(L[2].exp())])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-9)


# --------------------------------------------------------------------------------------------
# KL and the KLUB
# --------------------------------------------------------------------------------------------

def test_beta_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    p = 10 ** torch.empty(3000, 4, dtype=torch.float64).uniform_(-2, 4.2, generator=g)   # 0.01 .. 16000
    close = p[:1000].clone()
    close[:, 2:] = close[:, :2] * (1 + torch.empty(1000, 2, dtype=torch.float64).uniform_(-1e-3, 1e-3, generator=g))
    for params in (p, close):
        a1, b1, a2, b2 = params.unbind(1)
        ours = kl_beta(a1, b1, a2, b2)
        ref = kl_divergence(Beta(a1, b1), Beta(a2, b2))
        # both are differences of lgamma terms: round-off scales with their size
        size = sum(torch.lgamma(v).abs() for v in (a1, b1, a2, b2, a1 + b1, a2 + b2))
        assert torch.all((ours - ref).abs() <= 1e-9 * ref.abs() + 1e-13 * size), (ours - ref).abs().max()
    assert kl_beta(*[torch.tensor(3.0, dtype=torch.float64)] * 4).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
def test_klub_is_minimised_in_expectation_at_the_posterior_mean(t):
    """For x0 from a skewed three-point law, E[KLUB(x0, x0_hat)] is smallest at x0_hat = E[x0]
    (grid search and a zero gradient there), not at its median or mode; the KL taken the other
    way round would be minimised elsewhere, so the test knows the direction."""
    x = torch.tensor([0.62, 0.65, 0.97], dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    mean = (w * x).sum()
    a_t = torch.sigmoid(logit_alpha(torch.tensor(t)))
    a_s = torch.sigmoid(logit_alpha(torch.tensor(0.95 * t)))
    grid = torch.linspace(SHIFT, SHIFT + SCALE, 39001, dtype=torch.float64)   # spacing 1e-5
    expected = (klub(x, grid[:, None], a_t, a_s) * w).sum(1)
    assert abs(grid[expected.argmin()].item() - mean.item()) <= 1.5e-5
    x_hat = mean.clone().requires_grad_(True)
    (klub(x, x_hat, a_t, a_s) * w).sum().backward()
    off = torch.tensor(mean.item() + 0.02, dtype=torch.float64, requires_grad=True)
    (klub(x, off, a_t, a_s) * w).sum().backward()
    assert abs(x_hat.grad.item()) < 1e-6 * abs(off.grad.item())
    reverse = (klub(grid[:, None], x, a_t, a_s) * w).sum(1)
    assert abs(grid[reverse.argmin()].item() - mean.item()) > 0.01


def test_klub_is_zero_at_the_truth_and_weights_its_two_terms():
    x0 = torch.tensor([0.6, 0.8, 0.99], dtype=torch.float64)
    a_t, a_s = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.35, dtype=torch.float64)
    assert torch.all(klub(x0, x0, a_t, a_s).abs() < 1e-9)
    x_hat = x0 + 0.005
    cond = kl_divergence(Beta(ETA * 0.05 * x_hat, ETA * (1 - a_s * x_hat)), Beta(ETA * 0.05 * x0, ETA * (1 - a_s * x0)))
    marg = kl_divergence(Beta(ETA * a_t * x_hat, ETA * (1 - a_t * x_hat)), Beta(ETA * a_t * x0, ETA * (1 - a_t * x0)))
    torch.testing.assert_close(klub(x0, x_hat, a_t, a_s), 0.99 * cond + 0.01 * marg, rtol=1e-7, atol=1e-10)


# --------------------------------------------------------------------------------------------
# E and S
# --------------------------------------------------------------------------------------------

def test_logit_moments_against_monte_carlo():
    """E and S of logit z_t with x0 ~ U[shift, shift + scale], over the whole alpha range."""
    alpha = torch.sigmoid(torch.tensor([-13.0, -6.0, -1.0, 2.0, 6.0, 10.0], dtype=torch.float64))
    n = 30000
    u = torch.rand(len(alpha), 1, 1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x0 = SHIFT + SCALE * u
    logits = forward_sample(x0, alpha, ETA, gens(len(alpha), 100)).reshape(len(alpha), n)
    E, S = logit_moments(alpha)
    assert E.dtype == S.dtype == torch.float64 and E.shape == S.shape == alpha.shape
    check_mean_and_variance(logits, E, S ** 2, "logit z_t")
    # the quadrature term (the spread of E[logit z | x0] over x0) is most of S^2 near t = 0
    E_cond_var = logit_moments(alpha, nodes=1)[1]   # one node: that term is 0
    assert S[-1] > 3 * E_cond_var[-1]


def test_logit_moments_quadrature_has_converged():
    alpha = torch.sigmoid(torch.linspace(-13, 10, 24, dtype=torch.float64))
    E32, S32 = logit_moments(alpha, nodes=32)
    E128, S128 = logit_moments(alpha, nodes=128)
    assert torch.equal(E32, E128)
    torch.testing.assert_close(S32, S128, rtol=1e-8, atol=0)   # converged to round-off


# --------------------------------------------------------------------------------------------
# The network and the loss
# --------------------------------------------------------------------------------------------

def tiny_beta_net(label_dim=3, seed=0, **options):
    net = build_network(network_spec(8, 1, label_dim, bricks=TINY, process="beta", beta=options or None))
    return randomize_(net, seed=seed, scale=0.5)


def test_preconditioning_by_hand():
    """logit x0_hat = in + F(in, -logit(alpha) / 8), in = (logit z - E) / S, against the raw backbone."""
    net = tiny_beta_net().eval()
    assert isinstance(net, BetaPrecond) and net.process == "beta"
    la = torch.tensor([-12.0, 0.5, 9.0], dtype=torch.float64)
    logit_z = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20 - 5
    labels = torch.eye(3)
    E, S = logit_moments(torch.sigmoid(la))
    inp = ((logit_z - E.reshape(-1, 1, 1, 1)) / S.reshape(-1, 1, 1, 1)).float()
    F_x = net.model(inp, (-la / 8).float(), class_labels=labels)
    assert F_x.abs().max() > 0.1   # random weights: F is far from zero
    torch.testing.assert_close(net(logit_z, la, labels), inp + F_x, rtol=1e-5, atol=1e-5)
    # guidance mixes the backbone outputs: in + F_u + w (F_c - F_u)
    F_u = net.model(inp, (-la / 8).float(), class_labels=torch.zeros(3, 3))
    torch.testing.assert_close(net(logit_z, la, labels, cfg_scale=2.5), inp + F_u + 2.5 * (F_x - F_u),
                               rtol=1e-5, atol=1e-5)
    # brick skipping: the first brick's output
    F_0 = net.model(inp, (-la / 8).float(), class_labels=labels, return_stage_idx=0)
    torch.testing.assert_close(net(logit_z, la, labels, return_stage_idx=0), inp + F_0, rtol=1e-5, atol=1e-5)
    assert torch.allclose(net.x0_from_logit(torch.tensor([-50.0, 50.0])), torch.tensor([SHIFT, SHIFT + SCALE]))
    with pytest.raises(ValueError, match="logit_alpha holds 2 values but x has batch 3"):
        net(logit_z, la[:2], labels)


def test_loss_through_a_tiny_lego_with_random_weights():
    """BetaLoss on a two-brick LEGO (every weight random) equals the KLUB computed by hand from the
    backbone's per-brick outputs with torch.distributions' beta KL; its gradient reaches every weight."""
    net = tiny_beta_net(seed=2).train()
    loss_fn = BetaLoss()
    g = torch.Generator().manual_seed(4)
    y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    t = loss_fn.time(torch.tensor([0.05, 0.4, 0.7, 0.999]))
    logit_z = loss_fn.forward(y, t, gens(4))
    labels = torch.eye(3)[[0, 1, 2, 0]]
    drop = torch.tensor([[0], [1], [0], [0]])
    loss, per_brick = loss_fn(net, y, t, logit_z, labels, force_drop_ids=drop)

    # by hand
    la_t = logit_alpha(t.double()).reshape(-1, 1, 1, 1)
    la_s = logit_alpha(0.95 * t.double()).reshape(-1, 1, 1, 1)
    a_t, a_s = torch.sigmoid(la_t), torch.sigmoid(la_s)
    E, S = logit_moments(a_t)
    inp = ((logit_z.double() - E) / S).float()
    outs = net.model(inp, (-la_t / 8).flatten().float(), class_labels=labels, force_drop_ids=drop)
    assert len(outs) == 2 and min(o.abs().max().item() for o in outs) > 0.05
    x0 = ((y.double() + 1) / 2).clamp(0, 1) * SCALE + SHIFT
    hand = []
    for F in outs:
        xh = torch.sigmoid((inp + F).double()) * SCALE + SHIFT
        d = a_s - a_t
        cond = kl_divergence(Beta(ETA * d * xh, ETA * (1 - a_s * xh)), Beta(ETA * d * x0, ETA * (1 - a_s * x0)))
        marg = kl_divergence(Beta(ETA * a_t * xh, ETA * (1 - a_t * xh)), Beta(ETA * a_t * x0, ETA * (1 - a_t * x0)))
        hand.append((0.99 * cond.clamp(min=0) + 0.01 * marg.clamp(min=0)).sum((1, 2, 3)).mean())
    torch.testing.assert_close(torch.stack(per_brick).double(), torch.stack(hand), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), torch.stack(hand).mean(), rtol=1e-4, atol=1e-6)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().max() == 0
                                                                             or not torch.isfinite(p.grad).all())]
    assert missing == [], missing


def test_spec_round_trip_and_options():
    spec = network_spec(8, 1, 3, bricks=TINY, process="beta", beta={"eta": 5000, "data_mean": [0.25]})
    assert spec["process"] == "beta" and spec["beta"]["eta"] == 5000.0 and spec["beta"]["data_mean"] == [0.25]
    assert spec["beta"]["scale"] == SCALE and "sigma_data" not in spec
    net = build_network(spec)
    assert net.eta == 5000.0 and net.data_mean == [0.25]
    assert spec_from_network(net) == spec
    assert "process" not in network_spec(8, 1, 3, bricks=TINY)   # EDM specs are unchanged
    with pytest.raises(ValueError, match="process must be 'edm' or 'beta'"):
        network_spec(8, 1, 3, bricks=TINY, process="ddpm")
    with pytest.raises(ValueError, match="shift \\+ scale < 1"):
        network_spec(8, 1, 3, bricks=TINY, process="beta", beta={"scale": 0.5})
    with pytest.raises(TypeError, match="unknown beta-diffusion options \\['sigma'\\]"):
        network_spec(8, 1, 3, bricks=TINY, process="beta", beta={"sigma": 1})
    with pytest.raises(ValueError, match="data_mean must hold 1 per-channel means"):
        build_network(network_spec(8, 1, 3, bricks=TINY, process="beta", beta={"data_mean": [0.5, 0.5]}))


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

def test_sampling_grid():
    a = sampling_alphas(200)
    assert a.dtype == torch.float64 and len(a) == 201 and a[-1] == 1.0
    assert a[0].item() == pytest.approx(1 / (1 + math.exp(13)), rel=1e-12)
    ratios = a[1:] / a[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)   # geometric


def test_sampler_with_an_oracle_on_a_point_mass_returns_the_point():
    """Data = one image x*: the posterior mean is x* at every step, so the oracle x0_hat is x*; the
    chain's z is then exactly Beta(eta alpha_k x*, eta (1 - alpha_k x*)) at every step k (checked
    halfway, where alpha = 1.5e-3), and at alpha = 1 it is Beta(eta x*, eta (1 - x*)): mean x*,
    spread sqrt(x* (1 - x*) / (eta + 1)). Over 48 seeds x 16 pixels: each pixel's mean within Z
    standard errors, and the pooled standardised residuals of unit variance."""
    pixels = torch.linspace(-0.97, 0.97, 16, dtype=torch.float64).reshape(1, 1, 4, 4)   # x* in [-1, 1]
    x0_star = to_beta_range(pixels)
    oracle_logit = torch.logit((pixels + 1) / 2)      # sigmoid(.) scale + shift = x0*
    calls, states = [], {}

    def oracle(logit_z, la, stage):
        calls.append((float(la), stage))
        states[len(calls) - 1] = logit_z.clone()
        assert torch.isfinite(logit_z).all()
        return oracle_logit.expand(logit_z.shape[0], -1, -1, -1)

    n = 48
    images, from_z = beta_sampler(None, (n, 1, 4, 4), generators=gens(n), denoiser=oracle, return_z=True,
                                  data_mean=[float((pixels.mean() + 1) / 2)])
    assert len(calls) == 200 and calls[0][0] == pytest.approx(-13.0, abs=1e-5) and calls[-1][1] is None
    torch.testing.assert_close(images, pixels.float().expand(n, -1, -1, -1), rtol=0, atol=1e-6)

    def check(z, alpha, what):
        mean = alpha * x0_star
        sd = (mean * (1 - mean) / (ETA + 1)).sqrt()
        assert torch.all((z.mean(0) - mean[0]).abs() <= Z * sd[0] / math.sqrt(n)), what
        r = ((z - mean) / sd).flatten()
        assert abs(r.var().item() - 1) <= Z * math.sqrt(2 / len(r)), (what, r.var())

    alphas = sampling_alphas(200)
    check(torch.sigmoid(states[100]), alphas[100], "halfway")
    check((from_z.double() + 1) / 2 * SCALE + SHIFT, 1.0, "the end")
    assert from_z.std(0).mean() > 1e-3     # z is a random draw, not the oracle's value


def test_sampler_uses_guidance_and_skips_bricks():
    net = tiny_beta_net().eval()
    seen = []
    forward = net.forward

    def spy(*args, **kwargs):
        seen.append((kwargs.get("cfg_scale"), kwargs.get("return_stage_idx")))
        return forward(*args, **kwargs)

    net.forward = spy
    labels = torch.eye(3)[[0, 2]]
    with torch.no_grad():
        x = beta_sampler(net, (2, 1, 8, 8), labels, gens(2), num_steps=10, cfg_scale=2.0, t_break=0.3)
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6                    # x0_hat lies in the data range
    assert seen == [(2.0, None)] * 3 + [(2.0, 0)] * 7
    assert beta_mod.count_network_evaluations(10, 0.3) == {"full": 3, "skipped": 7}


# --------------------------------------------------------------------------------------------
# Training and sampling end to end
# --------------------------------------------------------------------------------------------

def beta_config(outdir, **kw):
    base = dict(data="digits", resolution=8, bricks=TINY, batch_size=8, steps=2, lr=1e-3, max_images=64,
                checkpoint_every=1, log_every=1, progress=False, outdir=str(outdir), seed=1, threads=2,
                process="beta", warmup_steps=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_training_resumes_exactly_and_records_the_process(tmp_path):
    straight = train(beta_config(tmp_path / "a", steps=2))
    first = train(beta_config(tmp_path / "b", steps=1))
    torch.manual_seed(999)   # scramble the global RNG: the resumed run restores what it needs
    resumed = train(beta_config(tmp_path / "b", steps=2, resume="auto"))
    assert all(math.isfinite(v) and v > 0 for v in straight.losses)
    assert first.losses + resumed.losses == straight.losses           # bit-identical on the CPU
    a = load_training_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    b = load_training_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    moved = max((a["model"][k] - build_network(a["network"]).state_dict()[k]).abs().max().item() for k in a["model"])
    assert moved > 1e-4
    assert a["network"]["process"] == "beta" and a["config"]["process"] == "beta"
    # the digits' mean (mostly background) is where sampling starts
    assert 0.05 < a["network"]["beta"]["data_mean"][0] < 0.5
    config = json.load(open(tmp_path / "a" / "config.json"))
    assert config["network"]["process"] == "beta"
    with pytest.raises(ValueError, match="process='beta' but this run has process='edm'.*--process beta"):
        train(beta_config(tmp_path / "b", steps=3, resume="auto", process="edm"))
    with pytest.raises(ValueError, match="process must be 'edm' or 'beta'"):
        beta_config(tmp_path / "c", process="vp").validate()


@pytest.fixture(scope="module")
def beta_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("beta_run")
    train(beta_config(out, steps=2))
    return str(out / "checkpoint.pt")


def test_sample_and_eval_detect_a_beta_network(beta_run, tmp_path, monkeypatch, capsys):
    net = load_network(beta_run)
    assert isinstance(net, BetaPrecond) and not net.training
    called = []
    real = beta_mod.beta_sampler

    def spy(*args, **kwargs):
        called.append(kwargs["num_steps"])
        return real(*args, **kwargs)

    monkeypatch.setattr(beta_mod, "beta_sampler", spy)
    res = sample(beta_run, "0-2", class_ids=[1, 2, 3], num_steps=5, batch_size=2, progress=False, device="cpu")
    assert called == [5, 5] and res.images.shape == (3, 1, 8, 8) and torch.isfinite(res.images).all()
    # one generator per seed: an image depends only on its seed, not on its batch
    alone = sample(net, [1], class_ids=[2], num_steps=5, progress=False, device="cpu")
    torch.testing.assert_close(alone.images[0], res.images[1], rtol=0, atol=1e-5)
    monkeypatch.setattr(beta_mod, "DEFAULT_SAMPLE_STEPS", 7)   # num_steps=None: the beta sampler's default
    sample(net, [0], num_steps=None, progress=False, device="cpu")
    assert called[-1] == 7
    with pytest.raises(ValueError, match="S_churn=1.0: churn is EDM's"):
        sample(net, [0], num_steps=2, S_churn=1.0, progress=False, device="cpu")

    from fastlego.__main__ import main
    assert main(["sample", "--network", beta_run, "--seeds", "0-3", "--steps", "3", "--cfg", "1.5",
                 "--t-break", "0.5", "--outdir", str(tmp_path / "s"), "--quiet", "--device", "cpu"]) == 0
    assert os.path.exists(tmp_path / "s" / "grid.png") and called[-1] == 3
    assert "sampled 4 images" in capsys.readouterr().out
    # fastlego eval: the digits measure of a beta network's samples
    assert main(["eval", "--network", beta_run, "--per-class", "1", "--steps", "2", "--quiet", "--device", "cpu",
                 "--json", str(tmp_path / "eval.json")]) == 0
    report = json.load(open(tmp_path / "eval.json"))
    assert called[-1] == 2 and report["n"] == 10 and 0 <= report["agreement"] <= 1
    assert report["process"] == "beta" and report["sampler"]["num_steps"] == 2


def test_cli_train_process_beta(tmp_path, capsys):
    from fastlego.__main__ import build_parser, main
    args = build_parser().parse_args(["train", "--outdir", str(tmp_path), "--process", "beta"])
    assert args.process == "beta"
    assert build_parser().parse_args(["train", "--outdir", str(tmp_path)]).process == "edm"
    assert main(["train", "--outdir", str(tmp_path / "r"), "--process", "beta", "--resolution", "8", "--bricks", TINY,
                 "--batch", "4", "--steps", "1", "--max-images", "16", "--quiet", "--threads", "2",
                 "--device", "cpu"]) == 0
    ckpt = load_training_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))
    assert ckpt["network"]["process"] == "beta"


def _ddp_run(outdir):
    """One rank of the two-process run (tests/two_processes.py sets up its environment)."""
    train(beta_config(outdir, steps=2, device="cpu", threads=1))


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Every image's forward draw comes from its own seed, so two processes with half the batch
    each draw what one process draws: the same losses and weights."""
    single = train(beta_config(tmp_path / "one", steps=2))
    run_two_processes(_ddp_run, str(tmp_path / "two"))
    one = load_training_checkpoint(str(tmp_path / "one" / "checkpoint.pt"))
    two = load_training_checkpoint(str(tmp_path / "two" / "checkpoint.pt"))
    assert two["world_size"] == 2 and two["step"] == 2
    losses_two = [json.loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert losses_two == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    worst = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    assert worst < 1e-5, worst


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_beta_training_with_cuda_graph_matches_eager_on_gpu(tmp_path):
    kw = dict(steps=6, checkpoint_every=6, device="cuda", precision="bf16", deterministic=True, resolution=16,
              bricks="4:lego_S_2:1,16:lego_S_8:1", grad_clip=1.0)
    graphed = train(beta_config(tmp_path / "graph", **kw))
    eager = train(beta_config(tmp_path / "eager", cuda_graph=False, **kw))
    assert graphed.cuda_graph and not eager.cuda_graph
    assert all(math.isfinite(v) for v in graphed.losses)
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-3)
    # 6 more steps: the step is captured after 3 eager ones
    resumed = train(beta_config(tmp_path / "graph", resume="auto", **dict(kw, steps=12)))
    assert resumed.cuda_graph and resumed.step == 12 and all(math.isfinite(v) for v in resumed.losses)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_beta_sampling_on_gpu_matches_cpu_and_cuda_graph(precision):
    net = tiny_beta_net().eval()
    ids = [0, 1, 2, 0]
    cpu = sample(net, "0-3", class_ids=ids, num_steps=20, cfg_scale=2.0, device="cpu", progress=False)
    gpu = sample(net, "0-3", class_ids=ids, num_steps=20, cfg_scale=2.0, device="cuda", progress=False,
                 precision=precision, cuda_graph=False)
    graph = sample(net, "0-3", class_ids=ids, num_steps=20, cfg_scale=2.0, device="cuda", progress=False,
                   precision=precision, cuda_graph=True)
    assert torch.isfinite(gpu.images).all()
    # CUDA's gamma draws differ from the CPU's: compare the distribution of pixel values loosely,
    # and the graph against eager on the same device closely (same generators, same draws)
    assert abs(gpu.images.mean().item() - cpu.images.mean().item()) < 0.3
    torch.testing.assert_close(graph.images, gpu.images, rtol=0, atol=2e-2 if precision == "bf16" else 1e-4)
