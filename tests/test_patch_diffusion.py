"""Patch Diffusion training (fastlego.patch_diffusion, `fastlego train --patch-diffusion`): crops and
their coordinates, the crop-size draw, batch multiplier and image accounting, which bricks run on
which crop, external coordinates through the backbone (reference and Triton interpreter), p = 1
equal to plain training bit for bit, DDP equal to one process, and the command line."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from two_processes import run_two_processes
import fastlego
from fastlego import dispatch, reference
from fastlego.data import DataOrder
from fastlego.networks import build_network
from fastlego.patch_diffusion import (PatchSchedule, bricks_for_crop, bricks_per_crop_size, check_patch_training,
                                      crop_coordinates, crop_images, crop_probabilities, describe_bricks_per_crop_size,
                                      step_indices)
from fastlego.testing import assert_close_to_reference, randomize_
from fastlego.training import TrainConfig, train
from fastlego.training_checkpoint import load_training_checkpoint

# A progressive-growth stack at resolution 16: 4x4 regions (crops 4, 8, 16), then the whole image.
STACK16 = "4:w16p2h2:1,16:w16p4h2:1"
# The stack at resolution 32: regions 4 / 16 / 32, tiny widths.
STACK32 = "4:w16p2h2:1,16:w16p4h2:1,32:w16p8h2:1"


def config(outdir, **kw):
    base = dict(data="digits", resolution=16, bricks=STACK16, batch_size=4, steps=4, lr=1e-3, max_images=64,
                checkpoint_every=100, log_every=1, progress=False, outdir=str(outdir), seed=3, threads=1,
                patch_diffusion=True)
    base.update(kw)
    return TrainConfig(**base)


def metrics(outdir):
    with open(os.path.join(outdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_sizes(outdir):
    """The crop size of every step of a run logged with log_every=1."""
    sizes = []
    for record in metrics(outdir):
        [(size, n)] = record["crop_steps"].items()
        assert n == 1
        sizes.append(int(size))
    return sizes


# --------------------------------------------------------------------------------------------
# Crops, coordinates, the draw
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [16, 32])
def test_crop_coordinates_are_the_slice_of_the_full_grid(resolution):
    grid = reference.coordinate_channels(1, resolution, resolution, torch.float32, "cpu")[0]
    images = torch.randn(5, 3, resolution, resolution)
    g = torch.Generator().manual_seed(resolution)
    for size in (resolution // 4, resolution // 2, resolution):
        offsets = torch.randint(resolution - size + 1, (5, 2), generator=g)
        offsets[0] = torch.tensor([resolution - size, 0])     # a corner: last row offset, first column
        coords = crop_coordinates(offsets, size, resolution)
        crops = crop_images(images, offsets, size)
        assert coords.shape == (5, 2, size, size) and coords.dtype == torch.float32
        for n, (r, c) in enumerate(offsets.tolist()):
            assert torch.equal(coords[n], grid[:, r:r + size, c:c + size]), (size, r, c)
            assert torch.equal(crops[n], images[n, :, r:r + size, c:c + size]), (size, r, c)
        # rows channel first: constant along a row, increasing down the rows
        assert torch.equal(coords[:, 0, :, :1].expand(-1, -1, size), coords[:, 0])
    full = crop_coordinates(torch.zeros(2, 2, dtype=torch.long), resolution, resolution)
    assert torch.equal(full, reference.coordinate_channels(2, resolution, resolution, torch.float32, "cpu"))


def binomial_check(counts, probabilities, n, z=4.5):
    """Each size's frequency within z binomial standard deviations of its probability."""
    for (size, q) in probabilities.items():
        f = counts.get(size, 0) / n
        if abs(f - q) > z * math.sqrt(max(q * (1 - q), 1e-12) / n):
            return False
    return True


@pytest.mark.parametrize("real_p", [0.5, 0.2, 0.9])
def test_crop_size_frequencies_match_the_probabilities(real_p):
    """6000 draws per p; each frequency within 4.5 binomial sigmas (a false failure ~1e-5). The same
    check rejects the probabilities with res/4 and res/2 swapped, so it can fail."""
    schedule = PatchSchedule(32, real_p, seed=5)
    gen = schedule.generator()
    n = 6000
    counts = {}
    for _ in range(n):
        size = schedule.draw(gen)
        counts[size] = counts.get(size, 0) + 1
    q = crop_probabilities(real_p)
    assert q == pytest.approx(((1 - real_p) * 0.4, (1 - real_p) * 0.6, real_p))
    assert binomial_check(counts, dict(zip((8, 16, 32), q)), n)
    assert not binomial_check(counts, dict(zip((8, 16, 32), (q[1], q[0], q[2]))), n)
    again = PatchSchedule(32, real_p, seed=5).generator()
    first = [PatchSchedule(32, real_p).draw(again) for _ in range(50)]
    again = PatchSchedule(32, real_p, seed=5).generator()
    assert first == [PatchSchedule(32, real_p).draw(again) for _ in range(50)]   # a function of the seed


def test_extreme_probabilities_and_the_progressive_schedule():
    full, crops = PatchSchedule(16, 1.0), PatchSchedule(16, 0.0)
    g = torch.Generator().manual_seed(0)
    assert {full.draw(g) for _ in range(200)} == {16}
    assert {crops.draw(g) for _ in range(200)} == {4, 8}
    prog = PatchSchedule(32, 0.5, progressive=True)
    at = {f: prog.size_at(f) for f in (0.0, 0.19, 0.2, 0.49, 0.5, 0.99, 1.0)}
    assert at == {0.0: 8, 0.19: 8, 0.2: 16, 0.49: 16, 0.5: 32, 0.99: 32, 1.0: 32}
    assert [prog.draw(g, f) for f in (0.1, 0.3, 0.7)] == [8, 16, 32]
    assert PatchSchedule(32, 0.75, progressive=True).size_at(0.09) == 8       # stage ends at (1-p) 2/5 = 0.1
    assert PatchSchedule(32, 0.75, progressive=True).size_at(0.1) == 16
    assert PatchSchedule(32, 1.0, progressive=True).size_at(0.0) == 32


def test_batch_multiplier_and_data_order():
    schedule = PatchSchedule(32)
    assert [schedule.multiplier(s) for s in (8, 16, 32)] == [4, 2, 1]
    assert schedule.expected_multiplier() == pytest.approx(0.2 * 4 + 0.3 * 2 + 0.5)
    with pytest.raises(ValueError, match="not a crop size"):
        schedule.multiplier(12)
    order = DataOrder(50, 8, seed=2, xflip=True)
    idx, flips = step_indices(order, 3, 4)                       # a res/4 step: batches 3..6
    want = [order.global_batch(k) for k in range(3, 7)]
    assert torch.equal(idx, torch.cat([w[0] for w in want])) and torch.equal(flips, torch.cat([w[1] for w in want]))
    halves = [step_indices(order, 3, 4, rank, 2)[0] for rank in (0, 1)]   # two ranks: contiguous halves
    assert torch.equal(torch.cat(halves), idx) and len(halves[0]) == 16


# --------------------------------------------------------------------------------------------
# Which bricks train on which crop size; refusals
# --------------------------------------------------------------------------------------------

def test_bricks_per_crop_size_selection():
    assert bricks_per_crop_size([4, 16, 32], 32) == {8: [0], 16: [0, 1], 32: [0, 1, 2]}
    assert bricks_per_crop_size([4, 8, 4], 16) == {4: [0], 8: [0, 1, 2], 16: [0, 1, 2]}
    assert bricks_per_crop_size([4, 16, 32], 32, real_p=1.0) == {32: [0, 1, 2]}
    assert bricks_per_crop_size([4, 16, 32], 32, real_p=0.0) == {8: [0], 16: [0, 1]}
    assert bricks_for_crop([4, 8, 4, 16], 8) == [0, 1, 2]        # a prefix: brick 3 and all after it stop
    assert bricks_for_crop([4, 6], 8) == [0]                     # 6 does not tile 8
    text = describe_bricks_per_crop_size([4, 16, 32], 32)
    assert "8x8 (p 0.20, batch x4): brick 0" in text and "16x16 (p 0.30, batch x2): bricks 0-1" in text
    assert "32x32 (p 0.50, batch x1): all 3 bricks" in text


@pytest.mark.parametrize("regions,resolution,kw,expect", [
    ([8, 16], 16, {}, r"4x4 crops .* train no brick.*region 8.*Fix: .*resolution whose quarter is a multiple of 8 "
                      r"\(e.g. 32\).*real_p=1"),
    ([32, 16, 4], 32, {}, r"8x8 crops .* train no brick: the first brick's region 32"),   # a PR stack
    ([8, 16], 16, {"progressive": True}, r"progressive schedule.*train no brick"),
    ([4, 16], 16, {"intermediate": False}, r"only bricks \[0\] of 2.*intermediate=True"),
    ([4, 8], 18, {}, r"resolution 18 is not a multiple of 4"),
    ([4, 8], 16, {"real_p": 1.5}, r"real_p .* \[0, 1\]"),
])
def test_setups_that_cannot_train_are_refused(regions, resolution, kw, expect):
    with pytest.raises(ValueError, match=expect):
        check_patch_training(regions, resolution, **kw)


def test_refusals_come_before_any_work(tmp_path):
    out = tmp_path / "demo-stack"
    with pytest.raises(ValueError, match="train no brick"):
        train(config(out, bricks="8:w16p4h2:1,16:w16p4h2:1"))                # the demo stack's regions at 16
    assert not os.path.exists(out / "checkpoint.pt") and not os.path.exists(out / "config.json")
    assert check_patch_training([8, 16], 16, real_p=1.0) == {16: [0, 1]}     # full images only: fine
    with pytest.raises(ValueError, match="need patch_diffusion=True"):
        TrainConfig(progressive=True).validate()
    with pytest.raises(ValueError, match="need patch_diffusion=True"):
        TrainConfig(real_p=0.3).validate()
    with pytest.raises(ValueError, match="process='beta' is not supported"):
        TrainConfig(patch_diffusion=True, process="beta").validate()
    with pytest.raises(ValueError, match=r"real_p .* \[0, 1\]"):
        TrainConfig(patch_diffusion=True, real_p=-0.1).validate()


# --------------------------------------------------------------------------------------------
# External coordinates through the network
# --------------------------------------------------------------------------------------------

def backbone(regions=(4, 16), width=16, intermediate=False, seed=1):
    m = fastlego.LegoBackbone(list(regions), 3, label_dim=4, model_type=[(width, 2, 2)] * len(regions),
                              depths=[1] * len(regions), train_intermediate_stages=intermediate)
    return randomize_(m, seed=seed).eval()


def inputs(B=2, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g), torch.randn(B, generator=g), torch.tensor([1, 3][:B])


def test_full_size_coords_are_bit_identical_to_the_built_grid():
    net = backbone()
    x, t, y = inputs()
    grid = reference.coordinate_channels(2, 16, 16, torch.float32, "cpu")
    with torch.no_grad(), fastlego.use_backend("reference"):
        built = net(x, t, y)
        given = net(x, t, y, coords=grid)
        cfg_built = net.forward_with_cfg(x, t, F.one_hot(y, 4).float(), 2.0)
        cfg_given = net.forward_with_cfg(x, t, F.one_hot(y, 4).float(), 2.0, coords=grid)
        edm = fastlego.EDMPrecond(16, 3, label_dim=4, backbone=net)
        d_built = edm(x, torch.tensor([0.5, 2.0]), F.one_hot(y, 4).float())
        d_given = edm(x, torch.tensor([0.5, 2.0]), F.one_hot(y, 4).float(), coords=grid)
    assert built.abs().max() > 0.1
    assert torch.equal(built, given) and torch.equal(cfg_built, cfg_given) and torch.equal(d_built, d_given)


@pytest.mark.interpreter
def test_full_size_coords_are_bit_identical_on_triton():
    net = backbone(width=16)
    x, t, y = inputs(B=1, H=16, W=16)
    grid = reference.coordinate_channels(1, 16, 16, torch.float32, "cpu")
    with torch.no_grad(), fastlego.use_backend("triton", global_attention="auto"), dispatch.record() as rec:
        built = net(x, t, y)
        given = net(x, t, y, coords=grid)
    assert {r.chosen for r in rec if r.op == "brick_embed"} == {"triton"}
    assert torch.equal(built, given)


def test_local_bricks_on_an_aligned_crop_give_the_full_images_slice():
    """Bricks of 4x4 regions see each region alone: on a crop at region-aligned offsets, with the
    crop's slice of the full grid as coords, they give the full image's output there. Without
    the coords (the crop's own grid) they do not: the coordinates carry the global position."""
    net = backbone(regions=(4, 4))
    x, t, y = inputs(B=2, H=16, W=16, seed=4)
    offsets = torch.tensor([[4, 8], [8, 0]])          # multiples of the region size 4
    crops, coords = crop_images(x, offsets, 8), crop_coordinates(offsets, 8, 16)
    with torch.no_grad(), fastlego.use_backend("reference"):
        full = net(x, t, y)
        on_crop = net(crops, t, y, coords=coords)
        own_grid = net(crops, t, y)
    want = crop_images(full, offsets, 8)
    torch.testing.assert_close(on_crop, want, rtol=1e-5, atol=1e-5)
    assert (own_grid - want).abs().max() > 1e-3


def test_a_crop_runs_the_bricks_that_tile_it():
    net = backbone(regions=(4, 16), intermediate=True).train()
    x, t, y = inputs(B=2, H=8, W=8)
    coords = crop_coordinates(torch.tensor([[0, 8], [4, 4]]), 8, 16)
    with fastlego.use_backend("reference"):
        outs = net(x, t, y, coords=coords, return_stage_idx=0, force_drop_ids=torch.zeros(2, 1))
        assert isinstance(outs, list) and len(outs) == 1 and outs[0].shape == (2, 3, 8, 8)
        with pytest.raises(ValueError, match=r"multiples of every brick's region size \[4, 16\]"):
            net(x, t, y, coords=coords)
        with pytest.raises(ValueError, match=r"coords must be float coordinate channels of shape .*\(2, 2, 8, 8\)"):
            net(x, t, y, coords=coords[:, :1], return_stage_idx=0)


def _crop_loss(net, mode, x, t, y, coords):
    net.zero_grad(set_to_none=True)
    with fastlego.use_backend(mode, global_attention="auto") if mode == "triton" else fastlego.use_backend(mode):
        out = net(x, t, y, coords=coords, return_stage_idx=0, force_drop_ids=torch.zeros(x.shape[0], 1))
        loss = sum(((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)) ** 2).mean()
                   for o in out)
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.interpreter
def test_crop_training_runs_the_triton_kernels_forward_and_backward():
    """A training forward + backward on 8x8 crops of 16x16 images, Triton forced (interpreter): the
    brick_embed kernel takes the crop with its coords and its input-gradient kernel runs in the
    backward (no reference fallback); the gradients, the embedding weight's coordinate columns
    included, are the reference's."""
    net = backbone(regions=(4, 16), intermediate=True).train()
    x, t, y = inputs(B=2, H=8, W=8, seed=9)
    x.requires_grad_(True)
    coords = crop_coordinates(torch.tensor([[8, 0], [3, 5]]), 8, 16)
    ref = _crop_loss(net, "reference", x, t, y, coords)
    with dispatch.record() as rec:
        got = _crop_loss(net, "triton", x, t, y, coords)
    chosen = {(r.op, r.chosen) for r in rec}
    assert ("brick_embed", "triton") in chosen and ("brick_embed_input_grad", "triton") in chosen, chosen
    assert not any(op.startswith("brick_embed") and c == "reference" for op, c in chosen), chosen
    assert set(got) == set(ref) and "model.0.x_embedder.proj.weight" in got and "model.1.x_embedder.proj.weight" not in got
    for n in ref:
        assert_close_to_reference(got[n], ref[n], atol=1e-5 * max(1.0, ref[n].abs().max().item()), what=n)
    w = ref["model.0.x_embedder.proj.weight"]
    assert w[:, 3:].abs().max() > 0     # the coordinate channels' columns get gradient


@pytest.mark.parametrize("mode", [pytest.param("triton", marks=pytest.mark.interpreter), "reference"])
def test_opcheck_brick_embed_with_coords(mode):
    g = torch.Generator().manual_seed(2)
    req = lambda *s: torch.randn(*s, generator=g).requires_grad_()   # noqa: E731
    coords = crop_coordinates(torch.tensor([[0, 4], [8, 8]]), 8, 16)
    args = (req(2, 3, 8, 8), req(2, 3, 8, 8), req(16, 8, 2, 2), req(16), req(1, 4, 16), 4, None, "", coords)
    with fastlego.use_backend(mode):
        torch.library.opcheck(torch.ops.fastlego.brick_embed.default, args)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def test_p1_equals_plain_training_bit_for_bit(tmp_path):
    """real_p = 1 draws no crop and no offset: losses, weights, EMA, image count and the shared
    generator are plain training's, bit for bit (same seeds)."""
    plain = train(config(tmp_path / "plain", patch_diffusion=False, steps=4, xflip=True))
    patch = train(config(tmp_path / "patch", real_p=1.0, steps=4, xflip=True))
    assert plain.losses == patch.losses and len(plain.losses) == 4
    assert plain.nimg == patch.nimg == 16
    a = load_training_checkpoint(str(tmp_path / "plain" / "checkpoint.pt"))
    b = load_training_checkpoint(str(tmp_path / "patch" / "checkpoint.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a["rng"]["train_generator"], b["rng"]["train_generator"])
    assert b["config"]["patch_diffusion"] and b["config"]["real_p"] == 1.0


def test_image_accounting_ema_and_data_order(tmp_path, monkeypatch):
    """nimg and the EMA count the images each step drew (batch x 4 / 2 / 1), and the steps consume
    the data order's batches one after the other, as plain training does."""
    import fastlego.training as training_module
    from fastlego.data import ImageDataset
    betas, seen = [], []
    real_beta, real_batch = training_module.ema_beta, ImageDataset.batch
    monkeypatch.setattr(training_module, "ema_beta", lambda b, n, h, r: betas.append((b, n)) or real_beta(b, n, h, r))
    monkeypatch.setattr(ImageDataset, "batch", lambda self, idx: seen.extend(idx) or real_batch(self, idx))
    res = train(config(tmp_path / "run", steps=10, batch_size=4, real_p=0.3, ema_halflife_kimg=0.05))
    sizes = step_sizes(tmp_path / "run")
    assert len(sizes) == 10 and len(set(sizes)) >= 2
    per_step = [4 * {4: 4, 8: 2, 16: 1}[s] for s in sizes]
    assert [b for b, _ in betas] == per_step
    assert [n for _, n in betas] == [sum(per_step[:i + 1]) for i in range(10)]
    assert res.nimg == sum(per_step)
    assert [round(r["kimg"] * 1000) for r in metrics(tmp_path / "run")] == [n for _, n in betas]
    order = DataOrder(64, 4, seed=3)
    want = torch.cat([order.global_batch(k)[0] for k in range(res.nimg // 4)]).tolist()
    assert seen == want
    ckpt = load_training_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert ckpt["nimg"] == res.nimg and ckpt["data"]["next_position"] == res.nimg
    # the bricks a crop does not run have no loss that step
    for record, size in zip(metrics(tmp_path / "run"), sizes):
        assert (record["loss_per_brick"][1] is None) == (size < 16), record


def test_progressive_run_follows_the_step_target(tmp_path):
    train(config(tmp_path / "prog", steps=10, progressive=True))
    assert step_sizes(tmp_path / "prog") == [4, 4, 8, 8, 8, 16, 16, 16, 16, 16]


def test_resume_continues_patch_training_exactly(tmp_path):
    straight = train(config(tmp_path / "a", steps=6))
    train(config(tmp_path / "b", steps=3))
    torch.manual_seed(999)
    resumed = train(config(tmp_path / "b", steps=6, resume="auto"))
    assert resumed.losses == straight.losses[3:] and resumed.nimg == straight.nimg
    assert step_sizes(tmp_path / "a") == step_sizes(tmp_path / "b")
    a = load_training_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    b = load_training_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(ValueError, match="pass --patch-diffusion --real-p 0.5 to continue it"):
        train(config(tmp_path / "b", steps=8, resume="auto", patch_diffusion=False))


def _ddp_run(outdir):
    """One rank of the two-process run (tests/two_processes.py sets up its environment)."""
    train(config(outdir, steps=4, real_p=0.2, device="cpu"))


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Two gloo processes draw the same crop sizes and keep their slices of the global draws
    (offsets included): the losses and weights are one process's."""
    single = train(config(tmp_path / "one", steps=4, real_p=0.2))
    run_two_processes(_ddp_run, str(tmp_path / "two"))
    assert step_sizes(tmp_path / "one") == step_sizes(tmp_path / "two") and 4 in step_sizes(tmp_path / "one")
    losses_two = [r["loss"] for r in metrics(tmp_path / "two")]
    assert losses_two == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    one = load_training_checkpoint(str(tmp_path / "one" / "checkpoint.pt"))
    two = load_training_checkpoint(str(tmp_path / "two" / "checkpoint.pt"))
    assert two["world_size"] == 2 and two["nimg"] == one["nimg"]
    worst = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    assert worst < 1e-5, worst


def test_cli_patch_training_at_32_then_full_size_sampling(tmp_path, capsys):
    from fastlego.__main__ import main
    out = str(tmp_path / "run")
    rc = main(["train", "--outdir", out, "--resolution", "32", "--bricks", STACK32, "--patch-diffusion",
               "--real-p", "0.4", "--steps", "6", "--batch", "4", "--max-images", "64", "--log-every", "1",
               "--threads", "1", "--seed", "2"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "patch diffusion (real_p 0.4): 8x8 (p 0.24, batch x4): brick 0; 16x16 (p 0.36, batch x2): bricks 0-1; " \
           "32x32 (p 0.40, batch x1): all 3 bricks" in err
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)["train"]
    assert saved["patch_diffusion"] is True and saved["real_p"] == 0.4 and saved["progressive"] is False
    assert sum(sum(r["crop_steps"].values()) for r in metrics(out)) == 6
    rc = main(["sample", "--network", os.path.join(out, "checkpoint.pt"), "--seeds", "0-1", "--steps", "3",
               "--outdir", str(tmp_path / "samples"), "--images", "--quiet"])
    assert rc == 0
    assert "sampled 2 images of 32x32" in capsys.readouterr().out
    assert main(["train", "--outdir", str(tmp_path / "x"), "--real-p", "0.3", "--steps", "1"]) == 2
    assert "add --patch-diffusion" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# GPU: CUDA graphs (one per crop size), the Triton kernels on crops in training
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_patch_training_with_cuda_graphs_on_gpu(tmp_path):
    """One CUDA graph per crop size (each captured after its warm-up steps, then replayed) trains
    as eager steps do; 24 steps at real_p 0.3 draw every size at least 7 times."""
    kw = dict(steps=24, device="cuda", precision="bf16", deterministic=True, resolution=32, batch_size=8,
              bricks="4:lego_S_2:1,16:lego_S_8:1,32:lego_S_4:1", real_p=0.3, warmup_steps=4, grad_clip=1.0)
    graphed = train(config(tmp_path / "graph", **kw))
    eager = train(config(tmp_path / "eager", cuda_graph=False, **kw))
    assert graphed.cuda_graph and not eager.cuda_graph
    sizes = step_sizes(tmp_path / "graph")
    assert sizes == step_sizes(tmp_path / "eager") and min(sizes.count(s) for s in (8, 16, 32)) >= 7
    assert all(math.isfinite(v) for v in graphed.losses)
    # not bit for bit: the captured AdamW reads its rate and step from device tensors (see
    # tests/test_training.py); the differences stay far below what the steps moved
    assert graphed.losses == pytest.approx(eager.losses, rel=2e-3)
    a = load_training_checkpoint(str(tmp_path / "graph" / "checkpoint.pt"))
    b = load_training_checkpoint(str(tmp_path / "eager" / "checkpoint.pt"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-2, atol=1e-4, msg=k)
    torch.manual_seed(3)   # config's seed: the run's initial weights
    start = build_network(a["network"]).state_dict()
    assert max((a["model"][k] - start[k]).abs().max().item() for k in a["model"]) > 1e-2
    # a resumed run captures each crop size's graph anew after that size's eager warm-up calls
    # (3); in 24 more steps some size comes at least 8 times, so at least one graph is replayed
    resumed = train(config(tmp_path / "graph", resume="auto", **dict(kw, steps=48)))
    later = step_sizes(tmp_path / "graph")[24:]
    assert resumed.step == 48 and len(later) == 24 and max(later.count(s) for s in (8, 16, 32)) >= 8
    assert resumed.cuda_graph and all(math.isfinite(v) for v in resumed.losses)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_crop_training_step_runs_triton_on_gpu(amp):
    """Under autocast on the GPU, `auto` runs the Triton brick_embed kernel and its input-gradient
    kernel for crops (never the reference), and the gradients match the reference backend's."""
    net = backbone(regions=(4, 16), width=384, intermediate=True).cuda().train()
    x, t, y = inputs(B=4, H=8, W=8, seed=3)
    x, t, y = x.cuda().requires_grad_(True), t.cuda(), torch.tensor([0, 1, 2, 3]).cuda() % 4
    coords = crop_coordinates(torch.tensor([[8, 0], [3, 5], [0, 0], [8, 8]]), 8, 16).cuda()

    def grads(mode, dtype):
        net.zero_grad(set_to_none=True)
        with fastlego.use_backend(mode), torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None), \
                dispatch.record() as rec:
            out = net(x, t, y, coords=coords, return_stage_idx=0, force_drop_ids=torch.zeros(4, 1, device="cuda"))
            loss = sum((o.float() ** 2).mean() for o in out)
            loss.backward()
        return {n: p.grad.float().clone() for n, p in net.named_parameters() if p.grad is not None}, rec

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    oracle, _ = grads("reference", None)          # fp32, no autocast
    same, _ = grads("reference", amp)             # the same dtype, PyTorch's ops
    got, rec = grads("auto", amp)
    chosen = {(r.op, r.chosen) for r in rec}
    assert ("brick_embed", "triton") in chosen and ("brick_embed_input_grad", "triton") in chosen, chosen
    assert not any(op.startswith("brick_embed") and c == "reference" for op, c in chosen), chosen
    for n in oracle:
        assert_close_to_reference(got[n], oracle[n], same[n], atol=1e-3 * max(1.0, oracle[n].abs().max().item()),
                                  what=f"{n} {amp}")
