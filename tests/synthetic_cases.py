"""Labelled synthetic change cases on disk, laid out as ``bench/accuracy.py`` reads them:
``<root>/<dataset>/<case>/{before,after,label}.tif`` and ``meta.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from scipy import ndimage as ndi

RGB = ("red", "green", "blue")
SIZE = 160


def synthetic_pair(seed: int, res_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured ground (vegetation and soil) and, on the after date only, bright new roofs of
    8-20 m (at least 3 px) a side: (before, after) reflectance (3, h, w) and the label."""
    rng = np.random.default_rng(seed)
    land = ndi.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 8) > 0
    tex = ndi.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 1.5).astype(np.float32)
    veg, soil = np.array([0.05, 0.09, 0.05]), np.array([0.20, 0.17, 0.13])
    before = np.where(land, veg[:, None, None], soil[:, None, None]).astype(np.float32)
    before *= 1 + 0.4 * tex
    after = before * np.float32(1.05)  # a global gain: not change
    label = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(10):
        side = max(3, int(rng.integers(8, 21) / res_m))
        side = min(side, 24)
        r, c = (int(v) for v in rng.integers(4, SIZE - side - 4, 2))
        after[:, r:r + side, c:c + side] = np.array([0.42, 0.40, 0.38])[:, None, None]
        label[r:r + side, c:c + side] = 1
    noise = [rng.normal(0, 0.004, before.shape).astype(np.float32) for _ in range(2)]
    return np.clip(before + noise[0], 0, 1), np.clip(after + noise[1], 0, 1), label


def _write(path: Path, arr: np.ndarray, res_m: float, descriptions: tuple[str, ...] = ()) -> None:
    arr = arr if arr.ndim == 3 else arr[None]
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=len(arr),
                       dtype=arr.dtype, crs="EPSG:32650",
                       transform=Affine(res_m, 0, 500_000, 0, -res_m, 2_545_000)) as dst:
        dst.write(arr)
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)


def write_case(d: Path, seed: int, res_m: float) -> None:
    """One case folder: :func:`synthetic_pair` as 8-bit RGB, its label, and ``meta.json``."""
    d.mkdir(parents=True)
    before, after, label = synthetic_pair(seed, res_m)
    for name, img in (("before", before), ("after", after)):
        _write(d / f"{name}.tif", np.rint(img * 255).astype(np.uint8), res_m, RGB)
    _write(d / "label.tif", label, res_m)
    (d / "meta.json").write_text(json.dumps({"dataset": d.parent.name, "gsd_m": res_m,
                                             "bands": list(RGB)}))


def make_cases(root: Path, datasets: dict[str, float], per_dataset: int = 3) -> list[str]:
    """``per_dataset`` cases of each ``{dataset: pixel size}``; their ``<dataset>/<case>``."""
    names = []
    for k, (ds, res) in enumerate(datasets.items()):
        for i in range(per_dataset):
            write_case(root / ds / f"case{i}", 10 * k + i, res)
            names.append(f"{ds}/case{i}")
    return names
