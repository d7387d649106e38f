"""The `fastlego` command line: demo, train, sample, distill, eval, bench, info.

    fastlego demo                      # train a small LEGO on the bundled digits, sample, compare skipping
    fastlego train --data digits --outdir runs/digits --steps 2000
    torchrun --nproc_per_node 8 -m fastlego train --data imagenet64.zip --preset lego_S_PG_64 ...
    fastlego sample --network runs/digits/checkpoint.pt --seeds 0-63 --outdir out --t-break 0.4
    fastlego distill --teacher runs/digits/checkpoint.pt --outdir runs/one-step   # SiD: a one-step generator
    torchrun --nproc_per_node 8 -m fastlego sample --network ... --seeds 0-49999 --batch 256 --npz --outdir fid
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


def _add_run_options(p, checkpointing: str, step: str) -> None:
    """The options `train` and `distill` share: resume, where and how the steps run, output."""
    p.add_argument("--resume", default=None,
                   help="continue a run: 'auto' continues the run in --outdir (its checkpoint.pt, when there is one), "
                        "a path continues that checkpoint into an --outdir that holds no other run (default: start afresh)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: this process's GPU when there is one, else cpu)")
    p.add_argument("--backend", default=None, choices=list(dispatch.MODES),
                   help="kernel backend of every op (default: auto, the fastest that supports each call)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--activation-checkpointing", choices=["brick", "block"], default=None,
                   help=f"recompute activations in backward per brick or per DiT block{checkpointing}: less memory, "
                        f"more compute (default: off)")
    p.add_argument("--checkpoint-blocks", type=_number(int, "--checkpoint-blocks", lo=0), default=None,
                   help="with --activation-checkpointing block: only the first N DiT blocks (default: all)")
    p.add_argument("--deterministic", action="store_true",
                   help="bitwise-reproducible gradients run to run (fastlego.set_deterministic; slower) (default: off)")
    graph = p.add_mutually_exclusive_group()
    graph.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=None,
                       help=f"replay {step} as one CUDA graph (default: on for one CUDA process)")
    graph.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                       help="run every step eagerly, e.g. to profile op by op (default: on for one CUDA process)")
    p.add_argument("--quiet", action="store_true", help="no header line and no progress bar (default: show them)")


def _positive_int(name):
    return _number(int, name, lo=1)


def _sigma(name):
    return _number(float, name, lo=0, lo_open=True)


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler (EDM Heun; a beta-diffusion network uses its own, see --steps)")
    g.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="sampler steps N: Heun steps, 2N-1 network evaluations per image (default 18); for a network "
                        "trained with --process beta, beta diffusion's steps, one evaluation each (default 200). "
                        "The sigma, rho and S options are EDM's")
    g.add_argument("--sigma-min", type=_sigma("--sigma-min"), default=0.002,
                   help="lowest noise level of the schedule, the last before 0 (default 0.002; the network's own "
                        "sigma_min if that is higher)")
    g.add_argument("--sigma-max", type=_sigma("--sigma-max"), default=80.0,
                   help="highest noise level, where sampling starts from pure noise (default 80; the network's own "
                        "sigma_max if that is lower)")
    g.add_argument("--rho", type=_sigma("--rho"), default=7.0,
                   help="schedule exponent: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - "
                        "sigma_max^(1/rho)))^rho; larger values spend more steps at low noise (default 7)")
    g.add_argument("--S-churn", dest="S_churn", type=_number(float, "--S-churn", lo=0), default=0.0,
                   help="stochasticity: a step whose noise level lies in [S-min, S-max] first raises it by the "
                        "factor 1 + min(S_churn/N, sqrt(2)-1) and adds the matching fresh noise "
                        "(default 0: deterministic sampling)")
    g.add_argument("--S-min", dest="S_min", type=_number(float, "--S-min", lo=0), default=0.0,
                   help="lowest noise level at which --S-churn applies (default 0)")
    g.add_argument("--S-max", dest="S_max", type=_number(float, "--S-max", lo=0), default=float("inf"),
                   help="highest noise level at which --S-churn applies (default inf: no upper bound)")
    g.add_argument("--S-noise", dest="S_noise", type=_number(float, "--S-noise", lo=0), default=1.0,
                   help="scale of the fresh noise that --S-churn adds; slightly above 1 offsets the detail "
                        "that churn loses (default 1)")
    g.add_argument("--cfg", type=_number(float, "--cfg", lo=0), default=None,
                   help="classifier-free guidance scale w for class-conditional networks: uncond + w (cond - uncond), "
                        "two network passes per call (default: no guidance, one conditional pass; 1 is the same)")
    g.add_argument("--t-break", type=_number(float, "--t-break", lo=0, hi=1), default=1.0,
                   help="fraction of the steps that run every brick; the rest stop after brick "
                        "num_bricks-2 (LEGO's brick skipping; default 1: no skipping)")
    g.add_argument("--skip-stage", type=int, default=None,
                   help="with --t-break below 1: the brick the late steps stop after, counted from 0 "
                        "(default num_bricks-2: only the last brick is skipped)")


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .training import TrainConfig, train
    if not args.patch_diffusion and (args.real_p is not None or args.progressive):
        raise ValueError("--real-p and --progressive set how patch diffusion draws its crops: add --patch-diffusion")
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
        cuda_graph=args.cuda_graph, overwrite=args.overwrite, process=args.process,
        patch_diffusion=args.patch_diffusion, real_p=0.5 if args.real_p is None else args.real_p,
        progressive=args.progressive)
    cfg.validate()
    result = train(cfg)
    if result.network is not None:
        if result.steps_run == 0:
            print(f"nothing to train: the run is at step {result.step} and --steps is {cfg.steps}; "
                  f"pass a larger --steps to continue it")
        else:
            print(f"trained {result.steps_run} step{'s' if result.steps_run != 1 else ''} "
                  f"(step {result.start_step} -> {result.step}) in {result.seconds:.1f} s, "
                  f"{result.images_per_second:.1f} images/s ({result.nimg / 1000:.1f} kimg in all); "
                  f"last loss {result.last_loss:.4f} (mean of the last logged window)")
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
                 which=args.which, progress=not args.quiet, overwrite=args.overwrite,
                 deterministic=args.deterministic)
    if res.rank != 0:  # under torchrun, rank 0 has every image and wrote the files: it reports
        return 0
    where = f" on {res.world} processes" if res.world > 1 else ""
    print(f"sampled {len(res.seeds)} images of {res.images.shape[2]}x{res.images.shape[3]} in {res.seconds:.2f} s"
          f"{where} ({res.images_per_second:.2f} images/s)")
    for kind, value in res.files.items():
        print(f"{kind}: {value if isinstance(value, str) else f'{len(value)} files in ' + os.path.dirname(value[0])}")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    demo(minutes=args.minutes, outdir=args.outdir, train_steps=args.train_steps, device=args.device, seed=args.seed,
         rows=args.rows, sample_steps=args.steps, t_break=args.t_break,
         cfg_scale=None if args.cfg == 1 else args.cfg, batch=args.batch, overwrite=args.overwrite,
         progress=not args.quiet, distill=args.distill, distill_minutes=args.distill_minutes,
         distill_steps=args.distill_steps)
    return 0


def cmd_distill(args) -> int:
    from .distill import DistillConfig, distill
    cfg = DistillConfig(
        teacher=args.teacher, which=args.which, outdir=args.outdir, batch_size=args.batch, steps=args.distill_steps,
        max_seconds=None if args.minutes is None else args.minutes * 60, lr=args.lr, fake_lr=args.fake_lr,
        betas=(args.beta1, args.beta2), eps=args.eps, alpha=args.alpha, tmax=args.tmax, sigma_init=args.sigma_init,
        loss_scale=args.loss_scale, fake_loss_scale=args.fake_loss_scale, teacher_cfg=args.teacher_cfg,
        class_dropout=args.class_dropout, ema_halflife_kimg=args.ema,
        ema_rampup=None if args.ema_rampup == 0 else args.ema_rampup, grad_clip=args.grad_clip,
        precision=args.precision, seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        resume=args.resume, overwrite=args.overwrite, device=args.device, backend=args.backend,
        progress=not args.quiet, threads=args.threads, activation_checkpointing=args.activation_checkpointing,
        checkpoint_blocks=args.checkpoint_blocks, deterministic=args.deterministic, cuda_graph=args.cuda_graph)
    cfg.validate()
    result = distill(cfg)
    if result.generator is not None:
        if result.steps_run == 0:
            print(f"nothing to distill: the run is at step {result.step} and --steps is {cfg.steps}; "
                  f"pass a larger --steps to continue it")
        else:
            skipped = f"; non-finite samples left out: {result.skipped[0]} + {result.skipped[1]}" \
                if any(result.skipped) else ""
            print(f"distilled {result.steps_run} step{'s' if result.steps_run != 1 else ''} "
                  f"(step {result.start_step} -> {result.step}) in {result.seconds:.1f} s, "
                  f"{result.images_per_second:.1f} images/s; last losses: fake score "
                  f"{result.last_losses['fake_score']:.4f}, generator {result.last_losses['generator']:.4g}{skipped}")
        print(f"checkpoint: {result.checkpoint}  (one-step generator: fastlego sample --network {result.checkpoint})")
        print(f"metrics:    {os.path.join(result.outdir, 'metrics.jsonl')}")
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

    print_info(preset=args.preset, batch=args.batch, device=args.device)
    return 0


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .sampling import PRECISIONS
    parser = argparse.ArgumentParser(prog="fastlego", description="LEGO diffusion: train, sample, benchmark.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `fastlego demo` for a first look (about 3 minutes on a laptop CPU).")
    parser.add_argument("--version", action="version", version=f"fastlego {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # demo ---------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="train a small LEGO on the bundled digits, sample, measure, compare skipping",
                       description="Train a small LEGO (a local brick on 8x8 regions, then a global 16x16 brick) on the "
                                   "1,797 real handwritten digits shipped with fastlego, then draw every digit with "
                                   "every brick and with the last brick skipped late in sampling (same seeds), "
                                   "measure both with fastlego.metrics (class agreement, Frechet distance) and "
                                   "report the time skipping saves. Uses the GPU when there is one.")
    p.add_argument("--minutes", type=_number(float, "--minutes", lo=0, lo_open=True), default=3.0,
                   help="wall-time budget of the whole demo in minutes; training gets what sampling leaves (default 3)")
    p.add_argument("--train-steps", type=_number(int, "--train-steps", lo=1), default=None,
                   help="train exactly this many steps instead of using the time budget (default: by time)")
    p.add_argument("--outdir", default="fastlego-demo",
                   help="where the checkpoint, grids and demo.json go (default ./fastlego-demo)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --outdir (default: refuse to touch it)")
    p.add_argument("--rows", type=_positive_int("--rows"), default=20,
                   help="images of each digit, one grid row each; all are measured (default 20)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=18, help="Heun sampling steps (default 18)")
    p.add_argument("--t-break", type=_number(float, "--t-break", lo=0, hi=1), default=0.5,
                   help="fraction of the steps that run every brick in the skipping grid (default 0.5)")
    p.add_argument("--cfg", type=_number(float, "--cfg", lo=0), default=2.0,
                   help="classifier-free guidance scale (default 2; 1 = none)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=None,
                   help="training batch (default 128 on a CPU, 256 on a GPU)")
    p.add_argument("--seed", type=_number(int, "--seed", lo=0), default=0,
                   help="seed of the training run and of the sampled images (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    p.add_argument("--distill", action="store_true",
                   help="after the demo, distill its network into a one-step generator (SiD, fastlego distill) and "
                        "measure its one-step samples of the same seeds; outside the --minutes budget (default: off)")
    p.add_argument("--distill-minutes", type=_number(float, "--distill-minutes", lo=0, lo_open=True), default=3.0,
                   help="with --distill: the distillation's time budget in minutes (default 3)")
    p.add_argument("--distill-steps", type=_positive_int("--distill-steps"), default=None,
                   help="with --distill: distill exactly this many steps instead (default: by time)")
    p.set_defaults(func=cmd_demo)

    # train --------------------------------------------------------------------------------
    from .presets import PRESETS
    from .networks import DEMO_BRICKS
    p = sub.add_parser("train", help="train a LEGO network with EDM's loss or beta diffusion's (torchrun for "
                                     "several GPUs)",
                       description="EDM training of a LEGO network (beta diffusion with --process beta). For several "
                                   "GPUs: torchrun --nproc_per_node N -m fastlego train ... (the batch is split "
                                   "evenly). A folder that already holds a run is never overwritten silently: "
                                   "continue it with --resume auto, or replace it with --overwrite.")
    p.add_argument("--data", default="digits",
                   help="an image folder, an EDM-style .zip, or 'digits' (1797 handwritten digits bundled with "
                        "fastlego) (default: %(default)s)")
    p.add_argument("--process", choices=["edm", "beta"], default="edm",
                   help="the diffusion process: edm (EDM's loss and Heun sampler), or beta (beta diffusion, Zhou et "
                        "al. 2023: multiplicative beta noise on pixels mapped into [0.60, 0.99], the KLUB loss; "
                        "recorded in the checkpoint, so fastlego sample and eval use its sampler) "
                        "(default: %(default)s)")
    p.add_argument("--outdir", required=True,
                   help="the run folder: checkpoint.pt, metrics.jsonl and config.json go there (required; a folder "
                        "that holds another run is refused unless --resume auto or --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --outdir: start afresh, its metrics.jsonl emptied and its "
                        "checkpoint.pt removed (default: refuse)")
    p.add_argument("--resolution", type=_positive_int("--resolution"), default=None,
                   help="training resolution; images are center-cropped and resized (default: the data's; 16 for digits)")
    net = p.add_mutually_exclusive_group()
    net.add_argument("--preset", default=None, choices=list(PRESETS), metavar="PRESET",
                     help=f"a LEGO preset of the release: {', '.join(PRESETS)} (default: none; --bricks is used)")
    net.add_argument("--bricks", default=None,
                     help="an explicit brick stack REGION:TYPE:DEPTH,... where TYPE is a release brick "
                          "(lego_{S,L,XL}_{2,4,8,16}: widths 384, 1024, 1152 with that patch size) or a custom "
                          "width written w<WIDTH>p<PATCH>h<HEADS>, e.g. 8:w128p4h4:1,16:w128p4h4:2 "
                          f"(default: {DEMO_BRICKS.replace('%', '%%')}, the demo's)")
    p.add_argument("--no-labels", action="store_true",
                   help="ignore the data's class labels (dataset.json in the folder or zip) and train "
                        "unconditionally (default: use them when there are any)")
    p.add_argument("--xflip", action="store_true", help="random horizontal flips of the training images (default: off)")
    p.add_argument("--max-images", type=_positive_int("--max-images"), default=None,
                   help="use only the first N images of the data (default: all)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=64,
                   help="global batch size, split evenly over the processes (default: %(default)s)")
    p.add_argument("--train-steps", "--steps", dest="train_steps", type=_number(int, "--steps", lo=0), default=1000,
                   help="total training steps; a resumed run counts its earlier steps (default: %(default)s)")
    p.add_argument("--minutes", type=_number(float, "--minutes", lo=0, lo_open=True), default=None,
                   help="also stop after this many minutes of training (default: no time limit)")
    p.add_argument("--lr", type=_number(float, "--lr", lo=0, lo_open=True), default=1e-4,
                   help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=_number(float, "--weight-decay", lo=0), default=0.0,
                   help="AdamW's decoupled weight decay; 0 is Adam, as the release (default: %(default)s)")
    p.add_argument("--warmup", type=_number(int, "--warmup", lo=0), default=0,
                   help="linear learning-rate warm-up over this many steps (default: %(default)s)")
    p.add_argument("--grad-clip", type=_number(float, "--grad-clip", lo=0, lo_open=True), default=None,
                   help="clip the global gradient norm to this value (default: no clipping)")
    p.add_argument("--ema", type=_number(float, "--ema", lo=0), default=500.0,
                   help="EMA half-life of the saved 'ema' weights, in thousands of images (default: %(default)s)")
    p.add_argument("--ema-rampup", type=_number(float, "--ema-rampup", lo=0), default=0.05,
                   help="EMA ramp-up: the half-life is at most this fraction of the images seen so far; "
                        "0 turns it off (default: %(default)s)")
    p.add_argument("--last-brick-only", action="store_true",
                   help="train only the last brick's output (default: every brick as a denoiser of its own, "
                        "the release's joint loss, which makes brick skipping work)")
    p.add_argument("--patch-diffusion", action="store_true",
                   help="Patch Diffusion (Wang et al. 2023): each step trains on random crops of size res/4, res/2 "
                        "or res (batch x4, x2, x1), each carrying its pixels' coordinates in the full image; only "
                        "the bricks whose regions tile a crop run on it (the header line says which); sampling "
                        "draws full images as usual. Needs a resolution that is a multiple of 4 and a first brick "
                        "that tiles res/4 (default: off)")
    p.add_argument("--real-p", type=_number(float, "--real-p", lo=0, hi=1), default=None,
                   help="with --patch-diffusion: the probability of a full-size step; crops of res/4 and res/2 "
                        "share the rest 2:3 (default 0.5)")
    p.add_argument("--progressive", action="store_true",
                   help="with --patch-diffusion: instead of drawing, train res/4 crops for the first (1-p)*2/5 of "
                        "training (20%%), res/2 until 1-p (50%%), then full images (default: off)")
    p.add_argument("--class-dropout", type=_number(float, "--class-dropout", lo=0, hi=0.999), default=0.1,
                   help="probability of dropping a training image's label, which classifier-free guidance "
                        "(--cfg when sampling) needs (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU (default: %(default)s)")
    p.add_argument("--seed", type=_number(int, "--seed", lo=0), default=0,
                   help="seed of the initial weights, the data order and every random draw (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=500,
                   help="write checkpoint.pt every N steps, and at the end (default: %(default)s)")
    p.add_argument("--log-every", type=_positive_int("--log-every"), default=50,
                   help="append the mean loss of the last N steps to metrics.jsonl every N steps (default: %(default)s)")
    p.add_argument("--workers", type=_number(int, "--workers", lo=0), default=0,
                   help="data-loading processes for image files (into pinned memory on a GPU); 0 loads in this "
                        "process. The bundled digits are held on the GPU and need none (default: %(default)s)")
    _add_run_options(p, checkpointing="", step="the whole training step")
    p.set_defaults(func=cmd_train)

    # sample -------------------------------------------------------------------------------
    p = sub.add_parser("sample", help="generate images from a trained network (torchrun for several GPUs)",
                       description="EDM Heun sampling (beta diffusion's sampler for a network trained with "
                                   "--process beta, found from its checkpoint) with optional guidance and brick "
                                   "skipping; any size that the bricks' regions tile, non-square (panoramas) "
                                   "included. One image per seed: an image depends only on its seed. For several "
                                   "GPUs (e.g. the 50,000 images of an FID set): torchrun --nproc_per_node N -m "
                                   "fastlego sample ... splits the batches over the processes and writes the same "
                                   "files as one process.")
    p.add_argument("--network", required=True,
                   help="the network to sample: a fastlego training checkpoint (OUTDIR/checkpoint.pt of fastlego "
                        "train), a release .pkl or a .safetensors file, or the checkpoint of fastlego distill (a "
                        "one-step generator: one network evaluation per image) (required)")
    p.add_argument("--which", choices=["ema", "model"], default="ema",
                   help="weights of a training checkpoint (the key of a release .pkl): ema, the moving average, "
                        "or model, the trained weights themselves (default ema)")
    p.add_argument("--outdir", required=True,
                   help="folder for grid.png, images/ and samples.npz, created if missing; files already there "
                        "are not replaced without --overwrite (required)")
    p.add_argument("--seeds", default="0-15",
                   help="one image per seed, e.g. 0-63, 1,5,9 or 0-9,100; each seed listed once (default 0-15)")
    p.add_argument("--class", dest="class_idx", type=_number(int, "--class", lo=0), default=None,
                   help="class of every image, for class-conditional networks (default: a random class per seed, "
                        "drawn from that seed)")
    p.add_argument("--resolution", type=_positive_int("--resolution"), default=None,
                   help="square output size in pixels, a multiple of every brick's region size (default: the "
                        "training resolution)")
    p.add_argument("--height", type=_positive_int("--height"), default=None,
                   help="output height in pixels (default: --resolution, else the training resolution)")
    p.add_argument("--width", type=_positive_int("--width"), default=None,
                   help="output width in pixels, e.g. 4x the height for a panorama (default: --resolution, else "
                        "the training resolution)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=64,
                   help="images per network call (default 64); under torchrun each process runs whole batches, "
                        "so N processes need at least N batches to all be busy")
    _add_sampler_args(p)
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png (default: write it)")
    p.add_argument("--grid-columns", type=_positive_int("--grid-columns"), default=None,
                   help="images per grid row (default: the square root of the number of images, rounded up)")
    p.add_argument("--grid-pad", type=_number(int, "--grid-pad", lo=0), default=0,
                   help="gray pixels between and around grid images (default 0)")
    p.add_argument("--grid-scale", type=_positive_int("--grid-scale"), default=1,
                   help="enlarge the grid N times, nearest neighbour, for small images (default 1)")
    p.add_argument("--images", action="store_true",
                   help="also write one PNG per seed, images/SEED.png with SEED zero-padded to 6 digits (default: off)")
    p.add_argument("--npz", action="store_true",
                   help="also write samples.npz: uint8 NHWC images under arr_0 as FID tools read them, plus seeds "
                        "and labels (default: off)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace sample files already in --outdir (grid.png, images/SEED.png, samples.npz) "
                        "(default: refuse before sampling, naming them)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu; under torchrun each process "
                        "takes the GPU of its LOCAL_RANK)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="the network's precision: fp32, or bf16 / fp16 autocast, or fp8 (the DiT blocks' linears "
                        "in e4m3 on FP8 tensor cores, compute capability 8.9+; the rest bf16), or fp8_fast (fp8 "
                        "with the tensor cores' fast accumulation: faster, about twice the GEMMs' error), or fp8_emulated "
                        "(fp8's numerics with plain ops on any device, slow: to measure its effect); the "
                        "sampler's own state stays in fp64 (default fp32)")
    graph = p.add_mutually_exclusive_group()
    graph.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=None,
                       help="insist on replaying the network as a CUDA graph per batch shape (a failed capture "
                            "stops the run) (default: graphs on CUDA, eager with a message if capture fails)")
    graph.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                       help="run every network call eagerly, e.g. to profile op by op (default: graphs on CUDA)")
    p.add_argument("--deterministic", action="store_true",
                   help="fix every kernel choice by a fixed rule instead of the tuned table (fastlego.set_deterministic), so that "
                        "GPU runs, and the processes of a torchrun run, give the bits of one process; slower "
                        "(default: off; CPU runs are reproducible without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")
    p.set_defaults(func=cmd_sample)

    # distill ------------------------------------------------------------------------------
    _add_distill_parser(sub)

    # eval ---------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="sample a digits network and measure its samples (fastlego.metrics)",
                       description="Draw N images of every digit from a network trained on the bundled digits "
                                   "(EDM Heun, or beta diffusion's sampler for a beta network; same seeds every "
                                   "run) and measure them with fastlego's digits classifier: class agreement (the "
                                   "fraction read as the digit asked for), the Frechet distance of the classifier's "
                                   "features to the real digits', and per-class counts.")
    p.add_argument("--network", required=True,
                   help="a fastlego training checkpoint (.pt), a saved network, or a fastlego distill checkpoint "
                        "(a one-step generator) (required)")
    p.add_argument("--which", choices=["ema", "model"], default="ema",
                   help="weights of a training checkpoint (default ema)")
    p.add_argument("--per-class", type=_positive_int("--per-class"), default=50,
                   help="images per digit (default 50: 500 images)")
    p.add_argument("--seed", type=_number(int, "--seed", lo=0), default=0,
                   help="first seed; image i uses seed + i (default 0)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=250, help="images per sampler batch (default 250)")
    _add_sampler_args(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="sampling precision, as `fastlego sample --precision` (default fp32)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    # bench / info -------------------------------------------------------------------------
    p = sub.add_parser("bench", help="speed benchmarks (fastlego.benchmark; its own options follow)", add_help=False)
    p.set_defaults(func=None, passthrough=True)
    p = sub.add_parser("info", help="environment, presets, backends and what runs where (fastlego.explain)",
                       description="Print the environment (Python, torch, CUDA, GPU, Triton, flash-attn, xformers, "
                                   "backend mode), the LEGO presets (regions, brick types, depths), and for one "
                                   "forward of a preset which backend runs each op and why the others refused.")
    p.add_argument("--preset", default="lego_S_PG_64", metavar="NAME",
                   help="the preset whose forward is explained, one of those listed (default lego_S_PG_64)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=2,
                   help="batch size of the explained forward (default 2)")
    p.add_argument("--device", default=None,
                   help="device of the explained forward, cpu or cuda (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_info)
    return parser


def _add_distill_parser(sub) -> None:
    from .distill import DistillConfig as D
    p = sub.add_parser("distill", help="distill a diffusion network into a one-step generator (SiD; torchrun for "
                                       "several GPUs)",
                       description="Score identity Distillation (SiD, Zhou et al. 2024): a generator that draws each "
                                   "image in one network evaluation, G(sigma_init z; sigma_init), learns from the "
                                   "frozen teacher and a fake-score network of its own samples, both started from "
                                   "the teacher's weights; no data needed. The result samples with fastlego sample "
                                   "--network OUTDIR/checkpoint.pt and measures with fastlego eval. For several GPUs: "
                                   "torchrun --nproc_per_node N -m fastlego distill ... (the batch is split evenly). A "
                                   "folder that already holds a run is never overwritten silently: continue it with "
                                   "--resume auto, or replace it with --overwrite.")
    p.add_argument("--teacher", required=True,
                   help="the teacher: a fastlego training checkpoint (OUTDIR/checkpoint.pt of fastlego train), a "
                        "release .pkl or a .safetensors file (required)")
    p.add_argument("--which", choices=["ema", "model"], default=D.which,
                   help="the teacher checkpoint's weights: ema (the moving average) or model (default: %(default)s)")
    p.add_argument("--outdir", required=True,
                   help="the run folder: checkpoint.pt, metrics.jsonl and config.json go there (required; a folder "
                        "that holds another run is refused unless --resume auto or --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --outdir (default: refuse)")
    p.add_argument("--batch", type=_positive_int("--batch"), default=D.batch_size,
                   help="global batch of each half-step (fake score, generator), split evenly over the processes "
                        "(default: %(default)s)")
    p.add_argument("--steps", dest="distill_steps", type=_number(int, "--steps", lo=0), default=D.steps,
                   help="total steps, each one fake-score update and one generator update; a resumed run counts "
                        "its earlier steps (default: %(default)s)")
    p.add_argument("--minutes", type=_number(float, "--minutes", lo=0, lo_open=True), default=None,
                   help="also stop after this many minutes (default: no time limit)")
    p.add_argument("--lr", type=_number(float, "--lr", lo=0, lo_open=True), default=D.lr,
                   help="the generator's Adam learning rate; the paper uses 1e-5, 4e-6 at ImageNet scale "
                        "(default: %(default)s)")
    p.add_argument("--fake-lr", type=_number(float, "--fake-lr", lo=0, lo_open=True), default=None,
                   help="the fake score's Adam learning rate (default: --lr)")
    p.add_argument("--beta1", type=_number(float, "--beta1", lo=0, hi=0.999), default=D.betas[0],
                   help="Adam's beta1 for both networks (default: %(default)s)")
    p.add_argument("--beta2", type=_number(float, "--beta2", lo=0, hi=0.9999), default=D.betas[1],
                   help="Adam's beta2 for both networks (default: %(default)s)")
    p.add_argument("--eps", type=_number(float, "--eps", lo=0, lo_open=True), default=D.eps,
                   help="Adam's epsilon for both networks (default: %(default)s)")
    p.add_argument("--alpha", type=_number(float, "--alpha"), default=D.alpha,
                   help="SiD's alpha in (y_real - y_fake) ((y_real - x_g) - alpha (y_real - y_fake)) "
                        "(default: %(default)s)")
    p.add_argument("--tmax", type=_number(float, "--tmax", lo=0, lo_open=True, hi=1000), default=D.tmax,
                   help="the generator step's noise: t ~ U(0, tmax/1000) on EDM's sigma schedule, 0 being sigma_min "
                        "0.002 (default: %(default)s)")
    p.add_argument("--sigma-init", type=_sigma("--sigma-init"), default=D.sigma_init,
                   help="the generator's input noise level: x_g = G(sigma_init z; sigma_init) (default: %(default)s)")
    p.add_argument("--loss-scale", type=_number(float, "--loss-scale", lo=0, lo_open=True), default=D.loss_scale,
                   help="the generator loss's scale over the batch (default: %(default)s)")
    p.add_argument("--fake-loss-scale", type=_number(float, "--fake-loss-scale", lo=0, lo_open=True),
                   default=D.fake_loss_scale, help="the fake-score loss's scale over the batch (default: %(default)s)")
    p.add_argument("--teacher-cfg", type=_number(float, "--teacher-cfg", lo=0), default=None,
                   help="distill the teacher's guided denoiser uncond + w (cond - uncond), so that the one-step "
                        "generator draws what guidance w would (default: no guidance, the paper's setting)")
    p.add_argument("--class-dropout", type=_number(float, "--class-dropout", lo=0, hi=0.999), default=None,
                   help="probability that an image is drawn, scored and judged without its label by all three "
                        "networks (default: the teacher's training label dropout)")
    p.add_argument("--ema", type=_number(float, "--ema", lo=0), default=D.ema_halflife_kimg,
                   help="EMA half-life of the generator's saved 'ema' weights, in thousands of images "
                        "(default: %(default)s)")
    p.add_argument("--ema-rampup", type=_number(float, "--ema-rampup", lo=0), default=D.ema_rampup,
                   help="EMA ramp-up: the half-life is at most this fraction of the images seen so far; 0 turns it "
                        "off (default: %(default)s)")
    p.add_argument("--grad-clip", type=_number(float, "--grad-clip", lo=0, lo_open=True), default=None,
                   help="clip each network's global gradient norm to this value (default: no clipping)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=D.precision,
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU (default: %(default)s)")
    p.add_argument("--seed", type=_number(int, "--seed", lo=0), default=D.seed,
                   help="seed of every random draw (latents, labels, noise) (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=D.checkpoint_every,
                   help="write checkpoint.pt every N steps, and at the end (default: %(default)s)")
    p.add_argument("--log-every", type=_positive_int("--log-every"), default=D.log_every,
                   help="append the mean losses of the last N steps to metrics.jsonl every N steps "
                        "(default: %(default)s)")
    _add_run_options(p, checkpointing=", in all three networks", step="the whole step (both updates)")
    p.set_defaults(func=cmd_distill)


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
    except (ValueError, FileNotFoundError, FileExistsError, dispatch.BackendNotSupported) as exc:
        # Bad values found past argparse (sizes that the bricks cannot tile, missing files, outputs
        # that would be overwritten, a mode this machine cannot run, ...): one clear message, no traceback.
        world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: say which process speaks
        where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
        print(f"fastlego {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
