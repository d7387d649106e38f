"""The 18 LEGO presets and the brick types they are made of, as the release names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

# Brick type -> (width D, patch size p, heads). The release's `lego_module_dict`.
BRICK_TYPES: Dict[str, Tuple[int, int, int]] = {}
for _size, (_width, _heads) in {"S": (384, 6), "L": (1024, 16), "XL": (1152, 16)}.items():
    for _patch in (2, 4, 8, 16):
        BRICK_TYPES[f"lego_{_size}_{_patch}"] = (_width, _patch, _heads)


@dataclass(frozen=True)
class Preset:
    """A stack of bricks: region size, brick type and depth of each, in order."""

    name: str
    regions: Tuple[int, ...]
    model_type: Tuple[str, ...]
    depths: Tuple[int, ...]

    def kwargs(self) -> dict:
        """Constructor arguments of `LegoBackbone` (the release's `LEGO`) for this preset."""
        return dict(img_resolution=list(self.regions), model_type=list(self.model_type), depths=list(self.depths))

    @property
    def training_resolution(self) -> int:
        return max(self.regions)


def _preset(name: str, regions: List[int], depths: List[int]) -> Preset:
    size = name.split("_")[1]
    # Patch 8 for the 16-pixel-region ("_8") bricks, patch 2 for regions of 4, 32 and 64.
    types = tuple(f"lego_{size}_{8 if r == 16 else 2}" for r in regions)
    return Preset(name, tuple(regions), types, tuple(depths))


_TABLE = [
    ("lego_S_PG_64", [4, 16, 64], [2, 4, 6]),
    ("lego_S_PR_64", [64, 16, 4], [6, 4, 2]),
    ("lego_S_U_32", [32, 16, 4, 16, 32], [6, 4, 2, 4, 6]),
    ("lego_S_U_64", [64, 16, 4, 16, 64], [6, 4, 2, 4, 6]),
    ("lego_L_PG_32", [4, 16, 32], [4, 8, 12]),
    ("lego_L_PR_32", [32, 16, 4], [12, 8, 4]),
    ("lego_L_PG_64", [4, 16, 64], [6, 8, 12]),
    ("lego_L_PR_64", [64, 16, 4], [12, 8, 6]),
    ("lego_L_U_32", [32, 16, 4, 16, 32], [12, 8, 6, 8, 12]),
    ("lego_L_U_64", [64, 16, 4, 16, 64], [12, 8, 6, 8, 12]),
    ("lego_L_PG_64_old", [4, 16, 64], [6, 6, 12]),
    ("lego_L_PR_64_old", [64, 16, 4], [12, 6, 6]),
    ("lego_XL_PG_32", [4, 16, 32], [4, 12, 14]),
    ("lego_XL_PR_32", [32, 16, 4], [14, 12, 4]),
    ("lego_XL_PG_64", [4, 16, 64], [4, 12, 14]),
    ("lego_XL_PR_64", [64, 16, 4], [14, 12, 4]),
    ("lego_XL_U_32", [32, 16, 4, 16, 32], [14, 10, 4, 10, 14]),
    ("lego_XL_U_64", [64, 16, 4, 16, 64], [14, 12, 4, 12, 14]),
]

PRESETS: Dict[str, Preset] = {name: _preset(name, regions, depths) for name, regions, depths in _TABLE}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a clear error listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown LEGO preset {name!r}: expected one of {', '.join(PRESETS)} "
            f"(fastlego.PRESETS lists them)"
        ) from None
