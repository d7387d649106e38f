"""Seed for seed, fastlego's sampler against the release's generator (EDM's sampler, LEGO's networks).

The reference below is written from the published algorithm (Karras et al. 2022, Algorithm 2) and
from how the release's `generate.py` spends each seed's random numbers, not from fastlego's code:

* one `torch.Generator` per seed, seeded with `seed mod 2^32`;
* from it, in this order: the latent (C, H, W) in float32; then, for a class-conditional network,
  one class id `randint(label_dim)` (drawn even when a fixed class replaces it); then one float64
  normal (C, H, W) on EVERY sampler step, whether or not that step churns (a step outside the
  S_min..S_max window multiplies its draw by sqrt(t_hat^2 - t^2) = 0);
* guidance `D_uncond + w (D_cond - D_uncond)`, the unconditional pass with all-zero labels, every
  brick on every step (the release's skip switch changes nothing).

fastlego must give the same image per seed (to float rounding) for deterministic Heun, guidance,
and churn with an S_min / S_max window that leaves steps without churn, whatever the batch.
A misaligned random stream moves an image by O(1); the tolerances are float32 rounding.
"""

import math

import pytest
import torch

import fastlego
from fastlego.sampling import StackedRandomGenerator, edm_sampler
from fastlego.testing import randomize_
from fastlego.training import build_network, network_spec

TINY = "4:lego_S_4:1,8:lego_S_8:1"
# ImageNet-64's published stochastic setting, on 5 steps: sigma 80 (above S_max: no churn, but a
# draw), three churning steps, sigma 0.002 (below S_min: no churn).
IMAGENET_CHURN = dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)
SEEDS = [0, 7, 123, 2 ** 31 + 5]


def tiny_net(label_dim=3, seed=0):
    net = build_network(network_spec(8, 1, label_dim, bricks=TINY))
    return randomize_(net, seed=seed, scale=0.5).eval()


# --------------------------------------------------------------------------------------------
# The reference: Algorithm 2 plus the release's per-seed random streams
# --------------------------------------------------------------------------------------------

def karras_sigmas(N, sigma_min, sigma_max, rho):
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, t_N = 0 (float64)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (N - 1) * (b - a)) ** rho for i in range(N)] + [0.0]


class SeedStreams:
    """The release's random numbers: a generator per seed, seeded with seed mod 2^32."""

    def __init__(self, seeds, device):
        self.device = device
        self.gens = [torch.Generator(device).manual_seed(int(s) % 2 ** 32) for s in seeds]

    def normal(self, shape, dtype):
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype, device=self.device) for g in self.gens])

    def class_ids(self, n):
        return torch.stack([torch.randint(n, (), generator=g, device=self.device) for g in self.gens])


def reference_generate(net, seeds, *, num_steps, class_idx=None, cfg_scale=None, height=None, width=None,
                       sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0, S_max=math.inf,
                       S_noise=1.0, device="cpu"):
    """Images (float64) and class ids as the release's generate.py makes them for `seeds`."""
    C, L = net.img_channels, net.label_dim
    H, W = height or net.img_resolution, width or net.img_resolution
    rnd = SeedStreams(seeds, device)
    z = rnd.normal((C, H, W), torch.float32)                       # 1. the latent
    labels = ids = None
    if L:
        ids = rnd.class_ids(L)                                     # 2. a class per seed, always drawn
        if class_idx is not None:
            ids = torch.full_like(ids, class_idx)
        labels = torch.eye(L, device=device)[ids]
    B = len(seeds)

    def D(x, sigma):  # the denoiser, per image, every brick
        s = torch.full((B,), float(sigma), dtype=torch.float64, device=device)
        cond = net(x.to(torch.float32), s, labels).to(torch.float64)
        if cfg_scale is None:
            return cond
        uncond = net(x.to(torch.float32), s, torch.zeros_like(labels)).to(torch.float64)
        return uncond + cfg_scale * (cond - uncond)

    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    t = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    x = z.to(torch.float64) * t[0]
    for i in range(num_steps):
        eps = S_noise * rnd.normal((C, H, W), torch.float64)       # 3. one draw per step, churn or not
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] + gamma * t[i]
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * eps
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d2 = (x - D(x, t[i + 1])) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return x, ids


def churn_steps(num_steps, S_churn=0.0, S_min=0.0, S_max=math.inf, sigma_min=0.002, sigma_max=80.0, rho=7.0, **_):
    t = karras_sigmas(num_steps, sigma_min, sigma_max, rho)[:-1]
    return [S_churn > 0 and S_min <= s <= S_max for s in t]


def assert_same_per_seed(images, ref, seeds, tol):
    """Image by image: fastlego's float32 samples against the reference's float64 ones."""
    assert images.shape == ref.shape and torch.isfinite(images).all()
    for k, seed in enumerate(seeds):
        err = (images[k].double() - ref[k].cpu()).abs().max().item()
        assert err <= tol * (1 + ref[k].abs().max().item()), f"seed {seed}: max |fastlego - release| = {err:.3g}"


# Relative to 1 + max|image|. Float32 network, float64 sampler state, the same batch: without
# guidance the two paths round alike up to fastlego's final float32 cast. Under guidance fastlego
# (like the release) mixes the two halves of one batched call on the network's float32 output,
# the reference mixes two denoiser calls in float64: ~1e-7 apart per call, amplified by the
# guidance and the steps to <~1e-5. A seed stream spent differently moves images by O(1).
TOL = {None: 1e-6, "cfg": 2e-5}

SETTINGS = {
    "heun": dict(),
    "heun_cfg": dict(cfg_scale=2.5),
    "heun_cfg_1": dict(cfg_scale=1.0),
    "churn_window": dict(IMAGENET_CHURN),
    "churn_window_cfg": dict(IMAGENET_CHURN, cfg_scale=1.5),
    "churn_window_class": dict(IMAGENET_CHURN, class_idx=2),
    "churn_everywhere": dict(S_churn=3.0),
}


def test_the_churn_window_leaves_steps_out_before_churning_ones():
    # the setting that tells a per-step draw from a per-churn-step draw: a skipped step comes first
    mask = churn_steps(5, **IMAGENET_CHURN)
    assert mask == [False, True, True, True, False]
    assert churn_steps(5, **SETTINGS["churn_everywhere"]) == [True] * 5


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sample_gives_the_release_images_seed_by_seed(name):
    kw = dict(SETTINGS[name])
    net = tiny_net()
    with torch.no_grad():
        ref, ids = reference_generate(net, SEEDS, num_steps=5, **kw)
        res = fastlego.sample(net, SEEDS, num_steps=5, batch_size=len(SEEDS), progress=False, device="cpu", **kw)
    assert res.labels.tolist() == ids.tolist()
    assert_same_per_seed(res.images, ref, SEEDS, TOL["cfg" if kw.get("cfg_scale") else None])


def test_unconditional_non_square_with_churn():
    # No class draw for an unconditional network; a non-square latent is drawn as (C, H, W) too
    # (the release itself only samples squares: the reference is the algorithm, not its assert).
    net = tiny_net(label_dim=0, seed=1)
    kw = dict(IMAGENET_CHURN, num_steps=6, height=8, width=16)
    with torch.no_grad():
        ref, _ = reference_generate(net, SEEDS, **kw)
        res = fastlego.sample(net, SEEDS, batch_size=4, progress=False, device="cpu", **kw)
    assert res.labels is None
    assert_same_per_seed(res.images, ref, SEEDS, TOL[None])


def test_edm_sampler_consumes_each_seeds_stream_like_the_release():
    # fastlego.sampling.edm_sampler given the release's latents, labels and per-seed noise source.
    net = tiny_net(seed=2)
    seeds = [3, 4, 5]
    with torch.no_grad():
        ref, ids = reference_generate(net, seeds, num_steps=5, **IMAGENET_CHURN)
        rnd = StackedRandomGenerator("cpu", seeds)
        latents = rnd.randn([3, 1, 8, 8])
        assert torch.equal(rnd.randint(3), ids)
        out = edm_sampler(net, latents, torch.eye(3)[ids], num_steps=5, randn_like=rnd.randn_like, **IMAGENET_CHURN)
    assert out.dtype == torch.float32
    assert_same_per_seed(out, ref, seeds, TOL[None])


@pytest.mark.parametrize("kw,draws", [(IMAGENET_CHURN, 4), (dict(S_churn=3.0), 5), (dict(), 0),
                                      (dict(S_churn=40.0, S_min=0.1, S_max=1.0), 4),
                                      (dict(S_churn=40.0, S_min=10.0, S_max=20.0), 2)])
def test_noise_is_drawn_on_every_step_up_to_the_last_churning_one(kw, draws):
    # sigmas 80, 17.5, 2.5, 0.17, 0.002: a step outside the window still draws (as the release
    # does) when a later step churns; the draws after the last churning step change nothing.
    mask = churn_steps(5, **kw)
    assert draws == (max(i for i, m in enumerate(mask) if m) + 1 if any(mask) else 0)
    shapes = []

    def noise(x):
        shapes.append((x.shape, x.dtype))
        return torch.ones_like(x)

    out = edm_sampler(None, torch.ones(2, 1, 3, 3), num_steps=5, randn_like=noise,
                      denoiser=lambda x, s, stage: 0.5 * x, **kw)
    assert torch.isfinite(out).all() and shapes == [((2, 1, 3, 3), torch.float64)] * draws


def test_one_image_of_a_batch_is_the_seed_sampled_alone():
    net = tiny_net(seed=3)
    kw = dict(IMAGENET_CHURN, num_steps=5, cfg_scale=2.0, progress=False, device="cpu")
    with torch.no_grad():
        batch = fastlego.sample(net, SEEDS, batch_size=len(SEEDS), **kw)
        for k, seed in enumerate(SEEDS):
            alone = fastlego.sample(net, [seed], batch_size=1, **kw)
            assert alone.labels.tolist() == [batch.labels[k].item()]
            err = (alone.images[0] - batch.images[k]).abs().max().item()
            assert err <= 1e-5 * (1 + batch.images[k].abs().max().item()), f"seed {seed}: {err:.3g}"
    assert not torch.allclose(batch.images[0], batch.images[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_seeds_wrap_at_2_pow_32_as_in_the_release(device):
    # The release seeds with seed mod 2^32. On the CPU torch's generator keeps only the low 32
    # bits of a seed anyway; CUDA's keeps 64, so there the wrap is fastlego's doing.
    a = StackedRandomGenerator(device, [5, 2 ** 32 + 5, 6])
    z = a.randn([3, 2, 4])
    assert torch.equal(z[0], z[1]) and not torch.equal(z[0], z[2])
    ref = SeedStreams([2 ** 32 + 5], device)
    assert torch.equal(z[1], ref.normal((2, 4), torch.float32)[0])
    x = torch.zeros(3, 2, 4, dtype=torch.float64, device=device)
    assert torch.equal(a.randn_like(x)[1], ref.normal((2, 4), torch.float64)[0])
    assert torch.equal(a.randint(1000)[1], ref.class_ids(1000)[0])
    with pytest.raises(ValueError, match="number of seeds, 3"):
        a.randn([2, 4])


def test_real_brick_skipping_is_the_deliberate_difference():
    # t_break < 1 really stops after the second-to-last brick late in sampling (the release's
    # switch runs every brick anyway): those images differ from the release's by design, while
    # t_break = 1 (the default) reproduces them.
    net = tiny_net(seed=4)
    kw = dict(IMAGENET_CHURN, num_steps=5, progress=False, device="cpu")
    with torch.no_grad():
        ref, _ = reference_generate(net, SEEDS[:2], num_steps=5, **IMAGENET_CHURN)
        same = fastlego.sample(net, SEEDS[:2], t_break=1.0, **kw)
        skipped = fastlego.sample(net, SEEDS[:2], t_break=0.4, **kw)
    assert_same_per_seed(same.images, ref, SEEDS[:2], TOL[None])
    assert (skipped.images.double() - ref).abs().max().item() > 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("name,cuda_graph", [("heun", False), ("heun_cfg", False), ("churn_window", False),
                                             ("churn_window_cfg", False), ("churn_window_class", False),
                                             ("churn_window_cfg", True)])
def test_sample_gives_the_release_images_on_gpu(name, cuda_graph):
    # The generators live on the GPU as in the release (CUDA's stream differs from the CPU's, and
    # keeps 64 seed bits: the seed 2^32 + 3 checks the wrap). The GPU network may round
    # differently between a batched guidance call and two plain calls, and between batch sizes:
    # the tolerance is loose next to the O(1) of a stream spent differently.
    kw = dict(SETTINGS[name])
    net = tiny_net().cuda()
    seeds = list(range(10)) + [2 ** 32 + 3]
    with torch.no_grad():
        ref, ids = reference_generate(net, seeds, num_steps=8, device="cuda", **kw)
        res = fastlego.sample(net, seeds, num_steps=8, batch_size=4, progress=False, device="cuda",
                              cuda_graph=cuda_graph, **kw)
    assert res.labels.tolist() == ids.tolist()
    assert_same_per_seed(res.images, ref, seeds, 2e-3)
