"""Load the LEGO release's checkpoints without running their code; save and load safetensors.

The release's `.pkl` files are a plain `pickle.dump` of a dict (`ema`, `loss_fn`, `augment_pipe`,
`dataset_kwargs`) written with NVIDIA's EDM/StyleGAN "persistence" pickling: the network under
`ema` is rebuilt by `torch_utils.persistence._reconstruct_persistent_obj(meta)`, which would
`exec` the source file stored in `meta['module_src']`, and the modules inside it are pickled
objects of `training.lego_models`, timm and torch.nn classes. Unpickling it normally runs code
from the file and needs the release's repository on the path.

`load_checkpoint` never does either. A restricted unpickler resolves an allow-list of globals to
inert stand-ins (objects that only hold their pickled `__dict__`), rebuilds tensors through torch's
own `weights_only` loader, and refuses every other global with an error naming it. The stand-in
tree is then walked (`_modules` / `_parameters` / `_buffers`) into a flat state dict with the
release's key names, which are `fastlego.EDMPrecond`'s: `model.model.{i}...`, `model.t_embedder...`.

    net = fastlego.load_checkpoint("edm-imagenet-64x64-cond-lego-l-pg.pkl")   # an EDMPrecond
    fastlego.save_checkpoint(net, "lego_l_pg_64.safetensors")                # + its constructor kwargs
    net = fastlego.load_checkpoint("lego_l_pg_64.safetensors")

Plain state-dict files (`torch.save(net.state_dict(), ...)`, read with `weights_only=True`) load
too; without constructor arguments in the file, the preset is inferred from the weights' shapes.
"""

from __future__ import annotations

import collections
import enum
import inspect
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .edm import EDMPrecond
from .model import LegoBackbone
from .presets import BRICK_TYPES, PRESETS, get_preset

__all__ = ["load_checkpoint", "save_checkpoint", "load_state_dict_from_release", "load_release_pickle",
           "release_state_dict", "infer_preset", "brick_structure", "RestrictedUnpickler",
           "PersistentObjectStandIn", "StandInModule", "UnsafePickleError"]

# The metadata key of fastlego's safetensors files and the version of what it holds.
SAFETENSORS_CONFIG_KEY = "fastlego_config"
SAFETENSORS_FORMAT_VERSION = 1

# EDMPrecond's constructor arguments, in the release's positional order (EDMPrecondLEGO's).
_EDM_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
             "sigma_data", "model_type")
_FLOAT_ARGS = ("sigma_min", "sigma_max", "sigma_data", "class_dropout_prob", "mlp_ratio")


# ============================================================================================
# Inert stand-ins for the classes and functions a release pickle names
# ============================================================================================

class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global (or a use of one) that fastlego does not allow."""


class StandInModule:
    """An inert stand-in for a pickled module class (`training.lego_models.LEGO`, timm's `Mlp`,
    `torch.nn.Linear`, ...): it runs none of the class's code and only keeps the pickled state,
    so its `_parameters`, `_buffers` and `_modules` can be walked. Subclasses are made per class
    path (`standin_class`), so `type(obj).__module__` / `__qualname__` say what it stands for."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        # Only reached when a pickle calls the class (REDUCE) instead of creating it bare (NEWOBJ).
        if args or kwargs:
            self.__dict__["_standin_call_args"] = (args, kwargs)

    def __setstate__(self, state):
        # pickle's BUILD: `state` is the object's __dict__, or `(dict, slot dict)` for classes with
        # __slots__; anything else is kept as is.
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_standin_state"] = state

    def __repr__(self) -> str:
        cls = type(self)
        return f"<inert stand-in for {cls.__module__}.{cls.__qualname__}>"


class PersistentObjectStandIn:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` would have rebuilt, left
    inert: the `meta` fields (`type`, `version`, `module_src`, `class_name`, `state`) are kept as
    data and `module_src` is never executed. `state` is the object's `__dict__`."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise UnsafePickleError(f"_reconstruct_persistent_obj expects a meta dict, got {type(meta).__name__}")
        self.type = meta.get("type")
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")
        self.class_name = meta.get("class_name")
        state = meta.get("state")
        self.state = dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return (f"<inert persistent object {self.class_name!r} (type={self.type!r}, version={self.version!r}; "
                f"source not executed)>")


class EasyDictStandIn(dict):
    """`dnnlib.util.EasyDict` (a dict with attribute access) as a plain dict subclass."""

    def __getattr__(self, name):
        if name.startswith("__"):  # never serve special names (e.g. __setstate__) from the data
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Format(str, enum.Enum):
    """timm's `timm.layers.format.Format` (the PatchEmbed output layout), an Enum of strings."""

    NCHW = "NCHW"
    NHWC = "NHWC"
    NCL = "NCL"
    NLC = "NLC"


_STANDIN_CACHE: Dict[Tuple[str, str], type] = {}


def standin_class(module: str, name: str) -> type:
    """The (cached) StandInModule subclass standing for `module.name`."""
    key = (module, name)
    if key not in _STANDIN_CACHE:
        _STANDIN_CACHE[key] = type(name, (StandInModule,), {"__module__": module, "__qualname__": name})
    return _STANDIN_CACHE[key]


def _reconstruct_persistent_obj(meta):
    """Stand-in for EDM's `torch_utils.persistence._reconstruct_persistent_obj`: no `exec`."""
    return PersistentObjectStandIn(meta)


def _load_from_bytes(blob):
    """Stand-in for `torch.storage._load_from_bytes`: the storage is a nested (legacy-format)
    torch.save blob, read with torch's own `weights_only` unpickler onto the CPU."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError(f"torch.storage._load_from_bytes expects bytes, got {type(blob).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            storage = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"torch's weights_only loader refused a nested tensor blob: {str(exc).splitlines()[0]}") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"a nested torch.save blob held {type(storage).__name__}, not a tensor storage")
    return storage


def _check_storage(storage, what: str) -> None:
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"{what} expects a tensor storage, got {type(storage).__name__}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`; backward hooks are dropped (a pickle can
    only hold allow-listed objects there anyway, and hooks are code)."""
    _check_storage(storage, "_rebuild_tensor_v2")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), bool(requires_grad),
                                               collections.OrderedDict(), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v3` (the newer dtypes)."""
    _check_storage(storage, "_rebuild_tensor_v3")
    if not isinstance(dtype, torch.dtype):
        raise UnsafePickleError(f"_rebuild_tensor_v3 expects a torch.dtype, got {type(dtype).__name__}")
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, tuple(size), tuple(stride), bool(requires_grad),
                                           collections.OrderedDict(), dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks=None, state=None):
    """Stand-in for `torch._utils._rebuild_parameter(_with_state)`: a plain Parameter; hooks and
    Python attributes set on the parameter are dropped."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _rebuild_from_type_v2(func, new_type, args, state):
    """Stand-in for `torch._tensor._rebuild_from_type_v2` (tensors with Python state or of a
    Tensor subclass): only plain tensors and Parameters are rebuilt; their Python state is dropped."""
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise UnsafePickleError(f"_rebuild_from_type_v2 with rebuild function {func!r} is not allowed")
    tensor = func(*args)
    if new_type is torch.nn.Parameter:
        return torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    if new_type is not torch.Tensor:
        raise UnsafePickleError(f"_rebuild_from_type_v2 into {new_type!r} is not allowed (only torch.Tensor and Parameter)")
    return tensor


def _safe_getattr(obj, name, *default):
    """`builtins.getattr` as pickles use it for Enum members (`getattr(Format, 'NCHW')`), only that."""
    if isinstance(obj, type) and issubclass(obj, enum.Enum) and isinstance(name, str) and name in obj.__members__:
        return obj.__members__[name]
    raise UnsafePickleError(f"getattr({obj!r}, {name!r}) is not allowed: only members of allow-listed Enums")


def _safe_reconstructor(cls, base, state):
    """`copyreg._reconstructor` (protocol 0/1 pickles of objects) for stand-in classes only."""
    if isinstance(cls, type) and issubclass(cls, StandInModule) and base is object:
        return object.__new__(cls)
    if cls is EasyDictStandIn and base is dict:
        return EasyDictStandIn(state or {})
    if cls is collections.OrderedDict and base is dict:
        return collections.OrderedDict(state or {})
    raise UnsafePickleError(f"copyreg._reconstructor({cls!r}, {base!r}) is not allowed")


def _numpy_multiarray():
    import numpy as np
    core = getattr(np, "_core", None)  # numpy >= 2 (numpy.core is a deprecated alias there)
    if core is None:
        import numpy.core as core
    return core.multiarray


def _numpy_scalar(dtype, data=None):
    """`numpy.core.multiarray.scalar` for non-object dtypes (numbers saved as numpy scalars)."""
    import numpy as np
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} is not allowed")
    return _numpy_multiarray().scalar(dtype, data)


def _numpy_reconstruct(subtype, shape, dtype_code):
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`, the first step of an ndarray's
    unpickling (ndarray.__setstate__ then fills it in); plain ndarrays only."""
    import numpy as np
    if subtype is not np.ndarray or not isinstance(dtype_code, (str, bytes)):
        raise UnsafePickleError(f"numpy _reconstruct({subtype!r}, ..., {dtype_code!r}) is not allowed (only numpy.ndarray)")
    return _numpy_multiarray()._reconstruct(np.ndarray, shape, dtype_code)


# The allow-list. Classes (modules of the release, timm, torch.nn) become StandInModule classes.
_STANDIN_CLASSES: Dict[str, frozenset] = {
    "training.lego_models": frozenset({"LEGO", "LEGO_module", "DiTBlock", "FinalLayer", "TimestepEmbedder",
                                       "PositionalEmbedding", "LabelEmbedder"}),
    "timm.layers.patch_embed": frozenset({"PatchEmbed"}),
    "timm.layers.attention": frozenset({"Attention"}),
    "timm.layers.mlp": frozenset({"Mlp"}),
    "timm.models.vision_transformer": frozenset({"PatchEmbed", "Attention", "Mlp"}),
    "timm.models.layers.patch_embed": frozenset({"PatchEmbed"}),  # timm < 0.9
    "timm.models.layers.mlp": frozenset({"Mlp"}),
}

_FUNCTIONS: Dict[Tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("timm.layers.format", "Format"): Format,
    ("dnnlib.util", "EasyDict"): EasyDictStandIn,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("builtins", "getattr"): _safe_getattr,
}
_SAFE_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "list", "tuple",
                  "dict", "int", "float", "bool", "str", "object"}


def _torch_nn_module_class(name: str) -> bool:
    cls = getattr(torch.nn, name, None)
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def _resolve_global(module: str, name: str):
    """The stand-in or safe object for an allow-listed global, or None."""
    if (module, name) in _FUNCTIONS:
        return _FUNCTIONS[(module, name)]
    if name in _STANDIN_CLASSES.get(module, ()):
        return standin_class(module, name)
    if module.startswith("torch.nn.modules.") and _torch_nn_module_class(name):
        return standin_class(module, name)
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    if module == "builtins" and name in _SAFE_BUILTINS:
        import builtins
        return getattr(builtins, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if name == "scalar":
            return _numpy_scalar
        if name == "_reconstruct":
            return _numpy_reconstruct
    if module == "numpy" and name in ("dtype", "ndarray"):
        import numpy as np
        return getattr(np, name)
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals, to inert stand-ins or safe functions,
    and refuses every other one with an `UnpicklingError` naming it. No code from the file runs."""

    def find_class(self, module: str, name: str):
        target = _resolve_global(module, name)
        if target is None:
            raise UnsafePickleError(
                f"refusing to load the global '{module}.{name}' from this pickle: fastlego reads LEGO/EDM "
                f"checkpoints without running their code and only allows the release's module classes "
                f"(training.lego_models, timm, torch.nn), tensors and plain containers. If this file is a "
                f"trusted checkpoint of another kind, convert it to a state dict first "
                f"(torch.save(net.state_dict(), path)) and load that.")
        return target

    def persistent_load(self, pid):
        raise UnsafePickleError(
            "this pickle uses persistent ids (a torch.save file in the legacy format?); fastlego reads those "
            "with torch.load(..., weights_only=True), which load_checkpoint does for torch.save files")


# The first pickle of a legacy (non-zip) torch.save file is this magic number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def load_release_pickle(path_or_file) -> Any:
    """Unpickle a release `.pkl` (path or binary file) with the restricted unpickler: the result
    holds `PersistentObjectStandIn` / `StandInModule` objects in place of the release's classes."""
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
    nearest = sorted(PRESETS.values(), key=lambda p: (_preset_distance(structure, p), p.name))[:3]
    near = "; ".join(f"{p.name} (regions {list(p.regions)}, depths {list(p.depths)}, width "
                     f"{BRICK_TYPES[p.model_type[0]][0]})" for p in nearest)
    raise ValueError(f"these weights fit no LEGO preset: they hold {_describe(structure)}. Nearest presets: {near}. "
                     f"Build the model yourself (fastlego.LegoBackbone with img_resolution/model_type/depths lists) "
                     f"and load_state_dict the weights, or pass model_type= if the preset is known")


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
        raise IsADirectoryError(f"{path!r} is a directory: pass the checkpoint file (.pkl, .pt, .safetensors) inside it")
    return path


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
        config.pop("format_version", None)
        config.pop("fastlego_version", None)
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
        data = _read_torch_file(path)
    else:
        try:
            data = load_release_pickle(path)
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError) as exc:
            raise ValueError(f"{path!r} is not a readable checkpoint: truncated, or not a .pkl / torch.save / "
                             f".safetensors file (pickle said: {exc or type(exc).__name__})") from None
        if isinstance(data, int) and data == _TORCH_LEGACY_MAGIC:
            data = _read_torch_file(path)
    return _state_from_unpickled(data, key, path)


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
    """(EDMPrecond arguments, backbone arguments); arguments neither takes are dropped with a warning."""
    edm_names, backbone_names = set(_EDM_ARGS), _backbone_arg_names()
    edm = {k: v for k, v in config.items() if k in edm_names}
    backbone = {k: v for k, v in config.items() if k in backbone_names}
    dropped = sorted(set(config) - edm_names - backbone_names)
    if dropped:
        warnings.warn(f"ignoring constructor arguments fastlego.EDMPrecond does not take: "
                      f"{ {k: config[k] for k in dropped} }", stacklevel=3)
    return edm, backbone


def _complete_config(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> Dict[str, Any]:
    """Fill what the file did not say from the weights: preset, channels, label and augment dims."""
    config = dict(config)
    if config.get("model_type") is None:
        config["model_type"] = infer_preset(state_dict)
    preset = get_preset(config["model_type"])
    structure = brick_structure(state_dict)
    config.setdefault("img_channels", structure[0]["in_channels"] - 2)
    label = state_dict.get("model.y_embedder.embedding_table.weight")
    config.setdefault("label_dim", int(label.shape[1]) if label is not None else 0)
    augment = state_dict.get("model.map_augment.weight")
    if augment is not None:
        config.setdefault("augment_dim", int(augment.shape[1]))
    config.setdefault("img_resolution", preset.training_resolution)
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


def _build(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> EDMPrecond:
    edm_kwargs, backbone_kwargs = _split_config(config)
    all_kwargs = dict(edm_kwargs, **backbone_kwargs)
    # Build on the meta device (no memory, no random init) and take the file's tensors as the
    # parameters (assign=True keeps their dtype; requires_grad comes from the model).
    with torch.device("meta"):
        net = EDMPrecond(**all_kwargs)
    _check_fit(net, state_dict, all_kwargs)
    net.load_state_dict({k: _dense_aligned(v) for k, v in state_dict.items()}, strict=True, assign=True)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):
        net = EDMPrecond(**all_kwargs)  # some state lives outside the state dict: build for real
        net.load_state_dict(state_dict, strict=True)
    return net


def load_checkpoint(path, model_type: Optional[str] = None, key: str = "ema", map_location="cpu",
                    **overrides) -> EDMPrecond:
    """Load a LEGO checkpoint as a `fastlego.EDMPrecond` in eval mode.

    `path`: a release `.pkl` (read without running its code; the network under `key`), a
    `save_checkpoint` safetensors file, or a `torch.save`d state dict (read with
    `weights_only=True`). Constructor arguments come from the file; `model_type` and
    `overrides` (EDMPrecond / LegoBackbone arguments, e.g. `use_fp16=True`) replace them;
    arguments in the file that fastlego does not take are dropped with a warning. Without a
    `model_type` anywhere the preset is inferred from the weights' shapes. Parameters keep the
    file's dtype (fp32 in the release) and are moved to the device `map_location` (None: CPU)."""
    unknown = sorted(set(overrides) - set(_EDM_ARGS) - _backbone_arg_names())
    if unknown:
        raise TypeError(f"load_checkpoint got unknown arguments {unknown}: overrides are EDMPrecond / LegoBackbone "
                        f"constructor arguments, one of {sorted(set(_EDM_ARGS) | _backbone_arg_names())}")
    state_dict, config = _read_checkpoint(path, key)
    state_dict = _normalize_keys(state_dict)
    config = dict(config)
    if model_type is not None:
        config["model_type"] = model_type
    config.update(overrides)
    config = _complete_config(state_dict, config)
    for name in _FLOAT_ARGS:
        if name in config and config[name] is not None:
            config[name] = float(config[name])
    net = _build(state_dict, config)
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


def checkpoint_config(net: EDMPrecond) -> Dict[str, Any]:
    """The constructor arguments that rebuild `net`: EDMPrecond's plus the backbone's that differ
    from a fresh preset model (augment_dim, class_dropout_prob, train_intermediate_stages, ...)."""
    backbone = net.model
    preset = get_preset(net.model_type)
    if list(backbone.img_resolution) != list(preset.regions) or list(backbone.model_type) != list(preset.model_type):
        raise ValueError(f"this model's bricks (regions {backbone.img_resolution}, types {backbone.model_type}) are not "
                         f"those of its preset {net.model_type!r}; save_checkpoint stores preset models only: "
                         f"save net.state_dict() with torch.save or safetensors yourself")
    config = {name: getattr(net, name) for name in _EDM_ARGS}
    config.update(augment_dim=backbone.augment_dim, class_dropout_prob=backbone.class_dropout_prob,
                  train_intermediate_stages=backbone.train_intermediate_stages)
    if list(backbone.depths) != list(preset.depths):
        config["depths"] = list(backbone.depths)
    fc1 = backbone.model[0].blocks[0].mlp.fc1 if len(backbone.model[0].blocks) else None
    if fc1 is not None and fc1.out_features != 4 * fc1.in_features:
        config["mlp_ratio"] = fc1.out_features / fc1.in_features
    return config


def save_checkpoint(net: EDMPrecond, path) -> None:
    """Write `net`'s weights (contiguous, on the CPU, `pos_embed` included) to a safetensors file
    whose metadata holds the constructor arguments as JSON; `load_checkpoint` reads it back."""
    st = _safetensors_module()
    if not isinstance(net, EDMPrecond):
        raise TypeError(f"save_checkpoint takes a fastlego.EDMPrecond, got {type(net).__name__}; wrap a LegoBackbone "
                        f"in EDMPrecond or save its state_dict() yourself")
    from . import __version__
    config = {k: _json_value(v) for k, v in checkpoint_config(net).items()}
    config.update(format_version=SAFETENSORS_FORMAT_VERSION, fastlego_version=__version__)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    st.save_file(tensors, os.fspath(path), metadata={"format": "pt", SAFETENSORS_CONFIG_KEY: json.dumps(config)})
