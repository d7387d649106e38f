"""How far FP8 inference (`fastlego.quantize(model, "fp8")`) moves the denoiser and the digits it draws.

    python3 bench/fp8_accuracy.py --presets lego_S_PG_64 --batch 2            # (a), CPU: slow for L / XL
    python3 bench/fp8_accuracy.py --presets none --digits CKPT --cfg 2,none   # (b) only
    python3 bench/fp8_accuracy.py --device cuda --batch 8 --digits CKPT       # both, on a GPU

(a) Per preset, random non-zero weights (`fastlego.testing.randomize_`, seed 0), the EDM denoiser
    D(x; sigma) of a batch with sigmas spread from 0.05 to 20 (class-conditional, 1000 classes),
    computed in each precision: fp32; bf16 (autocast on the device); fp8 emulated (the FP8
    numerics in plain PyTorch, fp32 elsewhere); fp8 emulated under bf16 autocast (what the GPU
    path computes); on a GPU with FP8 tensor cores also fp8 on the tensor cores under bf16
    autocast, with precise and with fast accumulation (`fast_accumulation=True`). Relative error
    ||D - D_ref|| / ||D_ref|| against fp32 and against bf16, after each brick (the denoiser with
    the bricks up to it, as `return_stage_idx` would stop; read from one forward through hooks on
    the bricks).
(b) `--digits CKPT`, a digits network (e.g. the demo's): for each guidance (`--cfg`, "none" for
    no guidance) and each precision, `--seed-sets` sets of 200 images (20 of every digit; seeds
    0-199, 200-399, ...) drawn with EDM's 18 Heun steps and measured with `fastlego.metrics`
    (class agreement, Frechet distance of the classifier's features): per set, and mean +- std
    over the sets (the seed-to-seed spread). The same seeds in every precision. On the CPU, bf16
    is CPU autocast (its matmuls round like the GPU's; its kernels are not the GPU's).

Accuracy only; speed is not measured here (the emulated path is slower than fp32 by design).
Prints tables and writes --json when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastlego  # noqa: E402
from fastlego import fp8, metrics  # noqa: E402
from fastlego.edm import EDMPrecond  # noqa: E402
from fastlego.model import LegoBackbone  # noqa: E402
from fastlego.testing import randomize_  # noqa: E402

DEFAULT_PRESETS = "lego_S_PG_64,lego_L_PG_64,lego_XL_U_32"


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def variants(net, device: torch.device):
    """(name, network, bf16 autocast) for every precision measured on `device`."""
    emulated = fastlego.quantize(net, "fp8", emulate=True)
    out = [("fp32", net, False), ("bf16", net, True), ("fp8 emulated", emulated, False),
           ("fp8 emulated + bf16", emulated, True)]
    hardware = fastlego.quantize(net, "fp8")
    reasons = fp8.not_supported_reasons(hardware)
    if not reasons:
        out.append(("fp8 scaled_mm + bf16", hardware, True))
        out.append(("fp8 fast acc. + bf16", fastlego.quantize(net, "fp8", fast_accumulation=True), True))
    return out, reasons


# --------------------------------------------------------------------------------------------
# (a) per preset, per brick
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def denoiser_per_brick(net: EDMPrecond, x, sigma, labels, bf16: bool):
    """D(x; sigma) after each brick: c_skip x + c_out F_k, F_k the output of brick k (fp32)."""
    outs = []
    hooks = [brick.register_forward_hook(lambda m, a, o: outs.append(o.float())) for brick in net.model.model]
    try:
        with autocast(x.device, bf16):
            final = net(x, sigma, labels)
    finally:
        for h in hooks:
            h.remove()
    c_skip, c_out, _, _ = net.preconditioning(sigma.reshape(-1, 1, 1, 1))
    per_brick = [c_skip * x + c_out * f for f in outs]
    assert torch.allclose(per_brick[-1], final, rtol=1e-5, atol=1e-5)
    return per_brick


def rel(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def preset_errors(name: str, batch: int, device: torch.device, label_dim: int = 1000) -> dict:
    backbone = LegoBackbone.from_preset(name, in_channels=3, label_dim=label_dim)
    net = randomize_(EDMPrecond(max(backbone.img_resolution), 3, label_dim=label_dim, backbone=backbone), seed=0)
    net = net.eval().to(device)
    res = max(backbone.img_resolution)
    g = torch.Generator().manual_seed(0)
    sigma = torch.logspace(torch.log10(torch.tensor(0.05)), torch.log10(torch.tensor(20.0)), batch) if batch > 1 \
        else torch.tensor([1.0])
    x = (torch.randn(batch, 3, res, res, generator=g) * (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25).sqrt()).to(device)
    labels = torch.randint(0, label_dim, (batch,), generator=g).to(device)
    sigma = sigma.to(device)
    found, reasons = variants(net, device)
    outputs, seconds = {}, {}
    for vname, model, bf16 in found:
        t0 = time.perf_counter()
        outputs[vname] = denoiser_per_brick(model, x, sigma, labels, bf16)
        seconds[vname] = time.perf_counter() - t0
        print(f"  {name} {vname}: {seconds[vname]:.1f} s", flush=True)
    rows = []
    for vname in outputs:
        if vname == "fp32":
            continue
        for k, (out, ref32, ref16) in enumerate(zip(outputs[vname], outputs["fp32"], outputs["bf16"])):
            assert torch.isfinite(out).all(), f"{name} {vname}: non-finite output after brick {k}"
            rows.append({"preset": name, "variant": vname, "brick": k, "vs_fp32": rel(out, ref32),
                         "vs_bf16": None if vname == "bf16" else rel(out, ref16)})
    return {"preset": name, "batch": batch, "rows": rows, "seconds": seconds, "fp8_refused": reasons}


def print_presets(results) -> None:
    print("\n(a) relative error of the denoiser output, per brick (random non-zero weights)")
    print(f"{'preset':<14}{'variant':<22}{'brick':>6}{'vs fp32':>10}{'vs bf16':>10}")
    for r in results:
        for row in r["rows"]:
            vs16 = "-" if row["vs_bf16"] is None else f"{row['vs_bf16']:.4f}"
            print(f"{row['preset']:<14}{row['variant']:<22}{row['brick']:>6}{row['vs_fp32']:>10.4f}{vs16:>10}")


# --------------------------------------------------------------------------------------------
# (b) the digits quality measure
# --------------------------------------------------------------------------------------------

def digits_quality(ckpt: str, device: torch.device, cfgs, seed_sets: int, per_class: int, batch: int) -> dict:
    from fastlego.sampling import load_network, sample

    net = load_network(ckpt, device=device)
    found, reasons = variants(net, device)
    ids = metrics.balanced_class_ids(per_class)
    n = len(ids)
    out = {"checkpoint": os.path.basename(ckpt), "device": str(device), "images_per_set": n, "fp8_refused": reasons,
           "runs": []}
    for cfg in cfgs:
        for vname, model, bf16 in found:
            sets = []
            t0 = time.perf_counter()
            for s in range(seed_sets):
                seeds = list(range(s * n, (s + 1) * n))
                res = sample(model, seeds, class_ids=ids, cfg_scale=cfg, batch_size=batch, device=device,
                             precision="bf16" if bf16 else "fp32", progress=False)
                q = metrics.evaluate_samples(res.images, ids, floor=(s == 0))
                sets.append({"seeds": f"{seeds[0]}-{seeds[-1]}", "agreement": q.agreement,
                             "frechet_distance": q.frechet_distance, "real_floor": q.real_floor or None})
            ag = [r["agreement"] for r in sets]
            fd = [r["frechet_distance"] for r in sets]
            run = {"cfg": cfg, "variant": vname, "sets": sets,
                   "agreement_mean": statistics.mean(ag), "agreement_std": statistics.pstdev(ag),
                   "fd_mean": statistics.mean(fd), "fd_std": statistics.pstdev(fd),
                   "seconds": time.perf_counter() - t0}
            out["runs"].append(run)
            print(f"  guidance {cfg}, {vname}: agreement {100 * run['agreement_mean']:.1f} +- "
                  f"{100 * run['agreement_std']:.1f}%, Frechet {run['fd_mean']:.2f} +- {run['fd_std']:.2f} "
                  f"({run['seconds']:.0f} s)", flush=True)
    return out


def print_digits(d: dict) -> None:
    print(f"\n(b) digits quality ({d['checkpoint']}, {d['device']}): {d['images_per_set']} images per seed set, "
          f"mean +- std over the sets (population std)")
    print(f"{'guidance':<10}{'variant':<22}{'agreement %':>16}{'Frechet':>16}   per set (agreement / Frechet)")
    for cfg in dict.fromkeys(r["cfg"] for r in d["runs"]):
        runs = [r for r in d["runs"] if r["cfg"] == cfg]
        for r in runs:
            per = ", ".join(f"{100 * s['agreement']:.1f}/{s['frechet_distance']:.2f}" for s in r["sets"])
            print(f"{str(cfg):<10}{r['variant']:<22}{100 * r['agreement_mean']:>9.1f} +- {100 * r['agreement_std']:<4.1f}"
                  f"{r['fd_mean']:>9.2f} +- {r['fd_std']:<5.2f}  {per}")
        base = next((r for r in runs if r["variant"] == "bf16"), None)
        for r in runs:
            if r["variant"].startswith("fp8") and base is not None:
                d_ag = 100 * (r["agreement_mean"] - base["agreement_mean"])
                d_fd = r["fd_mean"] - base["fd_mean"]
                ok = abs(d_ag) <= 2 and abs(d_fd) <= base["fd_std"]
                print(f"{'':<10}gate {r['variant']} vs bf16: agreement {d_ag:+.1f} points (<= 2), Frechet "
                      f"{d_fd:+.2f} (within bf16's spread {base['fd_std']:.2f}): {'pass' if ok else 'FAIL'}")
                # the same seeds drawn both ways: the paired difference is much tighter than the spread
                paired = [a["frechet_distance"] - b["frechet_distance"] for a, b in zip(r["sets"], base["sets"])]
                print(f"{'':<10}  paired Frechet difference per seed set: "
                      f"{', '.join(f'{v:+.2f}' for v in paired)}")
        floor = runs[0]["sets"][0]["real_floor"]
        if floor:
            print(f"{'':<10}real digits, same count: agreement {100 * floor['agreement']:.1f}%, Frechet "
                  f"{floor['frechet_distance']:.2f} +- {floor['frechet_distance_std']:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=DEFAULT_PRESETS, help=f"comma-separated presets for (a), or none "
                   f"(default {DEFAULT_PRESETS})")
    p.add_argument("--batch", type=int, default=2, help="images per preset forward in (a) (default 2)")
    p.add_argument("--digits", metavar="CKPT", help="a digits network for (b) (a fastlego training checkpoint)")
    p.add_argument("--cfg", default="2,none", help="guidance scales for (b), 'none' for none (default 2,none)")
    p.add_argument("--seed-sets", type=int, default=3, help="seed sets for (b) (default 3: seeds 0-599)")
    p.add_argument("--per-class", type=int, default=20, help="images of each digit per set (default 20)")
    p.add_argument("--sample-batch", type=int, default=200, help="sampler batch in (b) (default 200)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    presets = [] if args.presets.strip().lower() in ("", "none") else [s.strip() for s in args.presets.split(",")]
    if presets:
        results["presets"] = [preset_errors(name, args.batch, device) for name in presets]
        print_presets(results["presets"])
        refused = results["presets"][0]["fp8_refused"]
        if refused:
            print("fp8 on the tensor cores not measured here: " + "; ".join(refused))
    if args.digits:
        cfgs = [None if c.strip().lower() in ("none", "1") else float(c) for c in args.cfg.split(",")]
        results["digits"] = digits_quality(args.digits, device, cfgs, args.seed_sets, args.per_class, args.sample_batch)
        print_digits(results["digits"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
