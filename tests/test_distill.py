"""SiD distillation (fastlego.distill): the analytic proof on Gaussian data (exact denoiser as the
teacher, an affine generator, a fake score of the Gaussian-denoiser form), the losses through a
tiny randomised LEGO teacher, the loop (resume, DDP, run folders), one-step sampling and the
command line."""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

import fastlego
from two_processes import run_two_processes
from fastlego.distill import (DISTILL_FORMAT, DistillConfig, SiDLoss, denoise, distill, draw_half_step,
                              fake_score_step, generator_from_checkpoint, generator_step, load_distill_checkpoint,
                              mark_one_step, one_step_sigma)
from fastlego.networks import build_network, network_spec
from fastlego.run_folder import RunFolderInUse
from fastlego.testing import randomize_

# A LEGO small enough for the CPU: 4x4 regions of four 2x2 patches, then the 8x8 image in four
# 4x4 patches, width 32 (regions of one token would leave the attention's q and k without gradient).
TINY = "4:w32p2h2:1,8:w32p4h2:1"
TOY_SHAPE = (1, 2, 2)
MU = torch.tensor([0.5, -0.3, 0.2, 1.0]).reshape(1, *TOY_SHAPE)
S = 0.7


# --------------------------------------------------------------------------------------------
# Gaussian data: the exact denoiser, an affine generator, a Gaussian-denoiser-form fake score
# --------------------------------------------------------------------------------------------

class GaussianDenoiser(nn.Module):
    """D(x; sigma) = a + b^2 / (b^2 + sigma^2) (x - a): the exact denoiser of N(a, b^2 I)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float32).reshape(1, *TOY_SHAPE).clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def slope(self, sigma):
        return self.b ** 2 / (self.b ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    def forward(self, x, sigma, labels=None, **kwargs):
        return self.a + self.slope(sigma) * (x - self.a)


class AffineGenerator(nn.Module):
    """G(x; sigma) = m + r x / sigma: with x = sigma_init z, x_g = m + r z ~ N(m, r^2 I)."""

    def __init__(self, m, r):
        super().__init__()
        self.m = nn.Parameter(torch.as_tensor(m, dtype=torch.float32).reshape(1, *TOY_SHAPE).clone())
        self.r = nn.Parameter(torch.tensor(float(r)))

    def forward(self, x, sigma, labels=None, **kwargs):
        return self.m + self.r * x / sigma.reshape(-1, 1, 1, 1)


def adam(module, lr):
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)


def gaussian_teacher():
    return GaussianDenoiser(MU, S).requires_grad_(False)


def test_noise_levels_of_both_steps():
    sid = SiDLoss()
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    t = u * 0.8
    assert torch.allclose(sid.generator_sigma(u), (hi + (1 - t) * (lo - hi)) ** 7)
    assert sid.generator_sigma(u)[0].item() == pytest.approx(0.002)       # t = 0 is sigma_min
    assert sid.generator_sigma(torch.tensor(1.0)).item() < 80.0            # tmax = 800 never reaches sigma_max
    assert SiDLoss(tmax=1000).generator_sigma(torch.tensor(1.0)).item() == pytest.approx(80.0, rel=1e-5)
    assert sid.fake_sigma(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([math.exp(-1.2), math.exp(0.0)])


def test_fake_score_step_finds_the_generators_analytic_denoiser():
    """With the generator fixed at N(m, r^2 I), the fake-score step's optimum is that Gaussian's
    exact denoiser: (a, |b|) -> (m, r), and its outputs match the analytic denoiser's."""
    torch.manual_seed(0)
    m = torch.tensor([-0.4, 0.3, 0.8, 0.0]).reshape(1, *TOY_SHAPE)
    r = 0.45
    G = AffineGenerator(m, r).requires_grad_(False)
    fake = GaussianDenoiser(torch.zeros(4), 1.2)
    opt = adam(fake, 2e-2)
    sid, gen = SiDLoss(), torch.Generator().manual_seed(1)
    for i in range(400):
        if i == 250:
            for group in opt.param_groups:
                group["lr"] = 2e-3
        d = draw_half_step(gen, 512, TOY_SHAPE, 0, 0.0, False, "cpu")
        loss, skipped = fake_score_step(sid, G, fake, list(fake.parameters()), opt, d.z, None, None,
                                        sid.fake_sigma(d.u), d.noise)
        assert math.isfinite(loss.item()) and skipped.item() == 0
    assert (fake.a.detach() - m).abs().max().item() < 0.03, fake.a
    assert abs(abs(fake.b.item()) - r) < 0.02, fake.b
    analytic = GaussianDenoiser(m, r)
    x = torch.randn(64, *TOY_SHAPE, generator=torch.Generator().manual_seed(2)) * 2
    for sigma in (0.05, 0.5, 2.0, 10.0):
        s = torch.full((64,), sigma)
        err = (fake(x, s) - analytic(x, s)).abs().max().item()
        assert err < 0.05, (sigma, err)


def _generator_grads(G, fake, batch=4096, seed=0, sid=SiDLoss()):
    gen = torch.Generator().manual_seed(seed)
    d = draw_half_step(gen, batch, TOY_SHAPE, 0, 0.0, True, "cpu")
    G.zero_grad(set_to_none=True)
    x_g = sid.generate(G, d.z)
    objective, _, _ = sid.generator_loss(gaussian_teacher(), fake, x_g, sid.generator_sigma(d.u), d.noise)
    objective.backward()
    return G.m.grad.clone(), G.r.grad.clone(), d


def test_generator_gradient_vanishes_at_the_data_distribution():
    """At theta = (mu, s), with the fake score at its optimum (the data's denoiser), the
    generator's gradient is 0; away from it, the gradient is not, and descending it moves the
    generator toward (mu, s)."""
    fake = GaussianDenoiser(MU, S).requires_grad_(False)
    grad_m, grad_r, _ = _generator_grads(AffineGenerator(MU, S), fake)
    assert grad_m.abs().max().item() < 1e-6 and abs(grad_r.item()) < 1e-6, (grad_m, grad_r)
    # Away from the data: fake score = the analytic denoiser of the generator's own distribution.
    m, r = MU + torch.tensor([0.3, -0.2, 0.1, -0.3]).reshape(1, *TOY_SHAPE), 0.4
    grad_m, grad_r, _ = _generator_grads(AffineGenerator(m, r), GaussianDenoiser(m, r).requires_grad_(False))
    assert grad_m.abs().max().item() > 1e-2 and abs(grad_r.item()) > 1e-2
    assert ((-grad_m) * (MU - m)).sum().item() > 0      # mean pulled toward mu
    assert (-grad_r.item()) * (S - r) > 0                # scale pulled toward s


def test_generator_gradient_runs_through_both_networks_inputs():
    """theta reaches the loss only through x_g = m + r z, and through the teacher's and the fake
    score's inputs y_t = x_g + sigma n too: the autograd gradient equals the closed form
    dL/dx = [(c_r - c_f) v + u ((c_r - 1) - alpha (c_r - c_f))] / w, where u = y_real - y_fake,
    v = (y_real - x_g) - alpha u and c_r, c_f are the two denoisers' slopes; leaving out the paths
    through the networks' inputs (dL/dx = -u / w) gives another gradient."""
    sid = SiDLoss()
    m, r = MU + 0.25, 0.5
    fake = GaussianDenoiser(MU - 0.2, 0.9).requires_grad_(False)
    G = AffineGenerator(m, r)
    grad_m, grad_r, d = _generator_grads(G, fake, batch=256, seed=3)
    teacher = gaussian_teacher()
    with torch.no_grad():
        sigma = sid.generator_sigma(d.u)
        x = m + r * d.z
        y = x + sigma.reshape(-1, 1, 1, 1) * d.noise
        y_real, y_fake = teacher(y, sigma), fake(y, sigma)
        c_r, c_f = teacher.slope(sigma), fake.slope(sigma)
        w = (x - y_real).abs().flatten(1).mean(1).clamp(min=1e-5).reshape(-1, 1, 1, 1)
        u = y_real - y_fake
        v = (y_real - x) - sid.alpha * u
        dx = ((c_r - c_f) * v + u * ((c_r - 1) - sid.alpha * (c_r - c_f))) / w * (sid.loss_scale / 256)
        detached = -u / w * (sid.loss_scale / 256)
    torch.testing.assert_close(grad_m, dx.sum(0, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_r, (dx * d.z).sum(), rtol=1e-4, atol=1e-5)
    assert (detached.sum(0, keepdim=True) - grad_m).abs().max().item() > 0.1


def test_short_sid_run_converges_to_the_data_distribution():
    """Alternating fake-score and generator steps (Adam, betas (0, 0.999)) from a generator and a
    fake score far from the data: the generator ends at (mu, s)."""
    torch.manual_seed(0)
    G = AffineGenerator(torch.zeros(4), 0.25)
    fake = GaussianDenoiser(torch.zeros(4), 0.25)
    teacher = gaussian_teacher()
    opt_g, opt_f = adam(G, 1e-2), adam(fake, 1e-2)
    sid, gen = SiDLoss(), torch.Generator().manual_seed(1)
    start = (G.m.detach() - MU).abs().max().item(), abs(G.r.item() - S)
    for i in range(500):
        if i == 300:
            for opt in (opt_g, opt_f):
                for group in opt.param_groups:
                    group["lr"] = 1e-3
        df = draw_half_step(gen, 256, TOY_SHAPE, 0, 0.0, False, "cpu")
        dg = draw_half_step(gen, 256, TOY_SHAPE, 0, 0.0, True, "cpu")
        fake_score_step(sid, G, fake, list(fake.parameters()), opt_f, df.z, None, None, sid.fake_sigma(df.u), df.noise)
        generator_step(sid, G, teacher, fake, list(fake.parameters()), list(G.parameters()), opt_g, dg.z, None, None,
                       sid.generator_sigma(dg.u), dg.noise)
    assert start[0] > 0.9 and start[1] > 0.4
    assert (G.m.detach() - MU).abs().max().item() < 0.06, G.m
    assert abs(abs(G.r.item()) - S) < 0.04, G.r
    assert teacher.a.grad is None and torch.equal(teacher.a, MU)


def test_non_finite_samples_are_left_out_and_counted():
    """A generator sample that is NaN, or a teacher output that is inf, is left out of the loss
    and counted; the other images still train and every weight stays finite."""

    class Broken(AffineGenerator):
        def forward(self, x, sigma, labels=None, **kwargs):
            out = super().forward(x, sigma)
            bad = torch.zeros(x.shape[0], 1, 1, 1, dtype=torch.bool)
            bad[0] = True
            return torch.where(bad, torch.full_like(out, float("nan")), out)

    class InfTeacher(GaussianDenoiser):
        def forward(self, x, sigma, labels=None, **kwargs):
            out = super().forward(x, sigma)
            bad = torch.zeros(x.shape[0], 1, 1, 1, dtype=torch.bool)
            bad[1] = True
            return torch.where(bad, torch.full_like(out, float("inf")), out)

    sid, gen = SiDLoss(), torch.Generator().manual_seed(0)
    G, fake = Broken(MU + 0.3, 0.5), GaussianDenoiser(MU, 0.6)
    teacher = InfTeacher(MU, S).requires_grad_(False)
    opt_g, opt_f = adam(G, 1e-2), adam(fake, 1e-2)
    df = draw_half_step(gen, 16, TOY_SHAPE, 0, 0.0, False, "cpu")
    dg = draw_half_step(gen, 16, TOY_SHAPE, 0, 0.0, True, "cpu")
    before = [p.detach().clone() for p in list(G.parameters()) + list(fake.parameters())]
    loss_f, skipped_f = fake_score_step(sid, G, fake, list(fake.parameters()), opt_f, df.z, None, None,
                                        sid.fake_sigma(df.u), df.noise)
    loss_g, skipped_g = generator_step(sid, G, teacher, fake, list(fake.parameters()), list(G.parameters()), opt_g,
                                       dg.z, None, None, sid.generator_sigma(dg.u), dg.noise)
    assert skipped_f.item() == 1 and skipped_g.item() == 2
    assert math.isfinite(loss_f.item()) and math.isfinite(loss_g.item())
    after = list(G.parameters()) + list(fake.parameters())
    for p, old in zip(after, before):
        assert torch.isfinite(p).all() and torch.isfinite(p.grad).all()
        assert not torch.equal(p.detach(), old)   # the finite images still trained every weight


# --------------------------------------------------------------------------------------------
# A tiny LEGO teacher with every weight randomised
# --------------------------------------------------------------------------------------------

def tiny_lego(seed: int, intermediate: bool = True) -> fastlego.EDMPrecond:
    net = build_network(network_spec(8, 1, 10, bricks=TINY, intermediate=intermediate, class_dropout_prob=0.1))
    return randomize_(net, seed=seed, scale=0.5)


def lego_draws(seed=0, batch=6):
    gen = torch.Generator().manual_seed(seed)
    fake = draw_half_step(gen, batch, (1, 8, 8), 10, 0.3, False, "cpu")
    gen_draws = draw_half_step(gen, batch, (1, 8, 8), 10, 0.3, True, "cpu")
    return fake, gen_draws


def test_losses_through_a_tiny_randomised_lego_teacher():
    """Generator step: finite losses, gradients on every generator weight, none on the teacher's
    or the fake score's (whose weights do not change); theta reaches the loss through x_g only,
    and x_g's gradient includes the paths through both networks' inputs. Fake-score step: only
    the fake score changes."""
    sid = SiDLoss()
    teacher = tiny_lego(1).eval().requires_grad_(False)
    G, fake = tiny_lego(2).train(), tiny_lego(3).train()
    g_params, f_params = list(G.parameters()), [p for p in fake.parameters() if p.requires_grad]
    assert isinstance(G(torch.zeros(2, 1, 8, 8), torch.ones(2)), list)  # intermediate stages: a list in train mode
    df, dg = lego_draws()
    assert dg.drop_ids.sum().item() > 0  # some labels are dropped
    sigma = sid.generator_sigma(dg.u)
    saved = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in
             (("teacher", teacher), ("fake", fake), ("G", G))}

    # theta -> loss only through x_g: the full backward equals x_g's gradient pulled back through G.
    x_g = sid.generate(G, dg.z, dg.labels, dg.drop_ids)
    objective, loss, skipped = sid.generator_loss(teacher, fake, x_g, sigma, dg.noise, dg.labels, dg.drop_ids)
    assert torch.isfinite(objective) and torch.isfinite(loss) and skipped.item() == 0 and objective.abs().item() > 0
    trainable = [p for p in g_params if p.requires_grad]
    full = torch.autograd.grad(objective, trainable)
    x_leaf = sid.generate(G, dg.z, dg.labels, dg.drop_ids)
    leaf = x_leaf.detach().requires_grad_(True)
    objective_leaf = sid.generator_loss(teacher, fake, leaf, sigma, dg.noise, dg.labels, dg.drop_ids)[0]
    dx = torch.autograd.grad(objective_leaf, leaf)[0]
    chained = torch.autograd.grad(x_leaf, trainable, grad_outputs=dx)
    for a, b in zip(full, chained):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # ... and x_g's gradient runs through the teacher's and the fake score's inputs.
    def detached(net):   # the network's output, with no gradient path through its input
        return lambda x, s, labels=None, force_drop_ids=None: denoise(net, x, s, labels, force_drop_ids).detach()

    detached_teacher, detached_fake = detached(teacher), detached(fake)
    leaf2 = x_leaf.detach().requires_grad_(True)
    dx_outputs_only = torch.autograd.grad(sid.generator_loss(detached_teacher, detached_fake, leaf2, sigma, dg.noise,
                                                             dg.labels, dg.drop_ids)[0], leaf2)[0]
    assert (dx - dx_outputs_only).abs().max().item() > 1e-3 * dx.abs().max().item()

    # A generator step changes the generator only; no gradient lands on the other two.
    opt_g, opt_f = adam(G, 1e-3), adam(fake, 1e-3)
    loss_g, skipped_g = generator_step(sid, G, teacher, fake, f_params, g_params, opt_g, dg.z, dg.labels, dg.drop_ids,
                                       sigma, dg.noise)
    assert math.isfinite(loss_g.item()) and skipped_g.item() == 0
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in fake.parameters())
    assert all(p.requires_grad for p in f_params) and fake.training   # restored after the step
    for name, net in (("teacher", teacher), ("fake", fake)):
        assert all(torch.equal(v, saved[name][k]) for k, v in net.state_dict().items()), name
    grads = [p.grad for p in trainable]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().max() > 0) for g in grads) == len(grads)   # every generator weight is reached
    changed = [k for k, v in G.state_dict().items() if not torch.equal(v, saved["G"][k])]
    assert len(changed) >= len(trainable)

    # A fake-score step changes the fake score only.
    saved_g = {k: v.clone() for k, v in G.state_dict().items()}
    loss_f, skipped_f = fake_score_step(sid, G, fake, f_params, opt_f, df.z, df.labels, df.drop_ids,
                                        sid.fake_sigma(df.u), df.noise)
    assert math.isfinite(loss_f.item()) and loss_f.item() > 0 and skipped_f.item() == 0
    assert all(torch.equal(v, saved_g[k]) for k, v in G.state_dict().items())
    assert all(torch.equal(v, saved["teacher"][k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, saved["fake"][k]) for k, v in fake.state_dict().items())


def test_teacher_guidance_and_label_dropout_reach_the_teacher():
    """teacher_cfg makes y_real the guided denoiser; a dropped label gives the unconditional one."""
    teacher = tiny_lego(1).eval().requires_grad_(False)
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    drop = torch.tensor([[0], [1], [0], [1]])
    guided = denoise(teacher, x, sigma, labels, drop, cfg_scale=2.0)
    with torch.no_grad():
        cond, uncond = teacher(x, sigma, labels), teacher(x, sigma, torch.zeros_like(labels))
        plain = denoise(teacher, x, sigma, labels, drop)
    keep = drop.flatten() == 0
    torch.testing.assert_close(guided[keep], (uncond + 2.0 * (cond - uncond))[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[~keep], uncond[~keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain[~keep], uncond[~keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain[keep], cond[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_generator_gradient_on_the_triton_backward_matches_the_reference_interpreted():
    """The generator's gradient through the teacher's and the fake score's inputs on the fused
    kernels' backward (Triton's interpreter on the CPU) equals the reference ops' (fp32)."""
    from fastlego import dispatch
    from fastlego.testing import max_error
    sid = SiDLoss()
    teacher, G, fake = tiny_lego(1).eval().requires_grad_(False), tiny_lego(2).train(), tiny_lego(3).eval()
    fake.requires_grad_(False)
    _, d = lego_draws(seed=4, batch=2)

    def grads(mode):
        G.zero_grad(set_to_none=True)
        with fastlego.use_backend(mode):
            x = sid.generate(G, d.z, d.labels, d.drop_ids)
            objective, _, _ = sid.generator_loss(teacher, fake, x, sid.generator_sigma(d.u), d.noise, d.labels,
                                                 d.drop_ids)
            objective.backward()
        return {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None}

    ref = grads("reference")
    with dispatch.record() as rec:
        got = grads("triton")
    assert {r.op for r in rec} >= {"brick_embed", "modulated_linear", "window_attention", "final_layer",
                                   "window_attention_backward", "brick_embed_input_grad"}
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        scale = max(ref[name].abs().max().item(), 1e-3)
        assert max_error(got[name], ref[name]) <= 2e-4 * scale, name


# --------------------------------------------------------------------------------------------
# The loop: files, resume, DDP
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    fastlego.save_checkpoint(tiny_lego(1), path)
    return path


def tiny_config(outdir, teacher=None, **kw):
    base = dict(teacher=teacher, outdir=str(outdir), batch_size=4, steps=3, lr=1e-3, log_every=1,
                checkpoint_every=100, progress=False, threads=2, seed=1, ema_halflife_kimg=0.01)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher_path):
    """A 3-step distillation of the tiny teacher (checkpoint every 2 steps)."""
    out = tmp_path_factory.mktemp("distilled")
    return distill(tiny_config(out, teacher_path, checkpoint_every=2))


def test_distill_writes_checkpoint_metrics_and_config(distilled, teacher_path):
    res = distilled
    assert res.step == res.steps_run == 3 and res.nimg == 12 and len(res.losses) == 3
    assert all(math.isfinite(v) for row in res.losses for v in row) and res.skipped == [0, 0]
    assert sorted(os.listdir(res.outdir)) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    records = [json.loads(line) for line in open(os.path.join(res.outdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all({"loss_fake_score", "loss_generator", "skipped_fake_score", "skipped_generator"} <= set(r)
               for r in records)
    ckpt = load_distill_checkpoint(res.checkpoint)
    assert ckpt["format"] == DISTILL_FORMAT and ckpt["step"] == 3 and ckpt["one_step"] == {"sigma_init": 2.5}
    teacher = fastlego.load_checkpoint(teacher_path)
    moved = [k for k in ckpt["generator"] if not torch.equal(ckpt["generator"][k], teacher.state_dict()[k])]
    assert moved and all(k in teacher.state_dict() for k in ckpt["generator"])   # started from the teacher
    assert not torch.equal(ckpt["generator"][moved[0]], ckpt["generator_ema"][moved[0]])
    config = json.load(open(os.path.join(res.outdir, "config.json")))
    assert config["distill"]["alpha"] == 1.2 and config["class_dropout"] == pytest.approx(0.1)
    assert one_step_sigma(res.generator) == 2.5 and not res.generator.training


def test_resume_takes_the_same_next_steps(tmp_path, teacher_path):
    straight = distill(tiny_config(tmp_path / "a", teacher_path, steps=3))
    first = distill(tiny_config(tmp_path / "b", teacher_path, steps=2))
    torch.manual_seed(12345)   # scramble the global RNG: the resumed run must restore what it needs
    resumed = distill(tiny_config(tmp_path / "b", teacher_path, steps=3, resume="auto"))
    assert first.losses == straight.losses[:2] and resumed.losses == straight.losses[2:]   # bit-identical on the CPU
    a = load_distill_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    b = load_distill_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    for key in ("generator", "generator_ema", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("optimizer_generator", "optimizer_fake_score"):
        for pa, pb in zip(a[key]["state"].values(), b[key]["state"].values()):
            assert all(torch.equal(pa[n], pb[n]) for n in pa), key
    assert torch.equal(a["rng"]["distill_generator"], b["rng"]["distill_generator"]) and a["step"] == b["step"] == 3
    records = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    with pytest.raises(ValueError, match="batch_size=4 but this run has batch_size=8"):
        distill(tiny_config(tmp_path / "b", teacher_path, steps=4, batch_size=8, resume="auto"))
    other = str(tmp_path / "other.safetensors")
    fastlego.save_checkpoint(tiny_lego(7), other)
    with pytest.raises(ValueError, match="another teacher"):
        distill(tiny_config(tmp_path / "b", other, steps=4, resume="auto"))


def test_run_folder_rules_and_bad_values(tmp_path, distilled, teacher_path):
    with pytest.raises(RunFolderInUse, match="--resume auto"):
        distill(tiny_config(distilled.outdir, teacher_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill(tiny_config(tmp_path / "x", str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="one-step generator"):
        distill(tiny_config(tmp_path / "y", distilled.checkpoint))   # a distilled generator is no teacher
    for kw, message in [(dict(teacher=None), "needs a teacher"), (dict(tmax=0.0), "tmax must lie in"),
                        (dict(alpha=float("inf")), "alpha must be finite"), (dict(lr=0.0), "lr must be a positive"),
                        (dict(betas=(0.9, 1.0)), "betas must be two numbers"),
                        (dict(precision="fp16"), "precision must be"), (dict(class_dropout=1.0), "class_dropout"),
                        (dict(steps=None), "needs max_seconds")]:
        with pytest.raises(ValueError, match=message):
            distill(tiny_config(tmp_path / "z", **dict(dict(teacher=teacher_path), **kw)))
    assert not os.path.exists(tmp_path / "z")   # refused before any work
    with pytest.raises(ValueError, match="needs a CUDA device"):
        distill(tiny_config(tmp_path / "g", teacher_path, device="cpu", cuda_graph=True))


def max_difference_but_key_bias(a: dict, b: dict) -> float:
    """max |a - b| over two state dicts, the attention's key bias left out: it shifts every logit of
    a query equally, so its gradient is 0 up to float rounding, which Adam's early steps (about
    lr * sign(gradient)) turn into lr-sized moves that differ with any rounding."""
    worst = 0.0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        if k.endswith("attn.qkv.bias"):
            d[d.shape[0] // 3:2 * d.shape[0] // 3] = 0
        worst = max(worst, d.max().item())
    return worst


def _ddp_run(outdir, teacher):
    """One rank of the two-process run (tests/two_processes.py sets up its environment)."""
    distill(tiny_config(outdir, teacher, steps=2, device="cpu", threads=1))


def test_ddp_two_processes_equal_one_process_with_the_combined_batch(tmp_path, teacher_path):
    single = distill(tiny_config(tmp_path / "one", teacher_path, steps=2, device="cpu"))
    run_two_processes(_ddp_run, str(tmp_path / "two"), teacher_path)
    one = load_distill_checkpoint(str(tmp_path / "one" / "checkpoint.pt"))
    two = load_distill_checkpoint(str(tmp_path / "two" / "checkpoint.pt"))
    assert two["world_size"] == 2 and two["step"] == 2 and len(two["rng"]["per_rank"]) == 2
    records = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    losses_two = [[r["loss_fake_score"], r["loss_generator"]] for r in records]
    for row_two, row_one in zip(losses_two, single.losses):
        assert row_two == pytest.approx(row_one, rel=1e-4, abs=1e-6)
    for key in ("generator", "fake_score"):
        worst = max_difference_but_key_bias(one[key], two[key])
        assert worst < 1e-5, (key, worst)
    teacher = fastlego.load_checkpoint(teacher_path).state_dict()
    assert max((one["generator"][k] - teacher[k]).abs().max().item() for k in teacher) > 1e-4   # both moved


# --------------------------------------------------------------------------------------------
# One-step sampling, the command line, the demo
# --------------------------------------------------------------------------------------------

def test_sample_detects_the_one_step_generator_and_draws_in_one_evaluation(distilled):
    from fastlego.sampling import StackedRandomGenerator, load_network, sample
    net = load_network(distilled.checkpoint)
    assert one_step_sigma(net) == 2.5 and not net.training
    raw = load_network(distilled.checkpoint, which="model")
    assert not torch.equal(net.state_dict()["model.model.1.final_layer.linear.weight"],
                           raw.state_dict()["model.model.1.final_layer.linear.weight"])
    calls = []
    net.model.register_forward_hook(lambda *a: calls.append(1))
    seeds, ids = [5, 6, 7], [1, 2, 3]
    res = sample(net, seeds, class_ids=ids, progress=False, batch_size=3, device="cpu")
    assert len(calls) == 1   # one network evaluation for the whole batch (eager: on the CPU)
    rnd = StackedRandomGenerator("cpu", seeds)
    z = rnd.randn([3, 1, 8, 8])
    with torch.no_grad():
        expected = net(2.5 * z, torch.full((3,), 2.5), torch.nn.functional.one_hot(torch.tensor(ids), 10).float())
    torch.testing.assert_close(res.images, expected, rtol=1e-5, atol=1e-6)
    again = sample(distilled.checkpoint, [7, 5], class_ids=[3, 1], progress=False, batch_size=1, device="cpu")
    torch.testing.assert_close(again.images, res.images[[2, 0]], rtol=1e-5, atol=1e-6)   # an image depends on its seed
    for kw, message in [(dict(cfg_scale=2.0), "one-step generator"), (dict(t_break=0.5), "no late steps"),
                        (dict(S_churn=1.0), "no sampler steps")]:
        with pytest.raises(ValueError, match=message):
            sample(net, [0, 1], progress=False, **kw)
    # generator_from_checkpoint / mark_one_step are the same thing from the API.
    direct = generator_from_checkpoint(distilled.checkpoint)
    assert torch.equal(direct.state_dict()["model.model.1.final_layer.linear.weight"],
                       net.state_dict()["model.model.1.final_layer.linear.weight"])
    plain = tiny_lego(1).eval()
    assert one_step_sigma(plain) is None and one_step_sigma(mark_one_step(plain, 1.5)) == 1.5


def test_cli_distill_sample_and_eval(tmp_path, teacher_path, capsys):
    from fastlego.__main__ import main
    out = tmp_path / "run"
    rc = main(["distill", "--teacher", teacher_path, "--outdir", str(out), "--batch", "2", "--steps", "2",
               "--lr", "1e-3", "--log-every", "1", "--threads", "2", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "distilled 2 steps (step 0 -> 2)" in printed and "fastlego sample --network" in printed
    ckpt = str(out / "checkpoint.pt")
    assert main(["sample", "--network", ckpt, "--outdir", str(tmp_path / "s"), "--seeds", "0-3", "--quiet"]) == 0
    assert "sampled 4 images of 8x8" in capsys.readouterr().out and (tmp_path / "s" / "grid.png").exists()
    assert main(["sample", "--network", ckpt, "--outdir", str(tmp_path / "s2"), "--cfg", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "one-step generator" in err and "Traceback" not in err
    assert main(["eval", "--network", ckpt, "--per-class", "1", "--quiet"]) == 0
    assert "agreement" in capsys.readouterr().out
    assert main(["distill", "--teacher", teacher_path, "--outdir", str(out), "--steps", "3", "--quiet"]) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_every_distill_option_says_what_it_does_and_its_default():
    import argparse
    from fastlego.__main__ import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["distill"]
    formatter = parser._get_formatter()
    checked = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        assert action.help and len(text.split()) >= 3, action.option_strings
        if action.required:
            assert "required" in text, action.option_strings
        else:
            assert "default" in text, (action.option_strings, text)
        if action.default not in (None, False, True):
            assert f"default: {action.default}" in text, (action.option_strings, text)
        checked += 1
    assert checked >= 30
    defaults = parser.parse_args(["--teacher", "t", "--outdir", "o"])
    config = DistillConfig()
    assert (defaults.lr, defaults.alpha, defaults.tmax, defaults.sigma_init, defaults.loss_scale, defaults.batch) == \
        (config.lr, config.alpha, config.tmax, config.sigma_init, config.loss_scale, config.batch_size)
    assert (defaults.beta1, defaults.beta2, defaults.eps) == (0.0, 0.999, 1e-8)


def test_demo_distills_and_measures_one_step_samples(tmp_path, capsys):
    from fastlego.demo import demo
    summary = demo(train_steps=2, sample_steps=2, rows=1, batch=4, outdir=str(tmp_path / "demo"), progress=False,
                   distill=True, distill_steps=2)
    d = summary["distill"]
    assert d["steps"] == 2 and os.path.exists(d["checkpoint"]) and os.path.exists(d["one_step"]["grid"])
    assert 0 <= d["one_step"]["agreement"] <= 1 and d["one_step"]["frechet_distance"] > 0
    assert json.load(open(tmp_path / "demo" / "demo.json"))["distill"]["steps"] == 2
    assert "one step:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# GPU: the CUDA-graph step, the Triton backward through the teacher's input, bf16
# --------------------------------------------------------------------------------------------

GPU_BRICKS = "8:w128p4h4:1,32:w128p4h4:2"


@pytest.fixture
def gpu_teacher(tmp_path):
    net = build_network(network_spec(32, 3, 10, bricks=GPU_BRICKS, intermediate=True, class_dropout_prob=0.1))
    path = str(tmp_path / "teacher.safetensors")
    fastlego.save_checkpoint(randomize_(net, seed=1, scale=0.5), path)
    return path


@pytest.mark.cuda
def test_cuda_graph_distillation_equals_eager_steps(tmp_path, gpu_teacher):
    common = dict(batch_size=8, steps=6, precision="fp32", device="cuda", threads=None, deterministic=True,
                  grad_clip=1.0)
    eager = distill(tiny_config(tmp_path / "eager", gpu_teacher, cuda_graph=False, **common))
    graphed = distill(tiny_config(tmp_path / "graph", gpu_teacher, cuda_graph=True, **common))
    assert graphed.cuda_graph and not eager.cuda_graph
    for a, b in zip(graphed.losses, eager.losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    ga = load_distill_checkpoint(graphed.checkpoint)["generator"]
    gb = load_distill_checkpoint(eager.checkpoint)["generator"]
    # Not bit for bit: the captured Adam reads its rate and step from device tensors (fp32 bias
    # corrections) where the eager one uses Python floats.
    assert max_difference_but_key_bias(ga, gb) < 1e-4
    teacher = fastlego.load_checkpoint(gpu_teacher).state_dict()
    assert max_difference_but_key_bias(ga, {k: v for k, v in teacher.items()}) > 1e-3   # the steps did train


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_generator_gradient_on_the_triton_backward_matches_the_reference(dtype):
    """The generator's gradient runs backward through the teacher's and the fake score's inputs:
    on the fused kernels' backward it matches the fp32 reference (the tolerance rule)."""
    from fastlego.testing import assert_close_to_reference
    sid = SiDLoss()
    torch.manual_seed(0)
    spec = network_spec(32, 3, 10, bricks=GPU_BRICKS, intermediate=True, class_dropout_prob=0.1)
    nets = [randomize_(build_network(spec), seed=s, scale=0.5).cuda() for s in (1, 2, 3)]
    teacher, G, fake = nets[0].eval().requires_grad_(False), nets[1].train(), nets[2].eval().requires_grad_(False)
    gen = torch.Generator("cuda").manual_seed(0)
    d = draw_half_step(gen, 6, (3, 32, 32), 10, 0.3, True, "cuda")

    def grads(backend, autocast_dtype):
        G.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype != torch.float32 else torch.enable_grad()
        with fastlego.use_backend(backend), ctx:
            x = sid.generate(G, d.z, d.labels, d.drop_ids)
            objective, _, _ = sid.generator_loss(teacher, fake, x, sid.generator_sigma(d.u), d.noise, d.labels,
                                                 d.drop_ids)
        objective.backward()
        return torch.cat([p.grad.flatten() for p in G.parameters() if p.grad is not None])

    from fastlego.kernels.policy import tf32
    with tf32(False):   # IEEE fp32 on both sides, whatever an earlier test left switched on
        ref = grads("reference", torch.float32)
        out = grads("triton", dtype)
        same = grads("reference", dtype) if dtype != torch.float32 else None
    atol = (1e-4 if dtype == torch.float32 else 1e-3) * ref.abs().max().item()
    assert_close_to_reference(out, ref, same, atol=atol, what=f"generator grads {dtype}")


@pytest.mark.cuda
def test_bf16_distillation_of_a_preset_on_gpu(tmp_path):
    net = build_network(network_spec(64, 3, 1000, preset="lego_S_PG_64", intermediate=True, class_dropout_prob=0.1))
    path = str(tmp_path / "s64.safetensors")
    fastlego.save_checkpoint(randomize_(net, seed=1, scale=0.5), path)
    res = distill(tiny_config(tmp_path / "run", path, batch_size=16, steps=5, device="cuda", threads=None))
    assert res.cuda_graph and all(math.isfinite(v) for row in res.losses for v in row)
    from fastlego.sampling import sample
    images = sample(res.checkpoint, "0-15", progress=False, device="cuda", precision="bf16").images
    assert images.shape == (16, 3, 64, 64) and torch.isfinite(images).all()
