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
    """In a source checkout (not installed), expose the repository's kernels/ as fastlego.kernels."""
    if "fastlego.kernels" in _sys.modules or _ilu.find_spec(__name__ + ".kernels") is not None:
        return
    root = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(root, "__init__.py")
    if _os.path.exists(init):
        spec = _ilu.spec_from_file_location(__name__ + ".kernels", init, submodule_search_locations=[root])
        module = _ilu.module_from_spec(spec)
        _sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_map_source_kernels()

from .presets import PRESETS, Preset, get_preset  # noqa: E402
from .model import LegoBackbone  # noqa: E402
from .edm import EDMPrecond  # noqa: E402
from .dispatch import use_backend, set_backend, BackendNotSupported, set_deterministic, deterministic  # noqa: E402
from .info import explain  # noqa: E402
from . import ops, reference, dispatch  # noqa: E402,F401

__all__ = ["LegoBackbone", "EDMPrecond", "PRESETS", "Preset", "get_preset", "use_backend", "set_backend",
           "BackendNotSupported", "set_deterministic", "deterministic", "load_checkpoint", "save_checkpoint", "explain", "train", "TrainConfig", "sample"]


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
    raise AttributeError(f"module 'fastlego' has no attribute {name!r}")
