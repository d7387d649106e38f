"""fastlego.weight_cache: weights cast once inside `frozen_weights()`, made again when a weight
changes, never cached for training, released when the block ends; the model and `sample` give
the same bits with the cache; the sampler's CUDA-graph default and its reported fallback."""

import pytest
import torch

import fastlego
from fastlego import sampling, weight_cache
from fastlego.testing import randomize_
from fastlego.training import build_network, network_spec
from fastlego.weight_cache import autocast_weights, cached_bytes, cast_weight, frozen, frozen_weights

TINY = "4:lego_S_4:1,8:lego_S_8:1"


def tiny_net(label_dim=3, seed=0):
    net = build_network(network_spec(8, 1, label_dim, bricks=TINY))
    return randomize_(net, seed=seed, scale=0.5).eval()


def test_outside_the_block_every_call_casts_afresh():
    w = torch.randn(8, 4)
    a, b = cast_weight(w, torch.bfloat16), cast_weight(w, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    assert cached_bytes() == 0 and not frozen()
    assert cast_weight(w, torch.float32) is w and cast_weight(None, torch.bfloat16) is None
    assert autocast_weights(torch.randn(2, 4), w, None) == (w, None)   # autocast itself casts them


def test_inside_the_block_one_copy_per_weight_version_and_dtype():
    w = torch.randn(8, 4)
    with frozen_weights():
        a = cast_weight(w, torch.bfloat16)
        assert cast_weight(w, torch.bfloat16) is a and torch.equal(a, w.to(torch.bfloat16))
        h = cast_weight(w, torch.float16)
        assert h is not a and cast_weight(w, torch.float16) is h
        assert cached_bytes() == 2 * 32 * 2
        with torch.no_grad():
            w.mul_(3.0)                        # an in-place write bumps the version: a fresh copy
        b = cast_weight(w, torch.bfloat16)
        assert b is not a and torch.equal(b, w.to(torch.bfloat16))
        w.data = torch.randn(8, 4)             # new storage: a fresh copy too
        assert torch.equal(cast_weight(w, torch.bfloat16), w.to(torch.bfloat16))
        with frozen_weights():                 # re-entrant: the inner exit keeps the copies
            pass
        assert frozen() and cast_weight(w, torch.bfloat16) is cast_weight(w, torch.bfloat16)
    assert not frozen() and cached_bytes() == 0


def test_weights_that_autograd_records_are_never_cached():
    w = torch.randn(8, 4, requires_grad=True)
    with frozen_weights():
        a = cast_weight(w, torch.bfloat16)
        assert a.requires_grad and a.grad_fn is not None and cached_bytes() == 0
        a.float().sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w))
        with torch.no_grad():
            c = cast_weight(w, torch.bfloat16)
            assert cast_weight(w, torch.bfloat16) is c and not c.requires_grad


def test_copies_go_with_their_weights():
    with frozen_weights():
        w = torch.randn(64, 64)
        cast_weight(w, torch.bfloat16)
        assert cached_bytes() == 64 * 64 * 2
        del w
        assert cached_bytes() == 0


def test_autocast_weights_follow_the_autocast_dtype_of_the_input_device():
    w, b = torch.randn(6, 4), torch.randn(6)
    x = torch.randn(3, 4)
    with frozen_weights():
        assert autocast_weights(x, w, b) == (w, b)                  # autocast off: unchanged
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cw, cb = autocast_weights(x, w, b)
            assert cw.dtype == cb.dtype == torch.bfloat16
            assert autocast_weights(x, w, b)[0] is cw
            # the same values as autocast's own cast: F.linear gives the same bits
            assert torch.equal(torch.nn.functional.linear(x, cw, cb), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_model_gives_the_same_bits_with_cached_casts(dtype):
    net = tiny_net()
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.7, 3.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        plain = net(x, sigma, labels)
        with frozen_weights():
            first = net(x, sigma, labels)
            held = cached_bytes()
            second = net(x, sigma, labels)
            assert held > 0 and cached_bytes() == held       # the second call made no new copies
    assert torch.equal(plain, first) and torch.equal(plain, second)


def _width32_net_counting_adaln(monkeypatch, regions, depths, seed):
    """A width-32 backbone (patches 2, 4, 8, ... by brick), its inputs (B = 2, 8x8, 3 classes),
    and the list the rows of every adaLN GEMM it runs are appended to."""
    from fastlego import model as model_module
    net = fastlego.LegoBackbone(regions, 1, label_dim=3, model_type=[(32, 2 ** (i + 1), 2) for i in range(len(regions))],
                                depths=depths)
    net = randomize_(net, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, generator=g) / 2,
              torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float())
    calls = []
    real = model_module.adaln_modulation
    monkeypatch.setattr(model_module, "adaln_modulation", lambda c, w, b: calls.append(w.shape[0]) or real(c, w, b))
    return net, inputs, calls


def test_the_network_computes_its_modulations_in_one_gemm_inside_the_block(monkeypatch):
    """Inside the block the backbone runs one adaLN GEMM for every block and final layer of the
    bricks it runs (the stacked weights made once, made again when one changes); outside, one per
    block; the same values either way (up to the GEMM's rounding), with and without autocast, and
    with grad."""
    net, (x, t, labels), calls = _width32_net_counting_adaln(monkeypatch, [4, 8], [2, 3], seed=3)
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            calls.clear()
            plain = net(x, t, labels)
            assert sorted(calls) == sorted([6 * 32] * 5 + [2 * 32] * 2)
            with frozen_weights():
                calls.clear()
                stacked = net(x, t, labels)
                assert calls == [2 * 6 * 32 + 2 * 32 + 3 * 6 * 32 + 2 * 32]
                held = cached_bytes()
                net(x, t, labels)
                assert cached_bytes() == held                 # no new copies on the second call
                block = net.model[1].blocks[2].adaLN_modulation[1]
                with torch.no_grad():
                    block.bias.add_(0.25)                     # a changed weight: its stack is made again
                changed = net(x, t, labels)
                with torch.no_grad():
                    block.bias.sub_(0.25)
        tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stacked, plain, **tol)
        assert not torch.allclose(changed, plain, **tol)
    with frozen_weights():                                    # grad on, weights recorded: per block
        calls.clear()
        net(x, t, labels).sum().backward()
        assert len(calls) == 7


def test_constants_made_once_inside_the_block():
    made = []

    class Owner:
        pass

    owner = Owner()
    make = lambda: made.append(1) or torch.arange(4.0)  # noqa: E731
    assert torch.equal(weight_cache.constant(owner, "table", torch.device("cpu"), make), torch.arange(4.0))
    weight_cache.constant(owner, "table", torch.device("cpu"), make)
    assert len(made) == 2                                   # outside the block: made at every call
    with frozen_weights():
        a = weight_cache.constant(owner, "table", torch.device("cpu"), make)
        assert weight_cache.constant(owner, "table", torch.device("cpu"), make) is a and len(made) == 3
    with frozen_weights():                                  # released with the block
        weight_cache.constant(owner, "table", torch.device("cpu"), make)
        assert len(made) == 4


@pytest.mark.cuda
def test_a_constant_made_during_a_capture_is_not_kept():
    """A captured kernel has not run when the capture ends: a table made inside a capture is used
    by the graph only, and the next call outside makes it afresh."""
    made = []

    class Owner:
        pass

    owner, dev = Owner(), torch.device("cuda")
    make = lambda: made.append(1) or torch.arange(4.0, device=dev) * 2  # noqa: E731
    with frozen_weights():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            inside = weight_cache.constant(owner, "table", dev, make) + 1
        graph.replay()
        after = weight_cache.constant(owner, "table", dev, make)
        assert len(made) == 2 and weight_cache.constant(owner, "table", dev, make) is after
        assert torch.equal(after, torch.arange(4.0, device=dev) * 2) and torch.equal(inside, after + 1)


def test_timestep_features_are_the_releases():
    """[cos(t f), sin(t f)] with f_k = 10000^(-k/128), in and out of the block, bit for bit."""
    net = tiny_net()
    t = torch.tensor([0.3, -1.7, 2.5])
    freqs = (1 / 10000) ** (torch.arange(128, dtype=torch.float32) / 128)
    args = t.float().ger(freqs)
    expected = torch.cat([args.cos(), args.sin()], dim=1)
    assert torch.equal(net.model.t_embedder.timestep_features(t), expected)
    with frozen_weights():
        assert torch.equal(net.model.t_embedder.timestep_features(t), expected)
        assert torch.equal(net.model.t_embedder.timestep_features(t), expected)


def test_the_bricks_that_run_get_their_rows_of_the_stack(monkeypatch):
    """Consecutive bricks (all of them, the first k, or the last after a skip) share one GEMM over
    their rows of the network's stack; a brick left out in the middle makes each brick run its
    own; every way gives the values of the unstacked forward."""
    net, (x, t, labels), calls = _width32_net_counting_adaln(monkeypatch, [4, 8, 8], [1, 2, 1], seed=4)
    rows = [6 * 32 + 2 * 32, 2 * 6 * 32 + 2 * 32, 6 * 32 + 2 * 32]   # each brick's adaLN rows
    cases = [({}, [sum(rows)]), ({"return_stage_idx": 1}, [rows[0] + rows[1]]), ({"skip_bricks": [0]},
             [rows[1] + rows[2]]), ({"skip_bricks": [1]}, [rows[0], rows[2]])]
    with torch.no_grad():
        for kwargs, expected in cases:
            plain = net(x, t, labels, **kwargs)
            with frozen_weights():
                calls.clear()
                stacked = net(x, t, labels, **kwargs)
                assert calls == expected, kwargs
            torch.testing.assert_close(stacked, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_the_triton_launchers_use_the_cached_casts(monkeypatch):
    # fp16 autocast on the CPU, Triton kernels forced (interpreter): the launchers' weight casts
    # are made once per weight in the block, and the outputs are those of the uncached run.
    made = []
    real = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.data_ptr() in weights and out.dtype != self.dtype:
            made.append(tuple(self.shape))
        return out

    # width-32 bricks of regions 4 and 8 (patches 2 and 4)
    net = randomize_(fastlego.LegoBackbone([4, 8], 1, label_dim=3, model_type=[(32, 2, 2), (32, 4, 2)],
                                           depths=[1, 1]), seed=1).eval()
    weights = {p.data_ptr() for p in net.parameters()}
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.1, -0.3])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16), fastlego.use_backend("triton",
                                                                                          global_attention="auto"):
        plain = net(x, t, labels)
        uncached = len(made)
        made.clear()
        with frozen_weights():
            first = net(x, t, labels)
            first_casts = len(made)
            second = net(x, t, labels)
    # the launchers' casts (and the adaLN weights', which autocast made uncounted before) once
    assert uncached > 0 and first_casts >= uncached and len(made) == first_casts   # none on the 2nd call
    assert torch.equal(plain, first) and torch.equal(plain, second)


def test_sample_holds_casts_only_while_it_runs():
    net = tiny_net(label_dim=0)
    res = sampling.sample(net, [0, 1], num_steps=3, progress=False, device="cpu", precision="bf16")
    assert not res.cuda_graph and cached_bytes() == 0 and not frozen()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # the bits of an uncached sampler
        ref = sampling.edm_sampler(net, sampling.StackedRandomGenerator("cpu", [0, 1]).randn([2, 1, 8, 8]),
                                   None, num_steps=3)
    assert torch.equal(res.images, ref)


# --------------------------------------------------------------------------------------------
# The sampler's CUDA graphs: on by default on CUDA, a failed capture reported and run eagerly
# --------------------------------------------------------------------------------------------

def test_cuda_graph_default_is_off_on_the_cpu_and_explicit_true_is_refused():
    net = tiny_net()
    assert not sampling.sample(net, [0], num_steps=2, progress=False, device="cpu").cuda_graph
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        sampling.sample(net, [0], num_steps=2, progress=False, device="cpu", cuda_graph=True)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


def _failing_capture(exc):
    def capture(self, shape, stage):
        raise exc
    return capture


def test_a_failed_capture_in_fallback_mode_says_why_and_runs_eagerly(fake_cuda, monkeypatch, capsys):
    monkeypatch.setattr(sampling.CudaGraphDenoiser, "_capture",
                        _failing_capture(RuntimeError("operation not permitted when stream is capturing\nmore")))
    net = tiny_net(label_dim=0)
    den = sampling.CudaGraphDenoiser(net, fallback=True)
    x, s = torch.randn(2, 1, 8, 8), torch.tensor(1.5)
    with torch.no_grad():
        out = den(x, s, None)
        again = den(x, s, None)
        ref = net(x, s, None)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    err = capsys.readouterr().err
    assert err.count("capturing the network as a CUDA graph failed") == 1, err   # said once
    assert "operation not permitted" in err and "--no-cuda-graph" in err and "more" not in err
    assert den.failed and not den.graphs


@pytest.mark.parametrize("exc", [RuntimeError("capture failed"), torch.OutOfMemoryError("CUDA out of memory")])
def test_a_failed_capture_raises_when_insisted_on_and_out_of_memory_always(fake_cuda, monkeypatch, exc):
    monkeypatch.setattr(sampling.CudaGraphDenoiser, "_capture", _failing_capture(exc))
    net = tiny_net(label_dim=0)
    for fallback in ([False] if isinstance(exc, RuntimeError) else [False, True]):
        den = sampling.CudaGraphDenoiser(net, fallback=fallback)
        with pytest.raises(type(exc)), torch.no_grad():
            den(torch.randn(1, 1, 8, 8), torch.tensor(1.0), None)


# --------------------------------------------------------------------------------------------
# GPU: graphs by default, the cache across graph captures
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_on_gpu_uses_graphs_by_default_with_the_eager_values(precision):
    net = tiny_net().cuda()
    kw = dict(num_steps=5, progress=False, device="cuda", batch_size=3, precision=precision, cfg_scale=1.5,
              t_break=0.5)
    eager = sampling.sample(net, "0-6", cuda_graph=False, **kw)
    graphed = sampling.sample(net, "0-6", **kw)
    assert graphed.cuda_graph and not eager.cuda_graph
    assert torch.allclose(eager.images, graphed.images, atol=2e-3), (eager.images - graphed.images).abs().max()
    assert cached_bytes() == 0


@pytest.mark.cuda
def test_cached_casts_are_read_by_a_captured_graph():
    net = tiny_net(label_dim=0).cuda()
    x = torch.randn(2, 1, 8, 8, device="cuda")
    s = torch.tensor([0.5, 2.0], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        ref = net(x, s, None)
        with frozen_weights():
            den = sampling.CudaGraphDenoiser(net)
            out = den(x, s, None)
            assert den.graphs and cached_bytes() > 0
            assert torch.equal(den(x, s, None), out)
    assert torch.allclose(out, ref, atol=1e-2)
