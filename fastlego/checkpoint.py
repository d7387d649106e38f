"""Load the LEGO release's checkpoints without running their code; save and load safetensors.

The release's `.pkl` files are a plain `pickle.dump` of a dict (`ema`, `loss_fn`, `augment_pipe`,
`dataset_kwargs`) written with NVIDIA's EDM/StyleGAN "persistence" pickling: the network under
`ema` is rebuilt by `torch_utils.persistence._reconstruct_persistent_obj(meta)`, which would
`exec` the source file stored in `meta['module_src']`, and the modules inside it are pickled
objects of `training.lego_models`, timm and torch.nn classes. Unpickling it normally runs code
from the file and needs the release's repository on the path.

`load_checkpoint` never does either. A restricted unpickler (`fastlego.safe_unpickle`, which
says exactly what it allows) resolves an allow-list of globals to inert stand-ins (objects that only hold their pickled `__dict__`), rebuilds tensors through torch's
own `weights_only` loader, and refuses every other global with an error naming it. The stand-in
tree is then walked (`_modules` / `_parameters` / `_buffers`) into a flat state dict with the
release's key names, which are `fastlego.EDMPrecond`'s: `model.model.{i}...`, `model.t_embedder...`.

    net = fastlego.load_checkpoint("edm-imagenet-64x64-cond-lego-l-pg.pkl")   # an EDMPrecond
    fastlego.save_checkpoint(net, "lego_l_pg_64.safetensors")                # + its constructor kwargs
    net = fastlego.load_checkpoint("lego_l_pg_64.safetensors")

Every network fastlego builds saves and loads this way, the network's description travelling
with the weights: `save_checkpoint` stores the constructor arguments and, for a brick stack that
is no preset, the stack itself (`"bricks"`: regions, brick types with custom `[width, patch,
heads]` ones, depths). fastlego's training checkpoints (`checkpoint.pt` of `fastlego train`)
load too (their "ema" network, or `key="model"`), with the network spec they store.

Plain state-dict files (`torch.save(net.state_dict(), ...)`, read with `weights_only=True`) load
too; without constructor arguments in the file, the preset is inferred from the weights' shapes
(a custom stack's head counts are not in the shapes: pass `model_type="REGION:TYPE:DEPTH,..."`).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .edm import EDMPrecond, brick_stack_name
from .model import LegoBackbone
from .networks import SPEC_DEFAULTS, _stack_from_dict, parse_bricks, spec_from_network
from .presets import BRICK_TYPES, PRESETS, get_preset
from .run_folder import CHECKPOINT_NAME
# The unpickler's names are also offered here, where they lived before safe_unpickle.py.
from .safe_unpickle import (EasyDictStandIn, Format, PersistentObjectStandIn, RestrictedUnpickler,  # noqa: F401
                            StandInModule, UnsafePickleError, standin_class)
from .training_checkpoint import check_training_checkpoint, is_training_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint", "load_state_dict_from_release", "load_release_pickle",
           "release_state_dict", "infer_preset", "brick_structure", "RestrictedUnpickler",
           "PersistentObjectStandIn", "StandInModule", "UnsafePickleError"]

# The metadata key of fastlego's safetensors files and the version of what it holds
# (2: custom brick stacks under "bricks"; files of presets are as version 1 wrote them).
SAFETENSORS_CONFIG_KEY = "fastlego_config"
SAFETENSORS_FORMAT_VERSION = 2

# EDMPrecond's constructor arguments, in the release's positional order (EDMPrecondLEGO's).
_EDM_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
             "sigma_data", "model_type")
_FLOAT_ARGS = ("sigma_min", "sigma_max", "sigma_data", "class_dropout_prob", "mlp_ratio")


# ============================================================================================
# Reading a release pickle (with fastlego.safe_unpickle's restricted unpickler)
# ============================================================================================

# The first pickle of a legacy (non-zip) torch.save file is this magic number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def load_release_pickle(path_or_file) -> Any:
    """Unpickle a release `.pkl` (path or binary file) with `fastlego.safe_unpickle`'s
    RestrictedUnpickler (no code from the file runs): the result holds `PersistentObjectStandIn` /
    `StandInModule` objects in place of the release's classes."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(_check_path(path_or_file), "rb") as f:
            return RestrictedUnpickler(f).load()
    return RestrictedUnpickler(path_or_file).load()


# ============================================================================================
# Walking the stand-in tree
# ============================================================================================

def _module_dict(obj) -> Optional[dict]:
    """The module state (`__dict__`) of a stand-in (or a real nn.Module), None for other objects."""
    if isinstance(obj, PersistentObjectStandIn):
        return obj.state
    if isinstance(obj, (StandInModule, torch.nn.Module)):
        return obj.__dict__
    return None


def release_state_dict(obj) -> Dict[str, torch.Tensor]:
    """Flatten a (stand-in) module tree into a state dict: parameters, then persistent buffers,
    then submodules, recursively, keys joined with '.' as `nn.Module.state_dict` does."""
    if _module_dict(obj) is None:
        raise TypeError(f"expected a pickled module (a persistent object or module stand-in), got {type(obj).__name__}")
    out: Dict[str, torch.Tensor] = {}
    on_path: set = set()

    def walk(node, prefix: str) -> None:
        state = _module_dict(node)
        if state is None:
            raise ValueError(f"'{prefix[:-1]}' is a {type(node).__name__}, not a module: the checkpoint's "
                             f"module tree is malformed")
        if id(node) in on_path:
            raise ValueError(f"the checkpoint's module tree loops back on itself at '{prefix[:-1]}'")
        on_path.add(id(node))
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers", "_modules"):
            if not isinstance(state.get(group) or {}, Mapping):
                raise ValueError(f"'{prefix}{group}' is a {type(state[group]).__name__}, not a dict: the "
                                 f"checkpoint's module tree is malformed")
        for group in ("_parameters", "_buffers"):
            for name, tensor in (state.get(group) or {}).items():
                if tensor is None or (group == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"'{prefix}{name}' in {group} is a {type(tensor).__name__}, not a tensor")
                out[prefix + name] = tensor.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")
        on_path.discard(id(node))

    walk(obj, "")
    return out


def _plain(value):
    """Numpy scalars and EasyDicts from a pickle as plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def _release_config(obj) -> Dict[str, Any]:
    """EDMPrecond constructor arguments of a pickled EDM wrapper: `_init_args` / `_init_kwargs`
    (what the release's constructor got), then the wrapper's and backbone's attributes."""
    state = _module_dict(obj) or {}
    config: Dict[str, Any] = {}
    for name, value in zip(_EDM_ARGS, state.get("_init_args") or ()):
        config[name] = value
    config.update(state.get("_init_kwargs") or {})
    for name in _EDM_ARGS:
        if name not in config and name in state:
            config[name] = state[name]
    backbone = _module_dict((state.get("_modules") or {}).get("model"))
    if backbone is not None:
        if "train_intermediate_stages" not in config and "train_intermediate_stages" in backbone:
            config["train_intermediate_stages"] = backbone["train_intermediate_stages"]
        y_embedder = _module_dict((backbone.get("_modules") or {}).get("y_embedder"))
        if y_embedder is not None and "class_dropout_prob" not in config and "dropout_prob" in y_embedder:
            config["class_dropout_prob"] = y_embedder["dropout_prob"]
    return _plain(config)


def load_state_dict_from_release(path, key: str = "ema") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, constructor arguments) of the network stored under `key` in a release `.pkl`,
    read without running any of its code. Keys are EDMPrecond's (`model.model.0.pos_embed`, ...)."""
    data = load_release_pickle(path)
    return _state_from_unpickled(data, key, path)


def _state_from_unpickled(data, key: str, path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if isinstance(data, dict) and not _is_state_dict(data):
        if not any(_is_state_dict(v) or _module_dict(v) is not None for v in data.values()):
            raise _not_a_checkpoint(path, f"it holds a dict with entries {sorted(map(str, data))[:8]} but no "
                                          f"network (no state dict, no pickled module)")
        if key not in data:
            raise KeyError(f"{os.fspath(path)!r} holds no entry {key!r}: its entries are {sorted(map(str, data))}; "
                           f"pass key=<one of them> (the EMA weights are under 'ema' in the release)")
        data = data[key]
    if _is_state_dict(data):
        return dict(data), {}
    if _module_dict(data) is None:
        raise ValueError(f"the entry {key!r} of {os.fspath(path)!r} is a {type(data).__name__}, not a network")
    return release_state_dict(data), _release_config(data)


# ============================================================================================
# Preset inference from the weights' shapes
# ============================================================================================

def _shape(value) -> Tuple[int, ...]:
    return tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))


def brick_structure(shapes: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Per brick, what the weights say: region, patch, width, depth and brick type (None when the
    width/patch pair is no release brick type). `shapes` maps state-dict keys (with or without
    the `model.` prefixes) to tensors or shapes."""
    bricks: Dict[int, Dict[str, Any]] = {}
    for key, value in shapes.items():
        m = re.search(r"(?:^|\.)model\.(\d+)\.(pos_embed$|x_embedder\.proj\.weight$|blocks\.(\d+)\.)", key)
        if not m:
            continue
        info = bricks.setdefault(int(m.group(1)), {"blocks": set()})
        if m.group(3) is not None:
            info["blocks"].add(int(m.group(3)))
        elif m.group(2) == "pos_embed":
            info["pos_embed"] = _shape(value)
        else:
            info["proj"] = _shape(value)
    if not bricks:
        raise ValueError("these weights hold no LEGO bricks (no 'model.{i}.pos_embed' / 'model.{i}.x_embedder.proj.weight' "
                         f"keys); first keys: {list(shapes)[:5]}")
    out = []
    for i in range(max(bricks) + 1):
        info = bricks.get(i)
        if info is None or "pos_embed" not in info or "proj" not in info:
            raise ValueError(f"brick {i} of these weights lacks its pos_embed or x_embedder.proj.weight: not a LEGO checkpoint "
                             f"(or a truncated one)")
        tokens, width = info["pos_embed"][-2], info["pos_embed"][-1]
        patch = info["proj"][-1]
        grid = math.isqrt(tokens)
        depth = len(info["blocks"])
        kind = next((name for name, (w, p, _) in BRICK_TYPES.items() if w == width and p == patch), None)
        out.append(dict(region=grid * patch, patch=patch, width=width, depth=depth, kind=kind,
                        in_channels=info["proj"][1]))
    return out


def _describe(structure: Sequence[Dict[str, Any]]) -> str:
    return (f"{len(structure)} bricks with regions {[b['region'] for b in structure]}, depths "
            f"{[b['depth'] for b in structure]}, widths {[b['width'] for b in structure]}, patches "
            f"{[b['patch'] for b in structure]}")


def _preset_distance(structure, preset) -> int:
    if len(structure) != len(preset.regions):
        return 1000 + 100 * abs(len(structure) - len(preset.regions))
    d = 0
    for b, r, kind, depth in zip(structure, preset.regions, preset.model_type, preset.depths):
        width, patch, _ = BRICK_TYPES[kind]
        d += 4 * (b["region"] != r) + 4 * (b["width"] != width) + 4 * (b["patch"] != patch) + abs(b["depth"] - depth)
    return d


def infer_preset(shapes: Mapping[str, Any]) -> str:
    """The preset (`fastlego.PRESETS`) whose bricks have exactly these regions, widths, patches
    and depths. `shapes` maps state-dict keys to tensors or shapes (meta tensors are fine).
    A ValueError names the structure found and the nearest presets when none fits."""
    structure = brick_structure(shapes)
    found = ([b["region"] for b in structure], [b["kind"] for b in structure], [b["depth"] for b in structure])
    for name, preset in PRESETS.items():
        if found == (list(preset.regions), list(preset.model_type), list(preset.depths)):
            return name
    preset_widths = {w for w, _, _ in BRICK_TYPES.values()}
    widths = {b["width"] for b in structure}
    if widths - preset_widths:
        # No preset has this width: a custom stack. Its head counts are not in the shapes.
        stack = ",".join(f"{b['region']}:w{b['width']}p{b['patch']}h<HEADS>:{b['depth']}" for b in structure)
        raise ValueError(f"these weights fit no LEGO preset: they hold {_describe(structure)}, a custom brick stack "
                         f"(no preset has width {sorted(widths - preset_widths)[0]}). Pass the stack: "
                         f"model_type='{stack}' with the head count it was built with, or load the file that "
                         f"stores it (a fastlego training checkpoint.pt, or a fastlego.save_checkpoint file)")
    nearest = sorted(PRESETS.values(), key=lambda p: (_preset_distance(structure, p), p.name))[:3]
    near = "; ".join(f"{p.name} (regions {list(p.regions)}, depths {list(p.depths)}, width "
                     f"{BRICK_TYPES[p.model_type[0]][0]})" for p in nearest)
    raise ValueError(f"these weights fit no LEGO preset: they hold {_describe(structure)}. Nearest presets: {near}. "
                     f"Pass model_type= with the preset, or the stack as 'REGION:TYPE:DEPTH,...' (TYPE a brick "
                     f"name such as lego_S_2 or w<WIDTH>p<PATCH>h<HEADS>), or load the file that stores it (a "
                     f"fastlego training checkpoint.pt, or a fastlego.save_checkpoint file)")


# ============================================================================================
# Reading files
# ============================================================================================

def _check_path(path) -> str:
    path = os.fspath(path)
    if re.match(r"^[a-z]+://", path):
        raise ValueError(f"{path!r} is a URL: download the file first (e.g. with curl or "
                         f"torch.hub.download_url_to_file) and pass the local path")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if os.path.isdir(path):
        inside = os.path.join(path, CHECKPOINT_NAME)
        if os.path.exists(inside):
            raise IsADirectoryError(f"{path!r} is a directory (a training run's folder): pass its checkpoint, {inside!r}")
        raise IsADirectoryError(f"{path!r} is a directory: pass the checkpoint file (.pkl, .pt, .safetensors) inside it")
    return path


def _not_a_checkpoint(path: str, why: str) -> ValueError:
    """The error for a file that is no checkpoint, naming what to pass instead."""
    hint = ("pass a release .pkl, a fastlego training checkpoint (a run's checkpoint.pt), a "
            "fastlego.save_checkpoint .safetensors file or a torch.save'd state dict")
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        sibling = os.path.join(os.path.dirname(os.path.abspath(path)), CHECKPOINT_NAME)
        if os.path.exists(sibling) and os.path.exists(path) and not os.path.samefile(sibling, path):
            hint = f"this folder holds a training run: pass its checkpoint, {sibling!r}"
    return ValueError(f"{path!r} is not a readable checkpoint: {why}; {hint}")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8


def _safetensors_module():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError("safetensors files need the safetensors package: pip install safetensors "
                          "(or pip install 'fastlego[io]')") from None
    return st


def _read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    st = _safetensors_module()
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
    tensors = st.load_file(path, device="cpu")
    config: Dict[str, Any] = {}
    if SAFETENSORS_CONFIG_KEY in metadata:
        try:
            config = json.loads(metadata[SAFETENSORS_CONFIG_KEY])
        except ValueError as exc:
            raise ValueError(f"{path!r}: its '{SAFETENSORS_CONFIG_KEY}' metadata is not valid JSON ({exc})") from None
        for name in _FLOAT_ARGS:
            if isinstance(config.get(name), str):
                config[name] = float(config[name])  # non-finite floats are stored as "inf" / "nan"
        version = config.pop("format_version", 1)
        written_by = config.pop("fastlego_version", None)
        if isinstance(version, int) and version > SAFETENSORS_FORMAT_VERSION:
            raise ValueError(f"{path!r} was written by a newer fastlego ({written_by}, format version {version} > "
                             f"{SAFETENSORS_FORMAT_VERSION}): upgrade fastlego to load it")
    return tensors, config


def _read_torch_file(path: str):
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"{path!r} is a torch.save file holding more than tensors and plain containers, which fastlego "
            f"refuses to unpickle (it would run code from the file). Save a state dict instead: "
            f"torch.save(net.state_dict(), path). torch said: {str(exc).splitlines()[0]}") from None
    return data


def _read_checkpoint(path, key: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, constructor arguments found in the file) of any supported file."""
    path = _check_path(path)
    if _is_safetensors(path):
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        try:
            data = _read_torch_file(path)
        except (RuntimeError, EOFError) as exc:  # a zip, but no torch.save archive
            raise _not_a_checkpoint(path, f"a zip file but no torch.save archive (torch said: "
                                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    else:
        try:
            data = load_release_pickle(path)
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError, OverflowError) as exc:
            raise _not_a_checkpoint(path, f"truncated, or not a .pkl / torch.save / .safetensors file (pickle said: "
                                          f"{exc or type(exc).__name__})") from None
        if isinstance(data, int) and data == _TORCH_LEGACY_MAGIC:
            data = _read_torch_file(path)
    if is_training_checkpoint(data):
        return _state_from_training_checkpoint(check_training_checkpoint(data, path), key, path)
    return _state_from_unpickled(data, key, path)


def _state_from_training_checkpoint(ckpt: dict, key: str, path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """A fastlego training checkpoint's network `key` ("ema" or "model") and its spec as arguments."""
    if key not in ("ema", "model"):
        raise KeyError(f"{os.fspath(path)!r} is a fastlego training checkpoint: its networks are 'ema' (the "
                       f"default, the EMA weights) and 'model' (the raw trained weights); got key={key!r}")
    return dict(ckpt[key]), config_from_spec(ckpt["network"])


def _normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EDMPrecond's key names: drop a DDP `module.` prefix, add `model.` to backbone-only keys."""
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("t_embedder.") for k in sd):
        sd = {"model." + k: v for k, v in sd.items()}
    return sd


# ============================================================================================
# Building the model
# ============================================================================================

def _parameter_names(fn) -> set:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}


def _backbone_arg_names() -> set:
    """LegoBackbone arguments EDMPrecond passes through (the rest it sets itself)."""
    return _parameter_names(LegoBackbone.__init__) - {"img_resolution", "in_channels", "label_dim", "model_type",
                                                      "use_fp16"}


def _split_config(config: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(EDMPrecond arguments, backbone arguments); arguments neither takes are dropped with a warning.
    A custom stack's "bricks" are handled by `_make_network`."""
    config = {k: v for k, v in config.items() if k != "bricks"}
    edm_names, backbone_names = set(_EDM_ARGS), _backbone_arg_names()
    edm = {k: v for k, v in config.items() if k in edm_names}
    backbone = {k: v for k, v in config.items() if k in backbone_names}
    dropped = sorted(set(config) - edm_names - backbone_names)
    if dropped:
        warnings.warn(f"ignoring constructor arguments fastlego.EDMPrecond does not take: "
                      f"{ {k: config[k] for k in dropped} }", stacklevel=3)
    return edm, backbone


def _stack_text(model_type) -> Optional[str]:
    """The REGION:TYPE:DEPTH,... text of a model_type that names a brick stack (with or without
    the `custom:` prefix of `brick_stack_name`), else None."""
    if isinstance(model_type, str) and ":" in model_type:
        return model_type[len("custom:"):] if model_type.startswith("custom:") else model_type
    return None


def _complete_config(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, Any]:
    """Fill what the file did not say from the weights: preset, channels, label and augment dims.
    A model_type written as a brick stack ('4:lego_S_2:1,16:w128p8h4:2') becomes "bricks"."""
    config = dict(config)
    text = _stack_text(config.get("model_type"))
    if text is not None:
        config["bricks"] = parse_bricks(text)
    if config.get("bricks") is not None:
        stack = _stack_from_dict(config["bricks"])
        config["bricks"] = stack
        config["model_type"] = brick_stack_name(stack["img_resolution"], stack["model_type"], stack["depths"])
        resolution = max(stack["img_resolution"])
    else:
        if config.get("model_type") is None:
            config["model_type"] = infer_preset(state_dict)
        resolution = get_preset(config["model_type"]).training_resolution
    structure = brick_structure(state_dict)
    config.setdefault("img_channels", structure[0]["in_channels"] - 2)
    label = state_dict.get("model.y_embedder.embedding_table.weight")
    config.setdefault("label_dim", int(label.shape[1]) if label is not None else 0)
    augment = state_dict.get("model.map_augment.weight")
    if augment is not None:
        config.setdefault("augment_dim", int(augment.shape[1]))
    config.setdefault("img_resolution", resolution)
    return config


def _check_fit(net: EDMPrecond, state_dict: Dict[str, torch.Tensor], edm_kwargs: Dict[str, Any]) -> None:
    """A clear error, before loading, when the weights do not fit the model the arguments build."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            problems.append(f"{len(items)} {what} (e.g. {items[:3]})")
    try:
        hint = f"The weights hold {_describe(brick_structure(state_dict))}"
        try:
            hint += f", i.e. preset {infer_preset(state_dict)!r}"
        except ValueError:
            hint += ", which is no preset"
    except ValueError as exc:
        hint = str(exc)
    args = ", ".join(f"{k}={v!r}" for k, v in edm_kwargs.items())
    raise ValueError(f"the checkpoint's weights do not fit fastlego.EDMPrecond({args}): {'; '.join(problems)}. "
                     f"{hint}. Pass the matching model_type= / label_dim= / augment_dim= (or leave model_type "
                     f"out to infer it from the weights)")


def _dense_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a parameter should be: contiguous (a file may hold strided views) and
    64-byte aligned as torch's allocator makes it (safetensors' tensors may sit at 16-byte
    offsets, where CPU BLAS takes other code paths and rounds differently)."""
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


def _make_network(edm_kwargs: Dict[str, Any], backbone_kwargs: Dict[str, Any], bricks: Optional[dict]) -> EDMPrecond:
    """EDMPrecond of a preset (its name in model_type), or around the custom stack `bricks`."""
    if bricks is None:
        return EDMPrecond(**edm_kwargs, **backbone_kwargs)
    backbone = LegoBackbone(in_channels=edm_kwargs["img_channels"], label_dim=edm_kwargs.get("label_dim", 0),
                            **bricks, **backbone_kwargs)
    return EDMPrecond(**edm_kwargs, backbone=backbone)


def _build(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> EDMPrecond:
    edm_kwargs, backbone_kwargs = _split_config(config)
    bricks = config.get("bricks")
    all_kwargs = dict(edm_kwargs, **backbone_kwargs)
    # Build on the meta device (no memory, no random init) and take the file's tensors as the
    # parameters (assign=True keeps their dtype; requires_grad comes from the model).
    with torch.device("meta"):
        net = _make_network(edm_kwargs, backbone_kwargs, bricks)
    _check_fit(net, state_dict, all_kwargs)
    net.load_state_dict({k: _dense_aligned(v) for k, v in state_dict.items()}, strict=True, assign=True)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        net = _make_network(edm_kwargs, backbone_kwargs, bricks)  # some state lives outside the state dict: build for real
        net.load_state_dict(state_dict, strict=True)
    return net


def load_checkpoint(path, model_type: Optional[str] = None, key: str = "ema", map_location="cpu",
                    **overrides) -> EDMPrecond:
    """Load a LEGO checkpoint as a `fastlego.EDMPrecond` in eval mode.

    `path`: a release `.pkl` (read without running its code; the network under `key`), a
    `save_checkpoint` safetensors file, a fastlego training checkpoint (`fastlego train`'s
    `checkpoint.pt`: `key` "ema", the default, or "model"), or a `torch.save`d state dict (read
    with `weights_only=True`). Constructor arguments and brick stacks come from the file;
    `model_type` (a preset name, or a stack 'REGION:TYPE:DEPTH,...') and `overrides`
    (EDMPrecond / LegoBackbone arguments, e.g. `use_fp16=True`) replace them; arguments in the
    file that fastlego does not take are dropped with a warning. Without a `model_type` anywhere
    the preset is inferred from the weights' shapes. Parameters keep the file's dtype (fp32 in
    the release) and are moved to the device `map_location` (None: CPU). The network's spec is
    `net.network_spec` (what `fastlego.networks.build_network` takes)."""
    unknown = sorted(set(overrides) - set(_EDM_ARGS) - _backbone_arg_names())
    if unknown:
        raise TypeError(f"load_checkpoint got unknown arguments {unknown}: overrides are EDMPrecond / LegoBackbone "
                        f"constructor arguments, one of {sorted(set(_EDM_ARGS) | _backbone_arg_names())}")
    state_dict, config = _read_checkpoint(path, key)
    state_dict = _normalize_keys(state_dict)
    config = dict(config)
    if model_type is not None:
        config["model_type"] = model_type
        config.pop("bricks", None)   # the caller's stack (or preset) replaces the file's
    config.update(overrides)
    config = _complete_config(state_dict, config)
    for name in _FLOAT_ARGS:
        if name in config and config[name] is not None:
            config[name] = float(config[name])
    net = _build(state_dict, config)
    net.network_spec = spec_from_network(net)
    if map_location is not None:
        net = net.to(map_location)
    return net.eval()


# ============================================================================================
# Saving
# ============================================================================================

def _json_value(value):
    """JSON-safe: non-finite floats as strings ("inf"), tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def config_from_spec(spec: Dict[str, Any]) -> Dict[str, Any]:
    """A network spec (`fastlego.networks.network_spec` / `spec_from_network`) as the constructor
    arguments a checkpoint file stores: EDMPrecond's, the backbone's options and, for a stack that
    is no preset, "bricks" (regions, brick types, custom ones as [width, patch, heads], depths)."""
    options = {k: spec.get(k, v) for k, v in SPEC_DEFAULTS.items()}
    bricks = None if spec.get("preset") else _stack_from_dict(spec["bricks"])
    name = spec["preset"] if bricks is None else brick_stack_name(bricks["img_resolution"], bricks["model_type"],
                                                                   bricks["depths"])
    config = {"img_resolution": int(spec["img_resolution"]), "img_channels": int(spec["img_channels"]),
              "label_dim": int(spec["label_dim"]), "use_fp16": bool(options["use_fp16"]),
              "sigma_min": float(options["sigma_min"]), "sigma_max": float(options["sigma_max"]),
              "sigma_data": float(options["sigma_data"]), "model_type": name,
              "augment_dim": int(options["augment_dim"]), "class_dropout_prob": float(spec["class_dropout_prob"]),
              "train_intermediate_stages": bool(spec["train_intermediate_stages"])}
    if options["mlp_ratio"] != SPEC_DEFAULTS["mlp_ratio"]:
        config["mlp_ratio"] = float(options["mlp_ratio"])
    if bricks is not None:
        config["bricks"] = bricks
    return config


def checkpoint_config(net: EDMPrecond) -> Dict[str, Any]:
    """The constructor arguments that rebuild `net`, read from the module itself (any brick stack,
    preset or not; a `network_spec` attribute is not needed): see `config_from_spec`."""
    return config_from_spec(spec_from_network(net))


def save_checkpoint(net: EDMPrecond, path) -> None:
    """Write `net`'s weights (contiguous, on the CPU, `pos_embed` included) to a safetensors file
    whose metadata holds, as JSON, everything that rebuilds the network (`checkpoint_config`:
    constructor arguments, and the brick stack when it is no preset); `load_checkpoint` reads it
    back. Any EDMPrecond saves: a preset, a custom stack, custom `(width, patch, heads)` bricks."""
    st = _safetensors_module()
    if not isinstance(net, EDMPrecond):
        raise TypeError(f"save_checkpoint takes a fastlego.EDMPrecond, got {type(net).__name__}; wrap a LegoBackbone "
                        f"first: fastlego.EDMPrecond(img_resolution, img_channels, label_dim=backbone.label_dim, "
                        f"backbone=backbone)")
    from . import __version__
    config = {k: _json_value(v) for k, v in checkpoint_config(net).items()}
    config.update(format_version=SAFETENSORS_FORMAT_VERSION, fastlego_version=__version__)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    st.save_file(tensors, os.fspath(path), metadata={"format": "pt", SAFETENSORS_CONFIG_KEY: json.dumps(config)})
