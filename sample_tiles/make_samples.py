"""Seeded generator of the synthetic two- (or three-) period sample scene in ``sample_tiles/``.

A 1 m, 4-band (blue, green, red, nir) uint16 scene in CGCS2000 / 3-degree GK CM 114E
(EPSG:4547) near 115.0°E 23.0°N: a forested hill, a river, field parcels, a village, roads and
open land. Period 2 plants the three violation kinds (illegal construction, graves in forest,
occupation of farmland / ecological red-line land) together with the distractors that fool real
systems: permitted construction, tombs in a designated cemetery, harvested fields, a global
radiometric shift, a sub-pixel misregistration, a cloud and its shadow and a nodata wedge.

Everything is deterministic for a seed (one :class:`numpy.random.Generator`). The layout is
built as exact shapely vectors in pixel coordinates (x = column, y = row, 1 px = 1 m); the land
cover is rasterized from those vectors, so rule layers, truth and imagery agree.

Pure functions: :func:`make_scene` returns a :class:`Scene` (arrays and GeoDataFrames);
:func:`write_scene` is the only writer. Run as a script::

    python sample_tiles/make_samples.py [--out DIR] [--seed N] [--size N] [--periods 2|3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from affine import Affine
from rasterio import features
from scipy import ndimage
from shapely import affinity
from shapely.geometry import LineString, Point, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

CRS = "EPSG:4547"  # CGCS2000 / 3-degree Gauss-Kruger CM 114E
ORIGIN_XY = (602000.0, 2546000.0)  # top-left corner, metres
RES_M = 1.0
BANDS = ("blue", "green", "red", "nir")
DEFAULT_SEED = 42
DEFAULT_SIZE = 1024
HERE = Path(__file__).resolve().parent

#: Period name -> (TIFFTAG_DATETIME, ISO date).
PERIODS: dict[str, tuple[str, str]] = {
    "2024-03": ("2024:03:15 10:30:00", "2024-03-15"),
    "2024-06": ("2024:06:20 10:30:00", "2024-06-20"),
    "2024-09": ("2024:09:18 10:30:00", "2024-09-18"),
}

#: Period-2 misregistration: image content is moved by (dx, dy) pixels (x right, y down), i.e.
#: period-2 pixel (row, col) shows the ground at (row - dy, col - dx) of the true grid.
SHIFT_PX = (1.6, -1.2)
#: Period-2 radiometric change: reflectance' = gain * reflectance + offset, per band (B, G, R, N).
GAIN = (1.15, 1.13, 1.10, 1.06)
OFFSET = (0.012, 0.010, 0.006, -0.005)
#: Period-3 radiometric change (no shift, no cloud, no nodata).
GAIN_P3 = (0.96, 0.97, 0.97, 0.98)
OFFSET_P3 = (-0.004, -0.003, -0.002, 0.004)
#: Sun elevation (degrees) used for hillshading per period; azimuth 135° (from the south-east).
SUN_AZIMUTH = 135.0
SUN_ELEVATION = (40.0, 52.0, 46.0)

# Land-cover classes and their reflectance (blue, green, red, nir).
GRASS, FOREST, CROP, STUBBLE, BARE, HARD, ASPHALT, WATER, PATH, TOMB, LATERITE = range(11)
SPECTRA = np.array(
    [
        [0.045, 0.075, 0.060, 0.28],  # grass / scrub
        [0.030, 0.060, 0.040, 0.35],  # forest
        [0.040, 0.080, 0.050, 0.40],  # crop
        [0.080, 0.100, 0.120, 0.22],  # harvested stubble
        [0.120, 0.150, 0.200, 0.26],  # bare soil
        [0.200, 0.210, 0.220, 0.25],  # hardened ground / concrete
        [0.080, 0.090, 0.100, 0.12],  # asphalt
        [0.050, 0.060, 0.040, 0.02],  # water
        [0.090, 0.110, 0.130, 0.22],  # earth path / field ridge
        [0.380, 0.390, 0.400, 0.42],  # concrete tomb
        [0.110, 0.130, 0.210, 0.27],  # red laterite soil (grave clearings)
    ],
    dtype=np.float32,
)
#: Texture amplitudes (fine, mid, coarse) per class, relative brightness.
TEXTURE = np.array(
    [
        [0.06, 0.08, 0.06],
        [0.05, 0.06, 0.05],
        [0.04, 0.05, 0.04],
        [0.07, 0.06, 0.04],
        [0.06, 0.07, 0.06],
        [0.04, 0.04, 0.03],
        [0.03, 0.02, 0.02],
        [0.02, 0.03, 0.05],
        [0.08, 0.05, 0.03],
        [0.03, 0.02, 0.01],
        [0.07, 0.06, 0.04],
    ],
    dtype=np.float32,
)
ROOFS: dict[str, tuple[float, float, float, float]] = {
    "concrete": (0.25, 0.26, 0.27, 0.29),
    "steel_blue": (0.22, 0.18, 0.10, 0.16),
    "red_tile": (0.08, 0.09, 0.18, 0.24),
    "white": (0.40, 0.40, 0.40, 0.42),
}
SHADOW_TINT = np.array([0.55, 0.50, 0.46, 0.40], dtype=np.float32)  # shadows are bluish

STREET_OFFICES = (
    ("440113001", "石楼街道"),
    ("440113002", "化龙镇"),
    ("440113003", "石碁镇"),
)


# --------------------------------------------------------------------------- data model


@dataclass
class Building:
    """A building: footprint, roof halves (for gable shading), material and shadow."""

    footprint: Polygon
    halves: tuple[Polygon, Polygon]
    material: str
    ridge: float  # brightness contrast between the two roof halves (0 = flat roof)
    shadow: BaseGeometry


@dataclass
class Layout:
    """Exact vector layout of the scene in pixel coordinates (x = col, y = row)."""

    size: int
    zones: dict[str, BaseGeometry]
    fields: list[Polygon]
    base_paint: list[tuple[BaseGeometry, int]]  # (geometry, class), painted in order
    buildings: list[Building]
    cemetery_tombs_p1: list[tuple[Polygon, Polygon]]
    dem: np.ndarray
    permits: list[dict]
    # period-2 changes
    violations: list[dict] = field(default_factory=list)  # category, geometry, paint, building
    distractors: list[dict] = field(default_factory=list)  # kind, geometry, paint, building
    cloud: dict | None = None
    nodata_wedge: Polygon | None = None


@dataclass
class Scene:
    """The generated scene: per-period images plus rule layers and truth in the scene CRS."""

    size: int
    seed: int
    transform: Affine
    crs: str
    images: dict[str, np.ndarray]  # period -> (4, H, W) uint16 DN
    dates: dict[str, str]  # period -> TIFFTAG_DATETIME
    rules: dict[str, gpd.GeoDataFrame]
    violations: gpd.GeoDataFrame
    distractors: gpd.GeoDataFrame
    label: np.ndarray  # uint8, 1 = violation change
    params: dict


# --------------------------------------------------------------------------- geometry helpers


def rect(cx: float, cy: float, length: float, width: float, angle: float = 0.0) -> Polygon:
    """An oriented rectangle centred on (cx, cy), ``angle`` in degrees."""
    r = box(cx - length / 2, cy - width / 2, cx + length / 2, cy + width / 2)
    return affinity.rotate(r, angle, origin=(cx, cy)) if angle else r


def blob(rng: np.random.Generator, cx: float, cy: float, radius: float, irregularity: float = 0.25,
         aspect: float = 1.0, n: int = 40) -> Polygon:
    """An irregular closed shape: a circle with a few random low harmonics on its radius."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        amp = irregularity / k * rng.uniform(0.5, 1.0)
        r += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rot = rng.uniform(0, np.pi)
    x = radius * r * np.cos(theta) * aspect
    y = radius * r * np.sin(theta) / aspect
    xr = x * np.cos(rot) - y * np.sin(rot)
    yr = x * np.sin(rot) + y * np.cos(rot)
    return Polygon(np.column_stack([cx + xr, cy + yr])).buffer(0)


def largest(geom: BaseGeometry) -> Polygon:
    """The largest polygon of a (multi)polygon."""
    if geom.geom_type == "Polygon":
        return geom
    return max(getattr(geom, "geoms", []), key=lambda g: g.area)


def place(rng: np.random.Generator, zone: BaseGeometry, make: Callable[[float, float], Polygon],
          avoid: list[BaseGeometry], margin: float, tries: int = 400) -> Polygon | None:
    """Place ``make(x, y)`` uniformly inside ``zone`` keeping ``margin`` from ``avoid``."""
    minx, miny, maxx, maxy = zone.bounds
    obstacles = unary_union(avoid) if avoid else Polygon()
    for _ in range(tries):
        g = make(rng.uniform(minx, maxx), rng.uniform(miny, maxy))
        if g.is_empty or not zone.contains(g):
            continue
        if not obstacles.is_empty and g.buffer(margin).intersects(obstacles):
            continue
        return g
    return None


def make_building(rng: np.random.Generator, cx: float, cy: float, length: float, width: float,
                  angle: float, material: str | None = None, height: float | None = None,
                  ) -> Building:
    """A rectangular building with a gable or flat roof and its cast shadow (towards NW)."""
    if material is None:
        material = str(rng.choice(list(ROOFS), p=[0.4, 0.25, 0.2, 0.15]))
    if height is None:
        height = rng.uniform(3.0, 12.0)
    fp = rect(cx, cy, length, width, angle)
    half_a = rect(cx, cy - width / 4, length, width / 2)
    half_b = rect(cx, cy + width / 4, length, width / 2)
    halves = (affinity.rotate(half_a, angle, origin=(cx, cy)),
              affinity.rotate(half_b, angle, origin=(cx, cy)))
    flat = material in ("concrete", "white") and rng.random() < 0.7
    ridge = 0.0 if flat else rng.uniform(0.06, 0.14)
    # Sun from the south-east (azimuth 135°, elevation ~55°): shadows fall to the north-west.
    length_px = height / math.tan(math.radians(55.0))
    d = length_px / math.sqrt(2.0)
    moved = affinity.translate(fp, -d, -d)
    shadow = unary_union([fp, moved]).convex_hull.difference(fp)
    return Building(fp, halves, material, float(ridge), shadow)


# --------------------------------------------------------------------------- noise fields


def noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation."""
    g = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return g / max(float(g.std()), 1e-6)


def hillshade(dem: np.ndarray, azimuth: float, elevation: float) -> np.ndarray:
    """Lambertian illumination of a DEM (1 m cells) relative to flat ground."""
    dz_drow, dz_dcol = np.gradient(dem)
    az, el = math.radians(azimuth), math.radians(elevation)
    # Axes (east, north, up); rows grow southwards, so dz/dnorth = -dz/drow.
    sun = (math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el))
    nx, ny = -dz_dcol, dz_drow
    shade = (nx * sun[0] + ny * sun[1] + sun[2]) / np.sqrt(nx * nx + ny * ny + 1.0)
    return np.clip(shade / math.sin(el), 0.35, 1.5).astype(np.float32)


def crown_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Tree-crown texture: bright crowns (~2-4 m) around random stems, dark gaps between."""
    stems = rng.random(shape) < 1.0 / 12.0
    d = ndimage.distance_transform_edt(~stems).astype(np.float32)
    radius = 2.4 * (1.0 + 0.25 * noise(rng, shape, 6.0))
    crown = np.clip(1.0 - (d / np.maximum(radius, 1.0)) ** 2, 0.0, 1.0)
    return (0.62 + 0.55 * crown).astype(np.float32)


# --------------------------------------------------------------------------- layout


def _zones(rng: np.random.Generator, n: int) -> dict[str, BaseGeometry]:
    s = float(n)
    scene = box(0, 0, s, s)
    # Forested hill in the north-east, with a wavy lower-left edge.
    t = np.linspace(0, 1, 60)
    edge_x = s * (0.56 + 0.04 * np.sin(7 * t + rng.uniform(0, 6))) + 0.0 * t
    edge_y = s * (0.47 * t)
    pts = [(s, 0.0)] + [(x, 0.0) for x in edge_x[:1]] + list(zip(edge_x, edge_y, strict=True))
    pts += [(s * (0.56 + (0.44 * u)), s * (0.47 + 0.02 * math.sin(9 * u + 1.0)))
            for u in np.linspace(0, 1, 30)]
    forest = Polygon(pts + [(s, s * 0.47)]).buffer(0).intersection(scene)
    # Meandering river on the west side.
    ys = np.linspace(-5, s + 5, 80)
    xs = s * 0.11 + s * 0.03 * np.sin(2 * np.pi * ys / (0.6 * s) + rng.uniform(0, 6))
    river_line = LineString(np.column_stack([xs, ys]))
    river = river_line.buffer(max(8.0, 0.01 * s), cap_style="flat").intersection(scene)
    riparian = river_line.buffer(max(8.0, 0.01 * s) + max(14.0, 0.03 * s),
                                 cap_style="flat").intersection(scene)
    # Roads: E-W main road, N-S road to the south, a lane up to the forest edge.
    road_y = s * 0.52
    main_road = LineString([(0, road_y + 4), (s * 0.5, road_y - 3), (s, road_y + 2)])
    south_road = LineString([(s * 0.56, road_y), (s * 0.57, s)])
    lane = LineString([(s * 0.36, road_y), (s * 0.38, s * 0.30), (s * 0.60, s * 0.26)])
    roads = unary_union([main_road.buffer(5.0, cap_style="flat"),
                         south_road.buffer(4.0, cap_style="flat"),
                         lane.buffer(3.0, cap_style="flat")]).intersection(scene)
    farm = box(s * 0.20, s * 0.56, s * 0.52, s * 0.97)
    village = box(s * 0.60, s * 0.57, s * 0.97, s * 0.97)
    open_land = scene.difference(unary_union([forest, riparian, farm, village, roads]))
    redline = unary_union([riparian, forest.intersection(box(s * 0.7, 0, s, s * 0.2))])
    wedge = Polygon([(0, 0), (0.14 * s, 0), (0, 0.14 * s)])
    return {"scene": scene, "forest": forest, "river": river, "riparian": riparian,
            "roads": roads, "farm": farm, "village": village, "open": open_land,
            "redline": redline, "wedge": wedge}


def _fields(rng: np.random.Generator, farm: Polygon, river: BaseGeometry, roads: BaseGeometry,
            ) -> list[Polygon]:
    minx, miny, maxx, maxy = farm.bounds
    ncol = max(2, round((maxx - minx) / 80.0))
    nrow = max(3, round((maxy - miny) / 58.0))
    # Jittered grid nodes shared by neighbouring parcels, so ridges keep a constant width.
    gx, gy = np.meshgrid(np.linspace(minx, maxx, ncol + 1), np.linspace(miny, maxy, nrow + 1))
    jx = rng.uniform(-6, 6, gx.shape) * (maxx - minx) / 330
    jy = rng.uniform(-5, 5, gy.shape) * (maxy - miny) / 420
    jx[:, [0, -1]] = 0.0
    jy[[0, -1], :] = 0.0
    gx, gy = gx + jx, gy + jy
    block = unary_union([river.buffer(3), roads.buffer(2)])
    out = []
    for i in range(ncol):
        for j in range(nrow):
            quad = Polygon([(gx[j, i], gy[j, i]), (gx[j, i + 1], gy[j, i + 1]),
                            (gx[j + 1, i + 1], gy[j + 1, i + 1]), (gx[j + 1, i], gy[j + 1, i])])
            # Earth ridges 3 m wide between parcels.
            p = quad.buffer(-1.5, join_style="mitre")
            p = largest(p.difference(block))
            if p.area > 200:
                out.append(p)
    return out


def _village(rng: np.random.Generator, village: Polygon, roads: BaseGeometry) -> list[Building]:
    minx, miny, maxx, maxy = village.bounds
    out = []
    angle = rng.uniform(-4, 4)
    y = miny + 6
    while y < maxy - 14:
        cell_h = rng.uniform(16, 22)
        x = minx + 5
        while x < maxx - 12:
            cell_w = rng.uniform(13, 19)
            if rng.random() > 0.15:
                length = cell_w - rng.uniform(3, 5)
                width = cell_h - rng.uniform(4, 7)
                b = make_building(rng, x + cell_w / 2, y + cell_h / 2, length, width, angle)
                if village.contains(b.footprint) and not b.footprint.buffer(2).intersects(roads):
                    out.append(b)
            x += cell_w
        y += cell_h + (6 if rng.random() < 0.2 else 0)
    return out


def build_layout(rng: np.random.Generator, size: int) -> Layout:
    """The exact vector layout: land cover, existing buildings, DEM and rule-layer geometry."""
    z = _zones(rng, size)
    s = float(size)
    fields = _fields(rng, z["farm"], z["river"], z["roads"])
    paint: list[tuple[BaseGeometry, int]] = [(z["scene"], GRASS)]
    # Open-land texture: bare patches and hardened yards (unchanged between periods).
    avoid: list[BaseGeometry] = [z["wedge"]]
    for _ in range(max(2, size // 150)):
        g = place(rng, z["open"], lambda x, y: blob(rng, x, y, rng.uniform(12, 30), 0.35),
                  avoid, 4)
        if g is not None:
            paint.append((g, BARE))
            avoid.append(g)
    yards = []
    for _ in range(max(1, size // 300)):
        g = place(rng, z["open"], lambda x, y: rect(x, y, rng.uniform(25, 45), rng.uniform(20, 35),
                                                    rng.uniform(-10, 10)), avoid, 4)
        if g is not None:
            paint.append((g, HARD))
            avoid.append(g)
            yards.append(g)
    paint += [(z["forest"], FOREST), (z["farm"], PATH)]
    paint += [(f, CROP) for f in fields]
    paint += [(z["village"], HARD)]
    # Courtyard greenery and garden plots between village houses.
    vx0, vy0, vx1, vy1 = z["village"].bounds
    for _ in range(size // 24):
        g = blob(rng, rng.uniform(vx0, vx1), rng.uniform(vy0, vy1), rng.uniform(3, 9), 0.4)
        paint.append((g.intersection(z["village"]), GRASS if rng.random() < 0.6 else BARE))
    paint += [(z["river"], WATER), (z["roads"], ASPHALT)]
    buildings = _village(rng, z["village"], z["roads"])
    # A few farmhouses on the yards.
    for y_ in yards:
        c = y_.centroid
        buildings.append(make_building(rng, c.x + 3, c.y + 3, rng.uniform(10, 16),
                                       rng.uniform(8, 12), rng.uniform(-10, 10)))
    # Designated cemetery inside the forest, near its lower edge, with existing tombs.
    cem_zone = z["forest"].buffer(-12).intersection(box(s * 0.6, s * 0.3, s * 0.95, s * 0.46))
    cw, ch = min(70.0, 0.2 * s), min(50.0, 0.14 * s)
    cemetery = place(rng, cem_zone, lambda x, y: rect(x, y, cw, ch, rng.uniform(-8, 8)), [], 0)
    if cemetery is None:  # very small scenes
        c = cem_zone.representative_point()
        cemetery = rect(c.x, c.y, cw, ch)
    old_tombs: list[tuple[Polygon, Polygon]] = []
    tomb_avoid: list[BaseGeometry] = []
    for _ in range(4):
        t = _tomb(rng, cemetery.buffer(-3), tomb_avoid, 2.0)
        if t is not None:
            old_tombs.append(t)
            tomb_avoid.append(t[0])
    dem = _dem(rng, size, z["forest"])
    permits = _permits(rng, z, avoid + [b.footprint for b in buildings])
    return Layout(size=size, zones={**z, "cemetery": cemetery}, fields=fields, base_paint=paint,
                  buildings=buildings, cemetery_tombs_p1=old_tombs, dem=dem, permits=permits)


def _dem(rng: np.random.Generator, n: int, forest: BaseGeometry) -> np.ndarray:
    """DEM (m): a hill under the forest with multi-scale ridges, flat (0) elsewhere."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    c = forest.centroid
    r2 = ((xx - c.x) / (0.30 * n)) ** 2 + ((yy - c.y * 0.7) / (0.26 * n)) ** 2
    envelope = np.exp(-r2)
    mask = features.rasterize([(forest.buffer(0.02 * n), 1)], out_shape=(n, n), dtype="uint8")
    mask = ndimage.gaussian_filter(mask.astype(np.float32), 0.03 * n + 1)
    relief = 6.0 * noise(rng, (n, n), 0.05 * n + 1) + 2.5 * noise(rng, (n, n), 0.015 * n + 1)
    scale = n / 1024.0
    return ((110.0 * envelope + relief * envelope * 2.0) * mask * scale).astype(np.float32)


def _permits(rng: np.random.Generator, z: dict, avoid: list[BaseGeometry]) -> list[dict]:
    out: list[dict] = []
    holders = ["广州市石楼实业有限公司", "番禺区化龙镇明石村经济合作社", "广州莲花山物流有限公司"]
    zone = z["open"].difference(z["redline"].buffer(6)).difference(z["wedge"].buffer(10))
    k = min(1.0, z["scene"].bounds[2] / 768.0) ** 0.5
    for i in range(3):
        w, h = k * rng.uniform(34, 46), k * rng.uniform(28, 38)
        p = place(rng, zone, lambda x, y, w=w, h=h: rect(x, y, w, h, rng.uniform(-6, 6)),
                  avoid + [q["geometry"] for q in out], 6)
        if p is None:
            continue
        out.append({"geometry": p, "permit_no": f"穗规建证〔2024〕{117 + 23 * i:04d}号",
                    "holder": holders[i]})
    return out


def _tomb(rng: np.random.Generator, zone: BaseGeometry, avoid: list[BaseGeometry],
          margin: float, at: tuple[float, float] | None = None,
          ) -> tuple[Polygon, Polygon] | None:
    """A grave: an irregular clearing (3-15 m across) with a concrete tomb in the middle."""
    d = float(rng.uniform(5.0, 14.0))

    def make(x: float, y: float) -> Polygon:
        g = blob(rng, x, y, d / 2, 0.3)
        minx, miny, maxx, maxy = g.bounds
        across = max(maxx - minx, maxy - miny)
        return affinity.scale(g, min(1.0, 14.5 / across), min(1.0, 14.5 / across),
                              origin=(x, y))

    if at is not None:
        clearing = make(*at)
        obstacles = unary_union(avoid) if avoid else Polygon()
        if not zone.contains(clearing) or clearing.buffer(margin).intersects(obstacles):
            return None
    else:
        clearing = place(rng, zone, make, avoid, margin)
        if clearing is None:
            return None
    c = clearing.centroid
    t = max(1.6, 0.3 * d)
    tomb = rect(c.x, c.y, t * 1.3, t, rng.uniform(0, 180))
    return clearing, tomb


# --------------------------------------------------------------------------- period-2 changes


def plant_changes(rng: np.random.Generator, lay: Layout) -> None:
    """Plant violations and localized distractors of period 2 into ``lay`` (in place)."""
    taken: list[BaseGeometry] = [b.footprint.buffer(3) for b in lay.buildings]
    taken += [p["geometry"] for p in lay.permits]
    lay.nodata_wedge = lay.zones["wedge"]
    _plant_permitted(rng, lay)
    _plant_illegal_construction(rng, lay, taken)
    _plant_graves(rng, lay)
    _plant_cemetery_tombs(rng, lay)
    occupied = _plant_land_occupation(rng, lay, taken)
    # -- distractor: harvest of whole fields (crop -> stubble)
    rest = [i for i in occupied["order"] if i not in occupied["fields"]]
    for i in rest[: max(2, min(6, len(rest) // 3))]:
        f = lay.fields[i]
        lay.distractors.append({"kind": "harvest", "geometry": f, "paint": [(f, STUBBLE)],
                                "field": i})
    # -- distractor: cloud and its shadow over unchanged land; the nodata wedge
    lay.cloud = _cloud(rng, lay, lay.size)
    for kind in ("cloud", "shadow"):
        lay.distractors.append({"kind": kind, "geometry": lay.cloud[kind]})
    lay.distractors.append({"kind": "nodata", "geometry": lay.zones["wedge"]})


def _plant_permitted(rng: np.random.Generator, lay: Layout) -> None:
    """Distractor: one new building (with its shadow) inside each permit polygon."""
    for p in lay.permits:
        inner = p["geometry"].buffer(-3)
        minx, miny, maxx, maxy = inner.bounds
        w, h = maxx - minx, maxy - miny
        for _ in range(100):
            cx, cy = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
            b = make_building(rng, cx, cy, rng.uniform(0.35, 0.55) * w,
                              rng.uniform(0.3, 0.45) * h, rng.uniform(-6, 6),
                              height=rng.uniform(3.0, 8.0))
            if inner.contains(b.footprint) and p["geometry"].contains(b.shadow):
                lay.distractors.append({"kind": "permit", "geometry": b.footprint, "building": b})
                break


def _plant_illegal_construction(rng: np.random.Generator, lay: Layout,
                                taken: list[BaseGeometry]) -> None:
    """Violation: new buildings (60-600 m²) on open land, outside permits and red line."""
    z = lay.zones
    zone = z["open"].difference(z["redline"].buffer(3)).difference(z["wedge"].buffer(10))
    zone = zone.buffer(-3)
    minx, miny, maxx, maxy = zone.bounds
    for _ in range(7):
        length, width = rng.uniform(9, 30), rng.uniform(7, 18)
        length, width = min(length, 600 / width), max(width, 60 / length)
        material = str(rng.choice(list(ROOFS), p=[0.3, 0.45, 0.15, 0.1]))
        obstacles = unary_union(taken)
        for _ in range(200):
            b = make_building(rng, rng.uniform(minx, maxx), rng.uniform(miny, maxy), length,
                              width, rng.uniform(-20, 20), material)
            hull = b.footprint.union(b.shadow)
            if zone.contains(hull) and not hull.buffer(6).intersects(obstacles):
                lay.violations.append({"category": "illegal_construction",
                                       "geometry": b.footprint, "building": b})
                taken.append(hull.buffer(4))
                break


def _plant_graves(rng: np.random.Generator, lay: Layout) -> None:
    """Violation: grave clearings in forest, two clusters (10-30 m spacing) and isolated ones."""
    z = lay.zones
    forest_zone = z["forest"].buffer(-8).difference(z["cemetery"].buffer(15))
    forest_zone = forest_zone.difference(z["roads"].buffer(8))
    graves: list[tuple[Polygon, Polygon]] = []
    for cluster_size in (4, 3):
        seed_t = _tomb(rng, forest_zone, [g[0] for g in graves], 25.0)
        if seed_t is None:
            continue
        graves.append(seed_t)
        members = [seed_t]
        for _ in range(60):
            if len(members) >= cluster_size:
                break
            ref = members[int(rng.integers(len(members)))][0].centroid
            dist, ang = rng.uniform(10, 30), rng.uniform(0, 2 * np.pi)
            t = _tomb(rng, forest_zone, [g[0] for g in graves], 2.5,
                      at=(ref.x + dist * math.cos(ang), ref.y + dist * math.sin(ang)))
            if t is not None and all(t[0].centroid.distance(m[0].centroid) >= 10 for m in members):
                members.append(t)
                graves.append(t)
    for _ in range(3):  # isolated
        t = _tomb(rng, forest_zone, [g[0] for g in graves], 40.0)
        if t is not None:
            graves.append(t)
    for clearing, tomb in graves:
        lay.violations.append({"category": "forest_grave", "geometry": clearing,
                               "paint": [(clearing, LATERITE), (tomb, TOMB)]})


def _plant_cemetery_tombs(rng: np.random.Generator, lay: Layout) -> None:
    """Distractor: new tombs inside the designated cemetery."""
    cem_taken = [t[0] for t in lay.cemetery_tombs_p1]
    for _ in range(3):
        t = _tomb(rng, lay.zones["cemetery"].buffer(-3), cem_taken, 2.0)
        if t is not None:
            cem_taken.append(t[0])
            lay.distractors.append({"kind": "cemetery", "geometry": t[0],
                                    "paint": [(t[0], LATERITE), (t[1], TOMB)]})


def _plant_land_occupation(rng: np.random.Generator, lay: Layout, taken: list[BaseGeometry],
                           ) -> dict[str, list[int]]:
    """Violation: parts of 4 fields and one red-line riparian patch hardened or bared."""
    z = lay.zones
    order = [int(i) for i in rng.permutation(len(lay.fields))]
    occupied: list[int] = []
    for idx in order:
        if len(occupied) >= 4:
            break
        patch = _occupation_patch(rng, lay.fields[idx])
        if patch is None:
            continue
        occupied.append(idx)
        cls = HARD if rng.random() < 0.5 else BARE
        lay.violations.append({"category": "land_occupation", "geometry": patch,
                               "paint": [(patch, cls)]})
        taken.append(patch)
    rip = z["riparian"].difference(z["river"].buffer(2)).difference(z["roads"].buffer(8))
    rip = rip.difference(z["wedge"].buffer(20)).difference(z["farm"].buffer(3))
    minx, miny, maxx, maxy = rip.bounds
    for _ in range(200):
        p = blob(rng, rng.uniform(minx, maxx), rng.uniform(miny, maxy), rng.uniform(12, 16), 0.3,
                 aspect=1.4).intersection(rip)
        p = largest(p) if not p.is_empty else p
        if not p.is_empty and 300 <= p.area <= 3000:
            lay.violations.append({"category": "land_occupation", "geometry": p,
                                   "paint": [(p, HARD)]})
            taken.append(p)
            break
    return {"order": order, "fields": occupied}


def _occupation_patch(rng: np.random.Generator, f: Polygon) -> Polygon | None:
    """An irregular patch eating into one side of field ``f`` (300-3000 m², < 60 % of it)."""
    hi = min(3000.0, 0.6 * f.area)
    lo = min(300.0, 0.25 * f.area)
    target = rng.uniform(max(lo, 0.2 * f.area), max(lo, min(hi, 0.45 * f.area)))
    minx, miny, maxx, maxy = f.bounds
    for _ in range(50):
        side = int(rng.integers(4))
        u = rng.uniform(0.25, 0.75)
        cx, cy = [(minx + u * (maxx - minx), miny), (maxx, miny + u * (maxy - miny)),
                  (minx + u * (maxx - minx), maxy), (minx, miny + u * (maxy - miny))][side]
        radius = math.sqrt(target / math.pi) * 1.35
        p = blob(rng, cx, cy, radius, 0.35, aspect=rng.uniform(0.8, 1.3)).intersection(f)
        if p.is_empty:
            continue
        p = largest(p)
        if lo <= p.area <= hi and p.area < 0.6 * f.area:
            return p
    return None


def _cloud(rng: np.random.Generator, lay: Layout, n: int) -> dict:
    """A soft cumulus (alpha raster) and its shadow, avoiding every planted change."""
    z = lay.zones
    diameter = float(np.clip(rng.uniform(60, 100), 0, 0.35 * n))
    off = rng.uniform(40, 80) * min(1.0, n / 512)
    ang = math.radians(rng.uniform(215, 235))  # shadow away from the SE sun: up-left
    sdx, sdy = off * math.cos(ang), off * math.sin(ang)
    planted = [d["geometry"] for d in lay.violations + lay.distractors]
    planted += [p["geometry"] for p in lay.permits]
    keep_off = unary_union(planted + [z["wedge"], z["village"]]).buffer(6)
    cx = cy = None
    for attempt in range(1200):
        if attempt and attempt % 300 == 0:  # crowded (small) scenes: a smaller cloud
            diameter *= 0.8
        inner = z["scene"].buffer(-diameter * 0.6)
        x, y = rng.uniform(*inner.bounds[0::2]), rng.uniform(*inner.bounds[1::2])
        disk = Point(x, y).buffer(diameter * 0.6)
        sh = affinity.translate(disk, sdx, sdy)
        if z["scene"].contains(sh) and not disk.union(sh).intersects(keep_off):
            cx, cy = x, y
            break
    if cx is None:  # tiny scenes: accept any spot off the violations
        cx, cy = n * 0.3, n * 0.3
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    field_ = np.zeros((n, n), np.float32)
    r = diameter / 2
    for _ in range(6):  # cumulus lumps
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0, 0.45 * r)
        lx, ly = cx + d * math.cos(a), cy + d * math.sin(a)
        s = rng.uniform(0.35, 0.55) * r
        field_ += np.exp(-(((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * s * s)))
    wisps = 1.0 + 0.25 * noise(rng, (n, n), 3.0)
    alpha = np.clip((field_ * wisps - 0.35) / 0.6, 0.0, 1.0)
    alpha = ndimage.gaussian_filter(alpha, 1.5)
    alpha = np.where(alpha < 0.02, 0.0, alpha).astype(np.float32)
    shadow = ndimage.shift(alpha, (sdy, sdx), order=1, mode="constant", cval=0.0)

    def outline(a: np.ndarray) -> BaseGeometry:
        m = (a > 0.1).astype(np.uint8)
        return unary_union([Polygon(g["coordinates"][0]) for g, v in features.shapes(m, mask=m > 0)
                            if v == 1])

    return {"alpha": alpha, "shadow_alpha": shadow.astype(np.float32),
            "cloud": outline(alpha), "shadow": outline(shadow),
            "brightness": (0.45 + 0.25 * np.clip(field_ / max(field_.max(), 1e-6), 0, 1)
                           ).astype(np.float32)}


# --------------------------------------------------------------------------- rendering


@dataclass
class Textures:
    """Period-invariant ground texture fields."""

    fine: np.ndarray
    mid: np.ndarray
    coarse: np.ndarray
    colour: np.ndarray  # (4, H, W) small per-band colour variation
    crowns: np.ndarray
    field_gain: np.ndarray  # per field crop vigour


def make_textures(rng: np.random.Generator, n: int, n_fields: int) -> Textures:
    """Multi-scale noise fields shared by all periods (the ground does not change)."""
    shape = (n, n)
    colour = np.stack([noise(rng, shape, 8.0) for _ in range(4)]) * 0.03
    return Textures(noise(rng, shape, 0.7), noise(rng, shape, 4.0), noise(rng, shape, 20.0),
                    colour.astype(np.float32), crown_texture(rng, shape),
                    rng.uniform(0.85, 1.12, max(n_fields, 1)).astype(np.float32))


def render(lay: Layout, tex: Textures, paint: Sequence[tuple[BaseGeometry, int]],
           buildings: Sequence[Building], sun_elevation: float, field_vigour: bool = True,
           ) -> np.ndarray:
    """Surface reflectance (4, H, W) float32 of one period's land cover."""
    n = lay.size
    shape = (n, n)
    cls = features.rasterize([(g, v) for g, v in paint if not g.is_empty], out_shape=shape,
                             dtype="uint8")
    amp = TEXTURE[cls]
    bright = 1.0 + amp[..., 0] * tex.fine + amp[..., 1] * tex.mid + amp[..., 2] * tex.coarse
    refl = SPECTRA[cls].transpose(2, 0, 1) * (bright * 1.0)[None] * (1.0 + tex.colour)
    forest = cls == FOREST
    refl[:, forest] *= tex.crowns[forest]
    if field_vigour:
        fid = features.rasterize([(f, i + 1) for i, f in enumerate(lay.fields)], out_shape=shape,
                                 dtype="int32")
        crop = (cls == CROP) & (fid > 0)
        g = tex.field_gain[fid[crop] - 1]
        refl[3, crop] *= g
        refl[:3, crop] *= (2.0 - g)[None] ** 0.5
        # Row structure in crops: faint stripes.
        stripes = 1.0 + 0.04 * np.sin(np.arange(n, dtype=np.float32) * 2 * np.pi / 3.0)
        refl[:, crop] *= stripes[np.nonzero(crop)[0]][None]
    # Buildings: roof halves with material colour and ridge shading.
    if buildings:
        roof_shapes = []
        lut = np.zeros((2 * len(buildings) + 1, 4), np.float32)
        for i, b in enumerate(buildings):
            spec = np.array(ROOFS[b.material], np.float32)
            lut[2 * i + 1] = spec * (1.0 + b.ridge)
            lut[2 * i + 2] = spec * (1.0 - b.ridge)
            roof_shapes += [(b.halves[0], 2 * i + 1), (b.halves[1], 2 * i + 2)]
        shadows = features.rasterize([(b.shadow, 1) for b in buildings if not b.shadow.is_empty],
                                     out_shape=shape, dtype="uint8")
        roof_id = features.rasterize(roof_shapes, out_shape=shape, dtype="int32")
        sh = (shadows > 0) & (roof_id == 0)
        refl[:, sh] *= SHADOW_TINT[:, None]
        roof = roof_id > 0
        rtex = 1.0 + 0.03 * tex.fine[roof] + 0.02 * tex.mid[roof]
        refl[:, roof] = lut[roof_id[roof]].T * rtex[None]
        # Roof edges are slightly darker (eaves), a cue of real VHR imagery.
        edge = roof & ~ndimage.binary_erosion(roof)
        refl[:, edge] *= 0.9
    refl *= hillshade(lay.dem, SUN_AZIMUTH, sun_elevation)[None]
    return refl.astype(np.float32)


def add_cloud(refl: np.ndarray, cloud: dict) -> np.ndarray:
    """Blend a cloud (bright, soft edge) and darken its shadow (x0.35 at full opacity)."""
    a = cloud["alpha"][None]
    sa = cloud["shadow_alpha"][None]
    out = refl * (1.0 - 0.65 * sa)
    return out * (1.0 - a) + a * cloud["brightness"][None] * np.array(
        [1.0, 1.0, 0.99, 0.97], np.float32)[:, None, None]


def misregister(refl: np.ndarray, shift_xy: tuple[float, float]) -> np.ndarray:
    """Move image content by (dx, dy) px with cubic-spline resampling (edges replicated)."""
    dx, dy = shift_xy
    return np.stack([ndimage.shift(b, (dy, dx), order=3, mode="nearest") for b in refl])


def to_dn(rng: np.random.Generator, refl: np.ndarray, gain: Sequence[float],
          offset: Sequence[float]) -> np.ndarray:
    """Radiometric change, signal-dependent sensor noise, DN = reflectance x 10000 (>= 1)."""
    g = np.asarray(gain, np.float32)[:, None, None]
    o = np.asarray(offset, np.float32)[:, None, None]
    r = refl * g + o
    r = r + rng.standard_normal(r.shape, dtype=np.float32) * (0.003 + 0.012 * np.abs(r))
    return np.clip(np.rint(r * 10000.0), 1, 65535).astype(np.uint16)


# --------------------------------------------------------------------------- scene assembly


def _to_crs(geom: BaseGeometry, transform: Affine) -> BaseGeometry:
    a = transform
    return affinity.affine_transform(geom, [a.a, a.b, a.d, a.e, a.c, a.f])


def _gdf(rows: list[dict], transform: Affine, columns: Sequence[str] = ()) -> gpd.GeoDataFrame:
    geoms = [_to_crs(r.pop("geometry"), transform) for r in rows]
    return gpd.GeoDataFrame(rows or None, columns=list(columns) or None, geometry=geoms, crs=CRS)


def _street_offices(n: int) -> list[dict]:
    s = float(n)
    west = Polygon([(0, 0), (0.42 * s, 0), (0.40 * s, 0.5 * s), (0.45 * s, s), (0, s)])
    ne = Polygon([(0.42 * s, 0), (s, 0), (s, 0.55 * s), (0.6 * s, 0.52 * s), (0.41 * s, 0.52 * s),
                  (0.40 * s, 0.5 * s)])
    se = box(0, 0, s, s).difference(west).difference(ne)
    return [{"geometry": g, "code": c, "name": nm}
            for g, (c, nm) in zip((west, ne, se), STREET_OFFICES, strict=True)]


def make_scene(seed: int = DEFAULT_SEED, size: int = DEFAULT_SIZE, periods: int = 2) -> Scene:
    """Generate the whole scene in memory (pure; no I/O)."""
    if periods not in (2, 3):
        raise ValueError(f"periods must be 2 or 3, got {periods}")
    if size < 192:
        raise ValueError(f"size must be >= 192 px to hold every planted item, got {size}")
    rng = np.random.default_rng(seed)
    lay = build_layout(rng, size)
    plant_changes(rng, lay)
    tex = make_textures(rng, size, len(lay.fields))
    transform = Affine.translation(*ORIGIN_XY) @ Affine.scale(RES_M, -RES_M)

    cem_paint = [(g, v) for c, t in lay.cemetery_tombs_p1 for g, v in ((c, LATERITE), (t, TOMB))]
    paint1 = list(lay.base_paint) + cem_paint
    changes = lay.violations + lay.distractors
    paint2 = paint1 + [pv for d in changes for pv in d.get("paint", [])]
    new_b = [d["building"] for d in changes if "building" in d]
    images: dict[str, np.ndarray] = {}
    names = list(PERIODS)[:periods]

    refl1 = render(lay, tex, paint1, lay.buildings, SUN_ELEVATION[0])
    images[names[0]] = to_dn(rng, refl1, (1, 1, 1, 1), (0, 0, 0, 0))
    del refl1

    refl2 = render(lay, tex, paint2, lay.buildings + new_b, SUN_ELEVATION[1])
    refl2 = misregister(add_cloud(refl2, lay.cloud), SHIFT_PX)
    dn2 = to_dn(rng, refl2, GAIN, OFFSET)
    del refl2
    wedge = features.rasterize([(lay.nodata_wedge, 1)], out_shape=(size, size), dtype="uint8")
    dn2[:, wedge > 0] = 0
    images[names[1]] = dn2

    if periods == 3:
        harvested = {d["field"] for d in lay.distractors if d["kind"] == "harvest"}
        regrow = [(lay.fields[i], CROP) for i in sorted(harvested)]
        paint3 = paint2 + regrow
        refl3 = render(lay, tex, paint3, lay.buildings + new_b, SUN_ELEVATION[2])
        images[names[2]] = to_dn(rng, refl3, GAIN_P3, OFFSET_P3)

    z = lay.zones
    rules = {
        "forest": _gdf([{"geometry": z["forest"], "name": "莲花山林地"}], transform),
        "farmland": _gdf([{"geometry": f, "parcel_id": f"FL{i + 1:03d}"}
                          for i, f in enumerate(lay.fields)], transform),
        "ecological_redline": _gdf(
            [{"geometry": z["riparian"], "name": "河道生态保护红线"},
             {"geometry": z["forest"].intersection(box(0.7 * size, 0, size, 0.2 * size)),
              "name": "山体生态保护红线"}], transform),
        "permits": _gdf([{k: p[k] for k in ("geometry", "permit_no", "holder")}
                         for p in lay.permits], transform, ("permit_no", "holder")),
        "cemeteries": _gdf([{"geometry": z["cemetery"], "name": "莲花山公墓"}], transform),
        "street_offices": _gdf(_street_offices(size), transform),
    }
    vio_rows = []
    counters: dict[str, int] = {}
    for v in lay.violations:
        counters[v["category"]] = counters.get(v["category"], 0) + 1
        vio_rows.append({"geometry": v["geometry"], "category": v["category"],
                         "truth_id": f"{v['category']}_{counters[v['category']]:02d}",
                         "area_m2": round(v["geometry"].area * RES_M * RES_M, 1)})
    dis_rows = []
    kinds: dict[str, int] = {}
    for d in lay.distractors:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        dis_rows.append({"geometry": d["geometry"], "kind": d["kind"],
                         "distractor_id": f"{d['kind']}_{kinds[d['kind']]:02d}"})
    label = features.rasterize([(v["geometry"], 1) for v in lay.violations],
                               out_shape=(size, size), dtype="uint8")
    params = {
        "seed": seed, "size": size, "periods": names, "crs": CRS, "origin_xy": list(ORIGIN_XY),
        "resolution_m": RES_M,
        "shift_px": {"dx": SHIFT_PX[0], "dy": SHIFT_PX[1],
                     "meaning": "period-2 content moved by (dx right, dy down) px; "
                                "truth is in true ground coordinates"},
        "radiometry_p2": {"gain": list(GAIN), "offset_reflectance": list(OFFSET)},
        "sun_elevation_deg": list(SUN_ELEVATION[:periods]), "sun_azimuth_deg": SUN_AZIMUTH,
        "counts": {"violations": counters,
                   "distractors": {k: sum(d["kind"] == k for d in lay.distractors)
                                   for k in sorted({d["kind"] for d in lay.distractors})}},
        "unchanged_window_rowcol": _unchanged_window(lay),
    }
    if periods == 3:
        params["radiometry_p3"] = {"gain": list(GAIN_P3), "offset_reflectance": list(OFFSET_P3)}
    return Scene(size, seed, transform, CRS, images,
                 {k: PERIODS[k][0] for k in names}, rules, _gdf(vio_rows, transform),
                 _gdf(dis_rows, transform), label, params)


def _unchanged_window(lay: Layout) -> list[int]:
    """A (row0, row1, col0, col1) window in the village, free of changes, cloud and nodata."""
    minx, miny, maxx, maxy = (int(v) for v in lay.zones["village"].bounds)
    return [miny + 4, maxy - 4, minx + 4, maxx - 4]


# --------------------------------------------------------------------------- writing


def _write_tif(path: Path, arr: np.ndarray, transform: Affine, nodata: int | None,
               descriptions: Sequence[str] | None = None, datetime: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = arr.shape
    block = 256 if min(height, width) > 256 else 128
    profile = {"driver": "GTiff", "dtype": arr.dtype.name, "count": count, "height": height,
               "width": width, "crs": CRS, "transform": transform, "nodata": nodata,
               "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
               "predictor": 2, "zlevel": 9, "interleave": "pixel"}
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(tmp, "w", **profile) as dst:
        dst.write(arr)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
        if datetime:
            dst.update_tags(TIFFTAG_DATETIME=datetime)
    os.replace(tmp, path)


def _write_geojson(path: Path, gdf: gpd.GeoDataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.geojson")
    tmp.unlink(missing_ok=True)
    gdf.to_file(tmp, driver="GeoJSON", engine="pyogrio", COORDINATE_PRECISION=3)
    os.replace(tmp, path)


def write_scene(scene: Scene, out: Path) -> list[Path]:
    """Write images, rule layers and truth under ``out``; returns the written paths."""
    out = Path(out)
    written = []
    for name, arr in scene.images.items():
        p = out / name / "scene.tif"
        _write_tif(p, arr, scene.transform, 0, BANDS, scene.dates[name])
        written.append(p)
    for name, gdf in scene.rules.items():
        p = out / "rules" / f"{name}.geojson"
        _write_geojson(p, gdf)
        written.append(p)
    for name, gdf in (("violations", scene.violations), ("distractors", scene.distractors)):
        p = out / "truth" / f"{name}.geojson"
        _write_geojson(p, gdf)
        written.append(p)
    p = out / "truth" / "label.tif"
    _write_tif(p, scene.label[None], scene.transform, None, ("violation",))
    written.append(p)
    p = out / "truth" / "scene.json"
    p.write_text(json.dumps(scene.params, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(p)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: sample_tiles/)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="scene width = height in px")
    ap.add_argument("--periods", type=int, choices=(2, 3), default=2)
    args = ap.parse_args(argv)
    try:
        scene = make_scene(args.seed, args.size, args.periods)
    except ValueError as err:
        print(f"make_samples: {err}", file=sys.stderr)
        return 2
    for p in write_scene(scene, args.out):
        print(f"{p}  {p.stat().st_size / 1e6:.2f} MB")
    print(json.dumps(scene.params["counts"], ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
