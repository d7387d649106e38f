"""The restricted unpickler that reads the LEGO release's `.pkl` files: no code from a pickle runs.

This module is a security boundary. A pickle is a small program: its GLOBAL opcodes import any
attribute of any module (`os.system`, `builtins.eval`, ...) and its REDUCE / NEWOBJ / BUILD
opcodes call what they imported with arguments from the file, so `pickle.load` of a file runs
whatever the file says. The release's files add one more step: EDM's persistence pickling
rebuilds the network with `torch_utils.persistence._reconstruct_persistent_obj(meta)`, which
`exec`s the Python source stored in `meta['module_src']`.

`RestrictedUnpickler` resolves every global a pickle names through one allow-list
(`_resolve_global`) and refuses every other one with an `UnsafePickleError` naming it. What the
allow-list resolves to, and why none of it runs code the file controls:

- The release's module classes (`training.lego_models.LEGO`, `LEGO_module`, `DiTBlock`,
  `FinalLayer`, `TimestepEmbedder`, `PositionalEmbedding`, `LabelEmbedder`), timm's
  `PatchEmbed` / `Attention` / `Mlp` (at their timm >= 0.9 and older paths) and every
  `torch.nn.modules.*` Module class become `StandInModule` subclasses: they only store the
  pickled `__dict__` (their `_parameters`, `_buffers`, `_modules`), and the arguments when a
  pickle calls the class, as data. No method of the real class runs; the release's code and
  timm are never imported.
- `torch_utils.persistence._reconstruct_persistent_obj` becomes `PersistentObjectStandIn`,
  which keeps `meta` (type, version, class_name, state, module_src) as data: `module_src` is
  never executed.
- Tensors are rebuilt by checked stand-ins for torch's own rebuild functions
  (`torch._utils._rebuild_tensor_v2` / `_v3`, `_rebuild_parameter(_with_state)`,
  `torch._tensor._rebuild_from_type_v2` into plain tensors and Parameters only); their storages
  are nested torch.save blobs (`torch.storage._load_from_bytes`) read with torch's own
  `weights_only=True` loader. Backward hooks and Python attributes on tensors are dropped.
  Also allowed: `torch.Size`, `torch.device`, `torch.Tensor`, `Parameter`, and torch's dtypes,
  layouts and memory formats.
- Plain data: `collections.OrderedDict`; the builtins set, frozenset, slice, range, complex,
  bytearray, bytes, list, tuple, dict, int, float, bool, str and object; `dnnlib.util.EasyDict`
  as a plain dict subclass (`EasyDictStandIn`); timm's `Format` Enum as a local copy
  (`Format`), with `builtins.getattr` allowed only to fetch an allow-listed Enum's member;
  `copyreg._reconstructor` only for the stand-ins, EasyDict and OrderedDict; numpy's `dtype`,
  `ndarray`, `multiarray.scalar` (non-object dtypes) and `multiarray._reconstruct` (plain
  ndarrays).
- Persistent ids (legacy torch.save files) are refused: `fastlego.checkpoint` reads those with
  `torch.load(weights_only=True)`.

`fastlego.checkpoint.load_release_pickle` runs this unpickler on a file, and
`fastlego.checkpoint.release_state_dict` walks the stand-in tree into a state dict.
"""

from __future__ import annotations

import collections
import enum
import io
import pickle
import warnings
from typing import Any, Dict, Tuple

import torch


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
