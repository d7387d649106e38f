"""The `fastlego` command line: demo, train, sample, bench, info.

    fastlego demo                      # train a small LEGO on the bundled digits, sample, compare skipping
    fastlego train --data digits --outdir runs/digits --steps 2000
    torchrun --nproc_per_node 8 -m fastlego train --data imagenet64.zip --preset lego_S_PG_64 ...
    fastlego sample --network runs/digits/checkpoint.pt --seeds 0-63 --outdir out --t-break 0.4
    fastlego bench ...                 # fastlego.benchmark
    fastlego info                      # backends, kernels, what runs where
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import List, Optional

from . import dispatch

# --------------------------------------------------------------------------------------------
# Argument types: clear messages for bad values
# --------------------------------------------------------------------------------------------

def _number(kind, name: str, lo=None, hi=None, lo_open=False):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {text}")
        return v
    return parse


def _positive_int(name):
    return _number(int, name, lo=1)


def _sigma(name):
    return _number(float, name, lo=0, lo_open=True)


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler (EDM Heun)")
    g.add_argument("--steps", type=_positive_int("--steps"), default=18, help="sampling steps (default 18)")
    g.add_argument("--sigma-min", type=_sigma("--sigma-min"), default=0.002)
    g.add_argument("--sigma-max", type=_sigma("--sigma-max"), default=80.0)
    g.add_argument("--rho", type=_sigma("--rho"), default=7.0)
    g.add_argument("--S-churn", dest="S_churn", type=_number(float, "--S-churn", lo=0), default=0.0,
                   help="stochasticity (0: deterministic)")
    g.add_argument("--S-min", dest="S_min", type=_number(float, "--S-min", lo=0), default=0.0)
    g.add_argument("--S-max", dest="S_max", type=_number(float, "--S-max", lo=0), default=float("inf"))
    g.add_argument("--S-noise", dest="S_noise", type=_number(float, "--S-noise", lo=0), default=1.0)
    g.add_argument("--cfg", type=_number(float, "--cfg", lo=0), default=None,
                   help="classifier-free guidance scale (class-conditional networks; 1 = none)")
    g.add_argument("--t-break", type=_number(float, "--t-break", lo=0, hi=1), default=1.0,
                   help="fraction of the steps that run every brick; the rest stop after brick "
                        "num_bricks-2 (LEGO's brick skipping; default 1: no skipping)")
    g.add_argument("--skip-stage", type=int, default=None,
                   help="the brick late steps stop after (default num_bricks-2)")


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .training import TrainConfig, train
    cfg = TrainConfig(
        data=args.data, outdir=args.outdir, resolution=args.resolution, preset=args.preset, bricks=args.bricks,
        use_labels=not args.no_labels, xflip=args.xflip, max_images=args.max_images, batch_size=args.batch,
        steps=args.train_steps, max_seconds=None if args.minutes is None else args.minutes * 60, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup, grad_clip=args.grad_clip,
        ema_halflife_kimg=args.ema, ema_rampup=None if args.ema_rampup == 0 else args.ema_rampup,
        intermediate=not args.last_brick_only, class_dropout=args.class_dropout, precision=args.precision,
        seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume=args.resume,
        workers=args.workers, device=args.device, backend=args.backend, progress=not args.quiet, threads=args.threads,
        activation_checkpointing=args.activation_checkpointing, checkpoint_blocks=args.checkpoint_blocks,
        deterministic=args.deterministic,
        cuda_graph=args.cuda_graph)
    cfg.validate()
    result = train(cfg)
    if result.network is not None:
        print(f"trained {result.step} steps ({result.nimg / 1000:.1f} kimg) in {result.seconds:.1f} s, "
              f"{result.images_per_second:.1f} images/s; last loss {result.losses[-1] if result.losses else float('nan'):.4f}")
        print(f"checkpoint: {result.checkpoint}")
        print(f"metrics:    {os.path.join(result.outdir, 'metrics.jsonl')}")
    return 0


def cmd_sample(args) -> int:
    from .sampling import sample
    res = sample(args.network, args.seeds, class_idx=args.class_idx, height=args.height, width=args.width,
                 resolution=args.resolution, batch_size=args.batch, num_steps=args.steps, sigma_min=args.sigma_min,
                 sigma_max=args.sigma_max, rho=args.rho, S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max,
                 S_noise=args.S_noise, cfg_scale=args.cfg, t_break=args.t_break, skip_stage_idx=args.skip_stage,
                 outdir=args.outdir, grid=not args.no_grid, grid_columns=args.grid_columns, grid_pad=args.grid_pad,
                 grid_scale=args.grid_scale, images=args.images,
                 npz=args.npz, device=args.device, precision=args.precision, cuda_graph=args.cuda_graph,
                 which=args.which, progress=not args.quiet)
    print(f"sampled {len(res.seeds)} images of {res.images.shape[2]}x{res.images.shape[3]} in {res.seconds:.2f} s "
          f"({res.images_per_second:.2f} images/s)")
    for kind, value in res.files.items():
        print(f"{kind}: {value if isinstance(value, str) else f'{len(value)} files in ' + os.path.dirname(value[0])}")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    demo(minutes=args.minutes, outdir=args.outdir, train_steps=args.train_steps, device=args.device, seed=args.seed,
         rows=args.rows, sample_steps=args.steps, t_break=args.t_break,
         cfg_scale=None if args.cfg == 1 else args.cfg, batch=args.batch, progress=not args.quiet)
    return 0


def cmd_eval(args) -> int:
    from .metrics import cmd_eval as run

    return run(args)


def cmd_bench(args, rest: List[str]) -> int:
    try:
        benchmark = importlib.import_module("fastlego.benchmark")
    except ImportError as exc:
        print(f"fastlego bench: the benchmark module is not available in this install ({exc})", file=sys.stderr)
        return 2
    return int(benchmark.main(rest) or 0)


def cmd_info(args) -> int:
    from .info import print_info

    print_info()
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="fastlego", description="LEGO diffusion: train, sample, benchmark.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `fastlego demo` for a first look (about 3 minutes on a laptop CPU).")
    parser.add_argument("--version", action="version", version=f"fastlego {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # demo ---------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="train a small LEGO on the bundled digits, then sample with and without skipping",
                       description="Train a small LEGO (a local brick on 8x8 regions, then a global 16x16 brick) on 1797 real "
                                   "handwritten digits shipped with fastlego, then sample a grid of every digit with "
                                   "every brick and with the last brick skipped late in sampling, and report the "
                                   "throughput and the time skipping saves. Uses the GPU when there is one.")
    p.add_argument("--minutes", type=_number(float, "--minutes", lo=0, lo_open=True), default=3.0,
                   help="total time budget in minutes (default 3)")
    p.add_argument("--train-steps", type=_number(int, "--train-steps", lo=1), default=None,
                   help="train exactly this many steps instead of using the time budget")
    p.add_argument("--outdir", default="fastlego-demo", help="where the checkpoint and PNGs go (default ./fastlego-demo)")
    p.add_argument("--rows", type=_positive_int("--rows"), default=6, help="grid rows (each row: digits 0-9)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=18, help="sampling steps (default 18)")
    p.add_argument("--t-break", type=_number(float, "--t-break", lo=0, hi=1), default=0.5,
                   help="fraction of steps with every brick in the skipping grid (default 0.5)")
    p.add_argument("--cfg", type=_number(float, "--cfg", lo=0), default=2.0, help="guidance scale (default 2; 1 = none)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=None, help="training batch (default 32 CPU, 256 GPU)")
    p.add_argument("--seed", type=_number(int, "--seed", lo=0), default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    # train --------------------------------------------------------------------------------
    p = sub.add_parser("train", help="train a LEGO network with EDM's loss (torchrun for several GPUs)",
                       description="EDM training of a LEGO network. For several GPUs: "
                                   "torchrun --nproc_per_node N -m fastlego train ... (the batch is split evenly).")
    p.add_argument("--data", default="digits", help="image folder, EDM-style .zip, or 'digits' (bundled; default)")
    p.add_argument("--outdir", required=True, help="run folder: checkpoint.pt, metrics.jsonl, config.json")
    p.add_argument("--resolution", type=_positive_int("--resolution"), default=None,
                   help="training resolution (images are center-cropped and resized; default: the data's)")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--preset", default=None, help="a LEGO preset, e.g. lego_S_PG_64 (see fastlego info)")
    net.add_argument("--bricks", default=None,
                     help="an explicit stack REGION:TYPE:DEPTH,... (default 8:lego_S_4:1,16:lego_S_4:2, the demo's)")
    p.add_argument("--no-labels", action="store_true", help="ignore dataset.json labels (unconditional)")
    p.add_argument("--xflip", action="store_true", help="random horizontal flips")
    p.add_argument("--max-images", type=_positive_int("--max-images"), default=None)
    p.add_argument("--batch", type=_positive_int("--batch"), default=64, help="global batch size (default 64)")
    p.add_argument("--train-steps", "--steps", dest="train_steps", type=_number(int, "--steps", lo=0), default=1000,
                   help="training steps (default 1000)")
    p.add_argument("--minutes", type=_number(float, "--minutes", lo=0, lo_open=True), default=None,
                   help="also stop after this many minutes of training")
    p.add_argument("--lr", type=_number(float, "--lr", lo=0, lo_open=True), default=1e-4)
    p.add_argument("--weight-decay", type=_number(float, "--weight-decay", lo=0), default=0.0)
    p.add_argument("--warmup", type=_number(int, "--warmup", lo=0), default=0, help="learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=_number(float, "--grad-clip", lo=0, lo_open=True), default=None)
    p.add_argument("--ema", type=_number(float, "--ema", lo=0), default=500.0, help="EMA half-life in kimg (default 500)")
    p.add_argument("--ema-rampup", type=_number(float, "--ema-rampup", lo=0), default=0.05,
                   help="EMA ramp-up ratio (0: off; default 0.05)")
    p.add_argument("--last-brick-only", action="store_true",
                   help="train only the last brick's output (default: every brick jointly, the release's loss)")
    p.add_argument("--class-dropout", type=_number(float, "--class-dropout", lo=0, hi=0.999), default=0.1)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--seed", type=_number(int, "--seed", lo=0), default=0)
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=500)
    p.add_argument("--log-every", type=_positive_int("--log-every"), default=50)
    p.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' (OUTDIR/checkpoint.pt if present)")
    p.add_argument("--workers", type=_number(int, "--workers", lo=0), default=0, help="data-loading processes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: this process's GPU when there is one)")
    p.add_argument("--backend", default=None, choices=list(dispatch.MODES))
    p.add_argument("--threads", type=_positive_int("--threads"), default=None, help="CPU threads")
    p.add_argument("--activation-checkpointing", choices=["brick", "block"], default=None,
                   help="recompute activations in backward per brick or per DiT block (less memory, more compute)")
    p.add_argument("--checkpoint-blocks", type=_number(int, "--checkpoint-blocks", lo=0), default=None,
                   help="with --activation-checkpointing block: only the first N DiT blocks (default: all)")
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible gradients run to run (fastlego.set_deterministic; slower)")
    graph = p.add_mutually_exclusive_group()
    graph.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=None,
                       help="replay the whole training step as one CUDA graph (default: on for one CUDA process)")
    graph.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                       help="run every step eagerly (e.g. to profile op by op)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    # sample -------------------------------------------------------------------------------
    p = sub.add_parser("sample", help="generate images from a trained network",
                       description="EDM Heun sampling with optional guidance and brick skipping; any size that the "
                                   "bricks' regions tile, non-square (panoramas) included.")
    p.add_argument("--network", required=True,
                   help="a fastlego training checkpoint (.pt), or a release .pkl / .safetensors")
    p.add_argument("--which", choices=["ema", "model"], default="ema", help="weights of a training checkpoint")
    p.add_argument("--outdir", required=True)
    p.add_argument("--seeds", default="0-15", help="e.g. 0-63 or 1,5,9 (one image per seed; default 0-15)")
    p.add_argument("--class", dest="class_idx", type=_number(int, "--class", lo=0), default=None,
                   help="class of every image (default: a random class per seed)")
    p.add_argument("--resolution", type=_positive_int("--resolution"), default=None, help="square output size")
    p.add_argument("--height", type=_positive_int("--height"), default=None)
    p.add_argument("--width", type=_positive_int("--width"), default=None)
    p.add_argument("--batch", type=_positive_int("--batch"), default=64)
    _add_sampler_args(p)
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--grid-columns", type=_positive_int("--grid-columns"), default=None)
    p.add_argument("--grid-pad", type=_number(int, "--grid-pad", lo=0), default=0, help="gray pixels between grid images")
    p.add_argument("--grid-scale", type=_positive_int("--grid-scale"), default=1, help="enlarge the grid N times")
    p.add_argument("--images", action="store_true", help="write one PNG per seed under images/")
    p.add_argument("--npz", action="store_true", help="write samples.npz (uint8 NHWC under arr_0) for FID tools")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--cuda-graph", action="store_true", help="replay the network as a CUDA graph (CUDA only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    # eval ---------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="sample a digits network and measure its samples (fastlego.metrics)",
                       description="Draw N images of every digit from a network trained on the bundled digits "
                                   "(EDM Heun, same seeds every run) and measure them with fastlego's digits "
                                   "classifier: class agreement (the fraction read as the digit asked for), "
                                   "the Frechet distance of the classifier's features to the real digits', "
                                   "and per-class counts.")
    p.add_argument("--network", required=True, help="a fastlego training checkpoint (.pt) or saved network")
    p.add_argument("--which", choices=["ema", "model"], default="ema",
                   help="weights of a training checkpoint (default ema)")
    p.add_argument("--per-class", type=_positive_int("--per-class"), default=50,
                   help="images per digit (default 50: 500 images)")
    p.add_argument("--seed", type=_number(int, "--seed", lo=0), default=0,
                   help="first seed; image i uses seed + i (default 0)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=250, help="images per sampler batch (default 250)")
    _add_sampler_args(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="sampling precision (default fp32)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    # bench / info -------------------------------------------------------------------------
    p = sub.add_parser("bench", help="speed benchmarks (fastlego.benchmark; its own options follow)", add_help=False)
    p.set_defaults(func=None, passthrough=True)
    p = sub.add_parser("info", help="environment, backends and what runs where (fastlego.explain)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":  # everything after `bench` belongs to fastlego.benchmark
        return cmd_bench(None, argv[1:])
    args = parser.parse_args(argv)
    if args.command == "sample" and args.resolution is not None and (args.height or args.width):
        parser.error("give --resolution or --height/--width, not both")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad values found past argparse (sizes that the bricks cannot tile, missing files, ...):
        # one clear line, no traceback.
        print(f"fastlego {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
