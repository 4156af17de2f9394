"""Small siamese U-Net change networks for RGB imagery, run with onnxruntime.

A network (``bench/train_cnn.py``) sees both dates' 2–98 % stretched RGB through one shared
encoder and decodes the absolute differences of its features, so it judges a change by its
shape and context (a roof, not just a brighter patch). Output: a change logit per pixel. A model
folder may hold several, ``cnn_<name>.{onnx,json}``, each for a range of pixel sizes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import features as F


def factor(res_m: float, work_res_m: float) -> int:
    """Integer block-averaging factor that brings ``res_m`` closest to ``work_res_m``."""
    return max(1, int(round(work_res_m / res_m)))


def downsample(x: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f``×``f`` cells of the last two axes (edges padded by reflection)."""
    if f == 1:
        return x
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(0, -h % f), (0, -w % f)]
    x = np.pad(x, pad, mode="reflect") if (h % f or w % f) else x
    H, W = x.shape[-2] // f, x.shape[-1] // f
    return x.reshape(*x.shape[:-2], H, f, W, f).mean((-3, -1))


def model_input(before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                stretch: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``(6, h, w)`` float32: each date's RGB stretched 2–98 % (the scene's percentiles
    ``stretch``, ``(3, 2)`` per date, else those of ``valid`` here), centred on 0."""
    parts = []
    for i, img in enumerate((before, after)):
        img = np.nan_to_num(img.astype(np.float32))
        params = F.stretch_params(img, valid) if stretch is None else stretch[i]
        parts.append(F._stretch(img, params) - 0.5)
    x = np.concatenate(parts)
    x[:, ~valid] = 0.0
    return x


def pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
    """``x`` padded (by reflection) at the bottom and right to a multiple of ``multiple`` in
    its last two axes, as the network's poolings need."""
    ph, pw = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not (ph or pw):
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)], mode="reflect")


@dataclass(frozen=True)
class Net:
    """A loaded network: onnxruntime session, the pixel sizes it serves and how it runs."""

    session: Any
    #: pixel sizes (m) the network is used for
    res_range_m: tuple[float, float]
    #: pixel size (m) it works at: finer imagery is averaged down by an integer factor
    work_res_m: float
    #: logit the network's score is measured from when combined with the pixel model's margin
    threshold: float = 0.0
    #: weight of its logit beside the pixel model's margin (its logits run to about ±8)
    weight: float = 1.0
    #: the input's height and width are padded to a multiple of this (2^poolings)
    multiple: int = 8
    #: it also runs at these multiples of ``work_res_m``; a pixel's logit is the largest
    #: (objects wider than its field of view, e.g. warehouse roofs, show at a coarser scale)
    scales: tuple[float, ...] = (1.0,)
    #: the ONNX file it was loaded from
    path: Path | None = None

    def coarsest_m(self) -> float:
        """The coarsest pixel size it runs at."""
        return self.work_res_m * max(self.scales)

    def vote(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray, res_m: float,
             stretch: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """What the network adds to a pixel model's margin: ``weight * (logit - threshold)``,
        the logit being the largest over :attr:`scales`."""
        x = model_input(before, after, valid, stretch)  # one input for every scale
        z = predict_input(self, x, valid, res_m)
        for s in self.scales:
            if s != 1.0:
                np.maximum(z, predict_input(self, x, valid, res_m, s), out=z)
        hand_memory_back(self)
        return self.weight * (z - self.threshold)

    def covers(self, res_m: float) -> bool:
        return self.res_range_m[0] <= res_m <= self.res_range_m[1]


def paths(model_dir: Path, name: str) -> tuple[Path, Path]:
    """Network ``cnn_<name>.onnx`` and its JSON sidecar in a model folder."""
    return model_dir / f"cnn_{name}.onnx", model_dir / f"cnn_{name}.json"


def net_for(model_dir: Path, res_m: float, threads: int = 2) -> Net | None:
    """The folder's network for imagery of ``res_m``, or None when it has none."""
    for onnx in sorted(model_dir.glob("cnn_*.onnx")):
        js = onnx.with_suffix(".json")
        if js.exists():
            net = _load_net(onnx, js, threads)
            if net.covers(res_m):
                return net
    return None


@lru_cache(maxsize=8)
def _load_net(onnx: Path, js: Path, threads: int) -> Net:
    meta = json.loads(js.read_text())
    lo, hi = meta["res_range_m"]
    return Net(load(onnx, threads), (float(lo), float(hi)), float(meta["work_res_m"]),
               float(meta.get("threshold", 0.0)), float(meta.get("weight", 1.0)),
               int(meta.get("multiple", 8)),
               tuple(float(x) for x in meta.get("scales", (1.0,))), onnx)


@lru_cache(maxsize=4)
def load(path: Path, threads: int = 2) -> Any:
    """An onnxruntime session for the model file (cached per path)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


#: an enlarged input (4.4 m imagery: 16x the pixels of its block) is made and run in tiles of
#: about this many working pixels a side plus margins, so its block needs about the memory of
#: a 1 m block
TILE_PX = 512
#: context each side of a tile (working pixels, a multiple of every network's ``multiple``)
TILE_MARGIN_PX = 32


def run(net: Net, x: np.ndarray) -> np.ndarray:
    """The network's logits ``(h, w)`` for input ``x`` ``(6, h, w)``, in one call."""
    h, w = x.shape[1:]
    return net.session.run(None, {"x": pad_to(x, net.multiple)[None]})[0][0, 0, :h, :w]


def hand_memory_back(net: Net) -> None:
    """Hand the memory onnxruntime's CPU arena keeps back: a call on the smallest input under
    run options that shrink the arena once it ends (a block's tiles and scales share the
    arena until then).

    Kept, the arena held the network's peak working memory (about 300 MB for a 1024² block at
    1 m) beneath everything a block computes after it and the next block's features: a block
    worker peaked at 1.3-1.4 GiB on 1152² px, 0.8-0.9 GiB handing it back (a 4000² compare,
    2 workers: peak PSS 2.8-2.9 → 1.8-1.9 GiB). Its cost is the network's memory taken again
    by the next block (13-18 % of the network's time on one 1152² block, about 5 % of a
    block's); the arena switched off instead cost 15-25 % and lowered only a call's own peak."""
    x = np.zeros((1, 6, net.multiple, net.multiple), np.float32)
    net.session.run(None, {"x": x}, _shrink_after_run())


@lru_cache(maxsize=1)
def _shrink_after_run() -> Any:
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return opts


def enlarge_window(x: np.ndarray, up: int, rows: tuple[int, int],
                   cols: tuple[int, int]) -> np.ndarray:
    """Rows and columns ``[r0, r1)``, ``[c0, c1)`` of ``x`` enlarged ``up``× (bilinear, as
    :func:`scipy.ndimage.zoom` does it to the whole of ``x``), made from a crop of ``x`` with one
    pixel of context, so the whole enlargement never exists at once."""
    (r0, r1), (c0, c1) = rows, cols
    if up == 1:
        return x[:, r0:r1, c0:c1]
    h, w = x.shape[1:]
    sr0, sc0 = max(0, r0 // up - 1), max(0, c0 // up - 1)
    sr1, sc1 = min(h, (r1 - 1) // up + 2), min(w, (c1 - 1) // up + 2)
    z = ndi.zoom(x[:, sr0:sr1, sc0:sc1], (1, up, up), order=1, mode="nearest", grid_mode=True)
    return z[:, r0 - sr0 * up:r1 - sr0 * up, c0 - sc0 * up:c1 - sc0 * up]


def run_tiled(net: Net, x: np.ndarray, up: int = 1, tile: int = TILE_PX,
              margin: int = TILE_MARGIN_PX) -> np.ndarray:
    """:func:`run` on ``x`` enlarged ``up``× (:func:`enlarge_window`), its logits averaged back
    to ``x``'s pixels, in ``tile``-pixel cores with ``margin`` pixels of context each side (one
    call where it fits). Tiles start on the network's pooling lattice, so they pool as one call
    does, and are whole multiples of ``up``."""
    h, w = x.shape[1:]
    H, W = h * up, w * up
    if max(H, W) <= tile + 2 * margin:
        return downsample(run(net, enlarge_window(x, up, (0, H), (0, W))), up)
    step = math.lcm(up, net.multiple)
    tile = max(step, tile // step * step)
    out = np.empty((h, w), np.float32)
    for r in range(0, H, tile):
        for c in range(0, W, tile):
            r0, c0 = max(0, r - margin), max(0, c - margin)
            r1, c1 = min(H, r + tile + margin), min(W, c + tile + margin)
            z = run(net, enlarge_window(x, up, (r0, r1), (c0, c1)))
            re, ce = min(r + tile, H), min(c + tile, W)
            core = z[r - r0:re - r0, c - c0:ce - c0]
            out[r // up:re // up, c // up:ce // up] = downsample(core, up)
    return out


def upsample_factor(res_m: float, work_res_m: float) -> int:
    """Integer factor by which imagery coarser than ``work_res_m`` is enlarged (bilinear) to
    about it for the network, 1 otherwise (:func:`predict`)."""
    return max(1, int(round(res_m / work_res_m)))


def predict(net: Net, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
            res_m: float, scale: float = 1.0,
            stretch: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Change logit per pixel, ``(h, w)`` float32 (-20 where not valid), the network run at
    ``scale`` times its working pixel size (``stretch``: see :func:`model_input`).

    Finer imagery is averaged down to about that size; coarser imagery (1.5-4.5 m: GF-1,
    SPOT 6/7, PlanetScope) is enlarged to it and the logits averaged back, so a roof spans as
    many of the network's pixels as it learned from. Run as acquired, LEVIR averaged to 2.2 m
    scored F1 0.283 held out; enlarged, 0.594.
    """
    return predict_input(net, model_input(before, after, valid, stretch), valid, res_m, scale)


def predict_input(net: Net, x: np.ndarray, valid: np.ndarray, res_m: float,
                  scale: float = 1.0) -> np.ndarray:
    """:func:`predict` on the network's input ``x`` (:func:`model_input`) at full resolution."""
    f = factor(res_m, net.work_res_m * scale)
    up = upsample_factor(res_m, net.work_res_m * scale)
    x = downsample(x, f).astype(np.float32)
    # enlarged tile by tile, its logits averaged back
    out = run_tiled(net, x, up) if up > 1 else run(net, x)
    if f > 1:
        out = ndi.zoom(out, f, order=1, mode="nearest", grid_mode=True)
    H, W = valid.shape
    out = np.pad(out, ((0, max(0, H - out.shape[0])), (0, max(0, W - out.shape[1]))),
                 mode="edge")[:H, :W]
    return np.where(valid, out, -20.0).astype(np.float32)
