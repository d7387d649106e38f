"""Beta diffusion against EDM on the bundled digits, for the same training time (CPU-friendly).

    python3 bench/beta_vs_edm.py --seconds 150 --train-seeds 0,1 [--concurrent] [--outdir runs/beta_vs_edm]

For every training seed, the demo's network (`networks.DEMO_BRICKS`) is trained with the demo's
recipe (batch 128, lr 2e-3 with 50 warm-up steps, EMA half-life 5 kimg with ramp-up 0.1, class
dropout 0.1) once with EDM's loss and once with beta diffusion's KLUB (`--process beta`), each
for `--seconds` of training. Then each network draws the same 200 images (20 of every digit,
seeds 0-199) with its own sampler: EDM 18 Heun steps, beta diffusion 200 steps (its default;
`--beta-steps`), both with the demo's guidance (`--cfg`, default 2), and `fastlego.metrics`
measures them (class agreement, Frechet distance of the digits classifier's features) beside
what 200 real digits score (the floor). Prints one table and writes results.json in --outdir.

`--concurrent` trains the two networks of a seed at the same time, one CPU thread each, so that
both see the same machine load (on a shared machine, runs one after the other do not); without
it they train one after the other with `--threads` threads."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastlego import metrics  # noqa: E402
from fastlego.demo import DEMO_BATCH, DEMO_EMA_KIMG, DEMO_EMA_RAMPUP, DEMO_LR, DEMO_WARMUP  # noqa: E402
from fastlego.networks import DEMO_BRICKS  # noqa: E402
from fastlego.sampling import load_network, sample  # noqa: E402
from fastlego.training import TrainConfig, train  # noqa: E402


def train_one(process: str, seed: int, seconds: float, outdir: str, threads: int, device: str = "cpu") -> dict:
    """Train the demo network with `process` for `seconds`; the run's numbers as a dict."""
    torch.set_num_threads(threads)
    batch = DEMO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    cfg = TrainConfig(data="digits", resolution=16, outdir=outdir, bricks=DEMO_BRICKS, batch_size=batch,
                      steps=None, max_seconds=seconds, lr=DEMO_LR, warmup_steps=DEMO_WARMUP,
                      ema_halflife_kimg=DEMO_EMA_KIMG, ema_rampup=DEMO_EMA_RAMPUP, class_dropout=0.1, seed=seed,
                      checkpoint_every=10 ** 9, log_every=25, device=device, overwrite=True, progress=False,
                      threads=threads, process=process)
    res = train(cfg)
    return {"process": process, "seed": seed, "steps": res.steps_run, "kimg": res.nimg / 1000,
            "train_seconds": res.seconds, "images_per_s": res.images_per_second, "last_loss": res.last_loss,
            "checkpoint": res.checkpoint}


def _train_star(args):
    return train_one(*args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=150.0, help="training time of each network (default 150)")
    p.add_argument("--train-seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--per-class", type=int, default=20, help="images of each digit (default 20: 200 images)")
    p.add_argument("--beta-steps", type=int, default=200, help="beta diffusion sampler steps (default 200)")
    p.add_argument("--edm-steps", type=int, default=18, help="EDM Heun steps (default 18)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale of both samplers, the demo's (default 2)")
    p.add_argument("--concurrent", action="store_true",
                   help="train a seed's two networks at once, one thread each (the same load for both)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads when training one after the other (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: on cuda the demo's GPU batch (256), "
                   "the two trainings one after the other")
    p.add_argument("--outdir", default="beta-vs-edm", help="run folders and results.json (default ./beta-vs-edm)")
    args = p.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    seeds = [int(s) for s in args.train_seeds.split(",") if s.strip()]
    ids = metrics.balanced_class_ids(args.per_class)
    sample_seeds = list(range(len(ids)))
    cfg_scale = None if args.cfg == 1 else args.cfg
    rows = []
    for seed in seeds:
        jobs = [(process, seed, args.seconds, os.path.join(args.outdir, f"{process}-seed{seed}"),
                 1 if args.concurrent else args.threads, args.device) for process in ("edm", "beta")]
        if args.concurrent and args.device == "cpu":
            with mp.get_context("spawn").Pool(2) as pool:
                runs = pool.map(_train_star, jobs)
        else:
            runs = [train_one(*job) for job in jobs]
        torch.set_num_threads(args.threads)
        for run in runs:
            net = load_network(run["checkpoint"], device=args.device)
            steps = args.beta_steps if run["process"] == "beta" else args.edm_steps
            t0 = time.perf_counter()
            res = sample(net, sample_seeds, class_ids=ids, num_steps=steps, cfg_scale=cfg_scale,
                         batch_size=len(sample_seeds), device=args.device, progress=False)
            q = metrics.evaluate_samples(res.images, ids)
            run.update(sample_steps=steps, sample_seconds=time.perf_counter() - t0, agreement=q.agreement,
                       frechet_distance=q.frechet_distance, floor=q.real_floor)
            rows.append(run)
            print(f"  {run['process']} seed {seed}: {run['steps']} steps, {run['images_per_s']:.0f} images/s, "
                  f"agreement {100 * q.agreement:.1f}%, Frechet distance {q.frechet_distance:.2f}", flush=True)
    floor = rows[0]["floor"]
    print(f"\nDigits, {DEMO_BRICKS}, {args.seconds:.0f} s of training each on {args.device}"
          f"{' (both at once, one thread each)' if args.concurrent else ''}; {len(ids)} images "
          f"({args.per_class} per digit, seeds 0-{len(ids) - 1}), guidance {args.cfg}")
    head = (f"{'process':<8}{'seed':>5}{'steps':>7}{'kimg':>8}{'img/s':>7}{'loss':>9}{'sampler':>13}"
            f"{'s':>7}{'agreement':>11}{'Frechet':>9}")
    print(head)
    for r in rows:
        sampler = f"{r['sample_steps']} {'Heun' if r['process'] == 'edm' else 'beta'}"
        print(f"{r['process']:<8}{r['seed']:>5}{r['steps']:>7}{r['kimg']:>8.1f}{r['images_per_s']:>7.0f}"
              f"{r['last_loss']:>9.3f}{sampler:>13}{r['sample_seconds']:>7.0f}{100 * r['agreement']:>10.1f}%"
              f"{r['frechet_distance']:>9.2f}")
    print(f"{'real digits, same count':<57}{100 * floor['agreement']:>10.1f}%{floor['frechet_distance']:>9.2f}"
          f" +- {floor['frechet_distance_std']:.2f}")
    with open(os.path.join(args.outdir, "results.json"), "w") as f:
        json.dump({"seconds": args.seconds, "device": args.device, "concurrent": args.concurrent, "cfg": args.cfg, "bricks": DEMO_BRICKS,
                   "per_class": args.per_class, "runs": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
