"""Training: the EDM loss and preconditioning formulas, EMA, atomic checkpoints, exact resume,
loss going down on the bundled digits, and DDP (2 CPU processes, gloo) = one process."""

import math
import os

import pytest
import torch

from two_processes import run_two_processes
import fastlego
from fastlego.testing import randomize_
from fastlego.ema import ema_beta, update_ema
from fastlego.loss import EDMLoss
from fastlego.networks import DEMO_BRICKS, build_network, network_spec, parse_bricks
from fastlego.progress import ProgressBar
from fastlego.train_step import TrainStep, make_capturable, set_lr
from fastlego.training import TrainConfig, train
from fastlego.training_checkpoint import atomic_save, load_training_checkpoint, network_from_checkpoint

# The smallest LEGO that still has two bricks: 4x4 regions of one 4x4 patch, then one 8x8 patch.
TINY = "4:lego_S_4:1,8:lego_S_8:1"


def tiny_config(outdir, **kw):
    base = dict(data="digits", resolution=8, bricks=TINY, batch_size=8, steps=4, lr=1e-3, max_images=64,
                checkpoint_every=2, log_every=1, progress=False, outdir=str(outdir), seed=1, threads=2)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------

def test_edm_preconditioning_by_hand():
    net = build_network(network_spec(8, 1, 0, bricks=TINY))
    c_skip, c_out, c_in, c_noise = net.preconditioning(torch.tensor([0.5, 2.0]).reshape(-1, 1, 1, 1))
    # sigma = 0.5 = sigma_data: c_skip = 1/2, c_out = 0.25 / sqrt(0.5), c_in = 1 / sqrt(0.5), c_noise = log(0.5) / 4.
    assert torch.allclose(c_skip.flatten(), torch.tensor([0.5, 0.25 / 4.25]))
    assert torch.allclose(c_out.flatten(), torch.tensor([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)]))
    assert torch.allclose(c_in.flatten(), torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)]))
    assert torch.allclose(c_noise.flatten(), torch.tensor([math.log(0.5) / 4, math.log(2.0) / 4]))
    # D(x) = c_skip x + c_out F(c_in x, log(sigma)/4), checked against the raw backbone.
    randomize_(net)
    net.eval()
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    F_x = net.model(x * c_in, c_noise.flatten())
    assert torch.allclose(net(x, sigma), c_skip * x + c_out * F_x, atol=1e-6)


def test_edm_loss_by_hand():
    loss = EDMLoss()
    assert loss.sigma(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([math.exp(-1.2), math.exp(0.0)])
    # lambda(0.5) = (0.25 + 0.25) / (0.5 * 0.5)^2 = 8; lambda(1) = 1.25 / 0.25 = 5.
    assert loss.weight(torch.tensor([0.5, 1.0])).tolist() == pytest.approx([8.0, 5.0])

    seen = {}

    def net(x, sigma, labels):  # a "denoiser" returning 0.1 * its input, two bricks
        seen["x"], seen["sigma"] = x, sigma
        return [0.1 * x, 0.2 * x]

    y = torch.tensor([0.2, -0.4]).reshape(2, 1, 1, 1)
    noise = torch.tensor([1.0, 0.5]).reshape(2, 1, 1, 1)
    sigma = torch.tensor([0.5, 1.0])
    total, per_brick = loss(net, y, sigma, noise)
    assert torch.allclose(seen["x"].flatten(), torch.tensor([0.2 + 0.5, -0.4 + 0.5]))  # y + sigma * noise
    # brick 1: D = 0.1 (y + n): errors (0.07 - 0.2, 0.01 + 0.4) -> 8 * 0.13^2 and 5 * 0.41^2, mean.
    b1 = (8 * 0.13 ** 2 + 5 * 0.41 ** 2) / 2
    b2 = (8 * (0.14 - 0.2) ** 2 + 5 * (0.02 + 0.4) ** 2) / 2
    assert [float(v) for v in per_brick] == pytest.approx([b1, b2], rel=1e-6)
    assert float(total) == pytest.approx((b1 + b2) / 2, rel=1e-6)
    single, only = loss(lambda x, s, l: 0.1 * x, y, sigma, noise)
    assert float(single) == pytest.approx(b1, rel=1e-6) and len(only) == 1


def test_ema_beta_and_update():
    # Half-life 1 kimg, batch 1000: beta = 0.5 per step; ramp-up caps the half-life at 0.05 * nimg.
    assert ema_beta(1000, 10 ** 9, 1.0, None) == pytest.approx(0.5)
    assert ema_beta(100, 2000, 500.0, 0.05) == pytest.approx(0.5 ** (100 / 100))
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    a0 = a.weight.detach().clone()
    update_ema(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * a0 + 0.25 * b.weight)


def test_parse_bricks_and_spec_errors():
    assert parse_bricks("4:lego_S_2:1, 16:lego_S_8:2") == {"img_resolution": [4, 16], "depths": [1, 2],
                                                           "model_type": ["lego_S_2", "lego_S_8"]}
    assert parse_bricks(DEMO_BRICKS)["img_resolution"][-1] == 16
    for bad, msg in [("4:lego_S_2", "REGION:TYPE:DEPTH"), ("4:lego_Q_2:1", "unknown brick type"),
                     ("6:lego_S_4:1", "not a multiple of"), ("x:lego_S_2:1", "positive integers"), ("", "no bricks")]:
        with pytest.raises(ValueError, match=msg):
            parse_bricks(bad)
    with pytest.raises(ValueError, match="multiple of"):
        network_spec(12, 1, 0, bricks="8:lego_S_8:1")
    with pytest.raises(ValueError, match="exactly one"):
        network_spec(8, 1, 0)
    with pytest.raises(ValueError, match="unknown LEGO preset"):
        network_spec(64, 3, 0, preset="lego_S_PG_65")
    for kw, msg in [(dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"), (dict(precision="fp16"), "bf16"),
                    (dict(class_dropout=1.0), "class_dropout"), (dict(preset="lego_S_PG_64"), "not both"),
                    (dict(checkpoint_blocks=2), "needs activation_checkpointing=.block.")]:
        with pytest.raises(ValueError, match=msg):
            tiny_config("/nonexistent", **kw).validate()


def test_build_network_from_preset_and_bricks():
    net = build_network(network_spec(8, 1, 10, bricks=TINY, intermediate=False))
    assert isinstance(net, fastlego.EDMPrecond) and net.model.num_bricks == 2 and net.label_dim == 10
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert sorted(net.state_dict())[0].startswith("model.")  # the release's key prefix
    with torch.device("meta"):  # a preset builds through EDMPrecond itself (meta: no memory)
        pre = build_network(network_spec(64, 3, 0, preset="lego_S_PG_64"))
    assert pre.model.img_resolution == [4, 16, 64] and pre.model.train_intermediate_stages


def test_progress_bar_writes_lines(capsys):
    import io
    stream = io.StringIO()
    bar = ProgressBar(4, "x", stream=stream, interval=0.0)
    for _ in range(4):
        bar.update(1, loss=0.5)
    bar.close()
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("x [####################] 4/4") and "loss=0.5" in lines[-1]


# --------------------------------------------------------------------------------------------
# Layout: fastlego.training's parts live in modules of their own
# --------------------------------------------------------------------------------------------

# Names fastlego.training offered when it was one module, by the module that holds each one now.
MOVED_NAMES = {
    "fastlego.networks": ["DEMO_BRICKS", "SPEC_DEFAULTS", "parse_brick_type", "parse_bricks", "network_spec",
                          "spec_from_network", "build_network", "_stack_from_dict"],
    "fastlego.loss": ["EDMLoss"],
    "fastlego.train_step": ["TrainStep", "make_capturable", "adamw", "set_lr"],
    "fastlego.ema": ["ema_beta", "update_ema"],
    "fastlego.progress": ["ProgressBar"],
    "fastlego.training_checkpoint": ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "atomic_save", "global_rng_state",
                                     "set_global_rng_state", "is_training_checkpoint", "load_training_checkpoint",
                                     "check_training_checkpoint", "network_from_checkpoint"],
    "fastlego.run_folder": ["CHECKPOINT_NAME", "METRICS_NAME", "CONFIG_NAME", "RUN_FILES", "RunFolderInUse",
                            "existing_run_files"],
}


def test_training_still_offers_the_names_of_its_parts():
    """Code written against the one-module fastlego.training keeps working: every name that moved
    to a module of its own is the same object under fastlego.training."""
    import importlib
    for module, names in MOVED_NAMES.items():
        home = importlib.import_module(module)
        for name in names:
            assert getattr(fastlego.training, name) is getattr(home, name), (module, name)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def test_atomic_save_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file is gone too


def test_crash_during_training_checkpoint_keeps_previous(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, steps=2, checkpoint_every=2))
    real_replace = os.replace

    def crash(src, dst):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, steps=4, checkpoint_every=2, resume="auto"))
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = load_training_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["step"] == 2 and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------

def test_loss_goes_down_on_the_bundled_digits(tmp_path):
    cfg = tiny_config(tmp_path, steps=20, batch_size=16, lr=2e-3, warmup_steps=3, max_images=None, log_every=10,
                      checkpoint_every=100, ema_halflife_kimg=0.1)
    res = train(cfg)
    assert len(res.losses) == 20 and all(math.isfinite(v) for v in res.losses)
    # The training loss is noisy (random sigmas); judge on a fixed batch of real digits at fixed
    # sigmas and noise, before (the same seeded initialisation) and after training.
    from fastlego.data import ImageDataset, images_to_float
    images, labels = ImageDataset("digits", resolution=8).batch(list(range(0, 1797, 60)))
    y = images_to_float(images).repeat(4, 1, 1, 1)
    sigma = torch.tensor([0.1, 0.3, 1.0, 3.0]).repeat_interleave(len(images))
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    spec = load_training_checkpoint(res.checkpoint)["network"]
    torch.manual_seed(cfg.seed)
    before = build_network(spec).eval()
    after = network_from_checkpoint(res.checkpoint, which="model")
    with torch.no_grad():
        l0 = float(EDMLoss()(before, y, sigma, noise, labels.repeat(4, 1))[0])
        l1 = float(EDMLoss()(after, y, sigma, noise, labels.repeat(4, 1))[0])
    assert l1 < 0.75 * l0, (l0, l1)
    records = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [10, 20]
    assert all(len(r["loss_per_brick"]) == 2 and r["images_per_s"] > 0 for r in records)
    assert records[0]["lr"] == pytest.approx(2e-3)
    ckpt = load_training_checkpoint(res.checkpoint)
    assert ckpt["step"] == 20 and ckpt["nimg"] == 20 * 16
    # The EMA network differs from the raw one and is what network_from_checkpoint gives by default.
    ema = network_from_checkpoint(res.checkpoint)
    k = "model.model.1.final_layer.linear.weight"
    assert not torch.equal(ema.state_dict()[k], after.state_dict()[k])
    assert torch.equal(ema.state_dict()[k], res.network.state_dict()[k])


def test_resume_takes_the_same_next_steps(tmp_path):
    straight = train(tiny_config(tmp_path / "a", steps=6, checkpoint_every=3, xflip=True))
    first = train(tiny_config(tmp_path / "b", steps=3, checkpoint_every=3, xflip=True))
    # Scramble every global RNG in between: the resumed run must restore what it needs.
    torch.manual_seed(12345)
    resumed = train(tiny_config(tmp_path / "b", steps=6, checkpoint_every=3, xflip=True, resume="auto"))
    assert first.losses == straight.losses[:3]
    assert resumed.losses == straight.losses[3:]  # bit-identical on the CPU
    a = load_training_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    b = load_training_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert torch.equal(a["rng"]["train_generator"], b["rng"]["train_generator"]) and a["step"] == b["step"] == 6
    with pytest.raises(ValueError, match="batch_size=8 but this run has batch_size=16"):
        train(tiny_config(tmp_path / "b", steps=8, batch_size=16, resume="auto"))


def _ddp_run(outdir):
    """One rank of the two-process run (tests/two_processes.py sets up its environment)."""
    train(tiny_config(outdir, steps=3, checkpoint_every=3, device="cpu", threads=1))


def test_ddp_two_processes_equal_one_process_with_the_combined_batch(tmp_path):
    single = train(tiny_config(tmp_path / "one", steps=3, checkpoint_every=3))
    run_two_processes(_ddp_run, str(tmp_path / "two"))
    one = load_training_checkpoint(str(tmp_path / "one" / "checkpoint.pt"))
    two = load_training_checkpoint(str(tmp_path / "two" / "checkpoint.pt"))
    assert two["world_size"] == 2 and two["step"] == 3 and len(two["rng"]["per_rank"]) == 2
    losses_two = [__import__("json").loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert losses_two == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    worst = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    assert worst < 1e-5, worst
    moved = max((one["model"][k] - build_network(one["network"]).state_dict()[k]).abs().max().item() for k in one["model"])
    assert moved > 1e-3  # the comparison is not between two untrained copies


# --------------------------------------------------------------------------------------------
# The step runner and CUDA graphs (the graph itself is tested on the GPU, below)
# --------------------------------------------------------------------------------------------

def test_cuda_graph_setting_is_checked(tmp_path):
    from fastlego.training import _use_cuda_graph
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _use_cuda_graph(None, cpu, 1) is False          # auto: on for one CUDA process only
    assert _use_cuda_graph(None, cuda, 2) is False
    assert _use_cuda_graph(None, cuda, 1) is True
    assert _use_cuda_graph(False, cuda, 1) is False
    with pytest.raises(ValueError, match="needs a CUDA device.*drop --cuda-graph"):
        _use_cuda_graph(True, cpu, 1)
    with pytest.raises(ValueError, match="for one process; this run has 2"):
        _use_cuda_graph(True, cuda, 2)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(tiny_config(tmp_path, device="cpu", cuda_graph=True))
    assert not os.path.exists(tmp_path / "checkpoint.pt")   # refused before any step


def test_make_capturable_round_trip_and_set_lr():
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(5)
    opt.step()
    saved = opt.state_dict()
    make_capturable(opt, True, "cpu")
    group = opt.param_groups[0]
    assert group["capturable"] and torch.is_tensor(group["lr"]) and group["lr"].item() == pytest.approx(1e-3)
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 1
    lr_tensor = group["lr"]
    set_lr(opt, 5e-4)      # in place: a captured step keeps reading the same tensor
    assert group["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(5e-4)
    make_capturable(opt, False, "cpu")
    assert group["capturable"] is False and group["lr"] == pytest.approx(5e-4) and not torch.is_tensor(group["lr"])
    set_lr(opt, 2e-4)
    assert group["lr"] == 2e-4
    opt.load_state_dict(saved)   # a checkpoint's optimizer: make_capturable puts it in the asked form again
    make_capturable(opt, True, "cpu")
    assert opt.param_groups[0]["capturable"] and torch.is_tensor(opt.param_groups[0]["lr"])


def test_train_step_clears_gradients_between_steps():
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)   # lr 0: the weights stay, only the gradients matter

    def body(x):
        loss = lin(x).square().sum()
        loss.backward()
        opt.step()
        return loss.detach()

    step = TrainStep(body, opt)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    step(x1)
    step(x2)
    lin.zero_grad()
    lin(x2).square().sum().backward()
    expected = lin.weight.grad.clone()
    step(x2)
    assert torch.equal(lin.weight.grad, expected)   # the last step's gradient, not a sum over steps
    assert not step.captured and step.calls == 3
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        TrainStep(body, opt, warmup=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            TrainStep(body, opt, cuda_graph=True)


# --------------------------------------------------------------------------------------------
# GPU (run by the lead on the device machine)
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_bf16_training_of_a_preset_on_gpu(tmp_path):
    from fastlego.sampling import sample
    cfg = TrainConfig(data="digits", resolution=64, preset="lego_S_PG_64", batch_size=32, steps=30, lr=5e-4,
                      warmup_steps=5, log_every=10, checkpoint_every=30, outdir=str(tmp_path), progress=False)
    res = train(cfg)  # precision auto: bf16 autocast on CUDA
    assert all(math.isfinite(v) for v in res.losses)
    assert sum(res.losses[-10:]) < sum(res.losses[:10]), res.losses
    out = sample(res.checkpoint, "0-7", num_steps=8, t_break=0.5, cfg_scale=2.0, device="cuda", progress=False,
                 cuda_graph=True, precision="bf16")
    assert out.images.shape == (8, 1, 64, 64) and torch.isfinite(out.images).all()


def test_training_data_stays_on_the_host_off_the_gpu():
    from fastlego.data import ImageDataset
    from fastlego.training import _stage
    ds = ImageDataset("digits", resolution=8)
    assert _stage(ds, torch.device("cpu")) is ds and ds.device.type == "cpu"


@pytest.mark.cuda
def test_train_stages_the_digits_on_the_gpu_and_trains_as_from_the_host(tmp_path, monkeypatch):
    """On a GPU the in-memory digits are staged on the device (a step's batch is a gather there);
    the run takes exactly the steps it takes with the data on the host."""
    from fastlego import training
    from fastlego.data import ImageDataset
    assert training._stage(ImageDataset("digits", resolution=8), torch.device("cuda")).device.type == "cuda"
    kw = dict(steps=4, checkpoint_every=4, device="cuda", precision="bf16", deterministic=True, cuda_graph=False,
              xflip=True, resolution=16, bricks="4:lego_S_2:1,16:lego_S_8:1")
    staged = train(tiny_config(tmp_path / "staged", **kw))
    monkeypatch.setattr(training, "_stage", lambda dataset, device: dataset)
    host = train(tiny_config(tmp_path / "host", **kw))
    assert all(math.isfinite(v) for v in staged.losses)
    assert staged.losses == host.losses


def _nccl_run(outdir):
    torch.backends.cudnn.allow_tf32 = False
    train(tiny_config(outdir, steps=3, checkpoint_every=3, device=None, precision="fp32", resolution=16,
                      bricks="4:lego_S_2:1,16:lego_S_8:1"))


@pytest.mark.cuda
def test_ddp_nccl_two_gpus_equal_one_gpu(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.backends.cudnn.allow_tf32 = False
    single = train(tiny_config(tmp_path / "one", steps=3, checkpoint_every=3, device="cuda:0", precision="fp32",
                               resolution=16, bricks="4:lego_S_2:1,16:lego_S_8:1"))
    run_two_processes(_nccl_run, str(tmp_path / "two"))
    one = load_training_checkpoint(str(tmp_path / "one" / "checkpoint.pt"))
    two = load_training_checkpoint(str(tmp_path / "two" / "checkpoint.pt"))
    losses_two = [__import__("json").loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert losses_two == pytest.approx(single.losses, rel=1e-3)
    worst = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    assert worst < 1e-3, worst


def test_deterministic_training_runs_repeat_bitwise(tmp_path):
    """`deterministic=True` (`fastlego train --deterministic`) turns fastlego's deterministic mode on
    for the run and restores the previous state after; two runs give the same losses and weights."""
    seen = []
    original = fastlego.training._train

    def spy(*args, **kwargs):
        seen.append((fastlego.dispatch.is_deterministic(), torch.are_deterministic_algorithms_enabled()))
        return original(*args, **kwargs)

    fastlego.training._train = spy
    try:
        a = train(tiny_config(tmp_path / "a", steps=3, deterministic=True))
        b = train(tiny_config(tmp_path / "b", steps=3, deterministic=True))
    finally:
        fastlego.training._train = original
    assert seen == [(True, True), (True, True)]
    assert not fastlego.dispatch.is_deterministic() and not torch.are_deterministic_algorithms_enabled()
    assert a.losses == b.losses
    wa = load_training_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))["model"]
    wb = load_training_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _graph_vs_eager_nets(batches: int):
    from fastlego.benchmark import build_train_net, default_case
    case = default_case("lego_S_PG_64", 4)
    net = build_train_net(case, "cuda", seed=3)
    g = torch.Generator().manual_seed(5)
    data = []
    for _ in range(batches):
        images = torch.rand(case.input_shape, generator=g) * 2 - 1
        sigma = EDMLoss().sigma(torch.randn(case.batch, generator=g))
        data.append(tuple(v.cuda() for v in (images, sigma, torch.randn(case.input_shape, generator=g))))
    return net, data


def _runner(net, cuda_graph: bool):
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    make_capturable(opt, True, "cuda")   # the same optimizer arithmetic in both runs
    loss_fn = EDMLoss()

    def body(images, sigma, noise):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss, per_brick = loss_fn(net, images, sigma, noise)
        loss.backward()
        for p in params:
            torch.nan_to_num_(p.grad, nan=0.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return torch.stack([loss.detach()] + per_brick)

    return opt, TrainStep(body, opt, cuda_graph=cuda_graph, warmup=2)


@pytest.mark.cuda
def test_cuda_graph_train_step_equals_eager_steps():
    """Eight AdamW steps of lego_S_PG_64 (random non-zero weights, a new batch and learning rate
    every step, gradient guard and clip inside the step), eager vs captured after 2 warm-up
    steps: in deterministic mode the replayed graph gives the same losses and weights, bit for bit."""
    import copy
    net, data = _graph_vs_eager_nets(8)
    results = []
    with fastlego.deterministic():
        for cuda_graph in (False, True):
            model = copy.deepcopy(net)
            opt, step = _runner(model, cuda_graph)
            losses = []
            for i, batch in enumerate(data):
                set_lr(opt, 1e-3 * (i + 1) / 8)
                losses.append(step(*batch).clone())
            torch.cuda.synchronize()
            assert step.captured is cuda_graph and step.fallback_reason is None
            results.append((torch.stack(losses), {k: v.clone() for k, v in model.state_dict().items()}))
    (la, wa), (lb, wb) = results
    assert torch.isfinite(la).all() and torch.equal(la, lb), (la[:, 0], lb[:, 0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]
    moved = max((wa[k] - v).abs().max().item() for k, v in net.state_dict().items())
    assert moved > 1e-4   # the steps did train


@pytest.mark.cuda
def test_cuda_graph_capture_failure_falls_back_with_a_warning():
    lin = torch.nn.Linear(8, 8).cuda()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    make_capturable(opt, True, "cuda")
    seen = []

    def body(x):
        loss = lin(x).square().mean()
        seen.append(loss.item())   # a host sync: cannot be captured
        loss.backward()
        opt.step()
        return loss.detach()

    step = TrainStep(body, opt, cuda_graph=True, warmup=1)
    x = torch.randn(4, 8, device="cuda")
    step(x)
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
        out = step(x)
    assert not step.captured and step.fallback_reason and math.isfinite(out.item())
    out = step(x)   # eager from now on, no second warning
    assert len(seen) >= 3 and math.isfinite(out.item())


@pytest.mark.cuda
@pytest.mark.parametrize("checkpointing", [None, "block"])
def test_train_with_cuda_graph_on_gpu(tmp_path, checkpointing):
    """`fastlego train` on one GPU replays its steps as a CUDA graph by default (lr warm-up, label
    dropout, gradient clip inside) and trains as --no-cuda-graph does. Not bit for bit: the
    captured AdamW reads its rate and step from device tensors (fp32 bias corrections) where the
    eager one uses Python floats (the bitwise comparison with one optimizer is the test above)."""
    kw = dict(steps=6, checkpoint_every=6, device="cuda", precision="bf16", deterministic=True, warmup_steps=4,
              grad_clip=1.0, resolution=16, bricks="4:lego_S_2:1,16:lego_S_8:1",
              activation_checkpointing=checkpointing)
    graphed = train(tiny_config(tmp_path / "graph", **kw))
    eager = train(tiny_config(tmp_path / "eager", cuda_graph=False, **kw))
    assert graphed.cuda_graph and not eager.cuda_graph
    assert all(math.isfinite(v) for v in graphed.losses)
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-4)
    a = load_training_checkpoint(str(tmp_path / "graph" / "checkpoint.pt"))
    b = load_training_checkpoint(str(tmp_path / "eager" / "checkpoint.pt"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5, msg=k)
    torch.manual_seed(1)   # tiny_config's seed: the run's initial weights
    start = build_network(a["network"]).state_dict()
    moved = max((a["model"][k] - start[k]).abs().max().item() for k in a["model"])
    assert moved > 1e-3   # six steps at lr up to 1e-3 moved the weights far more than the tolerance
    resumed = train(tiny_config(tmp_path / "graph", resume="auto", **dict(kw, steps=12)))   # resumes into a graph
    assert resumed.cuda_graph and resumed.step == 12 and all(math.isfinite(v) for v in resumed.losses)


def test_train_checkpointing_first_blocks_only_same_losses(tmp_path):
    """checkpoint_blocks=1 ("block" mode) trains as without checkpointing: recomputation is exact."""
    plain = train(tiny_config(tmp_path / "plain", steps=2, checkpoint_every=2))
    part = train(tiny_config(tmp_path / "part", steps=2, checkpoint_every=2, activation_checkpointing="block",
                             checkpoint_blocks=1))
    assert part.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------
# A run folder is never overwritten silently (resume / overwrite say what to do)
# --------------------------------------------------------------------------------------------

# A custom-width stack: two bricks of width 32 (0.06M parameters), fast on the CPU.
SMALL = "4:w32p4h2:1,8:w32p8h2:1"


def small_config(outdir, **kw):
    return tiny_config(outdir, **dict(dict(bricks=SMALL, batch_size=4, steps=2, max_images=8, checkpoint_every=100,
                                           threads=1), **kw))


def _metrics_steps(outdir):
    return [__import__("json").loads(line)["step"] for line in open(os.path.join(outdir, "metrics.jsonl"))]


def _snapshot(outdir):
    return {name: open(os.path.join(outdir, name), "rb").read() for name in sorted(os.listdir(outdir))}


def test_outdir_with_a_run_is_refused_before_any_work(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(small_config(run))
    before = _snapshot(run)
    assert sorted(before) == ["checkpoint.pt", "config.json", "metrics.jsonl"]

    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded: the refusal came too late")

    monkeypatch.setattr("fastlego.data.ImageDataset", no_data)
    for kw in (dict(), dict(steps=5, seed=2)):
        with pytest.raises(fastlego.training.RunFolderInUse, match=r"already holds a training run \(checkpoint.pt, "
                           r"metrics.jsonl, config.json\).*--resume auto.*a fresh --outdir.*--overwrite"):
            train(small_config(run, **kw))
    assert _snapshot(run) == before   # nothing written, nothing appended
    # Any one file of a run is enough to refuse; --resume auto without a checkpoint cannot continue.
    for name in ("config.json", "metrics.jsonl"):
        lone = tmp_path / f"only-{name}"
        lone.mkdir()
        (lone / name).write_text("{}\n")
        with pytest.raises(fastlego.training.RunFolderInUse, match=name):
            train(small_config(lone))
        with pytest.raises(fastlego.training.RunFolderInUse, match="no checkpoint.pt.*--overwrite"):
            train(small_config(lone, resume="auto"))
        assert os.listdir(lone) == [name]
    with pytest.raises(ValueError, match="--overwrite or --resume auto"):
        train(small_config(run, overwrite=True, resume="auto"))
    assert _snapshot(run) == before


def test_overwrite_starts_afresh_and_resume_auto_appends(tmp_path):
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    first = train(small_config(run, steps=3, seed=5))
    assert _metrics_steps(run) == [1, 2, 3] and first.step == 3
    # overwrite: the same as a run into an empty folder, metrics not appended to the old ones.
    again = train(small_config(run, overwrite=True))
    reference = train(small_config(fresh))
    assert again.losses == reference.losses and again.step == 2 and again.steps_run == 2
    assert _metrics_steps(run) == [1, 2]
    ckpt = load_training_checkpoint(str(run / "checkpoint.pt"))
    assert ckpt["step"] == 2 and ckpt["config"]["seed"] == 1 and ckpt["config"]["overwrite"] is True
    # resume auto continues the run, its metrics appended.
    more = train(small_config(run, steps=4, resume="auto"))
    assert (more.start_step, more.step, more.steps_run) == (2, 4, 2)
    assert _metrics_steps(run) == [1, 2, 3, 4]


def test_resume_auto_drops_metrics_of_steps_after_the_checkpoint(tmp_path):
    """A run that logged steps past its last checkpoint and then died redoes those steps when
    resumed: their old records go, so metrics.jsonl holds every step once."""
    run = tmp_path / "run"
    train(small_config(run, steps=2))
    saved = (run / "checkpoint.pt").read_bytes()
    train(small_config(run, steps=4, resume="auto"))
    assert _metrics_steps(run) == [1, 2, 3, 4]
    (run / "checkpoint.pt").write_bytes(saved)          # died after logging 3, 4, before checkpointing them
    res = train(small_config(run, steps=4, resume="auto"))
    assert res.start_step == 2 and _metrics_steps(run) == [1, 2, 3, 4]


def test_resume_from_another_checkpoint_needs_a_free_outdir(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(small_config(a, steps=2))
    train(small_config(b, steps=1))
    before = _snapshot(b)
    with pytest.raises(fastlego.training.RunFolderInUse, match=r"another training run.*resumes from a different "
                       r"checkpoint.*fresh --outdir.*--resume auto.*--overwrite"):
        train(small_config(b, steps=3, resume=str(a / "checkpoint.pt")))
    assert _snapshot(b) == before
    # Into an empty folder: allowed; a's run continues there, with metrics of the new steps only.
    res = train(small_config(c, steps=3, resume=str(a / "checkpoint.pt")))
    assert (res.start_step, res.step) == (2, 3) and _metrics_steps(c) == [3]
    # With overwrite, b's run is replaced by a's continuation (b's old checkpoint is gone).
    res = train(small_config(b, steps=3, resume=str(a / "checkpoint.pt"), overwrite=True))
    assert _metrics_steps(b) == [3] and load_training_checkpoint(str(b / "checkpoint.pt"))["step"] == 3
    # Resuming a folder's own checkpoint by path is resuming it; overwrite would delete what it resumes.
    res = train(small_config(b, steps=4, resume=str(b / "checkpoint.pt")))
    assert res.start_step == 3 and _metrics_steps(b) == [3, 4]
    with pytest.raises(ValueError, match="would delete"):
        train(small_config(b, steps=5, resume=str(b / "checkpoint.pt"), overwrite=True))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(small_config(tmp_path / "d", resume=str(tmp_path / "nope.pt")))
    assert not os.path.exists(tmp_path / "d")


def test_cli_refuses_a_used_outdir_and_counts_resumed_steps(tmp_path, capsys):
    from fastlego.__main__ import main
    out = str(tmp_path / "run")
    argv = ["train", "--outdir", out, "--resolution", "8", "--bricks", SMALL, "--batch", "4", "--max-images", "8",
            "--log-every", "1", "--threads", "1", "--quiet"]
    assert main(argv + ["--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps (step 0 -> 2)" in printed
    losses = [__import__("json").loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert f"last loss {losses[-1]:.4f} (mean of the last logged window)" in printed
    before = _snapshot(out)
    assert main(argv + ["--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume auto" in err and "--overwrite" in err
    assert "Traceback" not in err and _snapshot(out) == before
    assert main(argv + ["--steps", "4", "--resume", "auto"]) == 0
    assert "trained 2 steps (step 2 -> 4)" in capsys.readouterr().out and _metrics_steps(out) == [1, 2, 3, 4]
    assert main(argv + ["--steps", "4", "--resume", "auto"]) == 0
    assert "nothing to train: the run is at step 4" in capsys.readouterr().out
    assert main(argv + ["--steps", "1", "--overwrite"]) == 0
    assert "trained 1 step (step 0 -> 1)" in capsys.readouterr().out and _metrics_steps(out) == [1]
    assert main(argv + ["--steps", "1", "--overwrite", "--resume", "auto"]) == 2
    assert "--overwrite or --resume auto" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Step counting, the last loss, the header
# --------------------------------------------------------------------------------------------

def test_train_result_counts_this_calls_steps_and_defines_last_loss(tmp_path):
    res = train(small_config(tmp_path, steps=5, log_every=3))
    assert (res.start_step, res.step, res.steps_run) == (0, 5, 5) and len(res.losses) == 5
    records = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [3, 5]
    # last_loss: the mean over the last logged window (steps 4 and 5), as metrics.jsonl's last record.
    assert res.last_loss == records[-1]["loss"]
    assert res.last_loss == pytest.approx(sum(res.losses[3:]) / 2, rel=1e-6)
    assert res.last_loss != pytest.approx(res.losses[-1], rel=1e-6)   # not one step's loss
    resumed = train(small_config(tmp_path, steps=7, log_every=3, resume="auto"))
    assert (resumed.start_step, resumed.step, resumed.steps_run) == (5, 7, 2) and len(resumed.losses) == 2
    done = train(small_config(tmp_path, steps=7, log_every=3, resume="auto"))
    assert done.steps_run == 0 and done.step == 7 and math.isnan(done.last_loss)


def test_header_names_the_step_target_or_the_time_budget(tmp_path, capsys):
    train(small_config(tmp_path / "steps", steps=2, progress=True))
    header = capsys.readouterr().err.splitlines()[0]
    assert header.startswith("fastlego train:") and header.endswith("steps 0->2")
    res = train(small_config(tmp_path / "time", steps=None, max_seconds=0.5, progress=True))
    header = capsys.readouterr().err.splitlines()[0]
    assert header.endswith("for 0 s from step 0") or header.endswith("for 1 s from step 0"), header
    assert "->" not in header and res.steps_run >= 1 and res.step == res.steps_run
    train(small_config(tmp_path / "both", steps=2, max_seconds=90, progress=True))
    assert capsys.readouterr().err.splitlines()[0].endswith("steps 0->2 or 1.5 min, whichever comes first")
    with pytest.raises(ValueError, match="steps=None.*needs max_seconds"):
        train(small_config(tmp_path / "never", steps=None))


# --------------------------------------------------------------------------------------------
# Custom-width bricks: w<WIDTH>p<PATCH>h<HEADS>
# --------------------------------------------------------------------------------------------

def test_custom_width_bricks_parse_build_and_train(tmp_path):
    stack = parse_bricks("8:w128p4h4:1, 16:w128p4h4:2")
    assert stack == {"img_resolution": [8, 16], "model_type": [[128, 4, 4], [128, 4, 4]], "depths": [1, 2]}
    assert parse_bricks("4:lego_S_2:1,8:w384p8h6:1")["model_type"] == ["lego_S_2", [384, 8, 6]]
    spec = network_spec(16, 1, 10, bricks="8:w64p4h4:1,16:w64p8h2:1")
    assert spec["bricks"]["model_type"] == [[64, 4, 4], [64, 8, 2]]
    assert __import__("json").loads(__import__("json").dumps(spec)) == spec   # JSON-friendly
    net = build_network(spec)
    assert net.model_type == "custom:8:w64p4h4:1,16:w64p8h2:1"
    assert [(b.width, b.patch, b.num_heads, len(b.blocks)) for b in net.model.model] == [(64, 4, 4, 1), (64, 8, 2, 1)]
    for bad, msg in [("8:w130p4h4:1", r"width 130 is not a multiple of the head count 4.*e\.g\. w132p4h4"),
                     ("8:w126p4h3:1", r"not a multiple of 4 .*sin-cos.*e\.g\. w132p4h3"),
                     ("8:w128p3h4:1", r"region 8 is not a multiple of w128p3h4's patch size 3"),
                     ("8:w0p4h4:1", "positive integers"), ("8:w128p4:1", r"unknown brick type 'w128p4'.*w<WIDTH>"),
                     ("8:w128p4h4:1,16:lego_S_4:1", r"share one width.*\[128, 384\]")]:
        with pytest.raises(ValueError, match=msg):
            parse_bricks(bad)
        with pytest.raises(ValueError, match=msg):
            tiny_config(tmp_path, bricks=bad).validate()
    with pytest.raises(ValueError, match="head count"):
        build_network(dict(spec, bricks=dict(spec["bricks"], model_type=[[66, 4, 4], [66, 8, 2]])))
    res = train(small_config(tmp_path / "run", steps=1))
    config = __import__("json").load(open(tmp_path / "run" / "config.json"))
    assert config["network"]["bricks"]["model_type"] == [[32, 4, 2], [32, 8, 2]]
    assert res.network.model_type == "custom:" + SMALL and math.isfinite(res.last_loss)
    # The DEMO_BRICKS default keeps its meaning: the network trained when neither preset nor bricks is given.
    assert network_spec(16, 1, 10, bricks=DEMO_BRICKS)["bricks"] == parse_bricks(DEMO_BRICKS)


def test_sigma_data_reaches_the_network(tmp_path):
    """The EDM loss and the network's preconditioning use the same sigma_data."""
    res = train(small_config(tmp_path, steps=1, sigma_data=0.7))
    assert res.network.sigma_data == 0.7
    assert load_training_checkpoint(res.checkpoint)["network"]["sigma_data"] == 0.7
    assert network_from_checkpoint(res.checkpoint).sigma_data == 0.7


# --------------------------------------------------------------------------------------------
# `fastlego train --help`
# --------------------------------------------------------------------------------------------

def test_every_train_option_says_what_it_does_and_its_default():
    import argparse
    from fastlego.__main__ import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = sub.choices["train"]
    formatter = train_parser._get_formatter()
    checked = 0
    for action in train_parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        text = formatter._expand_help(action)
        assert len(text.split()) >= 3, (action.option_strings, text)
        if action.required:
            assert "required" in text, action.option_strings
        else:
            assert "default" in text, (action.option_strings, text)
        if action.default not in (None, False, True, argparse.SUPPRESS):
            assert f"default: {action.default}" in text, (action.option_strings, text)
        checked += 1
    assert checked >= 30
    preset_help = next(a for a in train_parser._actions if "--preset" in a.option_strings).help
    assert all(name in preset_help for name in fastlego.PRESETS) and "fastlego info" not in preset_help
    bricks_help = next(a for a in train_parser._actions if "--bricks" in a.option_strings).help
    assert DEMO_BRICKS in bricks_help and "w<WIDTH>p<PATCH>h<HEADS>" in bricks_help
    # No help names a file of the repository that does not exist (e.g. notes or results files).
    text = train_parser.format_help()
    import re
    for name in re.findall(r"\b[\w./-]+\.(?:md|txt|py|rst)\b", text):
        assert os.path.exists(os.path.join(os.path.dirname(os.path.dirname(fastlego.__file__)), name)), name
