"""Shared type aliases and category constants."""

from __future__ import annotations

from typing import Literal

BBox = tuple[float, float, float, float]
"""(minx, miny, maxx, maxy)."""

BandRole = Literal["blue", "green", "red", "nir", "swir1", "swir2", "coastal", "rededge1",
                   "rededge2", "rededge3", "rededge4", "pan"]

Resampling = Literal["nearest", "bilinear", "cubic", "average"]

Category = Literal["illegal_construction", "forest_grave", "land_occupation", "other_change"]

#: Category codes in change.tif (0 = no change, 255 = not observed).
CATEGORY_CODES: dict[str, int] = {
    "illegal_construction": 1,
    "forest_grave": 2,
    "land_occupation": 3,
    "other_change": 4,
}
CODE_TO_CATEGORY: dict[int, str] = {v: k for k, v in CATEGORY_CODES.items()}
NO_CHANGE = 0
NOT_OBSERVED = 255

CATEGORY_ZH: dict[str, str] = {
    "illegal_construction": "违法建设",
    "forest_grave": "毁林建坟",
    "land_occupation": "违法占地",
    "other_change": "其他变化",
}
VIOLATIONS: tuple[str, ...] = ("illegal_construction", "forest_grave", "land_occupation")

#: Rule-layer roles the classifier understands.
RuleRole = Literal["forest", "farmland", "ecological_redline", "permits", "cemeteries",
                   "water", "construction_land"]

MU_M2 = 2000.0 / 3.0  # 1 亩 = 666.67 m²
