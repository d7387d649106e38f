"""Peak memory of a training step against how many DiT blocks are checkpointed, on one CUDA GPU.

    python3 bench/checkpoint_memory.py lego_XL_U_32:128 --blocks 0,6,9,12 [--graph] [--steps 3]

For each workload: the eager reference step's steady-state peak (`use_backend("reference")`,
the yardstick of the training memory target), then the fastlego step with the first N DiT blocks
checkpointed (`LegoBackbone.set_activation_checkpointing("block", blocks=N)`) for each N: its
steady-state peak, the ratio to the reference's and the median step time (one step per round,
`fastlego.benchmark.measure`; the timed comparisons live in `fastlego bench --modes train
--variants fastlego_graph_ckpt`).
The step is the bench's (`STEP_BUILDERS["train"]`: EDM loss, backward, fused AdamW; bf16
autocast, fp32 weights). Peak = max allocated over the steps after the first, minus what was
allocated before the network was built. Prints one table."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlego.benchmark import (GIB, STEP_BUILDERS, build_train_net, make_train_inputs,  # noqa: E402
                                measure, parse_cases, precision)


def steady_peak(case, dev, backend: str, blocks, graph: bool, steps: int):
    """(peak GiB above the start, median ms per step) of `steps` steps after the warm-up ones."""
    gc.collect()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(dev)
    net = build_train_net(case, dev)
    if blocks is not None:
        net.model.set_activation_checkpointing("block", blocks)
    inputs = make_train_inputs(case, dev)
    step = STEP_BUILDERS["train"](net, inputs, backend, dev, torch.bfloat16, cuda_graph=graph)
    with precision(dev):
        for _ in range(4 if graph else 1):       # a graph step is captured after 3 eager ones
            step()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        ms = measure(step, device=dev, rounds=steps, warmup=0, inner=1).median_ms
    peak = (torch.cuda.max_memory_allocated(dev) - start) / GIB
    del net, inputs, step
    return peak, ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", help="PRESET:BATCH,...")
    p.add_argument("--blocks", default="0", help="comma-separated counts of checkpointed blocks (all: every block)")
    p.add_argument("--graph", action="store_true", help="the fastlego step as a CUDA graph (fastlego train's default)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| workload | step | checkpointed blocks | peak GiB | / reference | ms / step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in parse_cases(args.workloads):
        ref, ref_ms = steady_peak(case, dev, "reference", None, False, args.steps)
        name = f"{case.preset} ({case.batch})"
        print(f"| {name} | reference eager | 0 | {ref:.1f} | 1.00 | {ref_ms:.0f} |", flush=True)
        for b in args.blocks.split(","):
            blocks = None if b.strip() == "all" else int(b)
            peak, ms = steady_peak(case, dev, "auto", blocks, args.graph, args.steps)
            label = "fastlego" + (" graph" if args.graph else " eager")
            print(f"| {name} | {label} | {b.strip()} | {peak:.1f} | {peak / ref:.3f} | {ms:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
