"""Sample quality on the bundled digits: a small shipped classifier, class agreement, Frechet distance.

`fastlego.metrics` is the yardstick for every faster or cheaper way of drawing digits (brick
skipping, lower precision, distillation, other training or diffusion schemes): the same seeds
drawn both ways, measured the same way.

- `DigitsClassifier`: a 4-layer CNN on 16x16 digits (18.5k parameters, shipped as float16 in
  `fastlego/data/digits_classifier.npz`), trained by `train_classifier` on a fixed split of the
  1,797 bundled digits: image i is held out when i % 5 == 0 (360 images), the other 1,437 train.
  `held_out_accuracy()` measures the shipped weights on the held-out fifth.
- `evaluate_samples(images, class_ids)`: (a) class agreement, the fraction of samples the
  classifier reads as the digit they were asked for; (b) the Frechet distance between the
  classifier's penultimate features (32 per image) of the samples and of the 1,797 real digits,
  `|mu_s - mu_r|^2 + Tr(S_s + S_r - 2 (S_s S_r)^(1/2))`; (c) per-class counts, how often each
  asked digit was read as each digit. Both (a) and (b) come with what real digits score at the
  same sample count (`real_floor`): the Frechet distance of N real digits is not 0, and it grows
  as N shrinks, so a sample set is judged against that floor, not against 0.
- `evaluate_network(net, per_class, seed)`: draws `per_class` images of every digit (seeds
  `seed, seed + 1, ...`, digit i % 10) with EDM's Heun sampler and measures them.
- `fastlego eval --network CKPT`: the same from the command line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits_classifier.npz")
CLASSIFIER_RESOLUTION = 16
NUM_CLASSES = 10
FEATURE_DIM = 32
HOLD_OUT_EVERY = 5          # image i of the bundled digits is held out when i % 5 == 0


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------

class DigitsClassifier(nn.Module):
    """16x16 gray digit in [-1, 1] -> 10 logits; `features` gives the 32 penultimate activations.

    conv3x3(1->16) at 16x16, conv3x3/2(16->32) to 8x8, conv3x3/2(32->32) to 4x4, 2x2 average
    pool to 2x2 (128 values), Linear(128, 32) + ReLU (the features), Linear(32, 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(128, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = prepare_images(x).to(self.fc1.weight.dtype)
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        h = F.avg_pool2d(h, 2).flatten(1)
        return F.relu(self.fc1(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """Images as the classifier reads them: float (N, 1, 16, 16) in [-1, 1].

    Takes float (N, C, H, W) in [-1, 1] (what the sampler returns) or uint8 (N, C, H, W) in
    0..255; C = 3 is averaged to gray; other sizes are resized (area when shrinking, bilinear
    when enlarging). Values are clipped to [-1, 1], as writing a PNG would."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 (gray) or 3 (RGB) channels, got {images.shape[1]}")
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    if not torch.isfinite(x).all():
        raise ValueError("images hold NaN or inf values: the network that made them diverged")
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    r = CLASSIFIER_RESOLUTION
    if x.shape[2:] != (r, r):
        shrink = x.shape[2] >= r and x.shape[3] >= r
        x = F.interpolate(x, size=(r, r), mode="area" if shrink else "bilinear",
                          **({} if shrink else {"align_corners": False}))
    return x.clamp(-1, 1)


def digits_split():
    """The fixed split: (train images, train labels, held-out images, held-out labels), images
    float (N, 1, 16, 16) in [-1, 1] as the training pipeline makes them."""
    from .data import images_to_float, load_digits

    images, labels = load_digits(CLASSIFIER_RESOLUTION)
    x = images_to_float(images)
    held = torch.arange(len(x)) % HOLD_OUT_EVERY == 0
    return x[~held], labels[~held], x[held], labels[held]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel each way (zero padding is black, the background) and
    light Gaussian noise: the classifier should read a digit, not its exact pixel grid."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=g)
    dx = torch.randint(0, 3, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(16))[:, None, :, None].expand(n, 1, 16, 18)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(16))[:, None, None, :].expand(n, 1, 16, 16)
    shifted = shifted.gather(3, cols)
    return (shifted + 0.1 * torch.randn(shifted.shape, generator=g)).clamp(-1, 1)


def train_classifier(seed: int = 0, epochs: int = 60, batch: int = 64, lr: float = 3e-3,
                     progress: bool = False) -> DigitsClassifier:
    """Train a DigitsClassifier on the training split (CPU, a few tens of seconds).

    Adam with a cosine-decayed rate, shift + noise augmentation. The shipped weights were made
    by this function with its defaults, then rounded to float16."""
    x, y, _, _ = digits_split()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def save_classifier(model: DigitsClassifier, path: str = CLASSIFIER_PATH) -> None:
    """Write the weights as float16 arrays (what ships in the package)."""
    np.savez_compressed(path, **{k: v.detach().cpu().numpy().astype(np.float16)
                                 for k, v in model.state_dict().items()})


_CLASSIFIERS: Dict[str, DigitsClassifier] = {}


def load_classifier(device="cpu") -> DigitsClassifier:
    """The shipped classifier (eval mode, no gradients, float32 weights from the float16 file)."""
    device = torch.device(device)
    key = str(device)
    if key not in _CLASSIFIERS:
        if not os.path.exists(CLASSIFIER_PATH):
            raise FileNotFoundError(f"the digits classifier's weights are missing ({CLASSIFIER_PATH}): "
                                    f"reinstall fastlego, or make them with fastlego.metrics.train_classifier() "
                                    f"and save_classifier()")
        model = DigitsClassifier()
        with np.load(CLASSIFIER_PATH) as f:
            state = {k: torch.from_numpy(f[k].astype(np.float32)) for k in f.files}
        model.load_state_dict(state, strict=True)
        _CLASSIFIERS[key] = model.eval().requires_grad_(False).to(device)
    return _CLASSIFIERS[key]


@torch.no_grad()
def _features_and_logits(images: torch.Tensor, device="cpu", batch: int = 1024):
    model = load_classifier(device)
    feats, logits = [], []
    for i in range(0, images.shape[0], batch):
        f = model.features(images[i:i + batch].to(device))
        feats.append(f.double().cpu())
        logits.append(model.fc2(f).double().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits)


def held_out_accuracy(device="cpu") -> float:
    """The shipped classifier's accuracy on the held-out fifth of the digits."""
    _, _, x, y = digits_split()
    _, logits = _features_and_logits(x, device)
    return float((logits.argmax(1) == y).double().mean())


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------

def feature_statistics(features: np.ndarray):
    """Mean (d,) and covariance (d, d) in float64; N >= 2 rows."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows of shape (N, d), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians.

    Tr (C1 C2)^(1/2) is computed as Tr (C1^(1/2) C2 C1^(1/2))^(1/2): the product is symmetric
    positive semi-definite, so both roots come from symmetric eigendecompositions (no complex
    parts, no iteration), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root1 = _sqrt_psd(cov1)
    cross = root1 @ cov2 @ root1
    w = np.linalg.eigvalsh((cross + cross.T) / 2)
    tr_root = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_root)
    return max(d, 0.0)


_REAL: Dict[str, tuple] = {}


def _real_digits(device="cpu"):
    """(features, labels, classifier logits, feature mean, feature covariance) of all 1,797
    real digits, cached per device."""
    key = str(device)
    if key not in _REAL:
        from .data import images_to_float, load_digits

        images, labels = load_digits(CLASSIFIER_RESOLUTION)
        feats, logits = _features_and_logits(images_to_float(images), device)
        _REAL[key] = (feats, labels.numpy(), logits.numpy(), *feature_statistics(feats))
    return _REAL[key]


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

@dataclass
class QualityReport:
    """What `evaluate_samples` measures; every field is plain JSON."""

    n: int                                  # samples measured
    agreement: float                        # fraction read as the digit asked for
    frechet_distance: float                 # of the classifier's features, samples vs real digits
    counts: List[List[int]]                 # counts[asked][read]
    real_floor: Dict[str, float] = field(default_factory=dict)  # real digits at the same N

    def per_class_agreement(self) -> List[float]:
        return [row[i] / max(sum(row), 1) for i, row in enumerate(self.counts)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_class_agreement"] = self.per_class_agreement()
        return d

    def summary(self) -> str:
        floor = self.real_floor
        fd_floor = f" (real digits at N={self.n}: {floor['frechet_distance']:.2f} +- {floor['frechet_distance_std']:.2f})" \
            if "frechet_distance" in floor else ""
        return f"agreement {100 * self.agreement:.1f}%, Frechet distance {self.frechet_distance:.2f}{fd_floor}"

    def table(self) -> str:
        """Per asked digit: images, read correctly, and the digit most often read instead."""
        lines = ["digit  n  agree  most confused with"]
        for i, row in enumerate(self.counts):
            n = sum(row)
            wrong = [(c, j) for j, c in enumerate(row) if j != i and c]
            other = f"{max(wrong)[1]} ({max(wrong)[0]})" if wrong else "-"
            lines.append(f"{i:5d} {n:3d} {100 * row[i] / max(n, 1):5.1f}%  {other}")
        return "\n".join(lines)


def _check_ids(class_ids, n: int) -> np.ndarray:
    ids = np.asarray(class_ids.cpu() if isinstance(class_ids, torch.Tensor) else class_ids).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"class_ids has {ids.shape[0]} entries but there are {n} images: one digit per image")
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= NUM_CLASSES):
        raise ValueError(f"class_ids must be integers in 0..{NUM_CLASSES - 1} (the digit each image was asked for)")
    return ids.astype(np.int64)


def real_floor(n: int, class_ids=None, draws: int = 5, device="cpu") -> Dict[str, float]:
    """What real digits score at sample count n: `draws` fixed random sets of n real digits
    (the same digits as `class_ids` asks for, when given) measured against all of them; the
    mean and the spread (standard deviation) of the Frechet distance, and the agreement."""
    feats, labels, logits, mu, cov = _real_digits(device)
    rng = np.random.default_rng(12345)
    ids = None if class_ids is None else _check_ids(class_ids, n)
    fds, agree = [], []
    for _ in range(draws):
        if ids is None:
            pick = rng.choice(len(feats), size=n, replace=n > len(feats))
        else:
            pick = np.empty(n, np.int64)
            for c in range(NUM_CLASSES):
                where = np.flatnonzero(ids == c)
                pool = np.flatnonzero(labels == c)
                pick[where] = rng.choice(pool, size=len(where), replace=len(where) > len(pool))
        fds.append(frechet_distance(*feature_statistics(feats[pick]), mu, cov))
        agree.append(float((logits[pick].argmax(1) == labels[pick]).mean()))
    return {"frechet_distance": float(np.mean(fds)), "frechet_distance_std": float(np.std(fds)),
            "agreement": float(np.mean(agree)), "draws": draws}


def evaluate_samples(images: torch.Tensor, class_ids, device="cpu", floor: bool = True) -> QualityReport:
    """Measure digit samples (N, C, H, W) asked to be `class_ids` (N,): see the module docstring.
    `floor`: also measure real digits at the same N and classes (`QualityReport.real_floor`)."""
    n = images.shape[0] if isinstance(images, torch.Tensor) else 0
    ids = _check_ids(class_ids, n)
    if n < 2:
        raise ValueError(f"need at least 2 images to measure (a Frechet distance needs a covariance), got {n}")
    x = prepare_images(images)
    feats, logits = _features_and_logits(x, device)
    read = logits.argmax(1).numpy()
    _, _, _, mu, cov = _real_digits(device)
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(counts, (ids, read), 1)
    return QualityReport(n=n, agreement=float((read == ids).mean()),
                         frechet_distance=frechet_distance(*feature_statistics(feats), mu, cov),
                         counts=counts.tolist(), real_floor=real_floor(n, ids, device=device) if floor else {})


def balanced_class_ids(per_class: int) -> List[int]:
    """0, 1, ..., 9, 0, 1, ...: `per_class` images of every digit, one digit per seed."""
    return [i % NUM_CLASSES for i in range(per_class * NUM_CLASSES)]


def evaluate_network(net, per_class: int = 50, seed: int = 0, device=None, batch_size: int = 250,
                     progress: bool = False, **sampler) -> tuple:
    """Draw `per_class` images of every digit (seed + i for image i, digit i % 10) and measure
    them. `sampler`: `fastlego.sample`'s sampler arguments (num_steps, cfg_scale, t_break, ...).
    Returns (QualityReport, SampleResult). Under torchrun the processes share the sampling and
    rank 0, which gathers every image, measures them; the other ranks get (None, their share)."""
    from .sampling import sample

    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if label_dim != NUM_CLASSES:
        raise ValueError(f"this measure is for class-conditional digits networks (label_dim {NUM_CLASSES}); "
                         f"this network has label_dim {label_dim}: train one with `fastlego train --data digits`")
    ids = balanced_class_ids(per_class)
    seeds = list(range(seed, seed + len(ids)))
    res = sample(net, seeds, class_ids=ids, device=device, batch_size=batch_size, progress=progress, **sampler)
    if res.rank != 0:
        return None, res
    return evaluate_samples(res.images, ids), res


def cmd_eval(args) -> int:
    """`fastlego eval`: sample a digits network and print (and optionally save) its report."""
    import torch as _torch

    from .sampling import load_network

    dev = args.device or ("cuda" if _torch.cuda.is_available() else "cpu")
    net = load_network(args.network, which=args.which, device=dev)
    report, res = evaluate_network(
        net, per_class=args.per_class, seed=args.seed, device=dev, batch_size=args.batch,
        progress=not args.quiet, num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        rho=args.rho, S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise,
        cfg_scale=args.cfg, t_break=args.t_break, skip_stage_idx=args.skip_stage, precision=args.precision)
    if report is None:   # another rank of torchrun: rank 0 measures and reports
        return 0
    print(f"{args.network}: {report.n} images ({args.per_class} per digit, seeds {args.seed}-"
          f"{args.seed + report.n - 1}), {res.seconds:.1f} s of sampling")
    print(f"  {report.summary()}")
    print("  " + report.table().replace("\n", "\n  "))
    if args.json:
        from .beta import DEFAULT_SAMPLE_STEPS

        process = getattr(net, "process", "edm")   # beta diffusion, or EDM
        steps = args.steps or (DEFAULT_SAMPLE_STEPS if process == "beta" else 18)
        with open(args.json, "w") as f:
            json.dump({"network": args.network, "per_class": args.per_class, "seed": args.seed, "process": process,
                       "sampler": {"num_steps": steps, "cfg_scale": args.cfg, "t_break": args.t_break,
                                   "S_churn": args.S_churn, "precision": args.precision},
                       **report.to_dict()}, f, indent=2)
        print(f"  report: {args.json}")
    return 0
