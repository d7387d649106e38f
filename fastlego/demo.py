"""`fastlego demo`: train a small LEGO on the bundled digits, sample, measure, compare skipping."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

DEMO_CLASSES = 10


def demo(minutes: float = 3.0, outdir: str = "fastlego-demo", train_steps: Optional[int] = None,
         device: Optional[str] = None, seed: int = 0, rows: int = 6, sample_steps: int = 18,
         t_break: float = 0.5, cfg_scale: Optional[float] = 2.0, batch: Optional[int] = None,
         progress: bool = True) -> dict:
    """Train a small LEGO (PG stack: a local brick on 8x8 regions, then a global 16x16 brick) on the bundled
    digits for about `minutes`, then sample a grid of every digit with and without brick skipping,
    and report throughput and the time skipping saves."""
    import torch
    from .sampling import count_network_evaluations, sample
    from .training import DEMO_BRICKS, TrainConfig, train

    t_all = time.perf_counter()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev.startswith("cuda")
    # Time budget: training gets what sampling (about 10% of 3 minutes on 2 CPU cores) leaves.
    budget = minutes * 60
    train_seconds = budget * (0.85 if not on_gpu else 0.9)
    cfg = TrainConfig(data="digits", resolution=16, outdir=outdir, bricks=DEMO_BRICKS, batch_size=batch or (256 if on_gpu else 32),
                      steps=train_steps if train_steps is not None else 10 ** 9,
                      max_seconds=None if train_steps is not None else train_seconds,
                      lr=1e-3, warmup_steps=50, ema_halflife_kimg=5, ema_rampup=0.1,
                      intermediate=True, class_dropout=0.1, seed=seed, checkpoint_every=10 ** 9, log_every=25,
                      device=dev, progress=progress)
    print(f"fastlego demo: training a LEGO ({DEMO_BRICKS}) on 1797 real 16x16 handwritten digits "
          f"on {dev} for {'%d steps' % train_steps if train_steps is not None else '%.1f min' % (train_seconds / 60)}")
    result = train(cfg)
    net = result.network
    print(f"  trained {result.step} steps ({result.nimg} images) at {result.images_per_second:.1f} images/s; "
          f"loss {result.losses[0]:.3f} -> {sum(result.losses[-10:]) / len(result.losses[-10:]):.3f}")

    # Sampling: every digit (one per column), with every brick and with the last brick skipped
    # after t_break of the steps. Same seeds, so the two grids are directly comparable.
    seeds = list(range(seed * 1000, seed * 1000 + rows * DEMO_CLASSES))
    class_ids = [i % DEMO_CLASSES for i in range(len(seeds))]
    common = dict(class_ids=class_ids, num_steps=sample_steps, cfg_scale=cfg_scale, outdir=outdir,
                  grid_columns=DEMO_CLASSES, grid_pad=1, grid_scale=4, device=dev, progress=progress, batch_size=len(seeds))
    sample(net, seeds[:DEMO_CLASSES], **dict(common, class_ids=class_ids[:DEMO_CLASSES], outdir=None, progress=False))  # warm-up
    full = sample(net, seeds, prefix="full_", t_break=1.0, **common)
    skip = sample(net, seeds, prefix="skip_", t_break=t_break, **common)
    evals = count_network_evaluations(sample_steps, t_break)
    saved = 1 - skip.seconds / full.seconds
    total = time.perf_counter() - t_all
    print(f"  sampling {len(seeds)} images, {sample_steps} Heun steps, cfg {cfg_scale}:")
    skip_label = f"skipping (t_break {t_break}):"
    print(f"    {'every brick:':<24}{full.seconds:7.2f} s {full.images_per_second:8.1f} images/s  -> {full.files['grid']}")
    print(f"    {skip_label:<24}{skip.seconds:7.2f} s {skip.images_per_second:8.1f} images/s  -> {skip.files['grid']}")
    print(f"    skipping saved {100 * saved:.0f}% of the sampling time ({evals['skipped']} of "
          f"{evals['full'] + evals['skipped']} network calls stopped after brick {net.model.num_bricks - 2})")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  more samples: fastlego sample --network {result.checkpoint} --seeds 0-99 --cfg {cfg_scale} "
          f"--t-break {t_break} --outdir {os.path.join(outdir, 'more')}")
    print(f"  demo took {total:.0f} s")
    summary = {"train_steps": result.step, "train_images_per_s": result.images_per_second,
               "first_loss": result.losses[0], "last_loss": result.losses[-1],
               "sample_seconds_full": full.seconds, "sample_seconds_skip": skip.seconds,
               "time_saved": saved, "grid_full": full.files["grid"], "grid_skip": skip.files["grid"],
               "checkpoint": result.checkpoint, "seconds": total}
    with open(os.path.join(outdir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
