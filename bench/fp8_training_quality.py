"""Would FP8 training GEMMs hurt? The demo's digits trained with the DiT blocks' GEMMs in emulated
FP8, against the same training in the model's own precision, several seeds each.

    python3 bench/fp8_training_quality.py                       # 3 seeds x (plain, fp8), 1000 steps, this CPU
    python3 bench/fp8_training_quality.py --seeds 0,1 --steps 600 --json fp8_train.json

The route being gated (a rowwise-scaled FP8 recipe, as `torch._scaled_mm` runs it on Hopper): every
qkv, proj, fc1 and fc2 GEMM of every DiT block, forward and backward, reads e4m3 operands with one
fp32 scale per row or column (scale = amax / 448 over the reduced axis):
- forward  y  = x W^T:  x scaled per row (token), W per row (output channel);
- backward dX = dY W:   dY per row, W per column (input channel);
- backward dW = dY^T X: dY per column (output channel, over the tokens), X per column.
Each operand is quantized along the axis its GEMM reduces, so each tensor is quantized twice. The
emulation rounds the operands to e4m3 and back and multiplies in fp32: the numerics of that
recipe, not its speed. adaLN, embeddings, the final layer, LayerNorm, softmax and the loss stay in
the model's precision. The other arm trains identically without the rounding.

For each arm and seed: the training loss over the last logged windows, and the digits quality of
the EMA network (`fastlego.metrics`: class agreement and Frechet distance of 20 images per digit,
18 Heun steps, image seeds 0-199, no guidance). The gate (issue: FP8 for the training GEMMs only
if it trains as well): FP8's mean within the plain arm's seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlego import metrics, reference  # noqa: E402
from fastlego.demo import DEMO_EMA_KIMG, DEMO_EMA_RAMPUP, DEMO_LR, DEMO_WARMUP  # noqa: E402
from fastlego.networks import DEMO_BRICKS, parse_bricks  # noqa: E402
from fastlego.training import TrainConfig, train  # noqa: E402

E4M3_MAX = 448.0


def fake_e4m3(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t rounded to e4m3 with one scale per slice along `dim` (amax / 448; an all-zero slice stays
    zero), returned in t's dtype: what an FP8 GEMM reducing over `dim` reads."""
    amax = t.detach().abs().amax(dim=dim, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return ((t.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(t.dtype)


class FP8RowwiseLinear(torch.autograd.Function):
    """y = x W^T + b with every GEMM's operands rounded to rowwise-scaled e4m3 (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(fake_e4m3(x, -1), fake_e4m3(weight, 1), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = (fake_e4m3(g2, 1) @ fake_e4m3(weight, 0)).reshape(x.shape)
        dw = fake_e4m3(g2, 0).t() @ fake_e4m3(x2, 0)
        db = g2.sum(0) if ctx.has_bias else None
        return dx, dw.to(weight.dtype), db


def block_gemm_shapes(bricks: str) -> set:
    """(out, in) of the qkv, proj, fc1 and fc2 weights of the bricks in `bricks` (one width)."""
    widths = {int(t[0]) for t in parse_bricks(bricks)["model_type"]}
    return {s for d in widths for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))}


@contextlib.contextmanager
def fp8_block_gemms(shapes: set, counter: list):
    """The reference ops' F.linear, for weights of the block GEMMs' shapes, through FP8RowwiseLinear
    (adaLN and the final layer have other shapes and keep theirs); `counter` counts those calls."""
    real = reference.F

    def linear(x, weight, bias=None):
        if tuple(weight.shape) in shapes:
            counter[0] += 1
            return FP8RowwiseLinear.apply(x, weight, bias)
        return real.linear(x, weight, bias)

    names = {k: getattr(real, k) for k in dir(real) if not k.startswith("__")}
    reference.F = types.SimpleNamespace(**dict(names, linear=linear))
    try:
        yield
    finally:
        reference.F = real


def run(arm: str, seed: int, args, outdir: str) -> dict:
    counter = [0]
    context = fp8_block_gemms(block_gemm_shapes(DEMO_BRICKS), counter) if arm == "fp8" else contextlib.nullcontext()
    cfg = TrainConfig(data="digits", resolution=16, outdir=outdir, bricks=DEMO_BRICKS, batch_size=args.batch,
                      steps=args.steps, lr=DEMO_LR, warmup_steps=DEMO_WARMUP, ema_halflife_kimg=DEMO_EMA_KIMG,
                      ema_rampup=DEMO_EMA_RAMPUP, intermediate=True, class_dropout=0.1, seed=seed,
                      checkpoint_every=10 ** 9, log_every=50, device="cpu", backend="reference",
                      threads=args.threads, progress=False)
    with context:
        result = train(cfg)
    if arm == "fp8" and counter[0] == 0:
        raise RuntimeError("the FP8 arm ran no block GEMM through the emulation: the patch missed them")
    with open(os.path.join(outdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    report, _ = metrics.evaluate_network(result.network, per_class=args.per_class, seed=0, device="cpu",
                                         num_steps=18, cfg_scale=None)
    return {"arm": arm, "seed": seed, "steps": result.steps_run, "seconds": result.seconds,
            "fp8_gemm_calls": counter[0], "loss_last_windows": statistics.mean(losses[-4:]), "losses": losses,
            "agreement": report.agreement, "frechet_distance": report.frechet_distance}


def spread(rows, key):
    values = [r[key] for r in rows]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="training seeds of each arm (default 0,1,2)")
    p.add_argument("--steps", type=int, default=1000, help="training steps of each run (default 1000)")
    p.add_argument("--batch", type=int, default=128, help="training batch (default 128, the demo's on a CPU)")
    p.add_argument("--per-class", type=int, default=20, help="images of each digit measured (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for arm in ("plain", "fp8"):
                row = run(arm, seed, args, os.path.join(tmp, f"{arm}{seed}"))
                rows.append(row)
                print(f"{arm:>5} seed {seed}: {row['steps']} steps in {row['seconds']:.0f} s, loss "
                      f"{row['loss_last_windows']:.4f}, agreement {row['agreement']:.1%}, Frechet "
                      f"{row['frechet_distance']:.2f} ({row['fp8_gemm_calls']} emulated FP8 GEMM calls)", flush=True)
    print("\n| arm | loss (last 200 steps) | agreement | Frechet distance |\n| --- | --- | --- | --- |")
    summary = {}
    for arm in ("plain", "fp8"):
        sel = [r for r in rows if r["arm"] == arm]
        (lm, ls), (am, as_), (fm, fs) = (spread(sel, k) for k in ("loss_last_windows", "agreement", "frechet_distance"))
        summary[arm] = {"loss": [lm, ls], "agreement": [am, as_], "frechet_distance": [fm, fs]}
        print(f"| {arm} ({len(sel)} seeds) | {lm:.4f} +- {ls:.4f} | {am:.1%} +- {as_:.1%} | {fm:.2f} +- {fs:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "args": vars(args), "rows": rows, "summary": summary}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
