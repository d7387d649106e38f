"""Which network to train, as a plain dict: a preset or an explicit brick stack ("network spec").

A spec is JSON-friendly (training checkpoints and `config.json` store it) and says everything
that builds the network: image size, channels, labels, the bricks (a preset's name, or each
brick's region, type and depth) and the options that differ from `SPEC_DEFAULTS`.

    spec = network_spec(16, 1, 10, bricks="8:lego_S_4:1,16:w384p8h6:2")
    net = build_network(spec)                  # an EDMPrecond; net.network_spec == spec
    spec_from_network(net) == spec             # read back from the module itself

A brick type is a release brick (`lego_S_4`: width 384, 4x4 patches, 6 heads) or a custom one
written `w<WIDTH>p<PATCH>h<HEADS>` and stored as `[width, patch, heads]`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Union

from .edm import EDMPrecond, brick_stack_name, brick_type_name, matching_preset
from .model import LegoBackbone
from .presets import BRICK_TYPES, get_preset

# The demo's brick stack for 16x16 digits, in the PG ("progressive growth") order: a local brick
# (8x8 regions of four 4x4 patches, depth 1) then a global brick (the whole image, 16 patches,
# depth 2), both 128 wide with 4 heads: 48 token-blocks per image and 1.0M parameters, sized to
# converge within minutes on two CPU cores. Skipping the last brick late in sampling leaves the
# local brick to finish the fine detail and saves about 2/3 of each skipped call.
DEMO_BRICKS = "8:w128p4h4:1,16:w128p4h4:2"

_CUSTOM_BRICK = re.compile(r"w(\d+)p(\d+)h(\d+)")
_BRICK_TYPE_HELP = ("a release brick (lego_{S,L,XL}_{2,4,8,16}: widths 384/1024/1152, that patch size) or a custom "
                    "one written w<WIDTH>p<PATCH>h<HEADS>, e.g. w128p4h4 (width 128, 4x4 patches, 4 heads)")

# Options of a network spec beyond its bricks, with the values a spec without them means.
SPEC_DEFAULTS: Dict[str, Any] = {"augment_dim": 0, "mlp_ratio": 4.0, "sigma_min": 0.0, "sigma_max": float("inf"),
                                 "sigma_data": 0.5, "use_fp16": False}


def parse_brick_type(kind) -> Union[str, List[int]]:
    """A brick type: a release name (`lego_S_4`, kept as is), or a custom brick written
    `w<WIDTH>p<PATCH>h<HEADS>` or given as a `(width, patch, heads)` sequence, returned as the
    JSON-friendly list `[width, patch, heads]`. Clear errors for bad ones."""
    if isinstance(kind, str):
        if kind in BRICK_TYPES:
            return kind
        match = _CUSTOM_BRICK.fullmatch(kind.strip())
        if match is None:
            raise ValueError(f"unknown brick type {kind!r}: expected {_BRICK_TYPE_HELP}")
        width, patch, heads = (int(g) for g in match.groups())
        text = kind
    else:
        values = list(kind) if isinstance(kind, (list, tuple)) else None
        if values is None or len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"brick type {kind!r}: expected {_BRICK_TYPE_HELP}, or a (width, patch, heads) "
                             f"tuple of integers")
        width, patch, heads = values
        text = f"w{width}p{patch}h{heads}"
    if min(width, patch, heads) < 1:
        raise ValueError(f"brick type {text!r}: width, patch and heads must be positive integers")
    step = math.lcm(4, heads)   # widths that both fit the heads and the sin-cos table's four parts
    bigger = f"w{width + (-width) % step}p{patch}h{heads}"
    if width % heads:
        fits = [h for h in range(heads, 0, -1) if width % h == 0][0]
        other = f"w{width}p{patch}h{fits} or " if width % 4 == 0 else ""
        raise ValueError(f"brick type {text!r}: width {width} is not a multiple of the head count {heads} "
                         f"(each head takes width/heads channels): e.g. {other}{bigger}")
    if width % 4:
        raise ValueError(f"brick type {text!r}: width {width} is not a multiple of 4 (the sin-cos position table "
                         f"splits the width into four parts): e.g. {bigger}")
    return [width, patch, heads]


def _brick_dims(kind) -> tuple:
    return BRICK_TYPES[kind] if isinstance(kind, str) else tuple(kind)


def _check_stack(regions: List[int], types: list, depths: List[int], where) -> None:
    """Every brick's region tiles into its patches and all bricks share one width."""
    for i, (r, t, d) in enumerate(zip(regions, types, depths)):
        what = where(i)
        if isinstance(r, bool) or not isinstance(r, int) or isinstance(d, bool) or not isinstance(d, int) or r < 1 or d < 1:
            raise ValueError(f"brick {what}: region and depth must be positive integers")
        patch = _brick_dims(t)[1]
        if r % patch:
            raise ValueError(f"brick {what}: region {r} is not a multiple of {brick_type_name(t)}'s patch size {patch}")
    widths = sorted({_brick_dims(t)[0] for t in types})
    if len(widths) > 1:
        raise ValueError(f"bricks {', '.join(where(i) for i in range(len(types)))}: all bricks must share one width "
                         f"(they share the conditioning vector), got widths {widths}")


def parse_bricks(text: str) -> Dict[str, list]:
    """"4:lego_S_2:1,16:w128p8h4:2" -> LegoBackbone kwargs (REGION:TYPE:DEPTH per brick; TYPE a
    release brick name or w<WIDTH>p<PATCH>h<HEADS>, stored as [width, patch, heads])."""
    regions, types, depths, parts = [], [], [], []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        fields = part.split(":")
        if len(fields) != 3:
            raise ValueError(f"brick {part!r}: expected REGION:TYPE:DEPTH, e.g. 4:lego_S_2:1 or 8:w128p4h4:1 "
                             f"(TYPE: {_BRICK_TYPE_HELP})")
        r, t, d = (f.strip() for f in fields)
        if not (r.isdigit() and d.isdigit()) or int(r) < 1 or int(d) < 1:
            raise ValueError(f"brick {part!r}: region and depth must be positive integers")
        try:
            kind = parse_brick_type(t)
        except ValueError as exc:
            raise ValueError(f"brick {part!r}: {exc}") from None
        regions.append(int(r)), types.append(kind), depths.append(int(d)), parts.append(part)
    if not regions:
        raise ValueError(f"no bricks in {text!r}: expected REGION:TYPE:DEPTH,..., e.g. {DEMO_BRICKS}")
    _check_stack(regions, types, depths, lambda i: repr(parts[i]))
    return {"img_resolution": regions, "model_type": types, "depths": depths}


def _stack_from_dict(bricks: dict) -> Dict[str, list]:
    """A {"img_resolution", "model_type", "depths"} dict, checked, brick types as parse_brick_type gives them."""
    keys = ("img_resolution", "model_type", "depths")
    if not isinstance(bricks, dict) or set(keys) - set(bricks) or len({len(bricks[k]) for k in keys}) != 1:
        raise ValueError(f"bricks must hold equally long lists img_resolution (regions), model_type and depths; "
                         f"got {bricks!r}")
    regions, depths = list(bricks["img_resolution"]), list(bricks["depths"])
    types = [parse_brick_type(t) for t in bricks["model_type"]]
    _check_stack(regions, types, depths, lambda i: f"{i} ({regions[i]}:{brick_type_name(types[i])}:{depths[i]})")
    return {"img_resolution": regions, "model_type": types, "depths": depths}


def network_spec(img_resolution: int, img_channels: int, label_dim: int, preset: Optional[str] = None,
                 bricks: Union[str, dict, None] = None, intermediate: bool = True,
                 class_dropout_prob: float = 0.1, process: str = "edm", beta: Optional[dict] = None,
                 **options) -> dict:
    """The plain-dict description of a network that `build_network` builds and checkpoints store.

    `options` are `SPEC_DEFAULTS`' keys (sigma_data, augment_dim, mlp_ratio, ...); only values
    that differ from those defaults are stored. `process="beta"` describes a beta-diffusion
    network (`fastlego.beta.BetaPrecond`): the spec then holds "process": "beta" and "beta", the
    process's constants (`fastlego.beta.BETA_DEFAULTS`, overridden by `beta`) and data mean; an
    EDM spec has neither key."""
    if process not in ("edm", "beta"):
        raise ValueError(f"process must be 'edm' or 'beta' (beta diffusion), got {process!r}")
    if beta is not None and process != "beta":
        raise ValueError("beta options need process='beta'")
    if (preset is None) == (bricks is None):
        raise ValueError("give exactly one of preset (a name from fastlego.PRESETS) or bricks "
                         f"(REGION:TYPE:DEPTH,..., e.g. {DEMO_BRICKS})")
    unknown = sorted(set(options) - set(SPEC_DEFAULTS))
    if unknown:
        raise TypeError(f"network_spec got unknown options {unknown}; expected some of {sorted(SPEC_DEFAULTS)}")
    if preset is not None:
        get_preset(preset)
        stack = None
    else:
        stack = parse_bricks(bricks) if isinstance(bricks, str) else _stack_from_dict(bricks)
    regions = list(get_preset(preset).regions) if preset else stack["img_resolution"]
    bad = [r for r in regions if img_resolution % r]
    if bad:
        raise ValueError(f"training resolution {img_resolution} is not a multiple of the region size(s) {bad} "
                         f"of this network (regions {regions}): use a resolution that is a multiple of "
                         f"{math.lcm(*regions)}, or a smaller stack")
    spec = {"img_resolution": int(img_resolution), "img_channels": int(img_channels), "label_dim": int(label_dim),
            "preset": preset, "bricks": stack, "train_intermediate_stages": bool(intermediate),
            "class_dropout_prob": float(class_dropout_prob)}
    spec.update({k: v for k, v in options.items() if v != SPEC_DEFAULTS[k]})
    if process == "beta":
        from .beta import BETA_DEFAULTS, check_beta_options

        given = dict(beta or {})
        check_beta_options(given)
        mean = given.pop("data_mean", None)
        spec["process"] = "beta"
        spec["beta"] = {**BETA_DEFAULTS, **{k: float(v) for k, v in given.items()},
                        "data_mean": [0.5] * int(img_channels) if mean is None else [float(m) for m in mean]}
    return spec


def _mlp_ratio(backbone: LegoBackbone) -> float:
    """The MLP ratio the backbone was built with, exact under DiTBlock's int(width * ratio)."""
    for brick in backbone.model:
        if len(brick.blocks):
            fc1 = brick.blocks[0].mlp.fc1
            ratio = fc1.out_features / fc1.in_features
            if int(fc1.in_features * ratio) != fc1.out_features:
                ratio = (fc1.out_features + 0.5) / fc1.in_features
            return ratio
    return SPEC_DEFAULTS["mlp_ratio"]


def spec_from_network(net: EDMPrecond) -> dict:
    """The network spec of any EDMPrecond (or beta-diffusion BetaPrecond), read from the module's
    own attributes (its bricks, channels, labels, options and EDM or beta parameters):
    `build_network(spec_from_network(net))` builds the same network. A preset's stack is stored
    by the preset's name."""
    beta = getattr(net, "process", "edm") == "beta"
    if not isinstance(net, EDMPrecond) and not beta:
        raise TypeError(f"expected a fastlego.EDMPrecond, got {type(net).__name__}: wrap a LegoBackbone in "
                        f"EDMPrecond(img_resolution, img_channels, label_dim=..., backbone=backbone)")
    backbone = net.model
    regions, depths = [int(r) for r in backbone.img_resolution], [int(d) for d in backbone.depths]
    types = [t if isinstance(t, str) else [int(v) for v in t] for t in backbone.model_type]
    preset = matching_preset(regions, types, depths, prefer=net.model_type)
    spec = {"img_resolution": int(net.img_resolution), "img_channels": int(net.img_channels),
            "label_dim": int(net.label_dim), "preset": preset,
            "bricks": None if preset else {"img_resolution": regions, "model_type": types, "depths": depths},
            "train_intermediate_stages": bool(backbone.train_intermediate_stages),
            "class_dropout_prob": float(backbone.class_dropout_prob)}
    options = {"augment_dim": int(backbone.augment_dim), "mlp_ratio": _mlp_ratio(backbone),
               "use_fp16": bool(net.use_fp16)}
    if not beta:   # EDM's own parameters
        options.update(sigma_min=float(net.sigma_min), sigma_max=float(net.sigma_max),
                       sigma_data=float(net.sigma_data))
    spec.update({k: v for k, v in options.items() if v != SPEC_DEFAULTS[k]})
    if beta:
        spec.update(process="beta", beta=net.options())
    return spec


def build_network(spec: dict) -> EDMPrecond:
    """An EDMPrecond from `network_spec`'s dict (a `fastlego.beta.BetaPrecond` for a spec with
    process "beta"); `net.network_spec` keeps the dict."""
    options = {k: spec.get(k, v) for k, v in SPEC_DEFAULTS.items()}
    if spec.get("process", "edm") == "beta":
        from .beta import BetaPrecond

        backbone_kwargs = dict(in_channels=spec["img_channels"], label_dim=spec["label_dim"],
                               train_intermediate_stages=spec["train_intermediate_stages"],
                               class_dropout_prob=spec["class_dropout_prob"], augment_dim=options["augment_dim"],
                               mlp_ratio=options["mlp_ratio"])
        if spec.get("preset"):
            backbone, name = LegoBackbone.from_preset(spec["preset"], **backbone_kwargs), spec["preset"]
        else:
            stack = _stack_from_dict(spec["bricks"])
            backbone = LegoBackbone(**stack, **backbone_kwargs)
            name = brick_stack_name(stack["img_resolution"], stack["model_type"], stack["depths"])
        net = BetaPrecond(spec["img_resolution"], spec["img_channels"], label_dim=spec["label_dim"],
                          use_fp16=options["use_fp16"], backbone=backbone, model_type=name, **spec["beta"])
        net.network_spec = dict(spec)
        return net
    edm = dict(label_dim=spec["label_dim"], use_fp16=options["use_fp16"], sigma_min=options["sigma_min"],
               sigma_max=options["sigma_max"], sigma_data=options["sigma_data"])
    backbone_kwargs = dict(train_intermediate_stages=spec["train_intermediate_stages"],
                           class_dropout_prob=spec["class_dropout_prob"], augment_dim=options["augment_dim"],
                           mlp_ratio=options["mlp_ratio"])
    if spec.get("preset"):
        net = EDMPrecond(spec["img_resolution"], spec["img_channels"], model_type=spec["preset"], **edm,
                         **backbone_kwargs)
    else:
        stack = _stack_from_dict(spec["bricks"])
        backbone = LegoBackbone(in_channels=spec["img_channels"], label_dim=spec["label_dim"], **stack,
                                **backbone_kwargs)
        net = EDMPrecond(spec["img_resolution"], spec["img_channels"], backbone=backbone,
                         model_type=brick_stack_name(stack["img_resolution"], stack["model_type"], stack["depths"]),
                         **edm)
    net.network_spec = dict(spec)
    return net
