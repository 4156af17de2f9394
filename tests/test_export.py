from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from PIL import Image

from pipeline import evidence, export
from pipeline.evidence import chip_bounds
from pipeline.export import (
    TASK_COLUMNS,
    export_all,
    office_task_name,
    task_rows,
    write_cog,
    write_evidence,
    write_geojson,
    write_gpkg,
    write_office_tasks,
    write_tasks_csv,
)
from pipeline.report import CATEGORY_COLORS, render_html, summarize
from pipeline.types import CATEGORY_CODES, CATEGORY_ZH, MU_M2

CRS = "EPSG:4547"
X0, Y0 = 602500.0, 2545500.0
NAN = float("nan")


def box(dx: float, dy: float, s: float) -> shapely.Polygon:
    return shapely.box(X0 + dx, Y0 + dy, X0 + dx + s, Y0 + dy + s)


@pytest.fixture
def patches() -> gpd.GeoDataFrame:
    """Seven patches: violations in two street offices and none, with every status."""
    holed = shapely.Polygon(box(0, 60, 40).exterior.coords, [box(10, 70, 10).exterior.coords])
    multi = shapely.MultiPolygon([box(60, 0, 10), box(75, 0, 10)])
    rows: list[tuple[Any, ...]] = [
        # geometry, category, confidence, admin_code, admin_name, status
        (box(0, 0, 20), "illegal_construction", 0.70, "440304001", "福田街道", "new"),
        (holed, "land_occupation", 0.90, "440304001", "福田街道", "grown"),
        (multi, "forest_grave", 0.95, "440304001", "福田街道", "reappeared"),
        (box(100, 0, 30), "illegal_construction", 0.70, "440304001", "福田街道", "new"),
        (box(0, 120, 25), "illegal_construction", 0.80, "440303002", "南园街道", "persisting"),
        (box(50, 120, 25), "land_occupation", 0.60, "440303002", "南园街道", "new"),
        (box(100, 120, 15), "other_change", 0.50, "440303002", "南园街道", "new"),
        (box(150, 150, 12), "forest_grave", 0.66, None, None, "new"),
        (box(150, 0, 12), "illegal_construction", 0.99, "440304001", "福田街道", "suppressed"),
    ]
    geoms = [r[0] for r in rows]
    gdf = gpd.GeoDataFrame({
        "patch_id": [f"TB-{r[3] or '000000000'}-20240601-{i:08x}" for i, r in enumerate(rows)],
        "category": [r[1] for r in rows],
        "category_zh": [CATEGORY_ZH[r[1]] for r in rows],
        "confidence": [r[2] for r in rows],
        "area_m2": [g.area for g in geoms],
        "area_mu": [g.area / MU_M2 for g in geoms],
        "admin_code": [r[3] for r in rows],
        "admin_name": [r[4] for r in rows],
        "forest_m2": np.float32(0.0), "farmland_m2": 0.0, "ecological_redline_m2": 0.0,
        "permits_m2": 0.0, "cemeteries_m2": 0.0, "water_m2": 0.0, "construction_land_m2": 0.0,
        "before_date": "2024-01-10", "after_date": "2024-06-01",
        "sensor": "GF-2", "resolution_m": 1.0,
        "ndvi_before": [0.6, NAN, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5, 0.1],
        "ndvi_after": np.float32(0.1), "bright_before": NAN, "bright_after": NAN,
        "run_id": "r1", "first_seen": "2024-06-01",
        "status": [r[5] for r in rows],
    }, geometry=geoms, crs=CRS)
    cent = gdf.geometry.centroid.to_crs(4326)
    gdf["centroid_lon"], gdf["centroid_lat"] = cent.x, cent.y
    return gdf


@pytest.fixture
def category_tif(tmp_path: Path) -> Path:
    """A plain tiled 128x128 uint8 category GeoTIFF (1 m) with a 255 nodata edge."""
    arr = np.zeros((128, 128), dtype=np.uint8)
    for code in range(1, 5):
        arr[10 * code:10 * code + 8, 20:40] = code
    arr[:, :4] = 255
    path = tmp_path / "change_blocks.tif"
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=1, dtype="uint8",
                       crs=CRS, transform=Affine(1, 0, X0 - 10, 0, -1, Y0 + 200), tiled=True,
                       blockxsize=64, blockysize=64) as dst:
        dst.write(arr, 1)
    return path


def signed_area(ring: list[list[float]]) -> float:
    xy = np.asarray(ring)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def polygons(geom: dict[str, Any]) -> list[Any]:
    return [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]


# --------------------------------------------------------------------------- GeoJSON


def test_geojson_is_rfc7946(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    # make one ring clockwise in the input so orientation has to be fixed
    patches.loc[0, "geometry"] = shapely.Polygon(patches.geometry[0].exterior.coords[::-1])
    path = tmp_path / "patches.geojson"
    write_geojson(patches, path)
    raw = path.read_bytes()
    assert "福田街道".encode() in raw and b"\\u" not in raw  # UTF-8, not escaped
    fc = json.loads(raw)
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    assert len(fc["features"]) == len(patches)
    n_holes = 0
    for feat, (_, row) in zip(fc["features"], patches.iterrows(), strict=True):
        assert feat["id"] == row["patch_id"]
        for poly in polygons(feat["geometry"]):
            assert signed_area(poly[0]) > 0  # outer ring counter-clockwise
            for hole in poly[1:]:
                assert signed_area(hole) < 0  # holes clockwise
                n_holes += 1
            for x, y in (p for ring in poly for p in ring):
                assert 114.5 < x < 115.5 and 22.5 < y < 23.5  # lon, lat order
                assert round(x, 7) == x and round(y, 7) == y
        props = feat["properties"]
        assert set(export.PATCH_FIELDS) - {"evidence"} <= set(props)
        assert props["bright_before"] is None
        assert isinstance(props["forest_m2"], float)
    assert n_holes == 1
    assert fc["features"][1]["properties"]["ndvi_before"] is None
    assert fc["features"][7]["properties"]["admin_code"] is None
    assert b"NaN" not in raw


def test_geojson_roundtrips_with_areas(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    path = tmp_path / "patches.geojson"
    write_geojson(patches, path)
    back = gpd.read_file(path)
    assert back.crs.to_epsg() == 4326 and len(back) == len(patches)
    areas = back.to_crs(CRS).geometry.area.to_numpy()
    np.testing.assert_allclose(areas, patches.geometry.area.to_numpy(), rtol=0.005)
    assert back["patch_id"].tolist() == patches["patch_id"].tolist()
    assert back.geom_type.tolist()[2] == "MultiPolygon"


@pytest.mark.skipif(shutil.which("ogrinfo") is None, reason="GDAL CLI (gdal-bin) not installed")
def test_geojson_opens_in_ogrinfo(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    path = tmp_path / "patches.geojson"
    write_geojson(patches, path)
    res = subprocess.run(["ogrinfo", "-ro", "-so", "-al", str(path)], capture_output=True,
                         text=True, check=True)
    assert f"Feature Count: {len(patches)}" in res.stdout
    assert "WGS 84" in res.stdout
    assert "ERROR" not in res.stderr


def test_empty_geojson(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    fc = write_geojson(patches.iloc[:0], tmp_path / "e.geojson")
    assert fc == {"type": "FeatureCollection", "features": []}
    assert len(gpd.read_file(tmp_path / "e.geojson")) == 0


# --------------------------------------------------------------------------- GPKG / COG


def test_gpkg_in_working_crs(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    path = tmp_path / "patches.gpkg"
    write_gpkg(patches, path)
    back = gpd.read_file(path, layer="patches")
    assert back.crs.to_epsg() == 4547
    np.testing.assert_allclose(back.area, patches.area)
    assert back["category_zh"].tolist() == patches["category_zh"].tolist()


def test_cog_is_valid(tmp_path: Path, category_tif: Path) -> None:
    dst = tmp_path / "change.tif"
    write_cog(category_tif, dst, blocksize=32)
    with rasterio.open(dst) as src:
        assert src.profile["tiled"] and src.block_shapes[0] == (32, 32)
        assert src.dtypes[0] == "uint8" and src.nodata == 255
        assert src.crs.to_epsg() == 4547
        assert src.overviews(1) == [2, 4]
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.tags()["CATEGORY_1"] == "illegal_construction"
        cmap = src.colormap(1)
        for cat, code in CATEGORY_CODES.items():
            assert cmap[code][:3] == CATEGORY_COLORS[cat]
        assert cmap[255][3] == 0
        with rasterio.open(category_tif) as orig:
            np.testing.assert_array_equal(src.read(1), orig.read(1))
        # GDAL's validate_cloud_optimized_geotiff checks: overview data before full-res data,
        # smallest overview first
        def first_offset(ovr: int | None) -> int:
            return int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1, ovr=ovr))

        assert first_offset(1) < first_offset(0) < first_offset(None)
    head = dst.read_bytes()[:400]
    assert b"GDAL_STRUCTURAL_METADATA_SIZE" in head and b"LAYOUT=IFDS_BEFORE_DATA" in head


def test_cog_rejects_non_category_raster(tmp_path: Path) -> None:
    src = tmp_path / "f.tif"
    with rasterio.open(src, "w", driver="GTiff", width=8, height=8, count=1, dtype="float32",
                       crs=CRS, transform=Affine(1, 0, X0, 0, -1, Y0)) as dst:
        dst.write(np.zeros((1, 8, 8), "float32"))
    with pytest.raises(export.InputError, match="uint8 category raster"):
        write_cog(src, tmp_path / "c.tif")
    assert not (tmp_path / "c.tif").exists()


# --------------------------------------------------------------------------- tasks.csv


def test_tasks_csv(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    path = tmp_path / "tasks.csv"
    prio = {"land_occupation": 1, "illegal_construction": 2, "forest_grave": 3}
    n = write_tasks_csv(task_rows(patches, prio), path)
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header[:3] == ["序号 seq", "图斑编号 patch_id", "街道 admin_name"]
    keys = [h.split()[-1] for h in header]
    recs = [dict(zip(keys, r, strict=True)) for r in body]
    assert n == len(recs) == 6  # not persisting, suppressed or other_change
    assert [r["seq"] for r in recs] == [str(i) for i in range(1, 7)]
    assert {r["status"] for r in recs} <= {"new", "grown", "reappeared"}
    assert "other_change" not in {r["category"] for r in recs}
    # grouped by street office (code order, unassigned last) ...
    assert [r["admin_code"] for r in recs] == ["440303002"] + ["440304001"] * 4 + [""]
    # ... then priority (beats confidence: forest_grave has 0.95), confidence desc, area desc
    fu = recs[1:5]
    assert [r["category"] for r in fu] == ["land_occupation", "illegal_construction",
                                           "illegal_construction", "forest_grave"]
    assert float(fu[1]["area_m2"]) > float(fu[2]["area_m2"])  # equal confidence: larger first
    assert fu[0]["category_zh"] == "违法占地" and fu[0]["admin_name"] == "福田街道"
    assert float(fu[0]["area_mu"]) == pytest.approx(1500 / MU_M2, abs=0.01)


def test_office_task_lists(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    rows = task_rows(patches)
    files = write_office_tasks(rows, tmp_path / "tasks")
    assert files == {"440303002_南园街道.csv": 1, "440304001_福田街道.csv": 4,
                     "unassigned.csv": 1}
    got = {}
    for name in files:
        raw = (tmp_path / "tasks" / name).read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf")
        with open(tmp_path / "tasks" / name, encoding="utf-8-sig", newline="") as f:
            header, *body = list(csv.reader(f))
        assert header == [f"{zh} {key}" for key, zh in TASK_COLUMNS]
        got[name] = body
    futian = got["440304001_福田街道.csv"]
    assert [r[0] for r in futian] == ["1", "2", "3", "4"]  # numbered within the office
    # the same tasks as tasks.csv, in the same order
    assert [r[1] for r in futian] == [r["patch_id"] for r in rows[1:5]]
    assert office_task_name("440304001", "福田 街道/东") == "440304001_福田_街道_东.csv"
    assert office_task_name("", "x") == office_task_name(None, None) == "unassigned.csv"


def test_task_rows_without_status_column(patches: gpd.GeoDataFrame) -> None:
    rows = task_rows(patches.drop(columns="status"))
    assert len(rows) == 8  # every violation


# --------------------------------------------------------------------------- evidence


def test_write_evidence(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    rec = patches.iloc[0].to_dict()
    b = chip_bounds(rec["geometry"], min_size_m=40)
    assert b[2] - b[0] == pytest.approx(40) and b[3] - b[1] == pytest.approx(40)
    before = np.full((40, 40, 3), 60, np.uint8)
    after = np.full((40, 40, 3), 200, np.uint8)
    path = tmp_path / "evidence" / "p.png"
    write_evidence(rec, before, after, path, bounds=b, panel_px=200)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] == 2 * 200 + 4 and img.shape[0] > 200
    yellow = (img[..., 0] == 255) & (img[..., 1] == 255) & (img[..., 2] == 0)
    # the 20 m square in a 40 m chip spans pixels 50..150 of each 200 px panel
    assert yellow[:200, :200].sum() > 200 and yellow[:200, 204:].sum() > 200
    assert yellow[100, 50] or yellow[100, 49]
    assert img[100, 100].tolist() == [60, 60, 60] and img[100, 304].tolist() == [200] * 3


def test_evidence_says_when_captions_lack_chinese(tmp_path: Path, patches: gpd.GeoDataFrame,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def render(items: list, panel_px: int) -> Any:
        return iter(["no chip"] * len(items))

    monkeypatch.setattr(evidence, "_CJK_FONTS", ())
    evidence._font.cache_clear()
    try:
        with caplog.at_level("INFO", logger="pipeline.export"), \
                pytest.warns(export.TubanWarning):
            export._write_all_evidence(patches, tmp_path / "ev", render, min_size_m=40,
                                       panel_px=256)
    finally:
        evidence._font.cache_clear()
    assert "no CJK font found" in caplog.text


def test_geojson_geometries_in_bulk_equal_one_at_a_time() -> None:
    hole = shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 2)]])
    geoms = np.array([
        hole,
        None,
        shapely.MultiPolygon([shapely.box(10, 10, 11, 11), hole]),
        shapely.Polygon(),
        shapely.box(0.123456789, 1.987654321, 2.5, 3.5),
        shapely.Point(1, 2),
        shapely.MultiPolygon(),
    ], dtype=object)
    got = export.geojson_geometries(geoms)
    want = [None if g is None or g.is_empty else export._geojson_geometry(g) for g in geoms]
    assert got == want
    assert got[2]["type"] == "MultiPolygon" and len(got[2]["coordinates"][1]) == 2  # the hole
    assert [0.1234568, 1.9876543] in got[4]["coordinates"][0]  # 7 decimals
    assert export.geojson_geometries(np.array([], dtype=object)) == []


# --------------------------------------------------------------------------- report


def test_summary_and_report(patches: gpd.GeoDataFrame) -> None:
    s = summarize(patches)
    assert s["total"]["count"] == 9 and s["tasks"] == 6
    assert s["by_category"]["illegal_construction"]["count"] == 4
    assert s["by_category"]["illegal_construction"]["tasks"] == 2
    assert s["by_status"] == {"grown": 1, "new": 5, "persisting": 1, "reappeared": 1,
                              "suppressed": 1}
    fu = next(a for a in s["by_admin"] if a["admin_code"] == "440304001")
    assert fu["count"] == 5 and fu["area_m2"] == pytest.approx(
        400 + 1500 + 200 + 900 + 144, abs=0.1)
    assert fu["area_mu"] == pytest.approx(fu["area_m2"] / MU_M2, abs=0.01)
    extent = tuple(patches.to_crs(4326).total_bounds + np.array([-1e-3, -1e-3, 1e-3, 1e-3]))
    html = render_html(s, export.to_rfc7946(patches), {"run_id": "r1", "extent": extent})
    assert "http://" not in html and "https://" not in html and "<svg" in html
    assert "福田街道" in html and "南园街道" in html and html.count("<path") == len(patches)
    assert "scene extent" in html


# --------------------------------------------------------------------------- export_all


def chip_reader(value: int) -> evidence.ChipReader:
    def read(bounds: tuple[float, float, float, float]) -> np.ndarray:
        return np.full((48, 48, 3), value, np.uint8)
    return read


def test_export_all(tmp_path: Path, patches: gpd.GeoDataFrame, category_tif: Path) -> None:
    out = tmp_path / "runs" / "r1"
    paths = export_all(out, patches, manifest={"run_id": "r1", "config": {"name": "t"}},
                       change_tif=category_tif, before_chip=chip_reader(50),
                       after_chip=chip_reader(180), cog_blocksize=32)
    names = {"patches.geojson", "patches.gpkg", "change.tif", "tasks.csv", "report.html",
             "run.json", "evidence", "tasks"}
    assert {p.name for p in out.iterdir()} == names
    assert sorted(p.name for p in (out / "tasks").iterdir()) == [
        "440303002_南园街道.csv", "440304001_福田街道.csv", "unassigned.csv"]
    # the report links each office's task count to its list
    import re
    from urllib.parse import unquote

    links = re.findall(r'href="(tasks/[^"]+)"', (out / "report.html").read_text())
    assert sorted(unquote(h) for h in links) == sorted(
        f"tasks/{p.name}" for p in (out / "tasks").iterdir())
    assert all(p.exists() for p in paths.values())
    n_violations = int((patches["category"] != "other_change").sum())
    assert len(list((out / "evidence").glob("*.png"))) == n_violations == len(patches) - 1
    fc = json.loads((out / "patches.geojson").read_text(encoding="utf-8"))
    ev = fc["features"][0]["properties"]["evidence"]
    assert ev == f"evidence/{patches['patch_id'][0]}.png" and (out / ev).exists()
    man = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert man["counts"]["patches"] == 9 and man["counts"]["tasks"] == 6
    assert man["outputs"]["cog"] == "change.tif"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "https://" not in html and "http://" not in html
    assert [p.name for p in out.parent.iterdir()] == ["r1"]  # no staging folder left


def test_export_all_assigns_ids_without_register(tmp_path: Path,
                                                 patches: gpd.GeoDataFrame) -> None:
    bare = patches.drop(columns=["patch_id", "status", "first_seen"])
    export_all(tmp_path / "o", bare, manifest={"run_id": "cmp"})
    back = gpd.read_file(tmp_path / "o" / "patches.gpkg")
    assert back["patch_id"].is_unique and set(back["status"]) == {"new"}
    assert back["patch_id"][0].startswith("TB-440304001-20240601-")


def test_export_all_empty(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    export_all(tmp_path / "o", patches.iloc[:0], manifest={"run_id": "r"})
    with open(tmp_path / "o" / "tasks.csv", encoding="utf-8-sig") as f:
        assert len(list(csv.reader(f))) == 1
    assert len(gpd.read_file(tmp_path / "o" / "patches.gpkg")) == 0


def test_failed_export_leaves_outdir_untouched(tmp_path: Path, patches: gpd.GeoDataFrame,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "patches.geojson").write_text("previous run")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_office_tasks", fail)  # after geojson, gpkg, tasks.csv
    with pytest.raises(OSError, match="disk full"):
        export_all(out, patches, manifest={"run_id": "r1"}, before_chip=chip_reader(1),
                   after_chip=chip_reader(2))
    assert [p.name for p in out.iterdir()] == ["patches.geojson"]
    assert (out / "patches.geojson").read_text() == "previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_export_all_with_config(tmp_path: Path, patches: gpd.GeoDataFrame) -> None:
    from pipeline.config import config_from_dict

    cfg = config_from_dict({
        "name": "t", "crs": CRS, "resolution": 1.0,
        "periods": [{"name": "a", "images": ["x"]}, {"name": "b", "images": ["y"]}],
        "output": {"report": False, "chip_size_px": 32},
        "categories": {"forest_grave": {"min_area_m2": 4, "priority": 5}},
    }, Path("t.yaml"), tmp_path)
    paths = export_all(tmp_path / "o", patches, manifest={"run_id": "r1"}, config=cfg,
                       before_chip=chip_reader(1), after_chip=chip_reader(2))
    assert "report" not in paths and not (tmp_path / "o" / "report.html").exists()
    with open(paths["tasks"], encoding="utf-8-sig") as f:
        cats = [r["类别代码 category"] for r in csv.DictReader(f)]
    assert cats[-2:] == ["forest_grave", "forest_grave"]  # priority 5 sorts last per office
    img = Image.open(tmp_path / "o" / "evidence" / f"{patches['patch_id'][0]}.png")
    assert img.size[0] == 2 * 256 + 4


def test_report_map_frame_fits_the_drawing() -> None:
    import re

    from pipeline.report import render_svg

    def frame(extent: tuple[float, float, float, float]) -> tuple[float, float]:
        svg = render_svg({"type": "FeatureCollection", "features": []}, extent, width=720)
        w, h = re.match(r'<svg width="(\d+)" height="(\d+)"', svg).groups()
        return float(w), float(h)

    lat = 23.0  # a square district in metres is ~cos(lat) narrower in degrees of longitude
    k = math.cos(math.radians(lat))
    w, h = frame((113.0, lat - 0.05, 113.0 + 0.1 / k, lat + 0.05))
    assert abs(w - h) <= 2 and w < 720  # square, not a wide frame with the map on the left
    w, h = frame((113.0, lat, 113.0 + 1.0 / k, lat + 0.1))  # wide: the full width
    assert w == 720 and h < 100
