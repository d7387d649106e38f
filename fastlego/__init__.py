"""fastlego: the LEGO diffusion backbone, exact to the released checkpoints, fast on CUDA GPUs.

`import fastlego` needs only torch and numpy; Triton kernels, flash-attn and xformers are
optional backends loaded on first use (see `fastlego.dispatch`).
"""

from __future__ import annotations

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """Bind `fastlego.kernels` to the kernels that come with this copy of fastlego: inside the
    package when installed (fastlego/kernels/), beside it in a source checkout (kernels/ at the
    repository root). They are loaded from there by path: the import system alone could take
    another copy's, e.g. when another checkout is installed in editable mode (its finder maps
    `fastlego.kernels` to its own kernels/). Without either folder the import system decides."""
    name = __name__ + ".kernels"
    here = _os.path.dirname(_os.path.abspath(__file__))
    for root in (_os.path.join(here, "kernels"), _os.path.join(_os.path.dirname(here), "kernels")):
        init = _os.path.join(root, "__init__.py")
        if _os.path.isfile(init):
            break
    else:
        return
    loaded = _sys.modules.get(name)
    if loaded is not None and _os.path.abspath(getattr(loaded, "__file__", None) or "") == init:
        return
    spec = _ilu.spec_from_file_location(name, init, submodule_search_locations=[root])
    module = _ilu.module_from_spec(spec)
    _sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules[name]
        raise
    globals()["kernels"] = module


_map_source_kernels()

from .presets import PRESETS, Preset, get_preset  # noqa: E402
from .model import LegoBackbone  # noqa: E402
from .edm import EDMPrecond  # noqa: E402
from .dispatch import use_backend, set_backend, BackendNotSupported, set_deterministic, deterministic  # noqa: E402
from .tuning import tune  # noqa: E402
from .weight_cache import frozen_weights  # noqa: E402
from .info import explain  # noqa: E402
from . import ops, reference, dispatch  # noqa: E402,F401

__all__ = ["LegoBackbone", "EDMPrecond", "PRESETS", "Preset", "get_preset", "use_backend", "set_backend",
           "BackendNotSupported", "set_deterministic", "deterministic", "tune", "frozen_weights", "load_checkpoint", "save_checkpoint", "explain", "train", "TrainConfig", "sample", "quantize"]


def __getattr__(name):
    # Lazily import the heavier entry points.
    if name in ("load_checkpoint", "save_checkpoint", "load_state_dict_from_release"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name in ("train", "TrainConfig"):
        from . import training
        return getattr(training, name)
    if name == "sample":
        from .sampling import sample
        return sample
    if name == "quantize":
        from .fp8 import quantize
        return quantize
    raise AttributeError(f"module 'fastlego' has no attribute {name!r}")
