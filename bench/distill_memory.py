"""GPU memory and step time of SiD distillation (`fastlego distill`) on one CUDA GPU.

    python3 bench/distill_memory.py                                   # lego_S_PG_64:64 and lego_L_PG_64:32
    python3 bench/distill_memory.py lego_S_PG_64:128,lego_L_PG_64:64 --steps 5 --json distill_memory.json
    python3 bench/distill_memory.py lego_L_PG_64:64 --checkpointing block --blocks 12

A distillation step holds three networks (the frozen teacher, the generator, the fake score), two
Adam optimizers (generator and fake score: two fp32 moments each) and the generator's EMA, and
runs one fake-score update (a generator forward without a graph, the fake score's forward and
backward) then one generator update (the generator's forward and backward through the teacher's
and the fake score's forward and input backward). For each PRESET:BATCH (64x64 images, 1000
classes, a teacher with randomised weights: values change neither memory nor time) it builds
`fastlego.distill.Distiller` as `fastlego distill` does (bf16 autocast, fp32 weights, the whole
step replayed as one CUDA graph unless --no-graph) and reports:

- resident: weights of the three networks + the EMA, optimizer states and gradients, after the
  warm-up steps (what stays allocated between steps);
- first steps' peak: the maximum allocated over the warm-up steps (the graph capture included);
- steady peak: the maximum allocated over the timed steps. Eagerly, the number to size a GPU by;
  under a CUDA graph the step's activations live in the graph's private pool, allocated once at
  capture, so this column shows only what lies outside it and "reserved" is the number to size by;
- reserved: the most memory PyTorch's allocator held (graph pools included; whole process);
- median step time and images per second (one batch through each half of the step).

All memory is counted above what was allocated before the networks were built, in GiB. For the
plain training step's peak at the same batch, see `fastlego bench --modes train`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlego.distill import DistillConfig, Distiller  # noqa: E402
from fastlego.networks import build_network, network_spec  # noqa: E402
from fastlego.testing import randomize_  # noqa: E402

GIB = float(1 << 30)
DEFAULT = "lego_S_PG_64:64,lego_L_PG_64:32"


def measure(preset: str, batch: int, args, dev: torch.device) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    spec = network_spec(64, 3, 1000, preset=preset, intermediate=True, class_dropout_prob=0.1)
    teacher = randomize_(build_network(spec), seed=1, scale=args.scale).to(dev)
    cfg = DistillConfig(teacher="(in memory)", batch_size=batch, precision=args.precision,
                        cuda_graph=not args.no_graph, activation_checkpointing=args.checkpointing,
                        checkpoint_blocks=args.blocks, teacher_cfg=args.teacher_cfg)
    distiller = Distiller(teacher, cfg, dev).prepare()
    weights = (torch.cuda.memory_allocated(dev) - start) / GIB
    gen = torch.Generator(dev).manual_seed(0)
    draws = [distiller.draw(gen, batch) for _ in range(2)]
    distiller.tune(*draws[0])
    warmup = 4 if distiller.graphed else 1      # a graph step is captured after 3 eager ones
    nimg = 0
    for i in range(warmup):
        distiller.step(*draws[i % 2])
        nimg += batch
        distiller.update_ema(batch, nimg)
    torch.cuda.synchronize(dev)
    first_peak = (torch.cuda.max_memory_allocated(dev) - start) / GIB
    resident = (torch.cuda.memory_allocated(dev) - start) / GIB
    torch.cuda.reset_peak_memory_stats(dev)
    times = []
    stats = None
    for i in range(args.steps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        stats = distiller.step(*draws[i % 2])
        nimg += batch
        distiller.update_ema(batch, nimg)
        t1.record()
        torch.cuda.synchronize(dev)
        times.append(t0.elapsed_time(t1))
    steady_peak = (torch.cuda.max_memory_allocated(dev) - start) / GIB
    reserved = torch.cuda.max_memory_reserved(dev) / GIB
    row = {"preset": preset, "batch": batch, "parameters_per_network": sum(p.numel() for p in teacher.parameters()),
           "weights_gib": weights, "resident_gib": resident, "first_steps_peak_gib": first_peak,
           "steady_peak_gib": steady_peak, "max_reserved_gib": reserved, "median_step_ms": statistics.median(times),
           "images_per_s": batch / (statistics.median(times) / 1000), "cuda_graph": distiller.captured,
           "skipped_last_step": [int(stats[2]), int(stats[3])], "precision": args.precision,
           "activation_checkpointing": args.checkpointing, "checkpoint_blocks": args.blocks,
           "teacher_cfg": args.teacher_cfg}
    del distiller, teacher, draws, stats
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="?", default=DEFAULT, help=f"PRESET:BATCH,... (default {DEFAULT})")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up (default 5)")
    p.add_argument("--no-graph", action="store_true", help="run the step eagerly (default: one CUDA graph)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = bf16 autocast on CUDA, as fastlego distill (default auto)")
    p.add_argument("--checkpointing", choices=["brick", "block"], default=None,
                   help="activation checkpointing in all three networks (default: off)")
    p.add_argument("--blocks", type=int, default=None, help="with --checkpointing block: the first N DiT blocks only")
    p.add_argument("--teacher-cfg", type=float, default=None,
                   help="distill the guided teacher (twice the teacher's batch) (default: no guidance)")
    p.add_argument("--scale", type=float, default=0.3, help="scale of the randomised teacher weights (default 0.3)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/distill_memory.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    print(f"SiD distillation step on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"{'CUDA graph' if not args.no_graph else 'eager'}, precision {args.precision}"
          f"{', checkpointing ' + args.checkpointing if args.checkpointing else ''}")
    print(f"{'preset':<14}{'batch':>6}{'params/net':>12}{'resident':>10}{'1st peak':>10}{'peak':>9}{'reserved':>10}"
          f"{'ms/step':>9}{'img/s':>8}")
    for item in [s.strip() for s in args.workloads.split(",") if s.strip()]:
        preset, _, batch = item.partition(":")
        try:
            row = measure(preset, int(batch or 64), args, dev)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{preset:<14}{batch:>6}  out of memory: {str(exc).splitlines()[0]}")
            rows.append({"preset": preset, "batch": int(batch or 64), "error": "out of memory"})
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        print(f"{preset:<14}{row['batch']:>6}{row['parameters_per_network'] / 1e6:>11.1f}M{row['resident_gib']:>9.2f}G"
              f"{row['first_steps_peak_gib']:>9.2f}G{row['steady_peak_gib']:>8.2f}G{row['max_reserved_gib']:>9.2f}G"
              f"{row['median_step_ms']:>9.1f}"
              f"{row['images_per_s']:>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": rows}, f,
                      indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
