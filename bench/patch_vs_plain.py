"""Patch Diffusion training against plain training on the bundled digits at 32x32, same wall time.

    python3 bench/patch_vs_plain.py [--seconds 150] [--train-seeds 0] [--outdir patch-vs-plain]
    python3 bench/patch_vs_plain.py --device cpu --seconds 6 --bricks 4:w16p2h2:1,16:w16p4h2:1,32:w16p8h2:1 \
        --batch 16 --per-class 2 --sample-steps 4 --threads 1          # a CPU smoke check

For every training seed the same network (`--bricks`, default a progressive-growth stack of
regions 4 / 16 / 32, width 256) is trained twice from the same seed on the 1,797 bundled digits
upsampled to 32x32: once on full images (plain EDM training) and once with `--patch-diffusion`
(crops of 8, 16 or 32 pixels with probabilities 0.2 / 0.3 / 0.5 and batch x4 / x2 / x1; 8x8
crops train brick 0, 16x16 crops bricks 0-1, full images all three). Both get `--seconds` of
training time, split into segments that end at the `--checkpoints` fractions of it (a run is
resumed from its checkpoint for the next segment, exactly as if it never stopped); after each
segment the EMA network draws the same `--per-class` images of every digit (18 Heun steps,
guidance 2, seeds 0..) and `fastlego.metrics` measures them (class agreement, Frechet distance
of the digits classifier's features), beside what as many real digits score.

The target (issue 18): patch training reaches plain training's final agreement AND Frechet
distance within 0.6x the wall time. The report says at which checkpoint (as a fraction of the
plain run's training time) the patch run first matched both, or that it never did.

The recipe: batch 256 (`--batch`; a patch step draws 4x / 2x / 1x that many images), lr 1e-3
after 100 warm-up steps, EMA half-life 5 kimg with ramp-up 0.1, label dropout 0.1, bf16 autocast
and CUDA graphs on a GPU (one graph per crop size for the patch run). `--warmup` seconds of
throwaway training of each run first (Triton compiles and `fastlego.tune` timings cached, so
neither timed run pays them). `--runs plain` or `--runs patch` trains one kind only (e.g. to
split the work over two commands); the table then includes the other kind's results already in
--outdir. Writes <outdir>/<run>-seed<S>/bench.json per run and <outdir>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastlego import metrics  # noqa: E402
from fastlego.demo import DEMO_EMA_KIMG, DEMO_EMA_RAMPUP  # noqa: E402
from fastlego.patch_diffusion import describe_bricks_per_crop_size  # noqa: E402
from fastlego.networks import parse_bricks  # noqa: E402
from fastlego.sampling import load_network  # noqa: E402
from fastlego.training import TrainConfig, train  # noqa: E402

BRICKS = "4:w256p2h4:1,16:w256p4h4:2,32:w256p4h4:2"
RUNS = ("plain", "patch")
TARGET = 0.6


def run_config(args, run: str, seed: int, outdir: str, **kw) -> TrainConfig:
    base = dict(data="digits", resolution=args.resolution, outdir=outdir, bricks=args.bricks, batch_size=args.batch,
                steps=None, lr=args.lr, warmup_steps=args.lr_warmup, ema_halflife_kimg=DEMO_EMA_KIMG,
                ema_rampup=DEMO_EMA_RAMPUP, class_dropout=0.1, seed=seed, checkpoint_every=10 ** 9, log_every=100,
                device=args.device, progress=False, threads=args.threads,
                patch_diffusion=run == "patch", real_p=args.real_p if run == "patch" else 0.5)
    base.update(kw)
    return TrainConfig(**base)


def crop_steps(outdir: str) -> dict:
    """Steps of each crop size in a patch run's metrics.jsonl (all its segments)."""
    counts = {}
    with open(os.path.join(outdir, "metrics.jsonl")) as f:
        for line in f:
            for size, n in json.loads(line).get("crop_steps", {}).items():
                counts[size] = counts.get(size, 0) + n
    return counts


def measure(args, checkpoint: str) -> dict:
    net = load_network(checkpoint, device=args.device)
    t0 = time.perf_counter()
    report, _ = metrics.evaluate_network(net, per_class=args.per_class, seed=0, device=args.device,
                                         batch_size=args.sample_batch, num_steps=args.sample_steps,
                                         cfg_scale=None if args.cfg == 1 else args.cfg)
    return {"agreement": report.agreement, "frechet_distance": report.frechet_distance,
            "floor": report.real_floor, "sample_seconds": time.perf_counter() - t0}


def train_and_measure(args, run: str, seed: int, fractions) -> dict:
    outdir = os.path.join(args.outdir, f"{run}-seed{seed}")
    if args.warmup > 0:   # compile kernels and fill the tuning cache outside the timed run
        scratch = os.path.join(args.outdir, f"warmup-{run}")
        train(run_config(args, run, seed, scratch, max_seconds=args.warmup, overwrite=True))
        shutil.rmtree(scratch, ignore_errors=True)
    points, trained, done = [], 0.0, 0.0
    for i, frac in enumerate(fractions):
        budget = args.seconds * frac - done
        res = train(run_config(args, run, seed, outdir, max_seconds=budget,
                               **({"overwrite": True} if i == 0 else {"resume": "auto"})))
        done += budget
        trained += res.seconds
        point = {"fraction": frac, "train_seconds": trained, "step": res.step, "kimg": res.nimg / 1000,
                 "images_per_s": res.images_per_second, "last_loss": res.last_loss,
                 **measure(args, res.checkpoint)}
        points.append(point)
        print(f"  {run} seed {seed} at {frac:.2f} ({trained:.0f} s, step {res.step}, {res.nimg / 1000:.0f} kimg): "
              f"agreement {100 * point['agreement']:.1f}%, Frechet distance {point['frechet_distance']:.2f}",
              flush=True)
    result = {"run": run, "seed": seed, "seconds": args.seconds, "points": points,
              "crop_steps": crop_steps(outdir) if run == "patch" else None,
              "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"}
    with open(os.path.join(outdir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def time_to_match(plain: dict, patch: dict):
    """The first patch checkpoint whose agreement >= plain's final and Frechet distance <= plain's
    final, as a fraction of the plain run's training time; None if none did."""
    final = plain["points"][-1]
    for p in patch["points"]:
        if p["agreement"] >= final["agreement"] and p["frechet_distance"] <= final["frechet_distance"]:
            return p["train_seconds"] / final["train_seconds"]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=150.0, help="training time of each run (default 150)")
    p.add_argument("--checkpoints", default="0.2,0.4,0.6,0.8,1.0",
                   help="fractions of --seconds at which both runs are measured (default 0.2,...,1.0)")
    p.add_argument("--train-seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--runs", default="plain,patch", help="which runs to train: plain, patch or both (default both)")
    p.add_argument("--bricks", default=BRICKS, help=f"the brick stack (default {BRICKS})")
    p.add_argument("--resolution", type=int, default=32, help="digits resolution, a multiple of 8 (default 32)")
    p.add_argument("--batch", type=int, default=256, help="batch of a full-size step (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--lr-warmup", type=int, default=100, help="learning-rate warm-up steps (default 100)")
    p.add_argument("--real-p", type=float, default=0.5, help="patch run: probability of a full image (default 0.5)")
    p.add_argument("--per-class", type=int, default=None, help="images of each digit measured (default 50 on a GPU, "
                                                                 "10 on the CPU)")
    p.add_argument("--sample-steps", type=int, default=18, help="Heun steps (default 18)")
    p.add_argument("--sample-batch", type=int, default=500, help="images per sampler call (default 500)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale, the demo's (default 2; 1 = none)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of untimed training of each run first (default 10 on a GPU, 0 on the CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--outdir", default="patch-vs-plain", help="run folders and results.json (default ./patch-vs-plain)")
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = str(args.device).startswith("cuda")
    args.per_class = args.per_class or (50 if gpu else 10)
    args.warmup = (10.0 if gpu else 0.0) if args.warmup is None else args.warmup
    fractions = [float(f) for f in args.checkpoints.split(",") if f.strip()]
    if not fractions or sorted(fractions) != fractions or fractions[0] <= 0 or fractions[-1] != 1.0:
        p.error(f"--checkpoints must rise from above 0 to 1.0, got {args.checkpoints}")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - set(RUNS):
        p.error(f"--runs takes plain and/or patch, got {args.runs}")
    seeds = [int(s) for s in args.train_seeds.split(",") if s.strip()]
    regions = parse_bricks(args.bricks)["img_resolution"]
    os.makedirs(args.outdir, exist_ok=True)
    print(f"digits at {args.resolution}x{args.resolution}, {args.bricks}, {args.seconds:.0f} s of training each on "
          f"{args.device}; patch run: {describe_bricks_per_crop_size(regions, args.resolution, args.real_p)}",
          flush=True)

    results = {}
    for seed in seeds:
        for run in RUNS:
            path = os.path.join(args.outdir, f"{run}-seed{seed}", "bench.json")
            if run in runs:
                results[run, seed] = train_and_measure(args, run, seed, fractions)
            elif os.path.exists(path):
                with open(path) as f:
                    results[run, seed] = json.load(f)

    floor = None
    print(f"\nDigits {args.resolution}x{args.resolution}, {args.bricks}; {10 * args.per_class} images measured "
          f"({args.per_class} per digit), {args.sample_steps} Heun steps, guidance {args.cfg}")
    print(f"{'run':<7}{'seed':>5}{'at':>6}{'train s':>9}{'steps':>8}{'kimg':>8}{'img/s':>8}{'loss':>8}"
          f"{'agreement':>11}{'Frechet':>9}")
    for (run, seed), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for pt in r["points"]:
            floor = pt["floor"]
            print(f"{run:<7}{seed:>5}{pt['fraction']:>6.2f}{pt['train_seconds']:>9.0f}{pt['step']:>8}{pt['kimg']:>8.0f}"
                  f"{pt['images_per_s']:>8.0f}{pt['last_loss']:>8.3f}{100 * pt['agreement']:>10.1f}%"
                  f"{pt['frechet_distance']:>9.2f}")
        if r.get("crop_steps"):
            print(f"{'':<12}crop steps: " + ", ".join(f"{k}x{k}: {v}" for k, v in sorted(r['crop_steps'].items(),
                                                                                      key=lambda kv: int(kv[0]))))
    if floor:
        print(f"{'real digits, same count':<69}{100 * floor['agreement']:>10.1f}%{floor['frechet_distance']:>9.2f}"
              f" +- {floor['frechet_distance_std']:.2f}")
    verdicts = []
    for seed in seeds:
        if ("plain", seed) in results and ("patch", seed) in results:
            ratio = time_to_match(results["plain", seed], results["patch", seed])
            final = results["plain", seed]["points"][-1]
            verdict = {"seed": seed, "plain_final_agreement": final["agreement"],
                       "plain_final_frechet_distance": final["frechet_distance"], "patch_time_fraction": ratio,
                       "target": TARGET, "met": ratio is not None and ratio <= TARGET}
            verdicts.append(verdict)
            when = "never (within its budget)" if ratio is None else f"at {ratio:.2f}x plain's training time"
            print(f"seed {seed}: patch training reached plain's final agreement {100 * final['agreement']:.1f}% and "
                  f"Frechet distance {final['frechet_distance']:.2f} {when}: target <= {TARGET}x "
                  f"{'met' if verdict['met'] else 'NOT met'}")
    with open(os.path.join(args.outdir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": [r for r in results.values()], "verdicts": verdicts}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
