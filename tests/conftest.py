"""Shared fixtures: small GeoTIFFs written on demand into ``tmp_path``.

``make_raster(name, array, crs=..., transform=... | res=/origin=, nodata=, descriptions=,
tags=, colorinterp=)`` writes ``array`` ((h, w) or (bands, h, w)) and returns its path.
``texture(shape, seed=0, sigma=2.0)`` is a seeded smooth random field in 0..1 (an image with
structure at every scale, good for registration tests).
``shared_data`` is ``../shared/data`` beside the repository, or skips the test when absent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from scipy import ndimage as ndi

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

MakeRaster = Callable[..., Path]


@pytest.fixture
def make_raster(tmp_path: Path) -> MakeRaster:
    """Factory writing a GeoTIFF into ``tmp_path`` (subfolders allowed in ``name``)."""

    def _make(name: str, array: np.ndarray, *, crs: Any = "EPSG:32650",
              transform: Affine | None = None, res: float = 1.0,
              origin: tuple[float, float] = (500_000.0, 2_545_000.0),
              nodata: float | None = None, descriptions: Sequence[str | None] | None = None,
              tags: dict[str, str] | None = None,
              colorinterp: Sequence[ColorInterp] | None = None) -> Path:
        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[None]
        count, h, w = arr.shape
        if transform is None:
            transform = Affine(res, 0.0, origin[0], 0.0, -res, origin[1])
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        profile = dict(driver="GTiff", width=w, height=h, count=count, dtype=arr.dtype,
                       transform=transform, nodata=nodata)
        if crs is not None:
            profile["crs"] = crs
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr)
            if descriptions:
                for i, d in enumerate(descriptions, start=1):
                    if d:
                        dst.set_band_description(i, d)
            if tags:
                dst.update_tags(**tags)
            if colorinterp:
                dst.colorinterp = list(colorinterp)
        return path

    return _make


def _texture(shape: tuple[int, int], seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = sum(ndi.gaussian_filter(rng.standard_normal(shape), s, mode="wrap") * s
            for s in (sigma, 3 * sigma, 9 * sigma))
    x = (x - x.min()) / (x.max() - x.min())
    return x.astype("float32")


@pytest.fixture
def texture() -> Callable[..., np.ndarray]:
    """``texture(shape, seed=0, sigma=2.0)`` -> float32 smooth random field in 0..1."""
    return _texture


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder, or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data folder not present")
    return SHARED_DATA


@pytest.fixture
def make_band_files(make_raster: MakeRaster) -> Callable[..., list[Path]]:
    """Factory writing one single-band GeoTIFF per entry of ``bands`` into ``folder``.

    ``make_band_files(folder, prefix, {"B02": arr10m, "B11": arr20m, "SCL": scl20m}, res=10.0)``
    writes ``<folder>/<prefix>_<key>.<ext>``; each array's pixel size is chosen so that all
    files cover the same extent as a ``(h, w)`` grid of ``res`` (the first array's shape).
    """

    def _make(folder: str, prefix: str, bands: dict[str, np.ndarray], *, res: float = 10.0,
              origin: tuple[float, float] = (500_000.0, 2_545_000.0), crs: Any = "EPSG:32650",
              ext: str = "tif", nodata: float | None = None) -> list[Path]:
        h0, _ = next(iter(bands.values())).shape
        out = []
        for key, arr in bands.items():
            r = res * h0 / arr.shape[0]
            out.append(make_raster(f"{folder}/{prefix}_{key}.{ext}", arr, crs=crs, res=r,
                                   origin=origin, nodata=nodata))
        return out

    return _make
