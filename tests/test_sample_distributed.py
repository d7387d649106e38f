"""`fastlego sample`'s outputs: torchrun splits the seeds over processes and writes the same bytes
as one process (gloo on the CPU), and no run replaces files it did not make unless asked."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import fastlego
import fastlego.sampling as sampling
from fastlego.__main__ import main
from fastlego.sampling import parse_seeds, sample, write_samples
from fastlego.testing import randomize_
from fastlego.training import TrainConfig, build_network, network_spec, train

TINY = "4:lego_S_4:1,8:lego_S_8:1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastlego.__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 1-step training run on the bundled digits at 8x8: a class-conditional (10 classes) network."""
    out = tmp_path_factory.mktemp("run")
    res = train(TrainConfig(data="digits", resolution=8, bricks=TINY, batch_size=4, steps=1, max_images=8,
                            outdir=str(out), progress=False, threads=1))
    return res.checkpoint


def run_sample(outdir, *args, nproc=None):
    """`fastlego sample` in a fresh process, or under torchrun with `nproc` processes (on the CPU
    unless `args` name another --device)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launch = [sys.executable, "-m", "fastlego"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "fastlego"]
    return subprocess.run([*launch, "sample", "--outdir", str(outdir), "--device", "cpu", "--quiet", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = open(path, "rb").read()
    return files


# --------------------------------------------------------------------------------------------
# torchrun: the seeds split over 2 processes, the same files as one process
# --------------------------------------------------------------------------------------------

def sample_here(outdir, *args):
    """`fastlego sample` in this process, with one CPU thread as the torchrun processes have."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["sample", "--outdir", str(outdir), "--device", "cpu", "--quiet", *args])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seeds,batch,idle", [
    ("0-4", "2", False),        # 3 batches: seeds 0,1,4 on rank 0 and 2,3 on rank 1
    ("3,9,11", "8", True),      # 1 batch: rank 1 has nothing to do (and says how to use it)
])
def test_two_processes_write_the_bytes_of_one(checkpoint, tmp_path, seeds, batch, idle, capsys):
    common = ["--network", checkpoint, "--seeds", seeds, "--batch", batch, "--steps", "2", "--images", "--npz",
              "--cfg", "2", "--t-break", "0.5", "--S-churn", "1", "--grid-columns", "2"]
    assert sample_here(tmp_path / "one", *common) == 0
    two = run_sample(tmp_path / "two", *common, nproc=2)
    assert two.returncode == 0, (two.stdout[-3000:], two.stderr[-3000:])
    n = len(parse_seeds(seeds))
    # Only rank 0 reports, for every image.
    assert two.stdout.count("sampled ") == 1 and f"sampled {n} images of 8x8" in two.stdout
    assert "on 2 processes" in two.stdout
    assert ("have nothing to do" in two.stderr) == idle
    a, b = tree(tmp_path / "one"), tree(tmp_path / "two")
    expected = {"grid.png", "samples.npz", *(os.path.join("images", f"{s:06d}.png") for s in parse_seeds(seeds))}
    assert set(a) == expected and set(b) == expected
    for name in sorted(a):
        assert a[name] == b[name], f"{name} differs between 1 and 2 processes"
    with np.load(tmp_path / "two" / "samples.npz") as f:
        assert f["seeds"].tolist() == parse_seeds(seeds) and f["arr_0"].shape == (n, 8, 8, 1)
        assert f["labels"].min() >= 0 and f["labels"].max() < 10
        assert len(np.unique(f["arr_0"].reshape(n, -1), axis=0)) == n  # every seed its own image


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("extra", [[], ["--cuda-graph", "--precision", "bf16"]])
def test_two_gpus_write_the_bytes_of_one(checkpoint, tmp_path, extra):
    """NCCL for the sampling, gloo for the gather: with --deterministic (no timed kernel choices)
    two GPUs write the files of one, also with CUDA graphs and bf16."""
    common = ["--network", checkpoint, "--seeds", "0-20", "--batch", "4", "--steps", "4", "--images", "--npz",
              "--cfg", "1.5", "--t-break", "0.5", "--S-churn", "5", "--height", "16", "--width", "32",
              "--deterministic", "--device", "cuda", *extra]  # (the last --device counts)
    one = run_sample(tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_sample(tmp_path / "two", *common, nproc=2)
    assert two.returncode == 0, (two.stdout[-3000:], two.stderr[-3000:])
    a, b = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert len(a) == 23 and set(a) == set(b)
    assert [name for name in sorted(a) if a[name] != b[name]] == []


def test_two_processes_refuse_to_overwrite_alike(checkpoint, tmp_path):
    """Rank 0 looks at the folder and every rank stops, before any sampling, with the same answer."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"mine")
    proc = run_sample(out, "--network", checkpoint, "--seeds", "0-3", "--batch", "2", "--steps", "2", nproc=2)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"fastlego sample (rank {rank} of 2): error: {out} already holds 1 of the files" in proc.stderr
    assert "grid.png" in proc.stderr and "--overwrite" in proc.stderr
    assert "sampling.py" not in proc.stderr  # a clean error, no Python traceback of ours
    assert (out / "grid.png").read_bytes() == b"mine" and os.listdir(out) == ["grid.png"]


# --------------------------------------------------------------------------------------------
# Never overwrite without being asked
# --------------------------------------------------------------------------------------------

def test_sample_refuses_to_overwrite_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["sample", "--network", checkpoint, "--outdir", str(out), "--seeds", "0-2", "--steps", "2", "--images",
            "--npz", "--quiet"]
    assert main(argv) == 0
    before = {name: (out / name).stat().st_mtime_ns for name in tree(out)}
    original = tree(out)
    capsys.readouterr()

    # The same run again: refused before the network is even read, naming the files and the flag.
    def must_not_load(*args, **kwargs):
        raise AssertionError("the network was loaded although the run had to be refused")
    with monkeypatch.context() as m:
        m.setattr(sampling, "load_network", must_not_load)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds 5 of the files" in err and "nothing was sampled" in err and "--overwrite" in err
    for name in ("grid.png", "images/000000.png", "samples.npz"):
        assert name in err, name
    assert tree(out) == original and {n: (out / n).stat().st_mtime_ns for n in tree(out)} == before

    # Only a file that would really be replaced counts: other seeds into images/ are fine.
    assert main(["sample", "--network", checkpoint, "--outdir", str(out), "--seeds", "5-6", "--steps", "2",
                 "--images", "--no-grid", "--quiet"]) == 0
    assert sorted(os.listdir(out / "images")) == [f"{s:06d}.png" for s in (0, 1, 2, 5, 6)]
    assert all(tree(out)[name] == data for name, data in original.items())
    # One clash among new seeds is enough to refuse.
    assert main(["sample", "--network", checkpoint, "--outdir", str(out), "--seeds", "6-9", "--steps", "2",
                 "--images", "--no-grid", "--quiet"]) == 2
    assert "already holds 1 of the files" in capsys.readouterr().err and not (out / "images" / "000007.png").exists()

    # --overwrite replaces them (different images: seeds 0-2 now get class 3).
    capsys.readouterr()
    assert main(argv + ["--overwrite", "--class", "3"]) == 0
    with np.load(out / "samples.npz") as f:
        assert f["labels"].tolist() == [3, 3, 3]


def test_sample_api_overwrite_prefix_and_latents(tmp_path):
    net = randomize_(build_network(network_spec(8, 1, 0, bricks=TINY)), seed=0, scale=0.5).eval()
    kw = dict(num_steps=2, progress=False, device="cpu", outdir=str(tmp_path), npz=True)
    first = sample(net, [0, 1], **kw)
    with pytest.raises(FileExistsError, match=r"2 of the files .*grid\.png, samples\.npz.*overwrite=True"):
        sample(net, [0, 1], **kw)
    sample(net, [0, 1], prefix="b_", **kw)  # another prefix: other files
    assert sorted(os.listdir(tmp_path)) == ["b_grid.png", "b_samples.npz", "grid.png", "samples.npz"]
    # write_samples guards the same files.
    with pytest.raises(FileExistsError, match="nothing was written"):
        write_samples(first, str(tmp_path), npz=True)
    assert write_samples(first, str(tmp_path), npz=True, overwrite=True)["grid"] == str(tmp_path / "grid.png")
    # Latent networks (4 channels) write samples.npz whatever npz says, and no PNGs.
    latent = randomize_(build_network(network_spec(8, 4, 0, bricks=TINY)), seed=1, scale=0.5).eval()
    with pytest.raises(FileExistsError, match="samples.npz"):
        sample(latent, [0], num_steps=2, progress=False, device="cpu", outdir=str(tmp_path))
    lat = tmp_path / "latents"
    lat.mkdir()
    (lat / "grid.png").write_bytes(b"mine")  # never written for latents: no clash
    sample(latent, [0], num_steps=2, progress=False, device="cpu", outdir=str(lat), grid=True)
    assert (lat / "grid.png").read_bytes() == b"mine"
    with np.load(lat / "samples.npz") as f:
        assert f["samples"].shape == (1, 4, 8, 8)


def test_npz_bytes_depend_only_on_the_arrays(tmp_path):
    """np.savez stamps the time into its zip; the sample files must not (same images, same bytes)."""
    net = randomize_(build_network(network_spec(8, 1, 3, bricks=TINY)), seed=0, scale=0.5).eval()
    res = sample(net, [4, 2], num_steps=2, progress=False, device="cpu")
    write_samples(res, str(tmp_path / "a"), npz=True, grid=False)
    with zipfile.ZipFile(tmp_path / "a" / "samples.npz") as z:
        assert sorted(z.namelist()) == ["arr_0.npy", "labels.npy", "seeds.npy"]
        assert {info.date_time for info in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    os.utime(tmp_path / "a" / "samples.npz", (0, 0))
    write_samples(res, str(tmp_path / "b"), npz=True, grid=False)
    assert (tmp_path / "a" / "samples.npz").read_bytes() == (tmp_path / "b" / "samples.npz").read_bytes()
    with np.load(tmp_path / "b" / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], fastlego.data.float_to_uint8(res.images).numpy())
        assert f["seeds"].tolist() == [4, 2] and f["labels"].tolist() == res.labels.tolist()
    assert not [n for n in os.listdir(tmp_path / "b") if ".tmp" in n]  # the temporary file is gone


def test_distributed_false_samples_every_seed_here(monkeypatch):
    """distributed=False under torchrun's variables: this process samples every seed, joins nothing."""
    net = randomize_(build_network(network_spec(8, 1, 0, bricks=TINY)), seed=0, scale=0.5).eval()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as if torchrun had started us (no MASTER_ADDR: joining would fail)
    res = sample(net, "0-2", num_steps=2, progress=False, device="cpu", distributed=False)
    assert res.rank == 0 and res.world == 1 and res.seeds == [0, 1, 2] and res.images.shape[0] == 3
    assert not torch.distributed.is_initialized()


def test_seeds_listed_twice_are_refused():
    assert parse_seeds("0-2,7") == [0, 1, 2, 7] and parse_seeds(range(3)) == [0, 1, 2]
    with pytest.raises(ValueError, match="seeds listed more than once: 2, 3; "):
        parse_seeds("0-3,2-3")
    with pytest.raises(ValueError, match="more than once: 5;"):
        parse_seeds([5, 5])
