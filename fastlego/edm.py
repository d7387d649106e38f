"""EDM preconditioning (Karras et al. 2022) around a LegoBackbone, as the release's EDMPrecondLEGO."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .model import LegoBackbone
from .presets import BRICK_TYPES, PRESETS, get_preset

# The release's default network (EDMPrecondLEGO's `model_type` default).
DEFAULT_MODEL_TYPE = "lego_XL_U_32"


def brick_type_name(kind) -> str:
    """A brick type as text: a release name (`lego_S_4`) as is, a custom `(width, patch, heads)`
    as `w<WIDTH>p<PATCH>h<HEADS>` (`w128p4h4`), the form `--bricks` reads."""
    if isinstance(kind, str):
        return kind
    width, patch, heads = (int(v) for v in kind)
    return f"w{width}p{patch}h{heads}"


def brick_stack_name(regions: Sequence[int], types: Sequence, depths: Sequence[int]) -> str:
    """`custom:REGION:TYPE:DEPTH,...`: the name of a brick stack that is no preset."""
    return "custom:" + ",".join(f"{int(r)}:{brick_type_name(t)}:{int(d)}" for r, t, d in zip(regions, types, depths))


def matching_preset(regions: Sequence[int], types: Sequence, depths: Sequence[int],
                    prefer: Optional[str] = None) -> Optional[str]:
    """The preset (`fastlego.PRESETS`) with exactly these bricks, `prefer` first; None if none has.
    A custom `(width, patch, heads)` brick equal to a release brick type counts as that type."""
    def canonical(kind):
        if isinstance(kind, str):
            return kind
        found = [name for name, value in BRICK_TYPES.items() if value == tuple(int(v) for v in kind)]
        return found[0] if found else tuple(int(v) for v in kind)

    stack = ([int(r) for r in regions], [canonical(t) for t in types], [int(d) for d in depths])
    names = ([prefer] if prefer in PRESETS else []) + list(PRESETS)
    for name in names:
        preset = PRESETS[name]
        if stack == (list(preset.regions), list(preset.model_type), list(preset.depths)):
            return name
    return None


def noise_levels_and_labels(x: torch.Tensor, level, class_labels: Optional[torch.Tensor], label_dim: int,
                            dtype: torch.dtype, name: str):
    """The preconditioning wrappers' common input rule: `level` (a number or one per image) as a
    (B, 1, 1, 1) tensor of `dtype`, and the labels as the backbone takes them (None for an
    unconditional network, all-zero one-hot rows when none are given, float rows reshaped to
    (B, label_dim), integer ids unchanged). `name` names the level in the error."""
    level = torch.as_tensor(level, device=x.device).to(dtype).reshape(-1, 1, 1, 1)
    if level.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} holds {level.shape[0]} values but x has batch {x.shape[0]}: pass one {name} "
                         f"(a number) or one per image, shape ({x.shape[0]},)")
    if level.shape[0] == 1 and x.shape[0] > 1:
        level = level.expand(x.shape[0], 1, 1, 1)
    if label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([x.shape[0], label_dim], device=x.device)
    elif torch.is_floating_point(class_labels):
        class_labels = class_labels.to(torch.float32).reshape(-1, label_dim)
    return level, class_labels


class EDMPrecond(nn.Module):
    """`D(x) = c_skip x + c_out F(c_in x, log(sigma) / 4)`, sigma_data 0.5; the backbone is `.model`,
    so state-dict keys are the release's (`model.model.{i}...`)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: Optional[str] = None, backbone: Optional[LegoBackbone] = None, **model_kwargs):
        """`model_type` names the preset the backbone is built from (the release's way; default
        lego_XL_U_32, the release's default); or pass a ready `backbone` (any brick stack) and
        `model_type` is only recorded (default: the preset with the backbone's bricks, else the
        stack's `custom:REGION:TYPE:DEPTH,...` name)."""
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        if backbone is not None and model_type is None:
            stack = (backbone.img_resolution, backbone.model_type, backbone.depths)
            model_type = matching_preset(*stack) or brick_stack_name(*stack)
        self.model_type = model_type if model_type is not None else DEFAULT_MODEL_TYPE
        model_type = self.model_type
        if backbone is not None:
            if model_kwargs:
                raise TypeError(f"EDMPrecond got a backbone and backbone arguments {sorted(model_kwargs)}: "
                                f"pass one or the other")
            if (backbone.in_channels, backbone.label_dim) != (img_channels, label_dim):
                raise ValueError(f"the backbone has in_channels={backbone.in_channels}, label_dim={backbone.label_dim} "
                                 f"but EDMPrecond was given img_channels={img_channels}, label_dim={label_dim}")
            self.model = backbone
        else:
            get_preset(model_type)  # clear error for an unknown name
            self.model = LegoBackbone.from_preset(model_type, in_channels=img_channels, label_dim=label_dim,
                                                  **model_kwargs)

    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (B, 1, 1, 1)."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None,
                cfg_scale: Optional[float] = None, return_stage_idx: Optional[int] = None,
                force_fp32: bool = False, skip_bricks=None, coords: Optional[torch.Tensor] = None,
                **model_kwargs):
        """The denoiser D(x; sigma). Returns a list (one per brick) when the backbone trains its
        intermediate stages. `use_fp16` runs the backbone under fp16 autocast on CUDA (the
        release's cast to fp16 without converting the weights fails; this one works).

        `coords` (B, 2, H, W), row position first: the coordinate channels of x's pixels when x
        is a crop of a larger image (Patch Diffusion training, `fastlego.patch_diffusion`); None
        builds x's own grid. They pass to the backbone unchanged (not preconditioned)."""
        x = x.to(torch.float32)
        sigma, class_labels = noise_levels_and_labels(x, sigma, class_labels, self.label_dim, torch.float32, "sigma")
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.float16) if fp16 else contextlib.nullcontext()
        inp = (c_in * x).to(self.model.dtype) if not torch.is_autocast_enabled(x.device.type) and not fp16 else c_in * x
        with autocast:
            if cfg_scale is None:
                F_x = self.model(inp, c_noise.flatten(), class_labels=class_labels,
                                 return_stage_idx=return_stage_idx, skip_bricks=skip_bricks, coords=coords,
                                 **model_kwargs)
            else:
                F_x = self.model.forward_with_cfg(inp, c_noise.flatten(), class_labels, cfg_scale,
                                                  return_stage_idx=return_stage_idx, skip_bricks=skip_bricks,
                                                  coords=coords, **model_kwargs)
        if isinstance(F_x, list):
            return [c_skip * x + c_out * f.to(torch.float32) for f in F_x]
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
