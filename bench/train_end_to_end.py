"""`fastlego train` end to end against the bench's training step: same network, same batch, same run.

    python3 bench/train_end_to_end.py                                  # lego_S_PG_64, batch 256, the digits at 64x64
    python3 bench/train_end_to_end.py --preset lego_L_PG_64 --batch 64 --steps 150 --json e2e.json
    python3 bench/train_end_to_end.py --data /data/cifar10.zip --workers 4

Two measurements on one GPU, one after the other:

1. the bench's step (`fastlego bench --modes train`, variant `fastlego_graph`): forward of
   EDMPrecond + EDM loss + backward + fused AdamW, replayed as one CUDA graph on one fixed batch,
   for a network of the run's shape (the data's channels, resolution and classes); timed with
   the package's timer;
2. `fastlego.train` on the data for `--steps` steps, as `fastlego train` runs it: the data order,
   loading (the bundled digits staged on the GPU; files through `--workers`), flips, the random
   draws, label dropout, the graphed step, the EMA update and the log. Its images/s are the
   trainer's own, from metrics.jsonl, over the log windows after the first `--skip-windows`
   (path tuning, the warm-up steps and the capture fall in those); the checkpoint is written only
   at the end, after the last window.

Prints both figures and the run's share of the bench's images/s (the target: at least 95%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlego.benchmark import BenchConfig, BenchSession, Case  # noqa: E402
from fastlego.data import ImageDataset  # noqa: E402
from fastlego.presets import get_preset  # noqa: E402
from fastlego.training import TrainConfig, train  # noqa: E402

TARGET = 0.95   # the run's images/s over the bench step's


def steady_images_per_s(records, skip_windows: int) -> float:
    """Images per second over a run's log windows after the first `skip_windows`. A record's
    `seconds` is the run's clock at the end of its window and `images_per_s` the window's images
    over its time, so a window's images are its rate times (its end - the previous end)."""
    records = [r for r in records if "images_per_s" in r]
    if len(records) <= skip_windows:
        raise ValueError(f"the run logged {len(records)} window(s), not more than the {skip_windows} skipped: "
                         f"train more steps (--steps) or log more often (--log-every)")
    ends = [0.0] + [r["seconds"] for r in records]
    images = sum(records[i]["images_per_s"] * (ends[i + 1] - ends[i]) for i in range(skip_windows, len(records)))
    return images / (ends[-1] - ends[skip_windows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="lego_S_PG_64", help="the network (default lego_S_PG_64)")
    p.add_argument("--batch", type=int, default=256, help="training batch (default 256)")
    p.add_argument("--data", default="digits", help="the run's data: 'digits', a folder or a zip (default digits)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the preset's)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes for file data (default 0)")
    p.add_argument("--steps", type=int, default=120, help="training steps of the run (default 120)")
    p.add_argument("--log-every", type=int, default=20, help="steps per log window (default 20)")
    p.add_argument("--skip-windows", type=int, default=1,
                   help="log windows left out at the start: tuning, warm-up and capture (default 1)")
    p.add_argument("--outdir", default=None, help="the run's folder (default: a temporary one, removed after)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/train_end_to_end.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.steps < args.log_every * (args.skip_windows + 2):
        p.error(f"--steps {args.steps} leaves fewer than 2 log windows of {args.log_every} steps after the "
                f"{args.skip_windows} skipped: pass --steps {args.log_every * (args.skip_windows + 3)} or more")
    resolution = args.resolution or get_preset(args.preset).training_resolution
    data = ImageDataset(args.data, resolution=resolution)
    case = Case(args.preset, args.batch, in_channels=data.channels, resolution=resolution, label_dim=data.label_dim)
    dev = torch.device("cuda", torch.cuda.current_device())

    session = BenchSession(BenchConfig(device=str(dev), cases=[case], train_cases=[case], modes=("train",),
                                       variants=("fastlego_graph",), kernels=False, floor=False, check=False))
    bench = session.end_to_end(case, "fastlego_graph", "train")
    if "error" in bench:
        print(f"the bench's step failed: {bench['error']}", file=sys.stderr)
        return 1
    del session
    torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as tmp:
        outdir = args.outdir or os.path.join(tmp, "run")
        run = train(TrainConfig(data=args.data, resolution=resolution, preset=args.preset, batch_size=args.batch,
                                steps=args.steps, log_every=args.log_every, checkpoint_every=args.steps + 1,
                                workers=args.workers, outdir=outdir, progress=False))
        with open(os.path.join(outdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    steady = steady_images_per_s(records, args.skip_windows)
    share = steady / bench["img_per_s"]
    row = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "case": case.describe(),
           "data": data.describe(), "bench_ms": bench["ms"], "bench_img_per_s": bench["img_per_s"],
           "bench_captured": bench.get("captured"), "run_steps": run.steps_run, "run_cuda_graph": run.cuda_graph,
           "run_img_per_s": steady, "run_img_per_s_whole": run.images_per_second, "share": share, "target": TARGET,
           "windows": records, "env": bench.get("env")}
    print(f"{case.describe()} on {row['device']}, torch {torch.__version__}")
    print(f"bench step (fastlego_graph): {bench['ms']:.2f} ms, {bench['img_per_s']:,.0f} img/s")
    print(f"fastlego train ({args.data}, {run.steps_run} steps, CUDA graph {run.cuda_graph}): "
          f"{steady:,.0f} img/s after {args.skip_windows} window(s) of {args.log_every} steps "
          f"({run.images_per_second:,.0f} over the whole run)")
    print(f"run / bench: {share:.3f} (target >= {TARGET}: {'met' if share >= TARGET else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
