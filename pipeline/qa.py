"""Product quality masks decoded into "not observed" pixels (pure array functions).

- Sentinel-2 L2A scene classification (SCL): 0 no data, 1 saturated/defective, 3 cloud shadow,
  8 cloud medium probability, 9 cloud high probability, 10 thin cirrus are invalid by default
  (2 dark/terrain shadow, 4-7 land/water/unclassified and 11 snow are kept).
- Sentinel-2 L1C ``QA60``: bit 10 opaque cloud, bit 11 cirrus.
- Landsat Collection-2 ``QA_PIXEL``: bit 0 fill, 1 dilated cloud, 2 cirrus (OLI), 3 cloud,
  4 cloud shadow are invalid by default (5 snow, 6 clear, 7 water are kept).

Each ``*_invalid`` function returns a bool array, True where the pixel must not be compared.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .sensors import QaKind

SCL_INVALID: frozenset[int] = frozenset({0, 1, 3, 8, 9, 10})
QA60_BITS: tuple[int, ...] = (10, 11)
QA_PIXEL_BITS: tuple[int, ...] = (0, 1, 2, 3, 4)


def bits_set(qa: np.ndarray, bits: Iterable[int]) -> np.ndarray:
    """True where any of ``bits`` (0 = least significant) is set in the integer array ``qa``."""
    m = 0
    for b in bits:
        m |= 1 << int(b)
    return (np.asarray(qa).astype(np.int64) & m) != 0


def scl_invalid(scl: np.ndarray, classes: Iterable[int] = SCL_INVALID) -> np.ndarray:
    """Sentinel-2 SCL: True for no data, saturated, cloud shadow, cloud and cirrus classes."""
    return np.isin(np.asarray(scl), np.fromiter(classes, dtype=np.int64))


def qa60_invalid(qa: np.ndarray, bits: Iterable[int] = QA60_BITS) -> np.ndarray:
    """Sentinel-2 QA60: True for opaque cloud (bit 10) or cirrus (bit 11)."""
    return bits_set(qa, bits)


def qa_pixel_invalid(qa: np.ndarray, bits: Iterable[int] = QA_PIXEL_BITS) -> np.ndarray:
    """Landsat QA_PIXEL: True for fill, dilated cloud, cirrus, cloud or cloud shadow."""
    return bits_set(qa, bits)


def invalid_mask(kind: QaKind, qa: np.ndarray) -> np.ndarray:
    """Dispatch on the product mask kind (``scl``, ``qa60``, ``qa_pixel``)."""
    if kind == "scl":
        return scl_invalid(qa)
    if kind == "qa60":
        return qa60_invalid(qa)
    if kind == "qa_pixel":
        return qa_pixel_invalid(qa)
    raise ValueError(f"unknown quality mask kind {kind!r}; expected scl, qa60 or qa_pixel")
