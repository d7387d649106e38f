"""fastlego.tune: the fused-matmul path measured in an explicit step, never inside a model call.

Checked without a GPU: the lookup's fixed rule (untuned shapes, deterministic mode) and the
tuned table; `tune` noting the shapes of one forward, timing each candidate (an injected timer),
installing the fastest and leaving the random number generators as they were; the cache file
(keyed by GPU name, torch/triton versions, then op, shapes and dtypes; written atomically; read
back instead of timing; an unreadable file rewritten); rank 0's choices on every rank (two gloo
processes); the real launchers following the table under Triton's interpreter. Most tests use a
toy op registered like the two matmul ops (kernels/modulated_linear.py and
kernels/linear_gated_residual.py), with pure-torch candidates, so they need no Triton.
On a GPU (cuda mark): tune a small model, then no host sync in its forward and a CUDA-graph
capture that replays the eager output; both launcher paths within tolerance of the reference.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastlego
from fastlego import reference, tuning
from fastlego.testing import assert_close_to_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastlego.__file__)))
TOY = "toy_gemm"
RAN = []   # (path, config) of every toy candidate run


@pytest.fixture(autouse=True)
def clean_tuning():
    """No installed choice, and a toy op with two pure-torch paths that note their runs in RAN."""
    tuning.clear()
    RAN.clear()
    tuning.register_gemm(TOY, fused=lambda x, w, config: RAN.append(("fused", config)) or x @ w.t(),
                         cublas=lambda x, w: RAN.append(("cublas", None)) or x @ w.t(),
                         configs=lambda args: [None])
    yield
    tuning.clear()
    tuning._OPS.pop(TOY, None)


def toy_key(x):
    return f"{TOY}|{tuple(x.shape)}|{x.dtype}".replace("torch.", "")


def toy_model(x, w, taken=None):
    """A 'model' whose one matmul asks the tuning table, as the matmul ops' launchers do."""
    path, _ = tuning.lookup(TOY, toy_key(x), (x, w))
    if taken is not None:
        taken.append(path)
    return x @ w.t()


def prefer(path, calls=None):
    """A timer that runs the candidate (so it must work) and says `path` is the fastest."""
    def timer(fn):
        before = len(RAN)
        fn()
        name = RAN[before][0]
        if calls is not None:
            calls.append(name)
        return 1.0 if name == path else 3.0
    return timer


def inputs(rows=6, k=8, n=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(rows)
    return torch.randn(rows, k, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The lookup inside a model call
# --------------------------------------------------------------------------------------------

def test_lookup_fixed_rule_then_table_then_deterministic():
    x, w = inputs()
    assert tuning.lookup(TOY, toy_key(x), (x, w)) == ("fused", None)    # untuned, CPU: the interpreter's rule
    assert tuning.fixed_path(torch.empty(0, device="meta")) == "fused"

    class CudaLike:
        is_cuda = True
    assert tuning.fixed_path(CudaLike()) == "cublas"                     # untuned on CUDA: cuBLAS
    tuning.install({toy_key(x): tuning.Choice("cublas")})
    assert tuning.lookup(TOY, toy_key(x), (x, w)) == ("cublas", None)
    with fastlego.deterministic():                                       # a fixed rule, whatever was tuned
        assert tuning.lookup(TOY, toy_key(x), (x, w)) == ("fused", None)
    x2 = inputs(rows=7)[0]
    assert tuning.lookup(TOY, toy_key(x2), (x2, w)) == ("fused", None)   # another shape: untuned
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    tuning.install({toy_key(x2): tuning.Choice("fused", cfg)})
    path, config = tuning.lookup(TOY, toy_key(x2), (x2, w))
    assert path == "fused" and tuning.config_to_dict(config) == cfg


def test_collecting_notes_each_shape_once_with_its_metadata():
    x, w = inputs()
    with tuning.collecting() as wanted:
        toy_model(x, w)
        toy_model(x, w)
        toy_model(x[:, :4].t().contiguous().t(), w[:, :4])              # another shape, column-major
        with torch.autocast("cpu", dtype=torch.bfloat16):
            toy_model(inputs(rows=9)[0], w)
    assert list(wanted) == [toy_key(x), toy_key(x[:, :4]), toy_key(inputs(rows=9)[0])]
    req = wanted[toy_key(x)]
    assert req.op == TOY and req.args[0] == ("tensor", (6, 8), (8, 1), "float32", "cpu")
    assert wanted[toy_key(x[:, :4])].args[0][2] == (1, 6)               # the strides are kept
    assert req.autocast[1] == (False, None) and wanted[toy_key(inputs(rows=9)[0])].autocast[1] == (True, torch.bfloat16)
    assert tuning._collecting is None


# --------------------------------------------------------------------------------------------
# tune(): measure, install, keep the RNG, cache file
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("winner", ["cublas", "fused"])
def test_tune_times_each_candidate_and_installs_the_fastest(tmp_path, winner):
    x, w = inputs()
    calls = []
    result = fastlego.tune(toy_model, x, w, cache_file=tmp_path / "t.json", timer=prefer(winner, calls))
    assert sorted(calls) == ["cublas", "fused"]                          # both ran once, through the timer
    assert result.measured == [toy_key(x)] and result.from_cache == []
    assert result.choices[toy_key(x)].path == winner and set(result.choices[toy_key(x)].ms) == {"cublas", "fused"}
    taken = []
    toy_model(x, w, taken)
    assert taken == [winner] and tuning.installed()[toy_key(x)].path == winner
    assert "1 matmul shape" in result.summary()


def test_tune_restores_the_random_generators_and_keeps_grad_mode(tmp_path):
    x, w = inputs()
    seen = []

    def model(x, w):
        seen.append(torch.is_grad_enabled())
        torch.rand(3)                                                     # label dropout, noise...
        return toy_model(x, w)

    before = torch.get_rng_state()
    fastlego.tune(model, x, w, cache_file=False, timer=prefer("cublas"))
    assert torch.equal(torch.get_rng_state(), before)
    with torch.no_grad():
        fastlego.tune(model, x, w, cache_file=False, timer=prefer("cublas"))
    assert seen == [True, False]


def test_tune_in_deterministic_mode_does_nothing(tmp_path):
    x, w = inputs()
    with fastlego.deterministic():
        result = fastlego.tune(toy_model, x, w, cache_file=tmp_path / "t.json",
                               timer=lambda fn: pytest.fail("no timing in deterministic mode"))
    assert result.choices == {} and not (tmp_path / "t.json").exists()


def test_tune_without_a_timer_times_only_cuda_calls(tmp_path):
    x, w = inputs()
    result = fastlego.tune(toy_model, x, w, cache_file=tmp_path / "t.json")
    assert result.choices == {} and not (tmp_path / "t.json").exists() and RAN == []


def test_cache_file_is_keyed_written_and_read_back(tmp_path):
    import triton
    path = tmp_path / "sub" / "tuning.json"
    x, w = inputs()
    x16 = inputs(dtype=torch.float16)[0]
    fastlego.tune(lambda: (toy_model(x, w), toy_model(x16, w.half())), cache_file=path, timer=prefer("cublas"))
    doc = json.loads(path.read_text())
    assert doc["format"] == "fastlego-tuning" and doc["version"] == 1
    (env, entries), = doc["environments"].items()
    assert env == tuning.environment_key("cpu")
    assert env.startswith("cpu") and f"torch {torch.__version__}" in env and f"triton {triton.__version__}" in env
    assert set(entries) == {toy_key(x), toy_key(x16)}                   # op, shapes and dtype in each key
    assert entries[toy_key(x)]["path"] == "cublas"

    tuning.clear()
    result = fastlego.tune(toy_model, x, w, cache_file=path, timer=lambda fn: pytest.fail("cached: no timing"))
    assert result.from_cache == [toy_key(x)] and result.measured == []
    assert tuning.installed()[toy_key(x)].path == "cublas"
    # another environment's entries stay when this one is written
    tuning.write_cache(str(path), "other GPU|torch 0|triton 0", {"k": tuning.Choice("fused")})
    tuning.write_cache(str(path), env, {"k2": tuning.Choice("cublas")})
    data = tuning.read_cache(str(path))
    assert set(data) == {env, "other GPU|torch 0|triton 0"} and set(data[env]) == {toy_key(x), toy_key(x16), "k2"}


def test_cache_file_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    tuning.write_cache(str(path), "env", {"a": tuning.Choice("fused")})
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tuning.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        tuning.write_cache(str(path), "env", {"b": tuning.Choice("cublas")})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["tuning.json"]   # no temporary left


def test_unreadable_cache_file_is_reported_and_rewritten(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("{ not json")
    x, w = inputs()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        fastlego.tune(toy_model, x, w, cache_file=path, timer=prefer("fused"))
    assert tuning.read_cache(str(path))[tuning.environment_key("cpu")][toy_key(x)].path == "fused"
    path.write_text(json.dumps({"format": "fastlego-tuning", "version": 1,
                                "environments": {"e": {"bad": {"path": "warp"}, "good": {"path": "cublas"}}}}))
    with pytest.warns(RuntimeWarning, match="'bad' skipped"):
        assert set(tuning.read_cache(str(path))["e"]) == {"good"}


def test_a_failing_candidate_is_skipped(tmp_path):
    x, w = inputs()

    def timer(fn):
        fn()
        if RAN[-1][0] == "fused":
            raise RuntimeError("out of resources: shared memory")
        return 2.0

    with pytest.warns(RuntimeWarning, match="shared memory"):
        result = fastlego.tune(toy_model, x, w, cache_file=False, timer=timer)
    assert result.choices[toy_key(x)].path == "cublas"


def test_a_config_out_of_shared_memory_is_skipped_quietly(tmp_path):
    """Triton's OutOfResources for a tile config (the prune's estimate missed some buffer) is a
    pruned candidate when another candidate ran: no warning; if nothing ran it is still said."""
    class OutOfResources(Exception):   # what triton.runtime.errors raises, by name
        pass

    x, w = inputs()

    def timer(fn):
        fn()
        if RAN[-1][0] == "fused":
            raise OutOfResources("out of resource: shared memory, Required: 245760, Hardware limit: 232448")
        return 2.0

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fastlego.tune(toy_model, x, w, cache_file=False, timer=timer)
    assert result.choices[toy_key(x)].path == "cublas"

    def nothing_runs(fn):
        raise OutOfResources("out of resource: shared memory")

    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        fastlego.tune(toy_model, x, w, cache_file=False, timer=nothing_runs)


# --------------------------------------------------------------------------------------------
# Every DDP rank uses rank 0's choices (two gloo processes)
# --------------------------------------------------------------------------------------------

_RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    rank, init, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from fastlego import tuning
    import fastlego

    ran = []
    tuning.register_gemm("toy_gemm", fused=lambda x, w, config: ran.append("fused") or x @ w.t(),
                         cublas=lambda x, w: ran.append("cublas") or x @ w.t(), configs=lambda a: [None])
    def key(x):
        return f"toy_gemm|{tuple(x.shape)}"
    def model(*xs):
        for x in xs:
            tuning.lookup("toy_gemm", key(x), (x, torch.ones(3, x.shape[1])))

    # each rank prefers another path; rank 1 also runs a shape rank 0 does not
    mine = "cublas" if rank == 0 else "fused"
    def timer(fn):
        fn()
        return 1.0 if ran[-1] == mine else 3.0
    shapes = [torch.ones(4, 2)] + ([torch.ones(5, 2)] if rank == 1 else [])
    cache = os.path.join(out_dir, f"cache{rank}.json")
    result = fastlego.tune(model, *shapes, cache_file=cache, timer=timer)

    # the collective itself: rank 0 decides on the union; its failure reaches every rank
    decided = []
    def decide(requests):
        decided.append(sorted(requests))
        return {k: tuning.Choice("fused" if rank == 0 else "cublas") for k in requests}
    shared = tuning.choose_on_rank0({f"r{rank}": tuning.Request("toy_gemm", (), ())}, decide)
    try:
        tuning.choose_on_rank0({}, lambda r: 1 / 0)
        failure = None
    except RuntimeError as exc:
        failure = str(exc)
    json.dump({"installed": {k: c.path for k, c in tuning.installed().items()}, "timed": len(ran),
               "measured": result.measured, "decided": decided, "shared": {k: c.path for k, c in shared.items()},
               "failure": failure}, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()
""")


def test_every_rank_installs_rank0s_choices(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    both = {"toy_gemm|(4, 2)": "cublas", "toy_gemm|(5, 2)": "cublas"}   # rank 0 prefers cuBLAS
    assert r0["installed"] == both and r1["installed"] == both
    assert r1["timed"] == 0 and r0["timed"] == 4                        # only rank 0 timed, both shapes
    assert (tmp_path / "cache0.json").exists() and not (tmp_path / "cache1.json").exists()
    assert r0["decided"] == [["r0", "r1"]] and r1["decided"] == []
    assert r0["shared"] == r1["shared"] == {"r0": "fused", "r1": "fused"}
    assert "failed on rank 0" in r0["failure"] and "ZeroDivisionError" in r1["failure"]


# --------------------------------------------------------------------------------------------
# The real launchers (Triton's interpreter on the CPU, the GPU below)
# --------------------------------------------------------------------------------------------

def _modulated(B=2, L=3, T=4, D=16, N=24, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(5)
    ada = torch.randn(B, 2 * D, generator=g).to(device, dtype)
    h = (torch.randn(B * L, T, D, generator=g) * 1.5 + 0.7).to(device, dtype)
    w = (torch.randn(N, D, generator=g) * D ** -0.5).to(device, dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(device, dtype)
    return h, ada[:, :D], ada[:, D:], w, b


def _gated(B=2, L=3, T=4, K=24, N=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(6)
    ada = torch.randn(B, 3 * N, generator=g).to(device, dtype)
    a = torch.randn(B * L, T, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device, dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(device, dtype)
    return a, w, b, ada[:, N:2 * N], torch.randn(B * L, T, N, generator=g).to(device, dtype)


def _f64(args):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in args]


def _check_both(ml_args, gr_args, atol):
    from fastlego.kernels.linear_gated_residual import linear_gated_residual
    from fastlego.kernels.modulated_linear import modulated_linear
    out = modulated_linear(*ml_args, "gelu_tanh")
    assert_close_to_reference(out, reference.modulated_linear(*_f64(ml_args), "gelu_tanh"),
                              reference.modulated_linear(*ml_args, "gelu_tanh"), atol=atol, what="modulated_linear")
    out = linear_gated_residual(*gr_args)
    assert_close_to_reference(out, reference.linear_gated_residual(*_f64(gr_args)),
                              reference.linear_gated_residual(*gr_args), atol=atol, what="linear_gated_residual")


@pytest.mark.interpreter
def test_launchers_follow_the_tuned_table(monkeypatch):
    from fastlego.kernels import gemm
    from fastlego.kernels import linear_gated_residual as LGR
    from fastlego.kernels import modulated_linear as ML
    ml, gr = _modulated(), _gated()
    key = gemm.shape_key("modulated_linear", ml[0], ml[3], ml[1], "gelu_tanh")
    assert key == "modulated_linear|M<=32|N=24|K=16|rows=12|float32|float32|amp=None|gelu_tanh"
    cublas_calls = []
    for module, label in ((ML, "modulated_linear_cublas"), (LGR, "linear_gated_residual_cublas")):
        real = module._cublas_path   # what the cuBLAS path runs, from the launcher and from tune's candidate
        monkeypatch.setattr(module, "_cublas_path",
                            lambda *a, _real=real, _n=label, **k: cublas_calls.append(_n) or _real(*a, **k))

    def model():
        with torch.no_grad(), fastlego.use_backend("triton"):
            fastlego.ops.modulated_linear(*ml, "gelu_tanh")
            fastlego.ops.linear_gated_residual(*gr)

    _check_both(ml, gr, atol=1e-5)                         # untuned: the interpreter's fused GEMM
    assert cublas_calls == []

    def timer(fn):                                         # runs each candidate, prefers cuBLAS
        n = len(cublas_calls)
        fn()
        return 1.0 if len(cublas_calls) > n else 2.0

    result = fastlego.tune(model, cache_file=False, timer=timer)
    assert sorted(k.split("|")[0] for k in result.choices) == ["linear_gated_residual", "modulated_linear"]
    assert all(c.path == "cublas" and c.config is None for c in result.choices.values())
    cublas_calls.clear()
    _check_both(ml, gr, atol=1e-5)
    assert cublas_calls == ["modulated_linear_cublas", "linear_gated_residual_cublas"]
    with fastlego.deterministic():                         # deterministic: the fixed rule again
        cublas_calls.clear()
        _check_both(ml, gr, atol=1e-5)
        assert cublas_calls == []


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_launchers_both_paths_within_tolerance(dtype, tmp_path):
    """Untuned (cuBLAS, the fixed rule), then tuned (whichever won, the fused GEMM with the tile
    config tune picked): both within tolerance of the fp64 reference at the S preset's widths."""
    ml, gr = _modulated(3, 16, 4, 384, 1152, dtype, "cuda"), _gated(3, 16, 4, 1536, 384, dtype, "cuda")
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    _check_both(ml, gr, atol)

    def model():
        with torch.no_grad():
            fastlego.ops.modulated_linear(*ml, "gelu_tanh")
            fastlego.ops.linear_gated_residual(*gr)

    result = fastlego.tune(model, cache_file=tmp_path / "t.json")
    assert len(result.choices) == 2 and result.measured
    for choice in result.choices.values():
        assert (choice.path == "fused") == (choice.config is not None) and len(choice.ms) >= 2
    _check_both(ml, gr, atol)
    # every fused config is forced in turn: each is correct (tune may pick any of them)
    for key in list(result.choices):
        for name, ms in result.choices[key].ms.items():
            if name.startswith("fused "):
                cfg = dict(item.split("=") for item in name[len("fused "):].split(","))
                tuning.install({key: tuning.Choice("fused", {k: int(v) for k, v in cfg.items()})})
                _check_both(ml, gr, atol)


@pytest.mark.cuda
def test_cuda_tuned_forward_has_no_host_sync_and_captures(tmp_path):
    """After tune, a forward with integer class ids syncs nothing (sync debug mode "error") and a
    CUDA graph of it replays the eager output; untuned shapes (the fixed rule) likewise."""
    from fastlego.testing import randomize_
    model = randomize_(fastlego.LegoBackbone.from_preset("lego_S_PG_64", label_dim=10), seed=2).cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    t = torch.rand(4, device="cuda")
    y = torch.tensor([1, 3, 9, 0], device="cuda")
    for tuned in (False, True):
        tuning.clear()
        if tuned:
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                result = fastlego.tune(model, x, t, y, cache_file=tmp_path / "t.json")
            assert result.choices
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            eager = model(x, t, y)                              # warm: compiles, fills caches
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                again = model(x, t, y)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(again, eager)
            static = [x.clone(), t.clone(), y.clone()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(*static)
            graph.replay()
            torch.cuda.synchronize()
        assert torch.equal(out, eager), f"tuned={tuned}"
