"""`fastlego demo`: train a small LEGO on the bundled digits, sample, measure, compare skipping.

The network is `networks.DEMO_BRICKS`: a PG stack of a local brick (8x8 regions, four 4x4 patches
each) and a global brick (the whole 16x16 image, 16 patches), both of width 128. On two CPU cores
it trains at about a thousand images a second, so a three-minute demo sees each of the 1,797
digits some eighty times. Its samples are measured with `fastlego.metrics` (class agreement,
Frechet distance of the digits classifier's features) next to what real digits score at the
same sample count.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

DEMO_CLASSES = 10
# Training recipe (AdamW, EDM loss on every brick's output, label dropout for guidance).
DEMO_LR = 2e-3
DEMO_WARMUP = 50
DEMO_EMA_KIMG = 5.0          # EMA half-life in thousands of images ...
DEMO_EMA_RAMPUP = 0.1        # ... at most 10% of the images seen so far
DEMO_BATCH = {"cpu": 128, "cuda": 256}
# Training by time gets the budget minus what sampling both grids will cost (measured before
# training) and this much more for Python's start-up, measuring the samples and writing files.
RESERVE_SECONDS = 15.0


def _forward_seconds(net, batch: int, device, repeats: int = 3, return_stage_idx: Optional[int] = None) -> float:
    """Seconds of one denoiser call at this batch (the cost of one sampler evaluation), every
    brick or stopping after brick `return_stage_idx` (a skipped call)."""
    import torch

    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device)
    sigma = torch.full((batch,), 1.0, device=device)
    labels = torch.nn.functional.one_hot(torch.arange(batch, device=device) % DEMO_CLASSES, DEMO_CLASSES).float()
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            net(x, sigma, labels, return_stage_idx=return_stage_idx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return best


def demo(minutes: float = 3.0, outdir: str = "fastlego-demo", train_steps: Optional[int] = None,
         device: Optional[str] = None, seed: int = 0, rows: int = 20, sample_steps: int = 18,
         t_break: float = 0.5, cfg_scale: Optional[float] = 2.0, batch: Optional[int] = None,
         overwrite: bool = False, progress: bool = True, distill: bool = False, distill_minutes: float = 3.0,
         distill_steps: Optional[int] = None) -> dict:
    """Train `networks.DEMO_BRICKS` on the bundled digits for about `minutes` in all (or exactly
    `train_steps` steps), then draw `rows` images of every digit with every brick and with the
    last brick skipped after a fraction `t_break` of the steps (same seeds), measure both with
    `fastlego.metrics`, and report the time skipping saves. `distill=True` then distills the
    network into a one-step generator (`fastlego.distill`; `distill_minutes`, or exactly
    `distill_steps` steps, outside the `minutes` budget) and measures its samples of the same
    seeds. Returns the summary it also writes to `outdir/demo.json`."""
    import torch

    from . import metrics
    from .sampling import count_network_evaluations, sample
    from .networks import DEMO_BRICKS, build_network, network_spec
    from .training import TrainConfig, train

    t_all = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or DEMO_BATCH.get(dev.type, DEMO_BATCH["cpu"])
    seeds = list(range(seed * 100_000, seed * 100_000 + rows * DEMO_CLASSES))
    class_ids = metrics.balanced_class_ids(rows)
    evals = count_network_evaluations(sample_steps, t_break)

    # Time budget: set aside what sampling both grids will cost (measured on an untrained copy of
    # the network at the sampling batch), training gets the rest.
    spec = network_spec(16, 1, DEMO_CLASSES, bricks=DEMO_BRICKS)
    probe = build_network(spec).to(dev).eval()
    n_params = sum(p.numel() for p in probe.parameters())
    sample_batch = len(seeds) * (2 if cfg_scale not in (None, 1.0) else 1)
    per_full = _forward_seconds(probe, sample_batch, dev)
    per_skipped = _forward_seconds(probe, sample_batch, dev, return_stage_idx=probe.model.num_bricks - 2)
    # the every-brick grid, then the skipping grid, plus a small warm-up call of the sampler
    sampling_estimate = (per_full * (2 * evals["full"] + evals["skipped"] + 2) + per_skipped * evals["skipped"])
    del probe
    if train_steps is None:
        left = minutes * 60 - (time.perf_counter() - t_all) - sampling_estimate - RESERVE_SECONDS
        train_seconds = max(left, 5.0)
        what = f"{train_seconds / 60:.1f} min"
    else:
        train_seconds, what = None, f"{train_steps} steps"
    print(f"fastlego demo: a LEGO of two bricks ({DEMO_BRICKS}; {n_params / 1e6:.2f}M parameters) on the 1,797 "
          f"bundled 16x16 handwritten digits, on {dev}, batch {batch}, training for {what}")

    cfg = TrainConfig(data="digits", resolution=16, outdir=outdir, bricks=DEMO_BRICKS, batch_size=batch,
                      steps=train_steps, max_seconds=train_seconds,
                      lr=DEMO_LR, warmup_steps=DEMO_WARMUP, ema_halflife_kimg=DEMO_EMA_KIMG,
                      ema_rampup=DEMO_EMA_RAMPUP, intermediate=True, class_dropout=0.1, seed=seed,
                      checkpoint_every=10 ** 9, log_every=25, device=str(dev), overwrite=overwrite, progress=progress)
    result = train(cfg)
    net = result.network
    print(f"  trained {result.steps_run} steps ({result.nimg:,} images) in {result.seconds:.0f} s, "
          f"{result.images_per_second:,.0f} images/s; loss {result.last_loss:.3f} (EDM loss, mean of the last "
          f"logged steps)")

    # Every digit (one per column, `rows` rows), with every brick and with the last brick skipped
    # late in sampling; the same seeds, so the two grids show the same images drawn two ways.
    common = dict(class_ids=class_ids, num_steps=sample_steps, cfg_scale=cfg_scale, outdir=outdir,
                  grid_columns=DEMO_CLASSES, grid_pad=1, grid_scale=4, device=dev, progress=False,
                  batch_size=len(seeds), overwrite=overwrite)
    sample(net, seeds[:DEMO_CLASSES], **dict(common, class_ids=class_ids[:DEMO_CLASSES], outdir=None))  # warm-up
    full = sample(net, seeds, prefix="full_", t_break=1.0, **common)
    skip = sample(net, seeds, prefix="skip_", t_break=t_break, **common)
    q_full = metrics.evaluate_samples(full.images, class_ids)
    q_skip = metrics.evaluate_samples(skip.images, class_ids, floor=False)
    floor = q_full.real_floor
    saved = 1 - skip.seconds / full.seconds

    guide = f"guidance {cfg_scale}" if cfg_scale not in (None, 1.0) else "no guidance"
    print(f"  {len(seeds)} images ({rows} of each digit), {sample_steps} Heun steps, {guide}; measured with "
          f"fastlego.metrics' digits classifier:")
    print(f"    {'':26}{'seconds':>8}{'images/s':>10}{'agreement':>11}{'Frechet distance':>18}")
    skip_label = f"skipping (t_break {t_break}):"
    for label, res, q in (("every brick:", full, q_full), (skip_label, skip, q_skip)):
        print(f"    {label:<26}{res.seconds:8.2f}{res.images_per_second:10.1f}{100 * q.agreement:10.1f}%"
              f"{q.frechet_distance:18.2f}")
    print(f"    {'real digits, same count:':<26}{'':18}{100 * floor['agreement']:10.1f}%"
          f"{floor['frechet_distance']:12.2f} +- {floor['frechet_distance_std']:.2f}")
    print(f"    skipping saved {100 * saved:.0f}% of the sampling time ({evals['skipped']} of "
          f"{evals['full'] + evals['skipped']} network calls stopped after brick {net.model.num_bricks - 2})")
    print(f"  grids: {full.files['grid']}, {skip.files['grid']}")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  more: fastlego eval --network {result.checkpoint} --cfg {cfg_scale}   "
          f"fastlego sample --network {result.checkpoint} --seeds 0-99 --outdir {os.path.join(outdir, 'more')}")
    total = time.perf_counter() - t_all
    print(f"  demo took {total:.0f} s")
    summary = {
        "device": str(dev), "bricks": DEMO_BRICKS, "parameters": n_params, "batch": batch,
        "train_steps": result.steps_run, "train_images": result.nimg, "train_seconds": result.seconds,
        "train_images_per_s": result.images_per_second, "last_loss": result.last_loss,
        "samples": len(seeds), "sample_steps": sample_steps, "cfg_scale": cfg_scale, "t_break": t_break,
        "full": {"seconds": full.seconds, "grid": full.files["grid"], **q_full.to_dict()},
        "skip": {"seconds": skip.seconds, "grid": skip.files["grid"], **q_skip.to_dict()},
        "time_saved": saved, "checkpoint": result.checkpoint, "seconds": total,
    }
    if distill:
        from .distill import distill_demo
        summary["distill"] = distill_demo(result.checkpoint, os.path.join(outdir, "distill"), minutes=distill_minutes,
                                          steps=distill_steps, seeds=seeds, class_ids=class_ids, cfg_scale=cfg_scale,
                                          device=dev, teacher_result=full, teacher_report=q_full,
                                          overwrite=overwrite, progress=progress, seed=seed)
    with open(os.path.join(outdir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
