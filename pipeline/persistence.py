"""Time series: confirm a change only when it persists, which suppresses seasonal false alarms.

Pure functions over patch tables (GeoDataFrames in one working CRS). Periods are indexed
``0..P-1``; ``changes[(i, j)]`` is the patch table of the comparison period ``i`` → period ``j``.
Consecutive pairs ``(k, k+1)`` are the changes to report; longer spans ``(k, k+m)`` are the
evidence that the after-state of a change seen in ``(k, k+1)`` is still there in period ``k+m``.

A patch ``P`` of pair ``(k, k+1)`` is *present* in period ``j = k+m`` (m ≥ 2) when

- the direct comparison ``(k, j)`` has patches of the same family covering ≥ ``min_overlap`` of
  ``P`` (the change from the first period is still visible against the last: a harvest,
  crop → stubble → crop, shows change in (0, 1) but not in (0, 2)); or
- the consecutive pair ``(j-1, j)`` has an overlapping patch of the same family that does not
  *revert* ``P`` (continuing change, e.g. a construction site becoming a building). A patch
  reverts ``P`` when its after-state evidence (``ndvi_after``, ``bright_after``) is closer to
  ``P``'s before-state than to ``P``'s after-state: crop regrowing after harvest.

``persist_periods = n`` confirms ``P`` when it is present in every period ``k+2 .. k+n``, i.e. it
is seen in its own pair and still there ``n - 1`` periods later (``n = 1`` confirms everything).
Patches whose pair is too recent to be judged are ``pending``. Each patch also gets
``first_seen``: the name of the first period it was seen in, following overlapping, non-reverting
patches of the same family back through earlier pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

#: evidence columns compared to tell a reversal (after-state back to the before-state)
STATE_KEYS: tuple[str, ...] = ("ndvi", "bright")
#: value of the ``persistence`` column
CONFIRMED, TRANSIENT, PENDING = "confirmed", "transient", "pending"


def overlap_pairs(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """Index pairs (positions in ``a``, ``b``) of intersecting patches and their shared area."""
    if a.empty or b.empty:
        e = np.zeros(0, int)
        return e, e, np.zeros(0)
    ia, ib = b.sindex.query(a.geometry.values, predicate="intersects")
    area = shapely.area(shapely.intersection(a.geometry.values[ia], b.geometry.values[ib]))
    return ia, ib, np.asarray(area, float)


def _family(gdf: gpd.GeoDataFrame, families: Mapping[str, str] | None) -> np.ndarray:
    cats = gdf["category"].astype(str).to_numpy() if "category" in gdf else np.full(
        len(gdf), "change")
    if families is None:
        return np.full(len(gdf), "change", dtype=object)
    return np.asarray([families.get(c, c) for c in cats], dtype=object)


def _state(gdf: gpd.GeoDataFrame, when: str) -> np.ndarray:
    """(n, k) before/after evidence, NaN where a column is missing."""
    cols = [gdf[f"{k}_{when}"].astype(float).to_numpy() if f"{k}_{when}" in gdf
            else np.full(len(gdf), np.nan) for k in STATE_KEYS]
    return np.stack(cols, axis=1) if cols else np.zeros((len(gdf), 0))


def reverts(first: gpd.GeoDataFrame, later: gpd.GeoDataFrame, ia: np.ndarray,
            ib: np.ndarray) -> np.ndarray:
    """Per pair: does ``later[ib]``'s after-state return to ``first[ia]``'s before-state?"""
    b0, a0 = _state(first, "before")[ia], _state(first, "after")[ia]
    a1 = _state(later, "after")[ib]
    ok = np.isfinite(b0) & np.isfinite(a0) & np.isfinite(a1)
    d_back = np.where(ok, np.abs(a1 - b0), 0.0).sum(axis=1)
    d_kept = np.where(ok, np.abs(a1 - a0), 0.0).sum(axis=1)
    return ok.any(axis=1) & (d_back < d_kept)


def _covered(p: gpd.GeoDataFrame, other: gpd.GeoDataFrame,
             families: Mapping[str, str] | None) -> np.ndarray:
    """Share of each patch of ``p`` covered by same-family patches of ``other``."""
    ia, ib, area = overlap_pairs(p, other)
    same = _family(p, families)[ia] == _family(other, families)[ib]
    cov = np.bincount(ia[same], weights=area[same], minlength=len(p))
    return cov / np.maximum(shapely.area(p.geometry.values), 1e-12)


def _continued(p: gpd.GeoDataFrame, nxt: gpd.GeoDataFrame,
               families: Mapping[str, str] | None) -> np.ndarray:
    """Patches of ``p`` overlapped by a same-family, non-reverting patch of ``nxt``."""
    ia, ib, area = overlap_pairs(p, nxt)
    keep = (area > 0) & (_family(p, families)[ia] == _family(nxt, families)[ib])
    keep &= ~reverts(p, nxt, ia, ib)
    out = np.zeros(len(p), bool)
    out[ia[keep]] = True
    return out


def confirm(changes: Mapping[tuple[int, int], gpd.GeoDataFrame], periods: Sequence[str], *,
            persist_periods: int = 2, min_overlap: float = 0.3,
            families: Mapping[str, str] | None = None) -> gpd.GeoDataFrame:
    """Judge every patch of the consecutive pairs ``(k, k+1)`` of ``changes``.

    Args:
        changes: patch tables keyed by ``(i, j)`` period indices, one working CRS; must hold
            the consecutive pairs to judge, plus ideally the spans ``(k, k+2)..(k, k+n)``.
        periods: period names, index = period number.
        persist_periods: n ≥ 1; see the module docstring.
        min_overlap: share of a patch a span's patches must cover for it to be present.
        families: category -> family; patches only confirm each other within a family.
            Default: every category is one family (a change may be classified differently
            against another period).

    Returns:
        The consecutive pairs' patches, concatenated, with ``pair`` (``"p_k→p_k+1"``),
        ``first_seen``, ``seen_periods`` (periods it was seen in, from its own after-period)
        and ``persistence`` (``confirmed``, ``transient`` or ``pending``).
    """
    if persist_periods < 1:
        raise ValueError(f"persist_periods must be ≥ 1, got {persist_periods}")
    n_p = len(periods)
    pairs = sorted(k for (k, j) in changes if j == k + 1)
    out: list[gpd.GeoDataFrame] = []
    first: dict[int, np.ndarray] = {}
    for k in pairs:
        p = changes[(k, k + 1)].reset_index(drop=True)
        seen = np.ones(len(p), int)
        alive = np.ones(len(p), bool)
        status = np.full(len(p), CONFIRMED, dtype=object)
        for m in range(2, persist_periods + 1):
            j = k + m
            if j >= n_p:
                status[alive] = PENDING
                alive[:] = False
                break
            present = np.zeros(len(p), bool)
            if (k, j) in changes:
                present |= _covered(p, changes[(k, j)], families) >= min_overlap
            if (j - 1, j) in changes:
                present |= _continued(p, changes[(j - 1, j)], families)
            gone = alive & ~present
            status[gone] = TRANSIENT
            alive &= present
            seen[alive] += 1
        fs = np.full(len(p), periods[k + 1], dtype=object)
        if (k - 1, k) in changes and k - 1 in first:
            prev = changes[(k - 1, k)].reset_index(drop=True)
            ia, ib, area = overlap_pairs(prev, p)
            keep = (area > 0) & (_family(prev, families)[ia] == _family(p, families)[ib])
            keep &= ~reverts(prev, p, ia, ib)
            order = {name: i for i, name in enumerate(periods)}
            for a, b in zip(ia[keep], ib[keep], strict=True):
                if order[first[k - 1][a]] < order[fs[b]]:
                    fs[b] = first[k - 1][a]
        first[k] = fs
        out.append(p.assign(pair=f"{periods[k]}→{periods[k + 1]}", first_seen=fs,
                            seen_periods=seen, persistence=status))
    if not out:
        return gpd.GeoDataFrame({"pair": [], "first_seen": [], "seen_periods": [],
                                 "persistence": []}, geometry=[])
    crs = out[0].crs
    return gpd.GeoDataFrame(pd.concat(out, ignore_index=True), geometry="geometry", crs=crs)


def keep_confirmed(judged: gpd.GeoDataFrame, *, pending: bool = False) -> gpd.GeoDataFrame:
    """The patches to report: confirmed ones (and, with ``pending``, the not yet judgeable)."""
    ok = judged["persistence"] == CONFIRMED
    if pending:
        ok |= judged["persistence"] == PENDING
    return judged[ok].reset_index(drop=True)
