"""Run summary (pure): counts and areas per category, street office and status, as a dict and
as a self-contained HTML page (inline CSS and an inline SVG map; no external references)."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import pandas as pd

from .types import CATEGORY_CODES, CATEGORY_ZH, MU_M2, VIOLATIONS

#: Display colour (RGB) per category, shared by ``change.tif``'s colour table and the report.
CATEGORY_COLORS: dict[str, tuple[int, int, int]] = {
    "illegal_construction": (228, 26, 28),
    "forest_grave": (152, 78, 163),
    "land_occupation": (255, 127, 0),
    "other_change": (55, 126, 184),
}
STATUS_ZH: dict[str, str] = {"new": "新增", "persisting": "持续", "grown": "扩大",
                             "reappeared": "复现", "suppressed": "已核销"}
_ISSUED = ("new", "grown", "reappeared")
_NO_ADMIN = "(未落入街道)"


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _agg(df: pd.DataFrame) -> dict[str, Any]:
    a = float(df["area_m2"].sum()) if len(df) else 0.0
    return {"count": len(df), "area_m2": round(a, 1), "area_mu": round(a / MU_M2, 2)}


def summarize(patches: pd.DataFrame) -> dict[str, Any]:
    """Counts and areas (m² and 亩) per category, per street office and per status.

    Args:
        patches: The patch table (``category``, ``area_m2``; ``status``, ``admin_code``,
            ``admin_name`` when present).

    Returns:
        ``{"total", "tasks", "by_category", "by_status", "by_admin"}``; ``tasks`` counts the
        patches to verify (violations with status new, grown or reappeared).
    """
    df = pd.DataFrame(patches.drop(columns="geometry", errors="ignore")).copy()
    if "area_m2" not in df:
        df["area_m2"] = 0.0
    df["area_m2"] = pd.to_numeric(df["area_m2"], errors="coerce").fillna(0.0)
    if "status" not in df:
        df["status"] = "new"
    for c in ("admin_code", "admin_name"):
        if c not in df:
            df[c] = None
    issued = df["category"].isin(VIOLATIONS) & df["status"].isin(_ISSUED)
    by_cat = {}
    for cat in CATEGORY_CODES:
        sub = df[df["category"] == cat]
        by_cat[cat] = {"category_zh": CATEGORY_ZH[cat], **_agg(sub),
                       "tasks": int((issued & (df["category"] == cat)).sum())}
    by_status = {str(s): int(n) for s, n in df["status"].value_counts().sort_index().items()}
    code = df["admin_code"].astype(object).where(df["admin_code"].notna(), "")
    name = df["admin_name"].astype(object).where(df["admin_name"].notna(), "")
    by_admin = []
    for (c, n), sub in df.groupby([code, name], sort=True):
        by_admin.append({
            "admin_code": str(c), "admin_name": str(n) or _NO_ADMIN, **_agg(sub),
            "tasks": int(issued[sub.index].sum()),
            "by_category": {cat: int((sub["category"] == cat).sum()) for cat in CATEGORY_CODES},
        })
    return {"total": {**_agg(df), "tasks": int(issued.sum())}, "tasks": int(issued.sum()),
            "by_category": by_cat, "by_status": by_status, "by_admin": by_admin}


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:"Microsoft YaHei","PingFang SC","Noto Sans CJK SC",sans-serif;margin:24px;
color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px}
.meta{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}
.sw{display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:middle;
border:1px solid #555}
svg{border:1px solid #bbb;background:#fafafa}
.cards span{display:inline-block;margin-right:20px;font-size:15px}
"""


def _rings(geom: Mapping[str, Any]) -> Iterable[list[list[list[float]]]]:
    if geom["type"] == "Polygon":
        yield geom["coordinates"]
    elif geom["type"] == "MultiPolygon":
        yield from geom["coordinates"]


class _Projector:
    """lon/lat -> SVG pixels (equirectangular, scaled by cos(latitude))."""

    def __init__(self, bbox: tuple[float, float, float, float], width: int) -> None:
        x0, y0, x1, y1 = bbox
        self.k = math.cos(math.radians((y0 + y1) / 2))
        w = max((x1 - x0) * self.k, 1e-12)
        h = max(y1 - y0, 1e-12)
        self.s = (width - 20) / max(w, h * 1.6)
        self.x0, self.y1 = x0, y1
        # the frame fits the drawing (a square district is not drawn into a wide frame)
        self.width, self.height = int(w * self.s + 20), int(h * self.s + 20)

    def __call__(self, lon: float, lat: float) -> tuple[float, float]:
        return (10 + (lon - self.x0) * self.k * self.s, 10 + (self.y1 - lat) * self.s)


def _bbox(features: list[dict[str, Any]], extent: Any) -> tuple[float, float, float, float] | None:
    xs: list[float] = []
    ys: list[float] = []
    if extent is not None:
        xs += [extent[0], extent[2]]
        ys += [extent[1], extent[3]]
    for f in features:
        for poly in _rings(f.get("geometry") or {"type": ""}):
            for ring in poly:
                xs += [p[0] for p in ring]
                ys += [p[1] for p in ring]
    if not xs:
        return None
    return min(xs), min(ys), max(xs), max(ys)


def render_svg(geojson: Mapping[str, Any], extent: Any = None, width: int = 720) -> str:
    """An inline SVG map of the patches coloured by category, with the scene extent.

    Args:
        geojson: A FeatureCollection in lon/lat (as written to ``patches.geojson``).
        extent: Scene extent ``(west, south, east, north)`` in degrees, or None.
        width: Width in pixels.

    Returns:
        The ``<svg>`` element as a string.
    """
    feats = list(geojson.get("features", []))
    bbox = _bbox(feats, extent)
    if bbox is None:
        return '<p class="meta">没有图斑 (no patches).</p>'
    pr = _Projector(bbox, width)
    parts = [f'<svg width="{pr.width}" '
             f'height="{pr.height}" viewBox="0 0 {pr.width} {pr.height}" role="img">']
    if extent is not None:
        (ax, ay), (bx, by) = pr(extent[0], extent[3]), pr(extent[2], extent[1])
        parts.append(f'<rect x="{ax:.1f}" y="{ay:.1f}" width="{bx - ax:.1f}" '
                     f'height="{by - ay:.1f}" fill="#fff" stroke="#333" stroke-dasharray="4 3">'
                     "<title>影像范围 scene extent</title></rect>")
    for f in feats:
        props = f.get("properties") or {}
        color = _hex(CATEGORY_COLORS.get(str(props.get("category")), (90, 90, 90)))
        d, pts = [], []
        for poly in _rings(f.get("geometry") or {"type": ""}):
            for ring in poly:
                xy = [pr(p[0], p[1]) for p in ring]
                pts += xy
                d.append("M" + "L".join(f"{x:.1f},{y:.1f}" for x, y in xy) + "Z")
        if not pts:
            continue
        tip = html.escape(f"{props.get('patch_id', '')} {props.get('category_zh', '')} "
                          f"{props.get('area_m2', '')} m² {props.get('status', '')}")
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if max(xs) - min(xs) < 3 and max(ys) - min(ys) < 3:  # too small to see: a marker
            cx, cy = sum(xs) / len(xs), sum(ys) / len(ys)
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{color}" '
                         f'stroke="#000" stroke-width="0.4"><title>{tip}</title></circle>')
        else:
            parts.append(f'<path d="{"".join(d)}" fill="{color}" fill-opacity="0.6" '
                         f'fill-rule="evenodd" stroke="{color}" stroke-width="1">'
                         f"<title>{tip}</title></path>")
    parts.append("</svg>")
    return "".join(parts)


class _Raw(str):
    """Markup that :func:`_row` must not escape."""


#: the task list of patches in no street office
UNASSIGNED_TASKS = "unassigned.csv"


def office_task_name(code: Any, name: Any) -> str:
    """File name of a street office's task list: ``<code>_<name>.csv`` (path separators and
    spaces in the name replaced), :data:`UNASSIGNED_TASKS` without a code."""
    if code is None or str(code).strip() == "":
        return UNASSIGNED_TASKS
    label = re.sub(r"[\\/:*?\"<>|\s]+", "_", str(name or "").strip()).strip("_")
    return f"{code}_{label}.csv" if label else f"{code}.csv"


def _task_link(office: Mapping[str, Any]) -> Any:
    """An office's task count, linked to its task list (``tasks/``, written by export)."""
    n = office["tasks"]
    if not n:
        return n
    name = office_task_name(office["admin_code"], office["admin_name"])
    return _Raw(f'<a href="tasks/{html.escape(quote(name))}">{n}</a>')


def _row(cells: Iterable[Any], left: int = 1) -> str:
    out = []
    for i, c in enumerate(cells):
        cls = ' class="l"' if i < left else ""
        out.append(f"<td{cls}>{c if isinstance(c, _Raw) else html.escape(str(c))}</td>")
    return "<tr>" + "".join(out) + "</tr>"


def render_html(summary: Mapping[str, Any], patches_geojson: Mapping[str, Any],
                meta: Mapping[str, Any]) -> str:
    """A self-contained ``report.html`` (inline CSS and SVG, no external URLs).

    Args:
        summary: From :func:`summarize`.
        patches_geojson: The FeatureCollection written to ``patches.geojson``.
        meta: ``title``, ``run_id``, ``before_date``, ``after_date``, ``crs`` and ``extent``
            (scene ``(west, south, east, north)`` in degrees) when known; other keys are listed.

    Returns:
        The HTML document.
    """
    esc = html.escape
    title = str(meta.get("title") or "图斑变化检测报告 Change-detection report")
    known = ("title", "extent")
    meta_rows = "".join(f"<tr><th class='l'>{esc(str(k))}</th><td class='l'>{esc(str(v))}"
                        "</td></tr>" for k, v in meta.items() if k not in known and v is not None)
    cat_rows = "".join(
        _row([_Raw(f'<span class="sw" style="background:{_hex(CATEGORY_COLORS[c])}"></span>'
                   f"{esc(v['category_zh'])} ({esc(c)})"), v["count"], v["tasks"],
              f"{v['area_m2']:,.1f}", f"{v['area_mu']:,.2f}"])
        for c, v in summary["by_category"].items())
    tot = summary["total"]
    cat_rows += _row(["合计 total", tot["count"], tot["tasks"], f"{tot['area_m2']:,.1f}",
                      f"{tot['area_mu']:,.2f}"])
    cats = list(CATEGORY_CODES)
    adm_head = "".join(f"<th>{esc(CATEGORY_ZH[c])}</th>" for c in cats)
    adm_rows = "".join(
        _row([a["admin_name"], a["admin_code"], *[a["by_category"][c] for c in cats],
              a["count"], _task_link(a), f"{a['area_m2']:,.1f}", f"{a['area_mu']:,.2f}"],
             left=2)
        for a in summary["by_admin"])
    st_rows = "".join(_row([f"{STATUS_ZH.get(s, s)} ({s})", n])
                      for s, n in summary["by_status"].items())
    legend = " ".join(f'<span><span class="sw" style="background:{_hex(CATEGORY_COLORS[c])}">'
                      f"</span>{esc(CATEGORY_ZH[c])}</span>" for c in cats)
    svg = render_svg(patches_geojson, meta.get("extent"))
    return f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_CSS}</style></head><body>
<h1>{esc(title)}</h1>
<div class="cards"><span>图斑 patches: <b>{tot['count']}</b></span>
<span>待核查 to verify: <b>{tot['tasks']}</b></span>
<span>面积 area: <b>{tot['area_m2']:,.1f} m²</b> ({tot['area_mu']:,.2f} 亩)</span></div>
<table class="meta">{meta_rows}</table>
<h2>分布图 Map</h2><div class="cards">{legend}</div>{svg}
<h2>按类别 By category</h2>
<table><tr><th class="l">类别 category</th><th>图斑数 count</th><th>待核查 tasks</th>
<th>面积 m²</th><th>面积 亩</th></tr>{cat_rows}</table>
<h2>按街道 By street office</h2>
<table><tr><th class="l">街道 street office</th><th class="l">代码 code</th>{adm_head}
<th>合计 count</th><th>待核查 tasks</th><th>面积 m²</th><th>面积 亩</th></tr>{adm_rows}</table>
<h2>按状态 By status</h2>
<table><tr><th class="l">状态 status</th><th>图斑数 count</th></tr>{st_rows}</table>
</body></html>
"""
