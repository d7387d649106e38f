"""Where a beta-diffusion network stands at each noise level, and what the KLUB pays for learning it.

    python3 bench/beta_noise_levels.py RUN/checkpoint.pt [--images 64] [--times 0.3,0.5,...]

For a digits network trained with `--process beta` (16x16, the bundled digits), at each time t:

- the network's clean-image estimate x0_hat from z_t ~ q(z_t | x0) of real digits (one draw each),
  as RMSE in pixel units (x0 mapped back to [0, 1]) against the true x0, against the mean digit
  of the image's class and against the mean of all digits: a network that learned what the class
  label says lands near the class mean at high noise, one that ignores it near the all-digit mean;
- "label effect": the RMSE between x0_hat under the true label and under another label (same z_t):
  how much the label moves the estimate;
- the KLUB (the training loss, summed over pixels, mean over images) of three fixed estimates:
  the all-digit mean, the class mean and the truth plus 2% noise. "gain" = KLUB(all-digit mean) -
  KLUB(class mean) is what the loss pays the network for reading the label at that t; compared
  across t it shows where the gradient signal is (the loss draws t uniformly).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastlego import beta  # noqa: E402
from fastlego.data import load_digits  # noqa: E402
from fastlego.sampling import load_network  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a `fastlego train --process beta` checkpoint of a 16x16 digits network")
    p.add_argument("--images", type=int, default=64, help="real digits, spread over the set (default 64)")
    p.add_argument("--times", default="0.1,0.3,0.5,0.6,0.7,0.8,0.9,0.99", help="times t in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    net = load_network(args.checkpoint)
    if getattr(net, "process", "edm") != "beta":
        raise SystemExit(f"{args.checkpoint} is not a beta-diffusion network (train it with --process beta)")
    o = net.options()
    u8, labels = load_digits(net.img_resolution)
    x = u8.to(torch.float64) / 127.5 - 1
    x0_all = beta.to_beta_range(x, o["scale"], o["shift"])
    class_mean = torch.stack([x0_all[labels == c].mean(0) for c in range(10)])
    all_mean = x0_all.mean(0)
    idx = torch.linspace(0, len(x) - 1, args.images).round().long()
    x0, lab = x0_all[idx], labels[idx]
    other = (lab + 3) % 10
    onehot = torch.nn.functional.one_hot(lab, 10).float()
    onehot_other = torch.nn.functional.one_hot(other, 10).float()

    def rmse(a, b):   # pixel units: x0 spans `scale`
        return float(((a - b) / o["scale"]).pow(2).mean().sqrt())

    print(f"{args.checkpoint}: {args.images} real digits, one forward draw each; RMSE in pixels of [0, 1]")
    print(f"{'t':>5}{'logit a':>9}{'vs truth':>10}{'vs class':>10}{'vs all':>9}{'label eff':>11}"
          f"{'KLUB all':>11}{'KLUB class':>12}{'gain':>9}{'KLUB 2%':>10}")
    for t in [float(s) for s in args.times.split(",")]:
        tt = torch.tensor(t, dtype=torch.float64)
        la_t = beta.logit_alpha(tt, o["logit_alpha_start"], o["logit_alpha_end"], o["schedule_power"])
        la_s = beta.logit_alpha(beta.EARLIER_TIME * tt, o["logit_alpha_start"], o["logit_alpha_end"],
                                o["schedule_power"])
        alpha_t, alpha_s = torch.sigmoid(la_t), torch.sigmoid(la_s)
        logit_z = beta.forward_sample(x0.float(), alpha_t.float().expand(len(x0)), o["eta"])
        with torch.no_grad():
            est = net.x0_from_logit(net(logit_z, la_t.expand(len(x0)), onehot).double())
            est_other = net.x0_from_logit(net(logit_z, la_t.expand(len(x0)), onehot_other).double())
        delta = beta.sigmoid_difference(la_s, la_t)

        def klub(x0_hat):
            return float(beta.klub(x0, x0_hat, alpha_t, alpha_s, delta, o["eta"]).flatten(1).sum(1).mean())

        noisy = (x0 + 0.02 * o["scale"] * torch.randn_like(x0)).clamp(o["shift"], o["shift"] + o["scale"])
        k_all, k_class = klub(all_mean.expand_as(x0)), klub(class_mean[lab])
        print(f"{t:>5.2f}{float(la_t):>9.2f}{rmse(est, x0):>10.3f}{rmse(est, class_mean[lab]):>10.3f}"
              f"{rmse(est, all_mean.expand_as(x0)):>9.3f}{rmse(est, est_other):>11.3f}{k_all:>11.2f}{k_class:>12.2f}"
              f"{k_all - k_class:>9.2f}{klub(noisy):>10.2f}")
    print(f"class mean as the estimate: RMSE {rmse(class_mean[lab], x0):.3f} against the truth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
