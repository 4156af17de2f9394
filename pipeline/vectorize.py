"""Polygons from the classified raster, streamed block by block.

Each block is vectorized in *global pixel coordinates* (integers, exact), so polygons cut by a
block edge are re-joined exactly afterwards; only then are they moved to map coordinates,
simplified and filtered by minimum area. Per-object evidence is accumulated as sums and pixel
counts so that means stay exact across seams.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from rasterio.windows import Window
from skimage.measure import label as cc_label

from .types import CODE_TO_CATEGORY, NOT_OBSERVED

#: Evidence layers summed per object (means computed after seams are joined).
STAT_LAYERS: tuple[str, ...] = ("confidence", "ndvi_before", "ndvi_after", "bright_before",
                                "bright_after")


@dataclass
class BlockPolygons:
    """Polygons of one block's core in global pixel coordinates, with per-object sums."""

    geoms: list[shapely.Polygon] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    pixels: list[int] = field(default_factory=list)
    sums: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)
    #: whether the polygon touches an edge of its block shared with another block
    on_seam: list[bool] = field(default_factory=list)
    #: pixels of the polygon inside a farmland parcel (parcel pieces are legitimately apart)
    parcel_px: list[int] = field(default_factory=list)
    #: after :func:`join_blocks`: indexes of polygons joined from parts decided differently
    reconciled: list[int] = field(default_factory=list)
    #: after :func:`join_blocks`: pairs of polygons that share a seam edge but got different
    #: categories in their blocks (an object wider than the halo decided differently on each
    #: side, or two different objects that happen to touch at a block edge)
    seam_conflicts: int = 0


def block_polygons(category: np.ndarray, window: Window, grid_shape: tuple[int, int],
                   evidence: Mapping[str, np.ndarray] | None = None,
                   parcel: np.ndarray | None = None) -> BlockPolygons:
    """Vectorize one block core (``category`` covers exactly ``window``) with 4-connectivity.

    ``parcel``: True inside farmland parcels (counted per polygon for :func:`join_blocks`).
    """
    cat = np.where(category == NOT_OBSERVED, 0, category).astype(np.uint8)
    labels = cc_label(cat, background=0, connectivity=1).astype(np.int32)
    out = BlockPolygons(sums={k: [] for k in STAT_LAYERS}, counts={k: [] for k in STAT_LAYERS})
    n = int(labels.max())
    if n == 0:
        return out
    # only the labelled pixels (changed objects are a small share of a block)
    idx = np.flatnonzero(labels)
    flat = labels.ravel()[idx]
    pixels = np.bincount(flat, minlength=n + 1)
    codes = np.zeros(n + 1, np.uint8)
    codes[flat] = cat.ravel()[idx]
    in_parcel = (np.bincount(flat, weights=parcel.ravel()[idx].astype(np.float64),
                             minlength=n + 1).astype(np.int64) if parcel is not None
                 else np.zeros(n + 1, np.int64))
    for name in STAT_LAYERS:
        layer = None if evidence is None else evidence.get(name)
        if layer is None:
            s, c = np.zeros(n + 1), np.zeros(n + 1, np.int64)
        else:
            v = layer.ravel()[idx].astype(np.float64)
            ok = np.isfinite(v)
            s = np.bincount(flat[ok], weights=v[ok], minlength=n + 1)
            c = np.bincount(flat[ok], minlength=n + 1)
        out.sums[name] = s[1:].tolist()
        out.counts[name] = c[1:].tolist()
    geoms: list[shapely.Polygon | None] = [None] * n
    # polygonize only the bounding box of the objects
    rows = np.flatnonzero(np.bincount(idx // labels.shape[1], minlength=labels.shape[0]))
    cols = np.flatnonzero(np.bincount(idx % labels.shape[1], minlength=labels.shape[1]))
    br0, br1, bc0, bc1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    sub = np.ascontiguousarray(labels[br0:br1, bc0:bc1])
    to_global = Affine.translation(window.col_off + bc0, window.row_off + br0)
    for geom, value in features.shapes(sub, mask=sub > 0, connectivity=4,
                                       transform=to_global):
        geoms[int(value) - 1] = shapely.geometry.shape(geom)
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    H, W = grid_shape
    for i, g in enumerate(geoms):
        assert g is not None  # every label is one 4-connected region, so one polygon
        minx, miny, maxx, maxy = g.bounds
        seam = (minx <= c0 and c0 > 0) or (maxx >= c1 and c1 < W) or \
               (miny <= r0 and r0 > 0) or (maxy >= r1 and r1 < H)
        out.geoms.append(g)
        out.codes.append(int(codes[i + 1]))
        out.pixels.append(int(pixels[i + 1]))
        out.on_seam.append(bool(seam))
        out.parcel_px.append(int(in_parcel[i + 1]))
    return out


def _shared_edge(a: shapely.Geometry, b: shapely.Geometry) -> bool:
    return shapely.length(shapely.intersection(a, b)) > 0


def join_blocks(parts: Iterable[BlockPolygons]) -> BlockPolygons:
    """Join objects that a block edge cut in two (sharing an edge across a seam), near-linearly.

    Parts with the same category are joined. Parts with different categories are one object
    that each block decided from what it saw (an object wider than the halo): they are joined
    too and take the category of the larger share of pixels (``reconciled``), unless one of
    them lies in a farmland parcel, where pieces are cut along parcel edges on purpose; those
    are counted in ``seam_conflicts`` and left apart.
    """
    merged = BlockPolygons(sums={k: [] for k in STAT_LAYERS}, counts={k: [] for k in STAT_LAYERS})
    for p in parts:
        merged.geoms += p.geoms
        merged.codes += p.codes
        merged.pixels += p.pixels
        merged.on_seam += p.on_seam
        merged.parcel_px += p.parcel_px or [0] * len(p.geoms)
        for k in STAT_LAYERS:
            merged.sums[k] += p.sums.get(k, [0.0] * len(p.geoms))
            merged.counts[k] += p.counts.get(k, [0] * len(p.geoms))
    seam_idx = np.flatnonzero(np.asarray(merged.on_seam, bool))
    if seam_idx.size < 2:
        return merged
    seam_geoms = np.asarray(merged.geoms, dtype=object)[seam_idx]
    tree = shapely.STRtree(seam_geoms)
    left, right = tree.query(seam_geoms, predicate="intersects")
    parent = np.arange(len(merged.geoms))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    codes, parcel_px = merged.codes, merged.parcel_px
    conflicts = 0
    for a, b in zip(seam_idx[left], seam_idx[right], strict=True):
        if a < b and _shared_edge(merged.geoms[a], merged.geoms[b]):
            if codes[a] != codes[b] and (parcel_px[a] or parcel_px[b]):
                conflicts += 1
                continue
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    merged.seam_conflicts = conflicts
    roots = np.array([find(i) for i in range(len(merged.geoms))])
    if (roots == np.arange(len(roots))).all():
        return merged
    return _merge_groups(merged, roots)


def _merge_groups(merged: BlockPolygons, roots: np.ndarray) -> BlockPolygons:
    """One polygon per root: union of the parts, summed statistics, the majority category."""
    codes, parcel_px = merged.codes, merged.parcel_px
    out = BlockPolygons(sums={k: [] for k in STAT_LAYERS}, counts={k: [] for k in STAT_LAYERS},
                        seam_conflicts=merged.seam_conflicts)
    order = np.argsort(roots, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(roots[order])) + 1)
    for g in groups:
        geoms = [merged.geoms[i] for i in g]
        out.geoms.append(geoms[0] if len(g) == 1 else shapely.union_all(geoms))
        share: dict[int, int] = {}
        for i in g:
            share[codes[i]] = share.get(codes[i], 0) + merged.pixels[i]
        if len(share) > 1:  # the larger share wins; equal shares: the lower code
            out.reconciled.append(len(out.codes))
        out.codes.append(min(share, key=lambda c: (-share[c], c)))
        out.pixels.append(int(sum(merged.pixels[i] for i in g)))
        out.on_seam.append(False)
        out.parcel_px.append(int(sum(parcel_px[i] for i in g)))
        for k in STAT_LAYERS:
            out.sums[k].append(float(sum(merged.sums[k][i] for i in g)))
            out.counts[k].append(int(sum(merged.counts[k][i] for i in g)))
    return out


def to_map(polys: BlockPolygons, transform: Affine, *, simplify_px: float = 0.0,
           min_area_m2: Mapping[str, float] | None = None,
           max_area_m2: Mapping[str, float | None] | None = None) -> list[dict]:
    """Move joined polygons to map coordinates, simplify, filter by area; one record each.

    Records hold ``geometry``, ``category``, ``pixels``, ``area_m2`` and the evidence means.
    """
    if not polys.geoms:
        return []
    t = transform
    geoms_px = np.asarray(polys.geoms, dtype=object)
    # canonical first: tolerance 0 drops the collinear vertices that seam joins leave behind
    # and normalize fixes where each ring starts, so the simplification (which depends on the
    # start vertex) gives the same polygon whatever the block layout
    geoms_px = shapely.normalize(shapely.simplify(geoms_px, 0.0, preserve_topology=True))
    if simplify_px > 0:
        geoms_px = shapely.simplify(geoms_px, simplify_px, preserve_topology=True)
        geoms_px = shapely.normalize(geoms_px)
    geoms_map = shapely.transform(geoms_px, lambda xy: np.column_stack(
        [t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f]))
    pixel_area = abs(t.a * t.e - t.b * t.d)
    records: list[dict] = []
    for i, g in enumerate(geoms_map):
        cat = CODE_TO_CATEGORY.get(polys.codes[i])
        if cat is None:
            continue
        area = polys.pixels[i] * pixel_area
        if min_area_m2 and area < min_area_m2.get(cat, 0.0):
            continue
        hi = (max_area_m2 or {}).get(cat)
        if hi is not None and area > hi:
            continue
        rec: dict = {"geometry": shapely.make_valid(g) if not g.is_valid else g,
                     "category": cat, "pixels": polys.pixels[i], "area_m2": area}
        for k in STAT_LAYERS:
            c = polys.counts[k][i]
            rec[k] = polys.sums[k][i] / c if c else float("nan")
        records.append(rec)
    return records


def polygons_from_array(category: np.ndarray, transform: Affine,
                        evidence: Mapping[str, np.ndarray] | None = None,
                        block_size: int | None = None, **kw: object) -> list[dict]:
    """Whole-array convenience (tests, notebooks): vectorize in blocks, join, move to map."""
    h, w = category.shape
    size = block_size or max(h, w)
    parts: list[BlockPolygons] = []
    for r in range(0, h, size):
        for c in range(0, w, size):
            win = Window(c, r, min(size, w - c), min(size, h - r))
            sl = (slice(r, r + int(win.height)), slice(c, c + int(win.width)))
            ev = None if evidence is None else {k: v[sl] for k, v in evidence.items()}
            parts.append(block_polygons(category[sl], win, (h, w), ev))
    return to_map(join_blocks(parts), transform, **kw)  # type: ignore[arg-type]

