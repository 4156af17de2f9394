"""The detector contract shared by every change detector.

A detector takes one block of an aligned, radiometrically normalised image pair and returns
change evidence for every pixel of that block. Arrays only: no files, no CRS.

Inputs
    before, after: float32 ``(bands, h, w)`` reflectance-like values (roughly 0..1), bands in the
        order of ``roles`` (e.g. ``("blue", "green", "red", "nir")``); invalid pixels may hold
        anything.
    valid: bool ``(h, w)``, True where both dates observed clear ground.
    roles: band role names, in band order.
    res_m: pixel size in metres (neighbourhood sizes scale with it).

Output: a dict of float32 ``(h, w)`` layers. Always ``"change"``: change probability in 0..1
(0 where not valid). Spectral evidence used by the classifier when the bands allow it:
``"ndvi_before"``, ``"ndvi_after"``, ``"bright_before"``, ``"bright_after"`` (NaN where the
needed band is absent).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ChangeDetector(Protocol):
    #: context pixels each side a block needs for neighbourhood operations
    halo: int

    def __call__(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]: ...
