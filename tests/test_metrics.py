"""fastlego.metrics: the shipped digits classifier, the Frechet distance, sample reports, `fastlego eval`."""

import json
import os

import numpy as np
import pytest
import torch

from fastlego import metrics as M
from fastlego.data import images_to_float, load_digits
from fastlego.testing import randomize_


@pytest.fixture(scope="module")
def real():
    images, labels = load_digits(16)
    return images_to_float(images), labels


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------

def test_shipped_classifier_is_small_and_reads_held_out_digits():
    assert os.path.getsize(M.CLASSIFIER_PATH) < 64 * 1024
    model = M.load_classifier()
    assert sum(p.numel() for p in model.parameters()) < 32_000
    assert M.held_out_accuracy() >= 0.97


def test_split_is_fixed_and_disjoint():
    xt, yt, xh, yh = M.digits_split()
    assert len(xt) + len(xh) == 1797 and len(xh) == 360
    images, labels = load_digits(16)
    x = images_to_float(images)
    assert torch.equal(xh, x[::5]) and torch.equal(yh, labels[::5])
    assert sorted(set(yh.tolist())) == list(range(10))


@pytest.mark.slow
def test_train_classifier_reproduces_a_classifier_as_good_as_the_shipped_one(tmp_path):
    model = M.train_classifier()
    _, _, x, y = M.digits_split()
    acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.97
    path = tmp_path / "c.npz"
    M.save_classifier(model, str(path))
    with np.load(path) as f:
        assert all(f[k].dtype == np.float16 for k in f.files)


def test_prepare_images_takes_uint8_rgb_and_other_sizes(real):
    x = real[0][:8]
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert torch.allclose(M.prepare_images(u8), x, atol=1 / 127.5)
    assert torch.allclose(M.prepare_images(x.expand(-1, 3, -1, -1)), x, atol=1e-6)
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")
    assert torch.allclose(M.prepare_images(big), x, atol=1e-6)
    assert M.prepare_images(x * 3).abs().max() <= 1
    assert M.prepare_images(torch.nn.functional.avg_pool2d(x, 2)).shape == (8, 1, 16, 16)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 16, 16), r"\(N, C, H, W\)"),
    (torch.zeros(2, 2, 16, 16), "1 \\(gray\\) or 3"),
    (torch.full((2, 1, 16, 16), float("nan")), "NaN or inf"),
])
def test_prepare_images_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        M.prepare_images(bad)


# --------------------------------------------------------------------------------------------
# The Frechet distance
# --------------------------------------------------------------------------------------------

def _fd_by_eigvals(mu1, c1, mu2, c2):
    """An independent route: Tr (C1 C2)^(1/2) = sum of the square roots of C1 C2's eigenvalues
    (real and >= 0 for positive semi-definite C1, C2)."""
    ev = np.linalg.eigvals(c1 @ c2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # identical Gaussians: 0; diagonal covariances: per-axis sum
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    mu, cov = M.feature_statistics(a)
    assert M.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-9)
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    assert M.frechet_distance(np.zeros(3), np.diag(d1), np.ones(3), np.diag(d2)) == pytest.approx(
        3 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())


def test_frechet_distance_matches_an_independent_route_on_random_covariances():
    rng = np.random.default_rng(1)
    for d in (2, 5, 32):
        x, y = rng.normal(size=(400, d)), rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) + 0.3
        s1, s2 = M.feature_statistics(x), M.feature_statistics(y)
        got = M.frechet_distance(*s1, *s2)
        assert got == pytest.approx(_fd_by_eigvals(*s1, *s2), rel=1e-6)
        assert got == pytest.approx(M.frechet_distance(*s2, *s1), rel=1e-6)


def test_feature_statistics_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        M.feature_statistics(np.zeros((1, 4)))


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def test_real_digits_score_like_real_digits_and_noise_does_not(real):
    x, y = real
    pick = torch.arange(0, 1797, 9)[:200]
    good = M.evaluate_samples(x[pick], y[pick])
    assert good.n == 200 and good.agreement >= 0.97
    assert sum(map(sum, good.counts)) == 200
    assert [sum(row) for row in good.counts] == torch.bincount(y[pick], minlength=10).tolist()
    floor = good.real_floor
    assert 0 < floor["frechet_distance"] and floor["agreement"] >= 0.97
    assert good.frechet_distance < 3 * floor["frechet_distance"] + 3 * floor["frechet_distance_std"]

    noise = M.evaluate_samples(torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)), y[pick])
    assert noise.agreement < 0.4 and noise.frechet_distance > 20 * floor["frechet_distance"]
    # the right images asked to be other digits: agreement collapses, the distance does not move
    shifted = M.evaluate_samples(x[pick], (y[pick] + 1) % 10, floor=False)
    assert shifted.agreement < 0.05 and shifted.frechet_distance == pytest.approx(good.frechet_distance)
    assert shifted.real_floor == {}


def test_counts_are_asked_by_read(real):
    x, y = real
    pick = torch.tensor([0, 1, 2, 10, 11])          # digits 0, 1, 2, 0, 1
    asked = torch.tensor([0, 1, 2, 0, 5])
    r = M.evaluate_samples(x[pick], asked, floor=False)
    counts = np.array(r.counts)
    assert counts.sum() == 5 and counts[5].sum() == 1 and counts[0, 0] == 2
    assert r.per_class_agreement()[5] == 0.0
    d = r.to_dict()
    assert json.loads(json.dumps(d))["counts"] == r.counts and len(d["per_class_agreement"]) == 10
    assert "digit" in r.table() and "agreement" in r.summary()


@pytest.mark.parametrize("ids, match", [([0, 1], "2 entries but there are 3"), ([0, 1, 10], "0..9"),
                                        ([0.5, 1, 2], "integers")])
def test_evaluate_samples_refuses_bad_class_ids(real, ids, match):
    with pytest.raises(ValueError, match=match):
        M.evaluate_samples(real[0][:3], np.array(ids))


def test_evaluate_samples_needs_two_images(real):
    with pytest.raises(ValueError, match="at least 2 images"):
        M.evaluate_samples(real[0][:1], [0])


def test_balanced_class_ids():
    assert M.balanced_class_ids(2) == list(range(10)) * 2


# --------------------------------------------------------------------------------------------
# Networks and the command line
# --------------------------------------------------------------------------------------------

def _tiny_digits_net(label_dim=10):
    from fastlego import EDMPrecond, LegoBackbone

    backbone = LegoBackbone(img_resolution=[8, 16], in_channels=1, label_dim=label_dim,
                            model_type=[(32, 4, 2), (32, 4, 2)], depths=[1, 1], train_intermediate_stages=True)
    return randomize_(EDMPrecond(16, 1, label_dim=label_dim, model_type="custom", backbone=backbone), scale=0.5).eval()


def test_evaluate_network_samples_every_digit_with_fixed_seeds():
    net = _tiny_digits_net()
    r1, res = M.evaluate_network(net, per_class=2, seed=5, num_steps=2, cfg_scale=2.0, device="cpu")
    assert r1.n == 20 and res.seeds == list(range(5, 25)) and res.labels.tolist() == M.balanced_class_ids(2)
    r2, _ = M.evaluate_network(net, per_class=2, seed=5, num_steps=2, cfg_scale=2.0, device="cpu")
    assert r1.to_dict() == r2.to_dict()


def test_evaluate_network_refuses_networks_that_are_not_digit_networks():
    with pytest.raises(ValueError, match="label_dim 10"):
        M.evaluate_network(_tiny_digits_net(label_dim=0), per_class=1)
    with pytest.raises(ValueError, match="per_class"):
        M.evaluate_network(_tiny_digits_net(), per_class=0)


def test_eval_command_prints_and_writes_the_report(tmp_path, capsys):
    from fastlego.__main__ import main

    run = tmp_path / "run"
    assert main(["train", "--outdir", str(run), "--bricks", "8:lego_S_4:1,16:lego_S_4:1", "--batch", "4",
                 "--steps", "1", "--quiet", "--threads", "2"]) == 0
    report = tmp_path / "report.json"
    assert main(["eval", "--network", str(run / "checkpoint.pt"), "--per-class", "1", "--steps", "2",
                 "--cfg", "2", "--json", str(report), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "Frechet distance" in out and "10 images" in out
    data = json.load(open(report))
    assert data["n"] == 10 and len(data["counts"]) == 10 and 0 <= data["agreement"] <= 1
    assert data["sampler"]["cfg_scale"] == 2.0


@pytest.mark.slow
def test_eval_under_torchrun_reports_once_what_one_process_reports(tmp_path):
    """Two gloo processes share the sampling; rank 0 measures every image: the same report as
    one process (same seeds, same batches), printed once."""
    import subprocess
    import sys

    from fastlego.training import TrainConfig, train

    run = train(TrainConfig(data="digits", bricks="8:w32p4h2:1,16:w32p4h2:1", batch_size=4, steps=1,
                            outdir=str(tmp_path / "run"), progress=False, threads=1))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(M.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["eval", "--network", run.checkpoint, "--per-class", "2", "--batch", "5", "--steps", "2",
            "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "fastlego", *args, "--json", str(tmp_path / "one.json")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=repo)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "fastlego", *args, "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=repo)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert two.stdout.count("agreement") == 1
    a, b = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert a == b and a["n"] == 20
