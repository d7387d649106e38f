"""The `fastlego` command line: train / sample / demo end to end at tiny sizes, bench and info
delegation, and clear errors for bad arguments."""

import argparse
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import fastlego
from fastlego.__main__ import main
from fastlego.data import decode_png

TINY = "4:lego_S_4:1,8:lego_S_8:1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastlego.__file__)))


def run_module(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastlego", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run of `fastlego train` on the bundled digits at 8x8."""
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--outdir", str(out), "--resolution", "8", "--bricks", TINY, "--batch", "4", "--steps", "2",
               "--max-images", "8", "--log-every", "1", "--quiet", "--threads", "2"])
    assert rc == 0
    return out


def test_train_writes_checkpoint_metrics_and_config(trained, capsys):
    assert sorted(os.listdir(trained)) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    records = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    config = json.load(open(trained / "config.json"))
    assert config["network"]["bricks"]["img_resolution"] == [4, 8] and config["train"]["batch_size"] == 4


def test_sample_writes_grid_images_and_npz(trained, tmp_path, capsys):
    out = tmp_path / "samples"
    rc = main(["sample", "--network", str(trained / "checkpoint.pt"), "--outdir", str(out), "--seeds", "0-2",
               "--steps", "2", "--height", "8", "--width", "16", "--images", "--npz", "--t-break", "0.5", "--cfg", "2",
               "--grid-columns", "3", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sampled 3 images of 8x16" in printed and "images/s" in printed
    assert decode_png(open(out / "grid.png", "rb").read()).shape == (8, 48, 1)
    assert sorted(os.listdir(out / "images")) == ["000000.png", "000001.png", "000002.png"]
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 16, 1)


def test_module_entry_point_runs_the_demo(tmp_path):
    """`python -m fastlego demo` end to end, in a fresh process (tiny: 2 training steps), then a
    second run into the same folder: refused without --overwrite, and nothing of the first touched."""
    out = tmp_path / "demo"
    args = ("demo", "--train-steps", "2", "--steps", "2", "--rows", "1", "--batch", "4", "--outdir", str(out), "--quiet")
    proc = run_module(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("checkpoint.pt", "metrics.jsonl", "full_grid.png", "skip_grid.png", "demo.json"):
        assert (out / name).exists(), name
    grid = decode_png(open(out / "skip_grid.png", "rb").read())
    assert grid.shape == (4 * 18, 4 * 171, 1)  # ten 16x16 digits, 1 gray pixel around each, enlarged 4x
    summary = json.load(open(out / "demo.json"))
    assert summary["train_steps"] == 2 and summary["full"]["seconds"] > 0 and summary["samples"] == 10
    for grid_name in ("full", "skip"):
        assert 0 <= summary[grid_name]["agreement"] <= 1 and summary[grid_name]["frechet_distance"] > 0
        assert sum(map(sum, summary[grid_name]["counts"])) == 10
    assert summary["full"]["real_floor"]["agreement"] > 0.9
    assert "skipping saved" in proc.stdout and "agreement" in proc.stdout and "Frechet distance" in proc.stdout
    assert "fastlego eval --network" in proc.stdout
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = run_module(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_help():
    proc = run_module("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("demo", "train", "sample", "bench", "info"))


# --------------------------------------------------------------------------------------------
# Bad arguments: argparse errors (exit 2) and value checks (exit 2, one line)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    ([], "required: COMMAND"),
    (["train", "--outdir", "x", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["train", "--outdir", "x", "--lr", "abc"], "--lr must be a number, got 'abc'"),
    (["train", "--outdir", "x", "--precision", "fp16"], "invalid choice: 'fp16'"),
    (["train", "--outdir", "x", "--preset", "lego_S_PG_64", "--bricks", TINY], "not allowed with argument"),
    (["train"], "--outdir"),
    (["sample", "--network", "n.pt", "--outdir", "o", "--t-break", "1.5"], "--t-break must be <= 1, got 1.5"),
    (["sample", "--network", "n.pt", "--outdir", "o", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "--network", "n.pt", "--outdir", "o", "--resolution", "8", "--height", "8"], "not both"),
    (["demo", "--minutes", "0"], "--minutes must be > 0"),
])
def test_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_value_errors_past_argparse(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoint.pt")
    cases = [
        (["sample", "--network", str(tmp_path / "missing.pt"), "--outdir", str(tmp_path)], "does not exist"),
        (["sample", "--network", ckpt, "--outdir", str(tmp_path), "--height", "12", "--steps", "1", "--quiet"],
         "is not a multiple of 8"),
        (["sample", "--network", ckpt, "--outdir", str(tmp_path), "--class", "10", "--steps", "1", "--quiet"],
         "class_idx must lie in 0..9"),
        (["train", "--outdir", str(tmp_path / "r"), "--data", str(tmp_path / "nope"), "--quiet"], "does not exist"),
        (["train", "--outdir", str(tmp_path / "r"), "--resolution", "12", "--bricks", TINY, "--quiet"],
         "multiple of 8"),
        (["train", "--outdir", str(tmp_path / "r"), "--checkpoint-blocks", "2", "--quiet"],
         "needs activation_checkpointing='block'"),
        (["train", "--outdir", str(tmp_path / "r"), "--resolution", "8", "--bricks", TINY, "--max-images", "8",
          "--activation-checkpointing", "block", "--checkpoint-blocks", "99", "--quiet"], "from 0 to"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


# --------------------------------------------------------------------------------------------
# bench / info delegate to fastlego.benchmark / fastlego.info
# --------------------------------------------------------------------------------------------

def test_bench_and_info_delegate(monkeypatch, capsys):
    seen = {}
    bench = types.ModuleType("fastlego.benchmark")
    bench.main = lambda argv: seen.setdefault("argv", argv) and 0
    info = types.ModuleType("fastlego.info")
    info.print_info = lambda **kw: print("INFO TABLE", sorted(kw.items()))
    monkeypatch.setitem(sys.modules, "fastlego.benchmark", bench)
    monkeypatch.setitem(sys.modules, "fastlego.info", info)
    assert main(["bench", "--tiny", "--json", "r.json"]) == 0
    assert seen["argv"] == ["--tiny", "--json", "r.json"]  # everything after `bench` is passed through
    assert main(["info"]) == 0
    assert "INFO TABLE [('batch', 2), ('device', None), ('preset', 'lego_S_PG_64')]" in capsys.readouterr().out
    assert main(["info", "--preset", "lego_XL_U_32", "--batch", "3", "--device", "cpu"]) == 0
    assert "INFO TABLE [('batch', 3), ('device', 'cpu'), ('preset', 'lego_XL_U_32')]" in capsys.readouterr().out


def test_info_lists_every_preset(capsys):
    from fastlego.presets import BRICK_TYPES, PRESETS
    assert main(["info", "--device", "cpu", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for p in PRESETS.values():  # one row per preset: name, regions, brick types, depths
        row = [line.split() for line in lines if line.split()[:1] == [p.name]]
        assert row and row[0][1:1 + 3 * len(p.regions)] == [*map(str, p.regions), *p.model_type, *map(str, p.depths)], p
    for t in {t for p in PRESETS.values() for t in p.model_type}:  # and what each brick type is
        assert [t, *map(str, BRICK_TYPES[t])] in [line.split() for line in lines], t
    assert "torch" in out and "lego_S_PG_64, batch 1" in out  # the environment and the backend table stay
    assert main(["info", "--preset", "lego_nope"]) == 2
    assert "unknown LEGO preset 'lego_nope'" in capsys.readouterr().err


def _option_help(parser, command):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", ["sample", "info"])
def test_every_option_says_what_it_does_and_its_default(command):
    from fastlego.__main__ import build_parser
    actions = _option_help(build_parser(), command)
    assert actions
    for a in actions:
        name = a.option_strings[0]
        assert a.help and len(a.help) > 15, f"{command} {name}: no help text"
        if a.required:
            assert "required" in a.help, name
            continue
        assert "default" in a.help, f"{command} {name}: the help does not say the default"
        if a.default not in (None, False):
            shown = {str(a.default), f"{a.default:g}" if isinstance(a.default, float) else str(a.default)}
            assert any(f"default {v}" in a.help for v in shown), f"{command} {name}: default {a.default!r} not named"
    names = {a.option_strings[0] for a in actions}
    if command == "sample":
        assert {"--seeds", "--batch", "--sigma-min", "--sigma-max", "--rho", "--S-churn", "--S-min", "--S-max",
                "--S-noise", "--overwrite"} <= names


def test_bench_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastlego.benchmark", None)  # import fails
    assert main(["bench"]) == 2
    assert "benchmark module is not available" in capsys.readouterr().err
