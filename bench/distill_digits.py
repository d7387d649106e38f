"""One-step digits: distill the demo's network with SiD and measure it against the teacher's Heun samples.

    python3 bench/distill_digits.py --outdir runs/distill-digits                     # teacher, distill, measure
    python3 bench/distill_digits.py --outdir DIR --teacher fastlego-demo/checkpoint.pt --minutes 10
    OMP_NUM_THREADS=1 python3 bench/distill_digits.py --outdir DIR --steps 600 --measure-every 100

1. The teacher: `--teacher CKPT`, or the demo's recipe (`fastlego demo`'s network, optimizer,
   EMA and batch; `--teacher-steps`, default 1300, about what the demo trains in 3 minutes on two
   free CPU cores) trained into OUTDIR/teacher.
2. SiD (`fastlego.distill`) of its guided denoiser (`--cfg`, default 2, the demo's guidance) into
   OUTDIR/distill for `--steps` or `--minutes`, with the demo's distillation recipe
   (`fastlego.distill.DEMO_DISTILL`, overridable: --lr, --batch, --ema). With
   `--measure-every N` the run stops every N steps, is measured, and resumes (resuming takes the
   same next steps, so the curve is one run's).
3. The same seeds and digits (`--per-class` of each, default 20: 200 images) drawn by the teacher
   with EDM's 18-step Heun sampler (35 evaluations, guidance `--cfg`: 70 network passes' worth) and
   by the one-step generator (1 evaluation), both in one batch of all the images; measured with
   `fastlego.metrics` (class agreement, Frechet distance of the digits classifier's features,
   against real digits at the same count). The undistilled generator (the teacher's own
   denoiser at sigma_init, what the distillation starts from) is measured too. Then the sampling
   images/s of the teacher and of the final generator at that batch: the best of `--repeats`
   timed runs of each, taken in turn so that a busy machine slows both alike.

Prints a table and writes OUTDIR/distill_digits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlego import demo as demo_recipe  # noqa: E402
from fastlego import metrics  # noqa: E402
from fastlego.distill import DEMO_DISTILL, DistillConfig, distill, mark_one_step  # noqa: E402
from fastlego.networks import DEMO_BRICKS  # noqa: E402
from fastlego.sampling import load_network, sample  # noqa: E402
from fastlego.training import TrainConfig, train  # noqa: E402


def train_teacher(outdir: str, steps: int, device: str, seed: int, threads) -> str:
    """The demo's network and recipe (fastlego.demo), trained for `steps` steps (resumed if there)."""
    batch = demo_recipe.DEMO_BATCH.get(torch.device(device).type, demo_recipe.DEMO_BATCH["cpu"])
    cfg = TrainConfig(data="digits", resolution=16, outdir=outdir, bricks=DEMO_BRICKS, batch_size=batch, steps=steps,
                      lr=demo_recipe.DEMO_LR, warmup_steps=demo_recipe.DEMO_WARMUP,
                      ema_halflife_kimg=demo_recipe.DEMO_EMA_KIMG, ema_rampup=demo_recipe.DEMO_EMA_RAMPUP,
                      intermediate=True, class_dropout=0.1, seed=seed, checkpoint_every=100, log_every=25,
                      device=device, threads=threads, resume="auto")
    res = train(cfg)
    print(f"teacher: {res.step} steps ({res.nimg:,} images), last loss {res.last_loss:.3f}: {res.checkpoint}")
    return res.checkpoint


def quality(name, net, seeds, class_ids, device, floor, **kw) -> dict:
    """Sample the seeds once (one batch) and measure them; the row of the table."""
    res = sample(net, seeds, class_ids=class_ids, progress=False, batch_size=len(seeds), device=device, **kw)
    report = metrics.evaluate_samples(res.images, class_ids, floor=False)
    row = {"name": name, "agreement": report.agreement, "frechet_distance": report.frechet_distance,
           "per_class_agreement": report.per_class_agreement(), "real_floor": floor, "first_run_seconds": res.seconds}
    print(f"  {name:<38}{100 * report.agreement:10.1f}%{report.frechet_distance:12.2f}", flush=True)
    return row


def timings(runs: dict, seeds, class_ids, device, repeats: int) -> dict:
    """Best sampling seconds of each (net, sampler kwargs) in `runs`, timed in turn `repeats` times
    (interleaved, so that a busy machine slows each alike)."""
    best = {name: float("inf") for name in runs}
    for _ in range(max(repeats, 1)):
        for name, (net, kw) in runs.items():
            res = sample(net, seeds, class_ids=class_ids, progress=False, batch_size=len(seeds), device=device, **kw)
            best[name] = min(best[name], res.seconds)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", required=True, help="teacher/, distill/ and distill_digits.json go here")
    p.add_argument("--teacher", default=None, help="a digits teacher checkpoint (default: train one the demo's way)")
    p.add_argument("--teacher-steps", type=int, default=1300, help="teacher training steps (default 1300)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: by --minutes)")
    p.add_argument("--minutes", type=float, default=5.0, help="distillation time budget without --steps (default 5)")
    p.add_argument("--measure-every", type=int, default=None,
                   help="with --steps: measure the generator every N steps (default: only at the end)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance of the teacher, distilled and sampled (default 2)")
    p.add_argument("--lr", type=float, default=DEMO_DISTILL["lr"], help=f"generator and fake-score learning rate "
                                                                          f"(default {DEMO_DISTILL['lr']})")
    p.add_argument("--batch", type=int, default=DEMO_DISTILL["batch_size"],
                   help=f"distillation batch (default {DEMO_DISTILL['batch_size']})")
    p.add_argument("--ema", type=float, default=DEMO_DISTILL["ema_halflife_kimg"],
                   help=f"generator EMA half-life in kimg (default {DEMO_DISTILL['ema_halflife_kimg']})")
    p.add_argument("--per-class", type=int, default=20, help="images of each digit measured (default 20: 200 images)")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling runs; the best counts (default 3)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the teacher and the distillation (default 0)")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.outdir, exist_ok=True)
    t_all = time.perf_counter()
    teacher_path = args.teacher or train_teacher(os.path.join(args.outdir, "teacher"), args.teacher_steps, device,
                                                 args.seed, args.threads)
    cfg_scale = None if args.cfg == 1 else args.cfg
    class_ids = metrics.balanced_class_ids(args.per_class)
    seeds = list(range(len(class_ids)))
    floor = metrics.real_floor(len(seeds), class_ids)

    teacher = load_network(teacher_path, device=device)
    sample(teacher, seeds[:10], class_ids=class_ids[:10], num_steps=2, progress=False, device=device)   # warm-up
    print(f"{len(seeds)} images ({args.per_class} of each digit), seeds 0-{len(seeds) - 1}, one batch, on {device}; "
          f"real digits at this count: agreement {100 * floor['agreement']:.1f}%, Frechet distance "
          f"{floor['frechet_distance']:.2f} +- {floor['frechet_distance_std']:.2f}")
    print(f"  {'':<38}{'agreement':>11}{'Frechet':>12}")
    heun = dict(num_steps=18, cfg_scale=cfg_scale)
    rows = {"teacher": quality(f"teacher, Heun 18 steps, cfg {args.cfg}", teacher, seeds, class_ids, device, floor,
                               **heun)}
    start = mark_one_step(load_network(teacher_path, device=device), DistillConfig.sigma_init)
    rows["undistilled"] = quality("teacher's D(2.5 z; 2.5), one step", start, seeds, class_ids, device, floor)

    out = os.path.join(args.outdir, "distill")
    cfg = DistillConfig(teacher=teacher_path, outdir=out, teacher_cfg=cfg_scale, lr=args.lr, batch_size=args.batch,
                        ema_halflife_kimg=args.ema, ema_rampup=DEMO_DISTILL["ema_rampup"], seed=args.seed,
                        device=device, threads=args.threads, checkpoint_every=10 ** 9, log_every=25, resume="auto")
    if args.steps is None:
        targets = [None]
    else:
        every = args.measure_every or args.steps
        targets = list(range(every, args.steps, every)) + [args.steps]
    curve = []
    seconds = 0.0
    for target in targets:
        res = distill(cfg, steps=target, max_seconds=None if target is not None else args.minutes * 60)
        seconds += res.seconds
        net = load_network(res.checkpoint, device=device)
        row = quality(f"SiD one step, {res.step} steps ({res.nimg / 1000:.0f} kimg)", net, seeds, class_ids, device,
                      floor)
        row.update(step=res.step, kimg=res.nimg / 1000, distill_seconds=seconds, last_losses=res.last_losses,
                   skipped=res.skipped)
        curve.append(row)
    rows["one_step"] = curve[-1]

    best = timings({"teacher": (teacher, heun), "one_step": (net, {})}, seeds, class_ids, device, args.repeats)
    for name in best:
        rows[name].update(seconds=best[name], images_per_s=len(seeds) / best[name])
    speedup = rows["one_step"]["images_per_s"] / rows["teacher"]["images_per_s"]
    gap = 100 * (rows["one_step"]["agreement"] - rows["teacher"]["agreement"])
    print(f"sampling {len(seeds)} images in one batch (best of {args.repeats}, interleaved): teacher "
          f"{rows['teacher']['seconds']:.2f} s ({rows['teacher']['images_per_s']:.1f} images/s), one step "
          f"{rows['one_step']['seconds']:.3f} s ({rows['one_step']['images_per_s']:.0f} images/s): {speedup:.0f}x")
    print(f"one step vs teacher: agreement {100 * rows['one_step']['agreement']:.1f}% vs "
          f"{100 * rows['teacher']['agreement']:.1f}% ({gap:+.1f} points; target: no more than 5 below), Frechet "
          f"distance {rows['one_step']['frechet_distance']:.1f} vs {rows['teacher']['frechet_distance']:.1f}, "
          f"{speedup:.0f}x the images/s (target: >= 20x); distillation {seconds:.0f} s for "
          f"{rows['one_step']['step']} steps at batch {args.batch}")
    summary = {"teacher": teacher_path, "device": str(device), "threads": torch.get_num_threads(),
               "cfg": args.cfg, "distill": {k: v for k, v in vars(args).items()}, "rows": rows, "curve": curve,
               "speedup": speedup, "agreement_difference_points": gap, "seconds": time.perf_counter() - t_all}
    path = os.path.join(args.outdir, "distill_digits.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
