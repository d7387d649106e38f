"""LegoBackbone: the LEGO diffusion backbone, exact to the released checkpoints.

One class per concept, named and laid out as the release's `training/lego_models.py` so that its
state dicts load with `strict=True`: `model.{i}` are the bricks, each with `x_embedder.proj`,
`pos_embed`, `blocks.{j}` and `final_layer`; `t_embedder`, `y_embedder`, `map_augment` make the
conditioning. Every computation runs through `fastlego.ops`, i.e. through the dispatcher.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import dispatch, ops, weight_cache
from .presets import BRICK_TYPES, get_preset
from .reference import adaln_modulation, sincos_pos_embed
from .weight_cache import autocast_weights


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D (a strided conv; timm's PatchEmbed keys)."""

    def __init__(self, in_channels: int, width: int, patch: int):
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch, bias=True)


class Attention(nn.Module):
    """qkv Linear(D, 3D) and output projection Linear(D, D) (timm's Attention keys)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not a multiple of the head count {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)


class Mlp(nn.Module):
    """fc1 Linear(D, 4D) -> tanh-GELU -> fc2 Linear(4D, D) (timm's Mlp keys)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, width, bias=True)


def own_modulation(module: nn.Module, c: torch.Tensor) -> torch.Tensor:
    """Linear(SiLU(c)) by `module.adaLN_modulation` itself (a DiT block's or final layer's), its
    weights cast once inside `frozen_weights()`: when the brick did not compute it (`Brick.modulations`)."""
    lin = module.adaLN_modulation[1]
    return adaln_modulation(c, *autocast_weights(c, lin.weight, lin.bias))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning; the conditioning is computed once per image."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(width, num_heads)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width, bias=True))

    def forward(self, h: torch.Tensor, c: torch.Tensor, mod: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`mod`: this block's adaLN parameters (B, 6D) when the brick computed them (see
        `Brick.modulations`), else computed here from c."""
        if mod is None:
            mod = own_modulation(self, c)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        qkv = ops.modulated_linear(h, shift1, scale1, self.attn.qkv.weight, self.attn.qkv.bias)
        a = ops.attention(qkv, self.attn.num_heads)
        h = ops.linear_gated_residual(a, self.attn.proj.weight, self.attn.proj.bias, gate1, h, keep_y=False)
        return ops.mlp(h, shift2, scale2, self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight,
                       self.mlp.fc2.bias, gate2)


class FinalLayer(nn.Module):
    """LN + adaLN modulate + Linear(D, p*p*C), folded back into the image."""

    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(width, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width, bias=True))

    def forward(self, h, c, region: int, image_shape, mod: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mod is None:
            mod = own_modulation(self, c)
        shift, scale = mod.chunk(2, dim=1)
        return ops.final_layer(h, shift, scale, self.linear.weight, self.linear.bias, region, image_shape)


class Brick(nn.Module):
    """One LEGO brick (the release's LEGO_module): regions of r x r pixels, each an independent
    sequence of (r/p)^2 patch tokens run through `depth` DiT blocks."""

    def __init__(self, region: int, in_channels: int, out_channels: int, width: int, patch: int,
                 num_heads: int, depth: int, mlp_ratio: float = 4.0):
        super().__init__()
        if region % patch:
            raise ValueError(f"region size {region} is not a multiple of the patch size {patch}")
        self.region, self.patch, self.width, self.num_heads = region, patch, width, num_heads
        self.in_channels, self.out_channels = in_channels, out_channels
        self.x_embedder = PatchEmbed(in_channels, width, patch)
        grid = region // patch
        self.pos_embed = nn.Parameter(sincos_pos_embed(width, grid), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch, out_channels)
        self.checkpointing: Optional[str] = None  # None, "brick" or "block" (see LegoBackbone)
        self.checkpoint_blocks = depth            # with "block": how many of the first blocks
        self.initialize_weights()

    @property
    def tokens_per_region(self) -> int:
        return (self.region // self.patch) ** 2

    def initialize_weights(self) -> None:
        """adaLN-Zero: Xavier-uniform Linears and patch conv, zero biases, zero modulation and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for p in (self.final_layer.adaLN_modulation[1].weight, self.final_layer.adaLN_modulation[1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, prev: Optional[torch.Tensor], c: torch.Tensor,
                coords: Optional[torch.Tensor] = None, mods: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """x (B, C, H, W) the network input, prev the previous brick's output (or None), coords
        external coordinate channels (B, 2, H, W) or None (the brick builds x's grid) -> (B, C, H, W).
        `mods`: the adaLN parameters of every block and of the final layer, when the backbone
        computed them (`LegoBackbone.modulations`); else the brick computes them."""
        if self.checkpointing == "brick" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, prev, c, coords, mods, use_reentrant=False, preserve_rng_state=False,
                              context_fn=dispatch.checkpoint_contexts)
        return self._forward(x, prev, c, coords, mods)

    # A brick draws no random numbers (label dropout happens in the embedder, before the bricks),
    # so recomputation needs no saved RNG state: preserve_rng_state=False skips that state's
    # device sync, which also lets a checkpointed step be captured as a CUDA graph.
    def _forward(self, x, prev, c, coords=None, mods=None):
        proj = self.x_embedder.proj
        h = ops.brick_embed(x, prev, proj.weight, proj.bias, self.pos_embed, self.region, coords)
        per_block = self.checkpoint_blocks if self.checkpointing == "block" and torch.is_grad_enabled() else 0
        if mods is None:
            mods = self.modulations(c)
        for i, block in enumerate(self.blocks):
            if i < per_block:
                h = checkpoint(block, h, c, use_reentrant=False, preserve_rng_state=False,
                               context_fn=dispatch.checkpoint_contexts)
            else:
                h = block(h, c, None if mods is None else mods[i])
        return self.final_layer(h, c, self.region, x.shape, None if mods is None else mods[-1])

    def modulation_layers(self) -> List[nn.Linear]:
        """The Linears of the brick's adaLN, in order: each block's, then the final layer's."""
        return [block.adaLN_modulation[1] for block in self.blocks] + [self.final_layer.adaLN_modulation[1]]

    def modulations(self, c: torch.Tensor) -> Optional[Sequence[torch.Tensor]]:
        """Inside `fastlego.frozen_weights()`: every block's adaLN parameters and the final layer's
        from one GEMM (`stacked_modulations`): per-block (B, 6D) views and the final layer's
        (B, 2D). None elsewhere: each block computes its own."""
        return stacked_modulations(self, self.modulation_layers(), c)


def stacked_modulations(owner: nn.Module, layers: Sequence[nn.Linear], c: torch.Tensor,
                        rows: Optional[slice] = None) -> Optional[List[torch.Tensor]]:
    """Inside `fastlego.frozen_weights()`: Linear(SiLU(c)) of each of `layers` (adaLN Linears that
    all read c) from one GEMM, SiLU(c) @ [W_1; W_2; ...]^T + [b_1; b_2; ...], the weights stacked
    once per version (`weight_cache.stacked`, kept under `owner`), split into one (B, out_i) view
    per layer: two launches instead of two per layer, the same values up to the GEMM's rounding.
    `rows`: the GEMM over that slice of the stacked rows only (the layers inside it; `layers`
    always names the whole stack). None elsewhere (training, or weights autograd records), and
    when the layers do not all read c's width: each layer is then computed on its own."""
    if not weight_cache.frozen() or any(lin.in_features != c.shape[-1] for lin in layers):
        return None
    dtype = dispatch.autocast_dtype(c) or layers[0].weight.dtype
    weight = weight_cache.stacked(owner, "adaln_weight", [lin.weight for lin in layers], dtype)
    bias = weight_cache.stacked(owner, "adaln_bias", [lin.bias for lin in layers], dtype)
    if weight is None or bias is None:
        return None
    sizes = [lin.out_features for lin in layers]
    if rows is not None:
        sizes = [n for n, end in zip(sizes, itertools.accumulate(sizes)) if rows.start < end <= rows.stop]
        weight, bias = weight[rows], bias[rows]
    return list(adaln_modulation(c, weight, bias).split(sizes, dim=1))


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features `[cos(t f), sin(t f)]`, f_k = 10000^(-k/128), then an MLP."""

    def __init__(self, width: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, width), nn.SiLU(), nn.Linear(width, width))

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        """(B, dim) fp32 `[cos(t f), sin(t f)]`; the frequencies are made once inside
        `frozen_weights()` and cos / sin write their halves in place: three launches, not seven."""
        half = self.frequency_embedding_size // 2
        freqs = weight_cache.constant(self, "frequencies", t.device, lambda: (1 / 10000) ** (
            torch.arange(half, dtype=torch.float32, device=t.device) / half))
        args = t.float().ger(freqs)
        if torch.compiler.is_compiling() or (args.requires_grad and torch.is_grad_enabled()):
            return torch.cat([args.cos(), args.sin()], dim=1)   # out= takes no autograd
        out = torch.empty(args.shape[0], 2 * half, dtype=torch.float32, device=t.device)
        torch.cos(args, out=out[:, :half])
        torch.sin(args, out=out[:, half:])
        return out

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(self.timestep_features(t).to(w.dtype))


class LabelEmbedder(nn.Module):
    """Linear(label_dim, D) on a float label vector; labels zeroed with probability p in training."""

    def __init__(self, label_dim: int, width: int, dropout_prob: float):
        super().__init__()
        self.label_dim, self.dropout_prob = label_dim, dropout_prob
        self.embedding_table = nn.Linear(label_dim, width)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand([labels.shape[0], 1], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids.reshape(labels.shape[0], 1) == 1
            labels = torch.where(drop, torch.zeros((), dtype=labels.dtype, device=labels.device), labels)
        return self.embedding_table(labels)


class LegoBackbone(nn.Module):
    """The LEGO backbone: a drop-in for the release's `LEGO` (same arguments, keys and outputs).

    `model_type` entries are the release's brick names (`fastlego.presets.BRICK_TYPES`) or
    `(width, patch, heads)` tuples for small custom bricks (tests, demos).

    Beyond the release: any H, W that are multiples of every run brick's region size (non-square
    too, with rows normalised by H-1 and columns by W-1); external coordinates (`coords`: a crop's
    slice of the full image's grid, for Patch Diffusion training); real brick skipping (`return_stage_idx` stops after
    that brick, `skip_bricks` leaves chosen bricks out), also in `forward_with_cfg`; the adaLN
    conditioning computed once per image; integer class ids accepted besides one-hot vectors.
    """

    def __init__(self, img_resolution: Sequence[int], in_channels: int, label_dim: int = 1000,
                 class_dropout_prob: float = 0.1, learn_sigma: bool = False, augment_dim: int = 0,
                 model_type: Sequence = ("lego_S_2", "lego_S_8", "lego_S_2"),
                 depths: Sequence[int] = (2, 4, 6), train_intermediate_stages: bool = False,
                 use_fp16: bool = False, mlp_ratio: float = 4.0, activation_checkpointing: Optional[str] = None,
                 **kwargs):
        super().__init__()
        if learn_sigma:
            raise ValueError("learn_sigma=True is not supported: the LEGO checkpoints predict C channels "
                             "(the release's fold breaks with 2C); pass learn_sigma=False")
        if kwargs:
            raise TypeError(f"LegoBackbone got unexpected arguments {sorted(kwargs)}")
        img_resolution, model_type, depths = list(img_resolution), list(model_type), list(depths)
        if not (len(img_resolution) == len(model_type) == len(depths)) or not img_resolution:
            raise ValueError(f"img_resolution, model_type and depths must be lists of one length "
                             f"(one entry per brick); got {len(img_resolution)}, {len(model_type)}, {len(depths)}")
        unknown = [t for t in model_type if not (t in BRICK_TYPES if isinstance(t, str) else len(t) == 3)]
        if unknown:
            raise ValueError(f"unknown brick type(s) {unknown}: expected names from {sorted(BRICK_TYPES)} "
                             f"or (width, patch, heads) tuples")
        self.img_resolution = img_resolution
        self.max_img_size = max(img_resolution)
        self.in_channels = in_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.class_dropout_prob = class_dropout_prob
        self.model_type = model_type
        self.depths = depths
        self.num_bricks = len(img_resolution)
        self.train_intermediate_stages = train_intermediate_stages
        self.use_fp16 = use_fp16
        bricks = []
        for i, (region, kind, depth) in enumerate(zip(img_resolution, model_type, depths)):
            width, patch, heads = BRICK_TYPES[kind] if isinstance(kind, str) else map(int, kind)
            cin = in_channels + 2 if i == 0 else 2 * in_channels + 2
            bricks.append(Brick(region, cin, in_channels, width, patch, heads, depth, mlp_ratio))
        self.model = nn.ModuleList(bricks)
        widths = {b.width for b in bricks}
        if len(widths) > 1:
            raise ValueError(f"all bricks must share one width (the conditioning vector's); got {sorted(widths)}")
        hidden = bricks[0].width
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(label_dim, hidden, class_dropout_prob) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, hidden, bias=True) if augment_dim else None
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.map_augment is not None:
            nn.init.normal_(self.map_augment.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.set_activation_checkpointing(activation_checkpointing)

    def set_activation_checkpointing(self, mode: Optional[str], blocks: Optional[int] = None) -> "LegoBackbone":
        """Trade compute for memory in training: "brick" keeps only each brick's input and output
        and recomputes the rest in backward, "block" keeps each DiT block's input; None (the
        default) keeps every activation. With "block", `blocks` = N checkpoints only the first N
        DiT blocks of the network (bricks in order; None: all of them): each one saves about 1/n
        of the activations for about 1/n of a forward pass, so N can be the fewest blocks that fit
        a memory budget. Gradients are the same (the forward is recomputed exactly); it applies
        only while autograd records."""
        if mode not in (None, "brick", "block"):
            raise ValueError(f"activation_checkpointing={mode!r}: expected None, 'brick' or 'block'")
        total = sum(len(brick.blocks) for brick in self.model)
        if blocks is not None:
            if mode != "block":
                raise ValueError(f"blocks={blocks} counts DiT blocks: it needs activation_checkpointing='block', "
                                 f"got {mode!r}")
            if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= total:
                raise ValueError(f"blocks={blocks!r}: expected an integer from 0 to {total} (this network's "
                                 f"DiT blocks), or None for all")
        left = total if blocks is None else blocks
        for brick in self.model:
            brick.checkpointing = mode
            brick.checkpoint_blocks = min(left, len(brick.blocks))
            left -= brick.checkpoint_blocks
        return self

    @property
    def activation_checkpointing(self) -> Optional[str]:
        return self.model[0].checkpointing

    @property
    def checkpointed_blocks(self) -> int:
        """How many DiT blocks recompute their activations in backward (0 unless "block" mode)."""
        return sum(b.checkpoint_blocks for b in self.model if b.checkpointing == "block")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LegoBackbone":
        """Build a preset (`fastlego.PRESETS`); `overrides` are constructor arguments, e.g.
        `in_channels=4, label_dim=1000`. `in_channels` defaults to 3."""
        kwargs = dict(get_preset(name).kwargs(), in_channels=3)
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.t_embedder.mlp[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.t_embedder.mlp[0].weight.device

    # ----------------------------------------------------------------------------------------
    def conditioning(self, timesteps, class_labels=None, augment_labels=None, force_drop_ids=None):
        """The conditioning vector c (B, D): timestep + label (+ augment) embeddings."""
        c = self.t_embedder(timesteps.reshape(-1))
        if self.y_embedder is not None and class_labels is not None:
            c = c + self.y_embedder(class_labels.to(c.dtype), self.training, force_drop_ids)
        if self.map_augment is not None and augment_labels is not None:
            c = c + self.map_augment(augment_labels.to(c.dtype))
        return c

    def modulations(self, c: torch.Tensor, run: Sequence[int]) -> Optional[dict]:
        """Inside `fastlego.frozen_weights()`, when the bricks that run are consecutive: the adaLN
        parameters of all of them (every block's and final layer's) from one GEMM over one stack
        of every brick's adaLN weights (`stacked_modulations`, its rows for those bricks), as
        {brick index: that brick's list (`Brick.modulations`)}. None otherwise: each brick
        computes its own (with a brick left out in the middle, `skip_bricks`)."""
        if not weight_cache.frozen() or list(run) != list(range(run[0], run[-1] + 1)):
            return None
        per_brick = [brick.modulation_layers() for brick in self.model]
        offsets = [0, *itertools.accumulate(sum(lin.out_features for lin in layers) for layers in per_brick)]
        flat = stacked_modulations(self, [lin for layers in per_brick for lin in layers], c,
                                   rows=slice(offsets[run[0]], offsets[run[-1] + 1]))
        if flat is None:
            return None
        out, k = {}, 0
        for i in run:
            out[i] = flat[k:k + len(per_brick[i])]
            k += len(per_brick[i])
        return out

    def bricks_to_run(self, return_stage_idx: Optional[int] = None,
                      skip_bricks: Optional[Iterable[int]] = None) -> List[int]:
        """Indices of the bricks a forward runs: all up to `return_stage_idx` minus `skip_bricks`."""
        n = self.num_bricks
        last = n - 1
        if return_stage_idx is not None:
            if not -n <= int(return_stage_idx) < n:
                raise ValueError(f"return_stage_idx={return_stage_idx} is out of range: this model has {n} "
                                 f"bricks, so pass 0..{n - 1} (or -1 for the last)")
            last = int(return_stage_idx) % n
        skip = set()
        for s in skip_bricks or ():
            if not -n <= int(s) < n:
                raise ValueError(f"skip_bricks holds {s}, but this model has {n} bricks (0..{n - 1})")
            skip.add(int(s) % n)
        run = [i for i in range(last + 1) if i not in skip]
        if not run:
            raise ValueError(f"skip_bricks={sorted(skip)} with return_stage_idx={return_stage_idx} leaves no brick to run")
        return run

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None, force_drop_ids: Optional[torch.Tensor] = None,
                return_stage_idx: Optional[int] = None, skip_bricks: Optional[Iterable[int]] = None,
                coords: Optional[torch.Tensor] = None, **kwargs) -> Union[torch.Tensor, List[torch.Tensor]]:
        """x (B, C, H, W), timesteps (B,), class_labels (B, label_dim) float or (B,) int ids.

        Returns F of the last brick run; in training mode with `train_intermediate_stages`, the
        list of every run brick's output. `return_stage_idx=k` stops after brick k (-1: the last);
        `skip_bricks` leaves bricks out: a brick after a skipped one sees the last run brick's
        output (or x itself if none ran yet) in place of its predecessor's. H and W must be
        multiples of the region sizes of the bricks that run.

        `coords` (B, 2, H, W), row position first and column second, are the coordinate channels
        every brick reads instead of building x's own grid: for a crop of a larger image, its
        pixels' positions in that image normalised to [-1, 1] over the full size (Patch
        Diffusion; `fastlego.patch_diffusion.crop_coordinates`). None: the grid of x's size, as
        `fastlego.reference.coordinate_channels` builds it.
        """
        run = self.bricks_to_run(self.num_bricks - 1 if (self.train_intermediate_stages and not self.training
                                                          and return_stage_idx is None) else return_stage_idx,
                                 skip_bricks)
        class_labels = self._validate(x, timesteps, class_labels, augment_labels, force_drop_ids, run, coords)
        c = self.conditioning(timesteps, class_labels, augment_labels, force_drop_ids)
        mods = self.modulations(c, run)
        prev, outputs = None, []
        for i in run:
            feed = prev if i > 0 else None
            if i > 0 and feed is None:
                feed = x  # brick i > 0 with every earlier brick skipped: it refines the input itself
            prev = self.model[i](x, feed, c, coords, None if mods is None else mods[i])
            outputs.append(prev)
        if self.train_intermediate_stages and self.training:
            return outputs
        return prev

    def forward_with_cfg(self, x, t, class_labels, cfg_scale, use_full_channels: bool = True,
                         return_stage_idx: Optional[int] = None, skip_bricks: Optional[Iterable[int]] = None,
                         coords: Optional[torch.Tensor] = None, **kwargs):
        """Classifier-free guidance in one batched call: `uncond + cfg_scale * (cond - uncond)`."""
        if class_labels is None:
            raise ValueError("forward_with_cfg needs class_labels (B, label_dim): the unconditional half "
                             "uses all-zero labels; for an unconditional model call forward() instead")
        # check the caller's batch before doubling it, so that errors name the caller's shapes
        run = self.bricks_to_run(self.num_bricks - 1 if (self.train_intermediate_stages and not self.training
                                                          and return_stage_idx is None) else return_stage_idx,
                                 skip_bricks)
        class_labels = self._validate(x, t, class_labels, None, None, run, coords)
        both = torch.cat([x, x], 0)
        t2 = torch.cat([t.reshape(-1), t.reshape(-1)], 0)
        y = torch.cat([class_labels, torch.zeros_like(class_labels)], 0)
        coords2 = None if coords is None else torch.cat([coords, coords], 0)
        out = self.forward(both, t2, y, return_stage_idx=return_stage_idx, skip_bricks=skip_bricks, coords=coords2)
        ch = self.in_channels if use_full_channels else 3
        eps, rest = out[:, :ch], out[:, ch:]
        cond, uncond = eps.chunk(2, dim=0)
        return torch.cat([uncond + cfg_scale * (cond - uncond), rest[: len(rest) // 2]], dim=1)

    # ----------------------------------------------------------------------------------------
    def _labels(self, class_labels, batch: int):
        """Class ids (B,) int -> one-hot float; float labels pass through (checked).

        Ids are range-checked without a host-device sync, so a CUDA-graph step or sampler with
        integer labels captures: CPU ids outside 0..label_dim-1 raise; on a GPU such an id's row
        is NaN instead (its image's output is NaN, never another class's)."""
        if class_labels is None or self.label_dim == 0:
            return class_labels
        if not torch.is_floating_point(class_labels):
            if class_labels.dim() != 1:
                raise ValueError(f"integer class_labels must be class ids of shape (B,), got {tuple(class_labels.shape)}")
            ids = class_labels.long()
            if ids.device.type == "cpu":   # reading CPU values costs no device sync
                bad = ids[(ids < 0) | (ids >= self.label_dim)]
                if bad.numel():
                    raise ValueError(f"class ids must lie in 0..{self.label_dim - 1}, got {bad.unique().tolist()[:8]}")
                class_labels = F.one_hot(ids, self.label_dim).to(self.dtype)
            else:                          # compared on the device: no .item(), no sync
                classes = torch.arange(self.label_dim, device=ids.device)
                valid = ((ids >= 0) & (ids < self.label_dim))[:, None]
                class_labels = torch.where(valid, (ids[:, None] == classes).to(self.dtype), float("nan"))
        if class_labels.dim() != 2 or class_labels.shape[1] != self.label_dim:
            raise ValueError(f"class_labels must have shape (B, {self.label_dim}) (one-hot or all-zero float "
                             f"rows) or (B,) integer ids; got {tuple(class_labels.shape)}")
        if class_labels.shape[0] not in (1, batch):
            raise ValueError(f"class_labels has {class_labels.shape[0]} rows but x has batch {batch}")
        return class_labels.expand(batch, -1)

    def _validate(self, x, timesteps, class_labels, augment_labels, force_drop_ids,
                  run: Optional[List[int]] = None, coords: Optional[torch.Tensor] = None):
        """Check every input before any compute; errors name the expected value and the fix.
        `run`: the bricks that run (default all), whose regions must tile x."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"x has {C} channels but this model was built for in_channels={self.in_channels}; "
                             f"pass (B, {self.in_channels}, H, W) images or build the model with in_channels={C}")
        regions = [self.img_resolution[i] for i in (range(self.num_bricks) if run is None else run)]
        bad = [r for r in regions if H % r or W % r]
        if bad:
            m = math.lcm(*regions)
            which = "every brick's region size" if run is None or len(run) == self.num_bricks else \
                f"the region size of every brick that runs (bricks {list(run)})"
            raise ValueError(f"x is {H}x{W} but H and W must be multiples of {which} "
                             f"{regions} (not of {sorted(set(bad))}): use sizes that are multiples "
                             f"of {m}, e.g. {max(m, H - H % m)}x{max(m, W - W % m)}")
        if coords is not None:
            if not isinstance(coords, torch.Tensor) or tuple(coords.shape) != (B, 2, H, W) \
                    or not torch.is_floating_point(coords):
                got = f"{coords.dtype} {tuple(coords.shape)}" if isinstance(coords, torch.Tensor) else type(coords).__name__
                raise ValueError(f"coords must be float coordinate channels of shape (B, 2, H, W) = ({B}, 2, {H}, {W}) "
                                 f"(row position first, column second), got {got}; pass None for x's own grid")
            if coords.device != x.device:
                raise ValueError(f"coords are on {coords.device} but x is on {x.device}: move them, e.g. "
                                 f"coords.to('{x.device}')")
        if not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.device}: move one, e.g. x.to('{self.device}')")
        autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cuda", "cpu") else False
        if x.dtype != self.dtype and not autocast:
            raise TypeError(f"x is {x.dtype} but the model's parameters are {self.dtype}: pass x.to({self.dtype}), "
                            f"convert the model with .to({x.dtype}), or run under torch.autocast")
        if not isinstance(timesteps, torch.Tensor) or timesteps.reshape(-1).shape[0] != B:
            raise ValueError(f"timesteps must be a tensor of shape (B,) = ({B},), got "
                             f"{tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps)}")
        if timesteps.device != x.device:
            raise ValueError(f"timesteps are on {timesteps.device} but x is on {x.device}")
        class_labels = self._labels(class_labels, B)
        if class_labels is not None and class_labels.device != x.device:
            raise ValueError(f"class_labels are on {class_labels.device} but x is on {x.device}")
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("augment_labels given but this model has augment_dim=0; build it with augment_dim")
            if augment_labels.shape != (B, self.augment_dim):
                raise ValueError(f"augment_labels must have shape ({B}, {self.augment_dim}), got {tuple(augment_labels.shape)}")
        if force_drop_ids is not None and force_drop_ids.numel() != B:
            raise ValueError(f"force_drop_ids must hold one entry per image, shape ({B}, 1); got {tuple(force_drop_ids.shape)}")
        return class_labels
