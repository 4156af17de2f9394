"""Change evidence + rule layers -> violation categories, object by object.

``rasterize_rules`` burns the GIS rule layers onto a (sub)grid; ``classify_block`` turns one
block's detector evidence into a uint8 category raster and a per-object confidence.

Objects. The change probability is thresholded with hysteresis (seeds at ``P_SEED`` grown into
``P_GROW``) and split into 8-connected objects, cut along farmland parcel boundaries (slivers
off farmland join their parcel piece). Every decision is made per object from the mean evidence
of its seed pixels (its lit ones, not darker than ``DARK``, when they are at least half: a new
building's cast shadow is part of the change but not of the surface) and its overlap with the
rule layers, on the whole outer block (core + halo),
using only fixed thresholds: an object that fits in the halo gets the same decision in every
block that sees it, and nothing depends on block statistics.

Decision (first match wins; ``f_role`` = fraction of the object on that rule layer):

* mask leak: most of the object hugs the invalid (cloud/shadow/nodata) mask -> dropped.
* illumination: every band scaled alike (low ``shape_score`` and ``ratio_spread``) by less
  than 3x -> excluded as ``illumination`` (cloud shadow, terrain shading).
* cloud-like whole object (>= 1000 m², visible reflectance >= 0.42, flat, NDVI < 0.1): a
  cloud the mask missed -> ``other_change`` (kept for review, never a violation).
* after state darker than ``DARK`` (water, deep shadow) is never bare or built ground.
* mapped water (``f_water`` >= 0.5): still water after (dark, or NDVI < 0) -> excluded as
  ``water`` (turbidity, algae); bare or built ground after, with NIR -> ``land_occupation``
  (a filled pond); without NIR, or vegetated after -> ``other_change``.
* forest loss (``f_forest`` >= 0.5, vegetation before, vegetation lost): ``forest_grave`` when
  its area <= ``categories['forest_grave'].max_area_m2``, excluded as ``cemetery`` when mostly in
  a designated cemetery; a larger clearing is ``land_occupation``.
* farmland / ecological red line (``f_farmland + f_redline`` >= 0.5): vegetated or stubble-like
  after (NDVI 0.2..0.45, or no NIR and soil-coloured over >= 80 % of the farmland parcel), or
  soil-coloured over >= 80 % of its parcel (ploughing) -> excluded as ``seasonal``; vegetation
  lost to bare soil or hardened/built ground (or built ground >= 1.3x brighter) ->
  ``land_occupation``.
* elsewhere: a new, compact, non-vegetated, built-coloured surface (flat or blue-shifted spectrum,
  or red-tile red) -> ``illegal_construction``.
* mostly inside a permit (``f_permits`` >= 0.5): construction and occupation are excluded as
  ``permit``; occupation mostly on approved construction land (``f_construction_land``) as
  ``construction_land`` (a building there still needs its permit).
* anything else confidently changed -> ``other_change``.

Confidence. ``conf = sigmoid(logit(p_mean) + GAIN * (2 * support - 1))`` where ``p_mean`` is
the object's mean change probability and ``support`` in 0..1 says how clearly the spectral
evidence fits the category (vegetation loss for graves, bareness for occupation, bareness times
compactness for construction, 0.5 = neutral for other_change). Objects below
``cfg.min_confidence`` are written as 0.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import NamedTuple

import geopandas as gpd
import numpy as np
from pyproj import CRS
from rasterio import features
from scipy import ndimage as ndi
from shapely.geometry import box
from skimage.measure import label

from .config import CategoryConfig, DetectionConfig
from .grid import Grid
from .types import CATEGORY_CODES, NO_CHANGE, NOT_OBSERVED

log = logging.getLogger(__name__)

#: rule roles burnt by :func:`rasterize_rules` (bool masks)
RULE_ROLES: tuple[str, ...] = ("forest", "farmland", "ecological_redline", "permits",
                               "cemeteries", "water", "construction_land")
#: int32 layer of farmland parcel ids (0 = none) added by :func:`rasterize_rules`
PARCEL_KEY = "farmland_parcel"

#: evidence layers averaged per object (over its seed pixels)
SPECTRAL_KEYS: tuple[str, ...] = ("veg_before", "veg_after", "ndvi_before", "ndvi_after",
                                  "bright_before", "bright_after", "chroma_blue_after",
                                  "chroma_red_after", "shape_score", "ratio_spread")
#: pieces of an object off farmland smaller than this share of it join its parcel pieces
SLIVER_SHARE = 0.25
#: hysteresis on the change probability: seeds and growth
P_SEED, P_GROW = 0.8, 0.4
#: fraction of an object on a rule layer that assigns it to that layer
MAJORITY = 0.5
#: vegetation likelihood (0..1): "was vegetated" and "lost vegetation"
VEG_BEFORE_MIN, VEG_LOSS_MIN = 0.5, 0.35
#: after-state vegetated (change within farming) and NDVI band of stubble / fallow
VEG_AFTER_GREEN = 0.5
STUBBLE_NDVI = (0.2, 0.45)
#: share of a farmland parcel an object must fill to count as a whole-field (seasonal) change
PARCEL_FILL = 0.8
#: brightening factor that marks a new built surface on land that was already bare
BRIGHTER = 1.3
#: visible chromaticity of built surfaces: blue share (flat/grey/blue roofs, concrete, asphalt)
#: or red share (red tile) beyond that of soils (blue ~0.25, red ~0.43)
BUILT_BLUE_SHARE, BUILT_RED_SHARE = 0.29, 0.48
#: below this mean visible reflectance the after state is water or deep shadow, not ground
DARK = 0.06
#: below this NDVI (NIR absorbed) a surface on the ``water`` rule layer is still water
WATER_NDVI = 0.0
#: an after state this bright and flat over this area is taken for a cloud the mask missed:
#: reported as other_change (for review), never as a violation
CLOUD_BRIGHT, CLOUD_MIN_M2 = 0.42, 1000.0
#: illumination-only change: shape score (noise units) and spread of band log-ratios below
#: these, and brightness changed by less than a factor of 3
ILLUM_SHAPE, ILLUM_SPREAD, ILLUM_MAX_LOG_RATIO = 2.5, 0.25, math.log(3.0)
#: objects mostly within this many metres of invalid pixels are mask leaks
MASK_EDGE_M = 4.0
#: gain of the spectral support in the confidence logistic
GAIN = 1.5
#: rule layers inside which a detector's ``change_any`` (every change, not only buildings)
#: is classified: see :func:`zoned_change`
OPEN_GROUND_RULES: tuple[str, ...] = ("forest", "farmland", "ecological_redline")


class BlockClassification(NamedTuple):
    """Result of :func:`classify_block`."""

    #: uint8 category codes (see :data:`pipeline.types.CATEGORY_CODES`, 0, 255)
    category: np.ndarray
    #: float32 per-object confidence 0..1 (0 where no violation / change)
    confidence: np.ndarray
    #: excluded objects by reason (``permit``, ``cemetery``, ``seasonal``, ``illumination``,
    #: ``mask_edge``)
    excluded: Counter[str]


def rasterize_rules(rules: dict[str, gpd.GeoDataFrame | None], grid: Grid) -> dict[str, np.ndarray]:
    """Burn rule layers onto ``grid``: one bool mask per role (all False for an empty layer).

    Pixels are in a polygon when their centre is (``all_touched=False``). Layers in another CRS
    are reprojected to the grid's. When ``farmland`` is given, an int32 :data:`PARCEL_KEY` layer
    numbers its parcels (row index + 1) so whole-field changes can be told from partial ones.
    """
    out: dict[str, np.ndarray] = {}
    for role, gdf in rules.items():
        ids = _burn(gdf, grid, ids=role == "farmland")
        out[role] = ids > 0
        if role == "farmland":
            out[PARCEL_KEY] = ids
    return out


def _burn(gdf: gpd.GeoDataFrame | None, grid: Grid, *, ids: bool) -> np.ndarray:
    shape = grid.shape
    if gdf is None or len(gdf) == 0:
        return np.zeros(shape, np.int32)
    if gdf.crs is not None and grid.crs is not None:
        target = CRS.from_user_input(getattr(grid.crs, "to_wkt", lambda: grid.crs)())
        if not target.equals(gdf.crs):
            gdf = gdf.to_crs(target)
    geoms = gdf.geometry.reset_index(drop=True)
    hits = geoms.sindex.query(box(*grid.bounds), predicate="intersects")
    shapes = [(geoms.iloc[i], int(i) + 1 if ids else 1) for i in sorted(hits)
              if geoms.iloc[i] is not None and not geoms.iloc[i].is_empty]
    if not shapes:
        return np.zeros(shape, np.int32)
    return features.rasterize(shapes, out_shape=shape, transform=grid.transform, fill=0,
                              all_touched=False, dtype="int32")


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _confidence(p_mean: float, support: float) -> float:
    return 1.0 / (1.0 + math.exp(-(_logit(p_mean) + GAIN * (2.0 * support - 1.0))))


class _Objects:
    """The labelled pixels of a block as flat indexes, so per-object sums touch only them.

    Changed objects cover a small share of a block: gathering their pixels once makes every
    per-object statistic cost O(object pixels) instead of O(block pixels).
    """

    def __init__(self, lab: np.ndarray, n: int) -> None:
        self.shape, self.n = lab.shape, n
        flat = lab.ravel()
        self.idx = np.flatnonzero(flat)
        self.lab = flat[self.idx].astype(np.intp)

    def subset(self, keep: np.ndarray) -> _Objects:
        out = object.__new__(_Objects)
        out.shape, out.n, out.idx, out.lab = self.shape, self.n, self.idx[keep], self.lab[keep]
        return out

    def values(self, layer: np.ndarray) -> np.ndarray:
        return layer.ravel()[self.idx]

    def interior(self) -> np.ndarray:
        """Per labelled pixel: all 8 neighbours labelled too (a 3×3 binary erosion of the
        labelled area, outside the array counting as unlabelled)."""
        h, w = self.shape
        r, c = np.divmod(self.idx, w)
        sel = np.flatnonzero((r > 0) & (r < h - 1) & (c > 0) & (c < w - 1))
        labelled = np.zeros(h * w, bool)
        labelled[self.idx] = True
        for off in (-w - 1, -w, -w + 1, -1, 1, w - 1, w, w + 1):
            sel = sel[labelled[self.idx[sel] + off]]
        out = np.zeros(self.idx.size, bool)
        out[sel] = True
        return out

    def first(self) -> np.ndarray:
        """(row, col) of each label's first pixel in raster order ((0, 0) for absent ones)."""
        first = np.full(self.n + 1, -1, np.int64)
        first[self.lab[::-1]] = self.idx[::-1]  # reversed: the smallest index per label wins
        return np.stack(np.unravel_index(np.maximum(first, 0), self.shape), axis=1)

    def count(self) -> np.ndarray:
        return np.bincount(self.lab, minlength=self.n + 1)

    def means(self, layer: np.ndarray | None) -> np.ndarray:
        """Per-object nan-aware mean (NaN where the object has no finite value; [0] = NaN)."""
        if layer is None:
            return np.full(self.n + 1, np.nan)
        return self.means_of(self.values(layer))

    def means_of(self, values: np.ndarray) -> np.ndarray:
        """:meth:`means` of values already gathered per labelled pixel."""
        v = values.astype(np.float64)
        ok = np.isfinite(v)
        lab = self.lab if ok.all() else self.lab[ok]
        if not ok.all():
            v = v[ok]
        s = np.bincount(lab, v, minlength=self.n + 1)
        c = np.bincount(lab, minlength=self.n + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(c > 0, s / np.maximum(c, 1), np.nan)
        out[0] = np.nan
        return out


def _means(lab: np.ndarray, n: int, layer: np.ndarray | None) -> np.ndarray:
    """Per-object nan-aware mean of ``layer`` (NaN where the object has no finite value)."""
    return _Objects(lab, n).means(layer)


def _parcel_fill(lab: np.ndarray, n: int, parcel: np.ndarray | None,
                 objs: _Objects | None = None) -> np.ndarray:
    """Per object: largest share of one farmland parcel (in this block) that it covers."""
    fill = np.zeros(n + 1)
    if parcel is None:
        return fill
    objs = objs or _Objects(lab, n)
    pobj = objs.values(parcel).astype(np.int64)
    m = pobj > 0
    if not m.any():
        return fill
    psize = np.bincount(parcel.ravel())
    base = int(parcel.max()) + 1
    pair = objs.lab[m].astype(np.int64) * base + pobj[m]
    keys, counts = np.unique(pair, return_counts=True)
    obj, pid = keys // base, keys % base
    share = counts / psize[pid]
    np.maximum.at(fill, obj, share)
    return fill


def _object_features(ev: dict[str, np.ndarray], masks: dict[str, np.ndarray], valid: np.ndarray,
                     lab: np.ndarray, n: int, res_m: float,
                     objs: _Objects | None = None) -> dict[str, np.ndarray]:
    """Per-object (index = label) means of evidence and fractions on each rule layer."""
    objs = objs or _Objects(lab, n)
    f: dict[str, np.ndarray] = {"n": objs.count().astype(float)}
    f["change"] = objs.means(ev["change"])
    # spectral states from the confidently changed pixels: the grown rim mixes in the surround
    seed = objs.subset(objs.values(ev["change"]) >= P_SEED)
    # the surface, not its shadow: a new building's cast shadow changes too but tells nothing
    # of the material; where shadow is most of the seed (water, deep shade) all of it counts
    ba = ev.get("bright_after")
    if ba is not None:
        lit = ~(seed.values(ba) < DARK)
        use_lit = 2 * np.bincount(seed.lab[lit], minlength=n + 1) >= seed.count()
        seed = seed.subset(lit | ~use_lit[seed.lab])
    for key in SPECTRAL_KEYS:
        f[key] = seed.means(ev.get(key))
    for role in RULE_ROLES:
        m = masks.get(role)
        f[f"f_{role}"] = (np.zeros(n + 1) if m is None
                          else np.nan_to_num(objs.means(m)))
    f["fill"] = _parcel_fill(lab, n, masks.get(PARCEL_KEY), objs)
    if valid.all():
        f["f_edge"] = np.zeros(n + 1)
    else:
        k = max(1, round(MASK_EDGE_M / res_m))
        near = ndi.binary_dilation(~valid, iterations=k) & valid
        f["f_edge"] = np.nan_to_num(objs.means(near))
    f["core"] = np.nan_to_num(objs.means_of(objs.interior()))
    return f


def _illumination(g: dict[str, float]) -> bool:
    """All bands scaled alike, no change of material: shadow or illumination, not change."""
    shape, spread = g.get("shape_score", math.nan), g.get("ratio_spread", math.nan)
    if not (math.isfinite(shape) and math.isfinite(spread)):
        return False
    bb, ba = g["bright_before"], g["bright_after"]
    ratio = abs(math.log(max(ba, 1e-3) / max(bb, 1e-3)))
    return shape < ILLUM_SHAPE and spread < ILLUM_SPREAD and ratio < ILLUM_MAX_LOG_RATIO


def _cloud_pieces(ev: dict[str, np.ndarray], whole: np.ndarray, lab: np.ndarray, n: int,
                  res_m: float, objs: _Objects | None = None) -> np.ndarray:
    """Per piece (label of ``lab``): 1.0 when its whole, unsplit object looks like a cloud.

    Large (>= ``CLOUD_MIN_M2``), very bright (visible >= ``CLOUD_BRIGHT``), spectrally flat and
    unvegetated (NDVI < 0.1; no test without NIR) after state: a cloud the mask missed.
    """
    same = whole is lab  # no object split by parcels: pieces are the objects
    m = n if same else int(whole.max())
    objs = objs if same and objs is not None else _Objects(whole, m)
    seed = objs.subset(objs.values(ev["change"]) >= P_SEED)
    g = {k: seed.means(ev.get(k)) for k in
         ("bright_after", "chroma_blue_after", "chroma_red_after", "ndvi_after")}
    area = objs.count() * res_m * res_m
    with np.errstate(invalid="ignore"):
        flat = ((np.abs(g["chroma_blue_after"] - 1 / 3) < 0.04)
                & (np.abs(g["chroma_red_after"] - 1 / 3) < 0.04))
        cloud = ((area >= CLOUD_MIN_M2) & (g["bright_after"] >= CLOUD_BRIGHT) & flat
                 & ~(g["ndvi_after"] >= 0.1))
    if same:
        return cloud.astype(float)
    parent = np.zeros(n + 1, np.int64)
    parent[lab.ravel()] = whole.ravel()
    return cloud[parent].astype(float)


def _decide(f: dict[str, np.ndarray], i: int, *, res_m: float,
            categories: dict[str, CategoryConfig]) -> tuple[str, float]:
    """Category (or ``excluded:<reason>``) and spectral support 0..1 for object ``i``."""
    return _decide_row({k: float(v[i]) for k, v in f.items()}, res_m=res_m,
                       categories=categories)


def _decide_row(g: dict[str, float], *, res_m: float,
                categories: dict[str, CategoryConfig]) -> tuple[str, float]:
    """:func:`_decide` on one object's features as plain floats (``g`` is extended)."""
    if g["f_edge"] >= 0.5:
        return "excluded:mask_edge", 0.0
    if _illumination(g):
        return "excluded:illumination", 0.0
    if g.get("cloud", 0.0) > 0:
        return "other_change", 0.2
    vb, va = g["veg_before"], g["veg_after"]
    surface = not g["bright_after"] < DARK  # False for water, deep shadow (NaN: unknown)
    g["bare"] = float(surface and va < 0.3)
    if math.isfinite(g["chroma_blue_after"]):
        g["built"] = float(surface and (g["chroma_blue_after"] >= BUILT_BLUE_SHARE
                                        or g["chroma_red_after"] >= BUILT_RED_SHARE))
    else:  # no colour evidence (detector without it): any bare surface may be built
        g["built"] = g["bare"]
    g["lost"] = float(vb >= VEG_BEFORE_MIN and vb - va >= VEG_LOSS_MIN)
    g["bareness"] = min(1.0, max(0.0, 1.0 - va))
    if g["f_water"] >= MAJORITY:
        return _water_rule(g)
    if g["f_forest"] >= MAJORITY and g["lost"]:
        return _forest_rule(g, g["n"] * res_m * res_m, categories)
    if g["f_farmland"] + g["f_ecological_redline"] >= MAJORITY:
        return _farmland_rule(g)
    return _open_land_rule(g)


def _forest_rule(g: dict[str, float], area_m2: float,
                 categories: dict[str, CategoryConfig]) -> tuple[str, float]:
    cap = categories["forest_grave"].max_area_m2 if "forest_grave" in categories else None
    if cap is None or area_m2 <= cap:
        if g["f_cemeteries"] >= MAJORITY:
            return "excluded:cemetery", 0.0
        return "forest_grave", min(1.0, (g["veg_before"] - g["veg_after"]) / 0.7)
    return _occupation(g, g["bareness"])


def _occupation(g: dict[str, float], support: float) -> tuple[str, float]:
    """Cleared or hardened ground: ``land_occupation`` unless a permit or approved
    construction land (the ``construction_land`` rule layer) covers most of it."""
    if g["f_permits"] >= MAJORITY:
        return "excluded:permit", 0.0
    if g["f_construction_land"] >= MAJORITY:
        return "excluded:construction_land", 0.0
    return "land_occupation", support


def _water_rule(g: dict[str, float]) -> tuple[str, float]:
    """Mapped water (the ``water`` rule layer). A water surface on both dates (turbidity,
    algae, glint) is no finding; ground where the water was (a filled pond, a built-out bank)
    is occupation. Without NIR a browner water surface looks like soil: kept for review."""
    na = g["ndvi_after"]
    if g["bright_after"] < DARK or (math.isfinite(na) and na < WATER_NDVI):
        return "excluded:water", 0.0
    if not math.isfinite(na) or g["veg_after"] >= VEG_AFTER_GREEN:
        return "other_change", 0.5  # unknown surface, or plants on water / an exposed bank
    return _occupation(g, g["bareness"])


def _farmland_rule(g: dict[str, float]) -> tuple[str, float]:
    na = g["ndvi_after"]
    stubble = math.isfinite(na) and STUBBLE_NDVI[0] <= na <= STUBBLE_NDVI[1]
    whole = g["fill"] >= PARCEL_FILL and not g["built"]
    if g["veg_after"] >= VEG_AFTER_GREEN or stubble or whole:
        return "excluded:seasonal", 0.0
    brighter = g["bright_after"] >= BRIGHTER * g["bright_before"]
    if (g["bare"] or g["built"]) and (g["lost"] or (g["built"] and brighter)):
        return _occupation(g, g["bareness"] * (1.0 - 0.5 * g["fill"]))
    return "other_change", 0.5


def _open_land_rule(g: dict[str, float]) -> tuple[str, float]:
    if g["bare"] and g["built"] and g["veg_before"] - g["veg_after"] >= -0.1:
        if g["f_permits"] >= MAJORITY:
            return "excluded:permit", 0.0
        compact = min(1.0, g["core"] / 0.3)
        if compact >= 0.5:
            return "illegal_construction", g["bareness"] * compact
    return "other_change", 0.5


def classify_block(evidence: dict[str, np.ndarray], rule_masks: dict[str, np.ndarray],
                   valid: np.ndarray, *, res_m: float, cfg: DetectionConfig,
                   categories: dict[str, CategoryConfig],
                   core: tuple[slice, slice] | None = None) -> BlockClassification:
    """Classify one block (core + halo) of detector evidence into violation categories.

    Args:
        evidence: detector layers (``change`` and the spectral evidence), ``(h, w)`` each.
        rule_masks: from :func:`rasterize_rules` on the same (sub)grid; missing roles = none.
        valid: True where both dates observed clear ground; 255 is written elsewhere.
        res_m: pixel size in metres (object areas).
        cfg: detection settings (``min_confidence``).
        categories: per-category settings (``forest_grave.max_area_m2``, ``min_area_m2``).
        core: slices of the block's core; excluded objects are counted only when their first
            pixel lies there, so summing counts over blocks counts each object once.

    Returns:
        :class:`BlockClassification` ``(category, confidence, excluded)``.
    """
    valid = valid.astype(bool)
    evidence = zoned_change(evidence, rule_masks)
    p = np.where(valid, evidence["change"], np.float32(0.0))  # NaN is never above a level
    mask = hysteresis(p, P_GROW, P_SEED) & valid
    whole, n = label(mask, connectivity=2, return_num=True)
    lab = whole
    if n and rule_masks.get(PARCEL_KEY) is not None:
        lab, n = _split_by_parcel(whole, rule_masks[PARCEL_KEY])
    cat = np.full(valid.shape, NO_CHANGE, np.uint8)
    conf = np.zeros(valid.shape, np.float32)
    excluded: Counter[str] = Counter()
    if n:
        objs = _Objects(lab, n)
        f = _object_features(evidence, rule_masks, valid, lab, n, res_m, objs)
        f["cloud"] = _cloud_pieces(evidence, whole, lab, n, res_m, objs)
        min_px = min(c.min_area_m2 for c in categories.values()) / (res_m * res_m)
        anchors = objs.first()
        codes = np.zeros(n + 1, np.uint8)
        confs = np.zeros(n + 1, np.float32)
        keys = list(f)
        todo = np.flatnonzero(f["n"] >= min_px)
        todo = todo[todo > 0]
        # one row of plain floats per object (a dict per object from numpy scalars is slow)
        rows = np.column_stack([f[k][todo] for k in keys]).tolist() if todo.size else []
        for i, row in zip(todo.tolist(), rows, strict=True):
            name, support = _decide_row(dict(zip(keys, row, strict=True)), res_m=res_m,
                                        categories=categories)
            if name.startswith("excluded:"):
                if core is None or _in_core(anchors[i], core):
                    excluded[name.split(":", 1)[1]] += 1
                continue
            c = _confidence(float(f["change"][i]), support)
            if c < cfg.min_confidence:
                continue
            codes[i], confs[i] = CATEGORY_CODES[name], c
        cat.flat[objs.idx] = codes[objs.lab]  # NO_CHANGE (0) and 0 elsewhere already
        conf.flat[objs.idx] = confs[objs.lab]
    cat[~valid] = NOT_OBSERVED
    conf[~valid] = 0.0
    return BlockClassification(cat, conf.astype(np.float32), excluded)


def zoned_change(evidence: dict[str, np.ndarray],
                 rule_masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``evidence`` with ``change`` taken from ``change_any`` inside :data:`OPEN_GROUND_RULES`.

    A detector with a building network (RGB imagery up to 4.5 m) reports in ``change`` only
    changes that look like buildings, and in ``change_any`` every change its pixel model finds.
    Inside forest, farmland and ecological land the latter counts: cleared or hardened ground is
    the violation there (毁林, 违法占地), and it is no building.
    """
    if "change_any" not in evidence:
        return evidence
    zone = None
    for role in OPEN_GROUND_RULES:
        m = rule_masks.get(role)
        if m is not None:
            zone = m.astype(bool) if zone is None else zone | m.astype(bool)
    if zone is None or not zone.any():
        return evidence
    return {**evidence, "change": np.where(zone, evidence["change_any"], evidence["change"])}


def hysteresis(p: np.ndarray, low: float, high: float) -> np.ndarray:
    """``p > low`` regions (4-connected) that hold a pixel ``> high``.

    What ``skimage.filters.apply_hysteresis_threshold`` returns, with the seed lookup touching
    only the seed pixels instead of summing over the whole block.
    """
    grow = p > low
    lab, n = ndi.label(grow)
    if not n:
        return grow
    keep = np.zeros(n + 1, bool)
    keep[lab[p > high]] = True
    keep[0] = False
    return keep[lab]


def _split_by_parcel(lab: np.ndarray, parcel: np.ndarray) -> tuple[np.ndarray, int]:
    """Cut objects along farmland parcel boundaries: seasonal farming is judged per parcel.

    Pieces of an object outside farmland that are small next to the object (ridges, paths and
    mixed pixels between fields) join the nearest parcel piece of the same object.
    """
    key = lab.astype(np.int64) * (int(parcel.max()) + 1) + parcel.astype(np.int64)
    key[lab == 0] = 0
    pieces, n = label(key, background=0, connectivity=2, return_num=True)
    farm = (pieces > 0) & (parcel > 0)
    if not farm.any() or farm.sum() == (pieces > 0).sum():
        return pieces, n
    obj_px = np.bincount(lab.ravel())
    piece_px = np.bincount(pieces.ravel(), minlength=n + 1)
    obj_of_piece = np.zeros(n + 1, np.int64)
    obj_of_piece[pieces.ravel()] = lab.ravel()
    has_farm = np.zeros(obj_px.size, bool)
    has_farm[lab[farm]] = True
    rest = (pieces > 0) & (parcel == 0)
    small = piece_px < SLIVER_SHARE * obj_px[obj_of_piece]
    cand = rest & small[pieces] & has_farm[lab]
    if cand.any():
        _, (ri, ci) = ndi.distance_transform_edt(~farm, return_indices=True)
        near = pieces[ri, ci]
        ok = cand & (lab[ri, ci] == lab)
        pieces = np.where(ok, near, pieces)
    return pieces, n


def _in_core(rc: np.ndarray, core: tuple[slice, slice]) -> bool:
    r, c = int(rc[0]), int(rc[1])
    rs, cs = core
    return (rs.start or 0) <= r < (rs.stop if rs.stop is not None else r + 1) and \
        (cs.start or 0) <= c < (cs.stop if cs.stop is not None else c + 1)
