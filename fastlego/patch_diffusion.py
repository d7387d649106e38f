"""Patch Diffusion training for LEGO: random crops that carry their position in the full image.

Patch Diffusion (Wang et al., NeurIPS 2023) trains a diffusion model on random crops of several
sizes, each crop carrying its pixels' absolute positions in the full image as two coordinate
channels, and samples full images as usual. `fastlego train --patch-diffusion` (TrainConfig
`patch_diffusion=True`, `real_p`, `progressive`) does this with EDM's loss, unchanged, on the crops:

- Crop sizes. Every step draws ONE crop size for the whole global batch from (res/4, res/2, res)
  with probabilities ((1 - p) 2/5, (1 - p) 3/5, p), p = `real_p` (default 0.5: 0.2, 0.3, 0.5).
  With `progressive` the size follows the training progress instead: res/4 while the progress
  is below (1 - p) 2/5 (the first 20% at the default p), res/2 below 1 - p (until 50%), then
  full images (the public code's schedule: the cumulative probabilities as stage ends). Progress
  is step / steps, or, with a time budget and no step target, the training time / max_seconds
  (the larger of the two when both are set).
- Batch. The batch grows as the crop shrinks so the pixels per step stay about constant: a step
  of crop size res/4 takes 4 x batch_size images, res/2 2 x, full 1 x (`batch_multiplier`). The
  images are the next batch_size-sized batches of the run's data order, so the data stream (and
  its epochs) is the same as plain training's: a step consumes 4, 2 or 1 of its batches.
- Offsets. Each image gets its own uniformly random crop offset (row and column independently,
  0..res - size), so every pixel position is trained at every crop size.
- Coordinates. A crop's coordinate channels are its pixels' positions in the full image,
  normalised to [-1, 1] over the full resolution: exactly the slice of the full grid that LEGO
  builds for full images (`fastlego.reference.coordinate_channels`: rows channel first, columns
  second, `(i / (res - 1) - 0.5) * 2`), so a full-size crop is the ordinary input. The network
  takes them as `coords` (`EDMPrecond` / `LegoBackbone`); the Triton brick_embed kernel reads
  them, for crops of every size. Sampling draws full images with the full grid, as always.
- Bricks. A brick whose region is larger than the crop (or does not tile it) cannot run on it:
  a step runs only the bricks whose regions tile the crop, and since a brick reads the previous
  brick's output, those are a prefix of the stack (`bricks_for_crop`). The loss averages over
  those bricks' outputs (EDM's loss on each: the release's intermediate-stage loss, which needs
  `intermediate=True` when a crop runs fewer than all bricks). `bricks_per_crop_size` says which
  bricks train on which crop size; `check_patch_training` refuses, before any work, a setup in
  which a crop size that can be drawn trains no brick (e.g. a stack whose first brick covers the
  whole image, or the demo stack at resolution 16, whose smallest region 8 exceeds res/4 = 4).
  For a progressive-growth stack `4:...,16:...,32:...` at resolution 32: 8x8 crops train brick 0,
  16x16 crops bricks 0-1, full images all three.

Accounting. `nimg` counts the images drawn: a step adds batch_size x its multiplier (each crop
counts as one image), and the EMA's decay of that step uses the same count, so the EMA
half-life (`ema_halflife_kimg`) is measured in drawn images. The public Patch Diffusion code adds
the expected count per step, batch_size x E[multiplier] (1.9 at the default p), to its image
counter and EMA, the same on average; counting what each step drew is exact at every step and
keeps p = 1 identical to plain training. Learning-rate warm-up counts steps, as plain training.
The loss is fastlego's EDM loss, the mean over the crop's pixels and images (the public code
sums over pixels, so its small crops weigh less; Adam's step is nearly invariant to that scale).

Reproducibility and DDP. The crop size is drawn on the CPU from a generator seeded by the run's
seed (`PatchSchedule.generator`), advanced identically on every rank, so all ranks draw the same
size every step with no communication and no device sync; its state is saved in the
checkpoint. The offsets are drawn from the run's shared device generator for the whole global
batch, before the sigmas and the noise, and each rank keeps its slice, so N processes compute
what one process does. At p = 1 (full images only) no offset is drawn and every step is the
plain training step, bit for bit.

CUDA graphs. The training step is replayed as a CUDA graph on one CUDA process by default; with
crops the shapes change from step to step, so patch training keeps one graph per crop size
(each captured after its own eager warm-up steps, with its own memory pool: up to about 1.75x
the activation memory of one full-size graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .reference import coordinate_channels

# Crop sizes as fractions of the resolution (res/4, res/2, res) and the batch multiplier of each:
# the public code's 4x / 2x / 1x.
CROP_DIVISORS: Tuple[int, int, int] = (4, 2, 1)
BATCH_MULTIPLIERS: Dict[int, int] = {4: 4, 2: 2, 1: 1}


def crop_probabilities(real_p: float) -> Tuple[float, float, float]:
    """(P(res/4), P(res/2), P(res)) = ((1 - p) 2/5, (1 - p) 3/5, p)."""
    check_real_p(real_p)
    return ((1 - real_p) * 2 / 5, (1 - real_p) * 3 / 5, float(real_p))


def check_real_p(real_p) -> None:
    if isinstance(real_p, bool) or not isinstance(real_p, (int, float)) or not 0 <= real_p <= 1:
        raise ValueError(f"real_p is the probability of a full-size image and must lie in [0, 1], got {real_p!r} "
                         f"(the public code's default is 0.5)")


def crop_sizes(resolution: int) -> Tuple[int, int, int]:
    """(res/4, res/2, res)."""
    return tuple(resolution // d for d in CROP_DIVISORS)


def bricks_for_crop(regions: Sequence[int], size: int) -> List[int]:
    """The bricks that run on a size x size crop: the longest prefix of the stack whose regions
    tile it (size a multiple of the region). Empty when the first brick's region does not."""
    run = []
    for i, r in enumerate(regions):
        if size % int(r):
            break
        run.append(i)
    return run


@dataclass(frozen=True)
class PatchSchedule:
    """Which crop size each step trains on, for images of `resolution`."""

    resolution: int
    real_p: float = 0.5
    progressive: bool = False
    seed: int = 0

    def __post_init__(self):
        check_real_p(self.real_p)
        if self.real_p < 1 and self.resolution % 4:
            raise ValueError(f"patch diffusion crops res/4 and res/2: resolution {self.resolution} is not a multiple "
                             f"of 4; use one that is (e.g. {self.resolution + (-self.resolution) % 4}), or real_p=1")

    @property
    def sizes(self) -> Tuple[int, int, int]:
        return crop_sizes(self.resolution)

    @property
    def probabilities(self) -> Tuple[float, float, float]:
        return crop_probabilities(self.real_p)

    def used_sizes(self) -> List[int]:
        """The crop sizes that can occur (nonzero probability, or a stage of the progressive schedule)."""
        return [s for s, q in zip(self.sizes, self.probabilities) if q > 0]

    def multiplier(self, size: int) -> int:
        """How many times batch_size images a step of this crop size takes (4, 2, 1)."""
        for s, d in zip(self.sizes, CROP_DIVISORS):
            if s == size:
                return BATCH_MULTIPLIERS[d]
        raise ValueError(f"{size} is not a crop size of resolution {self.resolution}: expected one of {self.sizes}")

    def expected_multiplier(self) -> float:
        """E[multiplier] under the random schedule (1.9 at p = 0.5: 0.2 x 4 + 0.3 x 2 + 0.5 x 1)."""
        return sum(q * BATCH_MULTIPLIERS[d] for q, d in zip(self.probabilities, CROP_DIVISORS))

    def generator(self) -> torch.Generator:
        """The CPU generator the crop sizes are drawn from (same seed on every rank)."""
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + 7)

    def size_at(self, progress: float) -> int:
        """The progressive schedule's crop size at `progress` (0 at the start, 1 at the end):
        the first size whose cumulative probability exceeds it (full images from 1 - p on)."""
        cum = 0.0
        for s, q in zip(self.sizes, self.probabilities):
            cum += q
            if q > 0 and progress < cum:
                return s
        return self.resolution

    def draw(self, generator: torch.Generator, progress: float = 0.0) -> int:
        """This step's crop size: from the generator (one uniform draw, inverse CDF), or from
        `progress` when progressive (no draw)."""
        if self.progressive:
            return self.size_at(progress)
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        cum = 0.0
        for s, q in zip(self.sizes, self.probabilities):
            cum += q
            if q > 0 and u < cum:
                return s
        return self.resolution   # u above a cumulative sum that rounding left below 1


def bricks_per_crop_size(regions: Sequence[int], resolution: int, real_p: float = 0.5,
                         progressive: bool = False) -> Dict[int, List[int]]:
    """{crop size: indices of the bricks that train on it} for every crop size that can occur
    (`bricks_for_crop`); an empty list marks a size that would train no brick."""
    schedule = PatchSchedule(int(resolution), real_p, progressive)
    return {s: bricks_for_crop(regions, s) for s in schedule.used_sizes()}


def describe_bricks_per_crop_size(regions: Sequence[int], resolution: int, real_p: float = 0.5,
                                  progressive: bool = False) -> str:
    """One line for the run's header: e.g. `8x8 (p 0.20): bricks 0; 16x16 (p 0.30): bricks
    0-1; 32x32 (p 0.50): all 3 bricks`."""
    schedule = PatchSchedule(int(resolution), real_p, progressive)
    parts = []
    for (s, run), q in zip(bricks_per_crop_size(regions, resolution, real_p, progressive).items(),
                           [q for q in schedule.probabilities if q > 0]):
        if not run:
            which = "no brick"
        elif len(run) == len(regions):
            which = f"all {len(run)} bricks" if len(run) > 1 else "the brick"
        else:
            which = f"brick {run[0]}" if len(run) == 1 else f"bricks {run[0]}-{run[-1]}"
        parts.append(f"{s}x{s} ({'stage' if progressive else f'p {q:.2f}'}, batch x{schedule.multiplier(s)}): {which}")
    return "; ".join(parts)


def check_patch_training(regions: Sequence[int], resolution: int, real_p: float = 0.5, progressive: bool = False,
                         intermediate: bool = True) -> Dict[int, List[int]]:
    """Refuse (ValueError naming the fix) a patch-diffusion setup that cannot train: a crop size
    that can occur with no brick to run, or a crop that runs only some bricks when the bricks
    are not trained as denoisers of their own (`intermediate=False`). Returns
    `bricks_per_crop_size`."""
    regions = [int(r) for r in regions]
    mapping = bricks_per_crop_size(regions, resolution, real_p, progressive)
    for size, run in mapping.items():
        if not run:
            patch = 2 if size % 2 == 0 else 1
            raise ValueError(
                f"patch diffusion at resolution {resolution}: the {size}x{size} crops (res/{resolution // size}, "
                f"{'a stage of the progressive schedule' if progressive else 'drawn'} with real_p={real_p}) train no brick: the first brick's region {regions[0]} does not tile a "
                f"{size}x{size} crop, and each brick needs the one before it (regions {regions}). Fix: put a brick "
                f"whose region divides {size} first (a progressive-growth stack such as "
                f"{size}:w128p{patch}h4:1,...), train at a resolution whose "
                f"quarter is a multiple of {regions[0]} (e.g. {4 * regions[0]}), or pass real_p=1 (--real-p 1: full "
                f"images only)")
    partial = {s: run for s, run in mapping.items() if len(run) < len(regions)}
    if partial and not intermediate:
        s, run = next(iter(partial.items()))
        raise ValueError(f"patch diffusion: {s}x{s} crops run only bricks {run} of {len(regions)}, whose outputs are "
                         f"then trained as denoisers; that needs intermediate=True (drop --last-brick-only), or a "
                         f"stack whose every region divides {s}")
    return mapping


# --------------------------------------------------------------------------------------------
# Crops and their coordinates
# --------------------------------------------------------------------------------------------

def draw_offsets(n: int, size: int, resolution: int, generator: torch.Generator, device) -> torch.Tensor:
    """(n, 2) int64 top-left corners (row, column), each uniform in 0..resolution - size."""
    return torch.randint(resolution - size + 1, (n, 2), generator=generator, device=device)


def _gather_crops(images: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """images (N, C, H, W), offsets (N, 2) -> (N, C, size, size): image n's pixels
    [r_n : r_n + size, c_n : c_n + size], by one indexed gather on the images' device."""
    n = images.shape[0]
    ar = torch.arange(size, device=images.device)
    rows = offsets[:, 0:1].to(images.device) + ar          # (N, s)
    cols = offsets[:, 1:2].to(images.device) + ar          # (N, s)
    idx = torch.arange(n, device=images.device)[:, None, None]
    crops = images.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]   # (N, s, s, C)
    return crops.permute(0, 3, 1, 2).contiguous()


def crop_images(images: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """images (N, C, R, R) -> (N, C, size, size) crops at `offsets` (N, 2) (row, column)."""
    if images.dim() != 4 or offsets.shape != (images.shape[0], 2):
        raise ValueError(f"crop_images takes images (N, C, H, W) and offsets (N, 2); got {tuple(images.shape)} and "
                         f"{tuple(offsets.shape)}")
    return _gather_crops(images, offsets, size)


def crop_coordinates(offsets: torch.Tensor, size: int, resolution: int, device=None) -> torch.Tensor:
    """(N, 2, size, size) float32 coordinate channels of crops at `offsets`: the matching slice
    of the full image's grid `coordinate_channels(1, resolution, resolution)` (rows first)."""
    device = offsets.device if device is None else device
    grid = coordinate_channels(offsets.shape[0], resolution, resolution, torch.float32, device)
    return _gather_crops(grid, offsets, size)


def nimg_of_step(batch_size: int, schedule: Optional[PatchSchedule], size: int) -> int:
    """Images a step draws: batch_size x the crop size's multiplier (batch_size without patches)."""
    return batch_size if schedule is None else batch_size * schedule.multiplier(size)


def step_indices(order, first_batch: int, multiplier: int, rank: int = 0, world: int = 1):
    """(indices, flips) of this rank's images for a step that takes `multiplier` consecutive
    batches of the data order starting at batch `first_batch`: the global batch is their
    concatenation (batch_size x multiplier images) and rank r keeps its contiguous slice."""
    parts = [order.global_batch(first_batch + j) for j in range(multiplier)]
    idx = torch.cat([p[0] for p in parts])
    flips = torch.cat([p[1] for p in parts])
    per = idx.shape[0] // world
    return idx[rank * per:(rank + 1) * per], flips[rank * per:(rank + 1) * per]


def batches_consumed(nimg: int, batch_size: int) -> int:
    """The data order's batches a patch run has consumed after drawing `nimg` images."""
    if nimg % batch_size:
        raise ValueError(f"nimg {nimg} is not a multiple of the batch size {batch_size}: not a patch run's count")
    return nimg // batch_size


__all__ = ["CROP_DIVISORS", "BATCH_MULTIPLIERS", "PatchSchedule", "crop_probabilities", "crop_sizes",
           "bricks_for_crop", "bricks_per_crop_size", "describe_bricks_per_crop_size", "check_patch_training",
           "draw_offsets", "crop_images", "crop_coordinates", "nimg_of_step", "step_indices", "batches_consumed"]
