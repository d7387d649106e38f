"""Sampling: the Heun sampler against exact answers on Gaussian data, brick skipping (counted with
hooks, also under guidance), non-square outputs, per-seed reproducibility, files, CUDA graphs."""

import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from fastlego.data import decode_png, float_to_uint8
from fastlego.sampling import (StackedRandomGenerator, count_network_evaluations, edm_sampler, edm_sigmas, full_steps,
                               load_network, parse_seeds, sample)
from fastlego.testing import randomize_
from fastlego.training import build_network, network_spec

TINY = "4:lego_S_4:1,8:lego_S_8:1"


def gaussian_denoiser(mu: float, s: float):
    """The exact denoiser of data ~ N(mu, s^2): E[y | y + sigma n] = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""
    def D(x, sigma, stage):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (s ** 2 * x + sigma ** 2 * mu) / (s ** 2 + sigma ** 2)
    return D


def tiny_net(label_dim=3, seed=0):
    net = build_network(network_spec(8, 1, label_dim, bricks=TINY))
    return randomize_(net, seed=seed, scale=0.5).eval()


# --------------------------------------------------------------------------------------------
# The sampler against exact answers
# --------------------------------------------------------------------------------------------

def test_sigma_schedule():
    t = edm_sigmas(18)
    assert t.dtype == torch.float64 and len(t) == 19 and t[-1] == 0
    assert t[0].item() == pytest.approx(80.0) and t[17].item() == pytest.approx(0.002)
    i = 5
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[i].item() == pytest.approx(expect, rel=1e-12)
    assert torch.all(t[:-1] > t[1:])
    assert edm_sigmas(1).tolist() == [80.0, 0.0]
    for kw, msg in [(dict(num_steps=0), "num_steps"), (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
                    (dict(rho=0.0), "rho")]:
        with pytest.raises(ValueError, match=msg):
            edm_sigmas(**kw)


def test_one_heun_step_by_hand():
    # Data N(0, 1): D(x; sigma) = x / (1 + sigma^2). Linear schedule (rho = 1): sigmas 2, 0.5, 0.
    D = gaussian_denoiser(0.0, 1.0)
    out = edm_sampler(None, torch.tensor([[0.5]]), num_steps=2, sigma_min=0.5, sigma_max=2.0, rho=1.0, denoiser=D)
    # x0 = 0.5 * 2 = 1.  Euler: d = (1 - 1/5) / 2 = 0.4, x = 1 - 1.5 * 0.4 = 0.4.
    # Heun: d' = (0.4 - 0.4/1.25) / 0.5 = 0.16, x1 = 1 - 1.5 * (0.2 + 0.08) = 0.58.
    # Last step (Euler to 0): d = (0.58 - 0.464) / 0.5 = 0.232, x2 = 0.58 - 0.5 * 0.232 = 0.464.
    assert out.item() == pytest.approx(0.464, abs=1e-6)

    # With churn on the first step only (S_min = 1) and unit "noise": gamma = S_churn / N = 0.1.
    out = edm_sampler(None, torch.tensor([[0.5]]), num_steps=2, sigma_min=0.5, sigma_max=2.0, rho=1.0, denoiser=D,
                      S_churn=0.2, S_min=1.0, S_noise=0.5, randn_like=torch.ones_like)
    t_hat = 2.2
    x_hat = 1 + math.sqrt(t_hat ** 2 - 4) * 0.5
    d = (x_hat - x_hat / (1 + t_hat ** 2)) / t_hat
    x_e = x_hat + (0.5 - t_hat) * d
    d2 = (x_e - x_e / 1.25) / 0.5
    x1 = x_hat + (0.5 - t_hat) * (0.5 * d + 0.5 * d2)
    assert out.item() == pytest.approx(x1 - 0.5 * (x1 - x1 / 1.25) / 0.5, abs=1e-6)


def test_heun_follows_the_exact_ode_on_gaussian_data():
    # Probability-flow ODE for N(mu, s^2): dx/dsigma = sigma (x - mu) / (s^2 + sigma^2), solved by
    # x(0) = mu + (x(sigma_max) - mu) s / sqrt(s^2 + sigma_max^2). Check every sample, then the moments.
    mu, s = 1.5, 0.3
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + (80 * z - mu) * s / math.sqrt(s ** 2 + 80 ** 2)
    errors = {}
    for n in (16, 32, 64):
        out = edm_sampler(None, z, num_steps=n, denoiser=gaussian_denoiser(mu, s)).double()
        errors[n] = (out - exact).abs().max().item()
    assert errors[64] < 6e-3
    # Heun is second order: doubling the steps divides the error by about 4 (Euler would give 2).
    assert 3.3 < errors[16] / errors[32] < 4.7 and 3.3 < errors[32] / errors[64] < 4.7, errors
    assert out.std().item() == pytest.approx(s, rel=0.02)
    assert out.mean().item() == pytest.approx(mu, abs=0.02)


def test_stochastic_heun_samples_the_right_distribution():
    mu, s = -0.5, 0.4
    rnd = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 1, 1, 1, generator=rnd, dtype=torch.float64)
    out = edm_sampler(None, z, num_steps=96, denoiser=gaussian_denoiser(mu, s), S_churn=30, S_min=0.01, S_max=10,
                      S_noise=1.0, randn_like=lambda x: torch.randn(x.shape, generator=rnd, dtype=x.dtype)).double()
    exact = mu + (80 * z - mu) * s / math.sqrt(s ** 2 + 80 ** 2)
    assert (out - exact).abs().max().item() > 1e-2  # the churn really changed the path ...
    assert out.mean().item() == pytest.approx(mu, abs=0.02)  # ... not the distribution
    assert out.std().item() == pytest.approx(s, rel=0.02)  # (the SDE discretisation error shrinks with steps)


# --------------------------------------------------------------------------------------------
# Brick skipping
# --------------------------------------------------------------------------------------------

def _count_brick_calls(net):
    calls = {i: [] for i in range(net.model.num_bricks)}
    handles = [brick.register_forward_hook(lambda m, a, o, i=i: calls[i].append(a[0].shape[0]))
               for i, brick in enumerate(net.model.model)]
    return calls, handles


@pytest.mark.parametrize("cfg_scale", [None, 2.5])
def test_skipping_runs_fewer_bricks(cfg_scale):
    net = tiny_net()
    x = torch.randn(2, 1, 8, 8)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    calls, handles = _count_brick_calls(net)
    with torch.no_grad():
        full = edm_sampler(net, x, labels, num_steps=4, cfg_scale=cfg_scale, t_break=1.0)
        n_full = {i: len(c) for i, c in calls.items()}
        for c in calls.values():
            c.clear()
        skipped = edm_sampler(net, x, labels, num_steps=4, cfg_scale=cfg_scale, t_break=0.5)
    for h in handles:
        h.remove()
    evals = count_network_evaluations(4, 0.5)
    assert evals == {"full": 4, "skipped": 3} and full_steps(4, 0.5) == 2
    assert n_full == {0: 7, 1: 7}
    assert {i: len(c) for i, c in calls.items()} == {0: 7, 1: 4}  # the last brick ran only in full steps
    batch = 4 if cfg_scale else 2  # guidance runs the conditional and unconditional halves together
    assert set(calls[0]) == set(calls[1]) == {batch}
    assert not torch.allclose(full, skipped)


def test_late_steps_use_the_second_to_last_brick():
    net = tiny_net()
    x = torch.randn(2, 1, 8, 8)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 2]), 3).float()
    with torch.no_grad():
        skipped = edm_sampler(net, x, labels, num_steps=3, t_break=0.0)
        manual = edm_sampler(net, x, labels, num_steps=3,
                             denoiser=lambda x, s, stage: net(x.float(), s, labels, return_stage_idx=0))
    assert torch.equal(skipped, manual)


def test_skipping_errors():
    with pytest.raises(ValueError, match="t_break"):
        full_steps(10, 1.5)
    one = build_network(network_spec(8, 1, 0, bricks="8:lego_S_8:1")).eval()
    with pytest.raises(ValueError, match="at least 2 bricks"):
        edm_sampler(one, torch.randn(1, 1, 8, 8), num_steps=2, t_break=0.5)
    with pytest.raises(ValueError, match="before the last one"):
        edm_sampler(tiny_net(), torch.randn(1, 1, 8, 8), num_steps=2, t_break=0.5, skip_stage_idx=1)


# --------------------------------------------------------------------------------------------
# sample(): sizes, seeds, labels, files
# --------------------------------------------------------------------------------------------

def test_non_square_sampling_and_size_errors():
    net = tiny_net(label_dim=0)
    res = sample(net, [0, 1], height=8, width=24, num_steps=2, progress=False, device="cpu")
    assert res.images.shape == (2, 1, 8, 24) and torch.isfinite(res.images).all() and res.labels is None
    with pytest.raises(ValueError, match="not a multiple of 8"):
        sample(net, [0], height=8, width=12, num_steps=2, progress=False, device="cpu")
    with pytest.raises(ValueError, match="unconditional"):
        sample(net, [0], cfg_scale=2.0, num_steps=2, progress=False, device="cpu")
    with pytest.raises(ValueError, match="cuda_graph"):
        sample(net, [0], cuda_graph=True, num_steps=2, progress=False, device="cpu")


def test_seeds_reproduce_images_whatever_the_batch():
    net = tiny_net()
    a = sample(net, "3-5", num_steps=3, batch_size=3, progress=False, device="cpu")
    b = sample(net, [5, 4], num_steps=3, batch_size=1, progress=False, device="cpu")
    assert a.labels.tolist()[1:] == b.labels.tolist()[::-1]  # a random class per seed, from that seed
    assert torch.allclose(a.images[2], b.images[0], atol=1e-5) and torch.allclose(a.images[1], b.images[1], atol=1e-5)
    assert not torch.allclose(a.images[0], a.images[1])
    c = sample(net, [5], class_idx=0, num_steps=3, progress=False, device="cpu")
    assert c.labels.tolist() == [0]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("3-1", "x", "", "-4"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    g1, g2 = StackedRandomGenerator("cpu", [7, 8]), StackedRandomGenerator("cpu", [8])
    assert torch.equal(g1.randn([2, 3])[1], g2.randn([1, 3])[0])


def test_files_written(tmp_path):
    net = tiny_net()
    res = sample(net, [3, 9, 11], num_steps=2, outdir=str(tmp_path), images=True, npz=True, grid_columns=2,
                 cfg_scale=1.5, t_break=0.5, progress=False, device="cpu")
    u8 = float_to_uint8(res.images)
    grid = decode_png(open(tmp_path / "grid.png", "rb").read())
    assert grid.shape == (16, 16, 1) and np.array_equal(grid[:8, 8:], u8[1].numpy())
    assert sorted(os.listdir(tmp_path / "images")) == ["000003.png", "000009.png", "000011.png"]
    assert np.array_equal(decode_png(open(tmp_path / "images" / "000011.png", "rb").read()), u8[2].numpy())
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        assert f["seeds"].tolist() == [3, 9, 11] and f["labels"].tolist() == res.labels.tolist()
    assert res.files["grid"] == str(tmp_path / "grid.png") and res.images_per_second > 0


def test_load_network_from_training_checkpoint_and_release_files(tmp_path, monkeypatch):
    from fastlego.training import TrainConfig, train
    out = train(TrainConfig(data="digits", resolution=8, bricks=TINY, batch_size=4, steps=1, max_images=8,
                            outdir=str(tmp_path / "run"), progress=False))
    net = load_network(out.checkpoint)
    assert not net.training and all(torch.equal(a, b) for a, b in
                                    zip(net.state_dict().values(), out.network.state_dict().values()))
    res = sample(out.checkpoint, [0, 1], num_steps=2, progress=False, device="cpu")
    assert res.images.shape == (2, 1, 8, 8)
    # Anything else goes to fastlego.load_checkpoint: first the real one ...
    torch.save({"hello": torch.ones(1)}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="hold no LEGO bricks"):
        load_network(str(tmp_path / "other.pt"))
    # ... then a stand-in that records its calls (a .pkl gets the key `which`).
    calls = []
    fake = types.ModuleType("fastlego.checkpoint")
    fake.load_checkpoint = lambda path, **kw: calls.append((os.path.basename(path), kw)) or tiny_net(seed=3).train()
    monkeypatch.setitem(sys.modules, "fastlego.checkpoint", fake)
    (tmp_path / "net.pkl").write_bytes(b"x")
    (tmp_path / "net.safetensors").write_bytes(b"x")
    assert not load_network(str(tmp_path / "net.pkl")).training
    load_network(str(tmp_path / "net.safetensors"))
    load_network(str(tmp_path / "other.pt"))
    assert calls == [("net.pkl", {"key": "ema"}), ("net.safetensors", {}), ("other.pt", {})]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_network(str(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------------------------
# GPU: CUDA graphs and reduced precision (run by the lead on the device machine)
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("cfg_scale,t_break", [(None, 1.0), (2.0, 0.4)])
def test_cuda_graph_matches_eager(cfg_scale, t_break):
    net = tiny_net().cuda()
    kw = dict(num_steps=6, cfg_scale=cfg_scale, t_break=t_break, progress=False, device="cuda", batch_size=3)
    eager = sample(net, "0-6", cuda_graph=False, **kw)  # 3 + 3 + 1: two graph shapes
    graphed = sample(net, "0-6", cuda_graph=True, **kw)
    assert torch.allclose(eager.images, graphed.images, atol=1e-4), (eager.images - graphed.images).abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_sampling_on_gpu(precision):
    net = tiny_net().cuda()
    ref = sample(net, "0-3", num_steps=6, progress=False, device="cuda", precision="fp32")
    low = sample(net, "0-3", num_steps=6, progress=False, device="cuda", precision=precision)
    err = (ref.images - low.images).abs().max().item()
    assert torch.isfinite(low.images).all() and err < 0.15, err


@pytest.mark.cuda
def test_skipping_saves_time_on_gpu():
    net = build_network(network_spec(64, 3, 10, preset="lego_S_PG_64")).cuda()
    randomize_(net, scale=0.5)
    net.eval()
    # 128 images per batch (256 network rows under CFG): the GPU is busy, so the time per image is
    # the network's, not kernel-launch overhead (at 32 images the saving measured 18%, at 128
    # the bricks' FLOP shares show)
    kw = dict(num_steps=10, progress=False, device="cuda", batch_size=128, precision="bf16", cfg_scale=1.5)
    sample(net, "0-127", **kw)  # warm-up
    full = sample(net, "0-127", t_break=1.0, **kw)
    skip = sample(net, "0-127", t_break=0.4, **kw)
    print(f"\n[sampling] lego_S_PG_64, 128 images, 10 Heun steps, cfg 1.5, bf16, {torch.cuda.get_device_name()}: "
          f"all bricks {full.seconds:.3f} s, t_break 0.4 {skip.seconds:.3f} s "
          f"({100 * (1 - skip.seconds / full.seconds):.0f}% less time per image)")
    # Brick 2 (64x64 regions, depth 6) is most of the cost: skipping it in 60% of the steps must
    # save a good part of the time.
    assert skip.seconds < 0.8 * full.seconds, (full.seconds, skip.seconds)
