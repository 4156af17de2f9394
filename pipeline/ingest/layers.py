"""Rule layers and street-office boundaries: vector files read, clipped to the grid, repaired."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from rasterio.crs import CRS

from ..config import PipelineConfig
from ..errors import (
    ConfigError,
    InputError,
    MissingCRSError,
    MissingFileError,
)
from ..grid import Grid, norm_crs, transform_bounds
from ..types import BBox

#: what GDAL reads a shapefile's features from besides the ``.shp``: index, attributes, CRS and
#: attribute encoding (editing a permit's attributes in a GIS rewrites the ``.dbf`` alone)
SHAPEFILE_SIDECARS: tuple[str, ...] = (".shx", ".dbf", ".prj", ".cpg")


def layer_files(path: str | Path) -> list[Path]:
    """The files a vector layer is read from: ``path``, and a shapefile's sidecars that exist
    (in either case of extension)."""
    p = Path(path)
    if p.suffix.lower() != ".shp":
        return [p]
    found = (p.with_suffix(e) for ext in SHAPEFILE_SIDECARS for e in (ext, ext.upper()))
    return [p, *dict.fromkeys(q for q in found if q.exists())]


def load_layer(path: str | Path, crs: CRS | str, bounds: BBox | None = None,
               layer: str | None = None, where: str | None = None) -> gpd.GeoDataFrame:
    """Read a vector layer, filtered to ``bounds`` (in ``crs``), reprojected and repaired."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{p}: no such file; check the rule/admin layer path")
    crs = norm_crs(crs, "working CRS")
    try:
        info = pyogrio.read_info(p, layer=layer)
    except Exception as err:  # pyogrio raises DataSourceError/DataLayerError and others
        if layer is not None and "layer" in str(err).lower():
            raise InputError(f"{p}: has no layer {layer!r}; available: "
                             f"{', '.join(str(x[0]) for x in _layers(p))}") from None
        raise InputError(f"{p}: not a vector file GDAL can read; give GeoPackage, GeoJSON or "
                         "Shapefile") from None
    if not info.get("crs"):
        raise MissingCRSError(f"{p}: vector layer has no CRS; assign one (e.g. ogr2ogr -a_srs "
                              "EPSG:4326) and retry")
    bbox = None
    if bounds is not None:
        bbox = transform_bounds(crs, norm_crs(info["crs"]), *bounds)
    try:
        gdf = pyogrio.read_dataframe(p, layer=layer, where=where, bbox=bbox)
    except Exception as err:
        raise InputError(f"{p}: cannot read ({' '.join(str(err).split())}); check where:/layer:"
                         ) from None
    gdf = gdf.to_crs(crs)
    geoms = shapely.make_valid(gdf.geometry.values)
    if len(gdf) and shapely.get_dimensions(gdf.geometry.values).max() == 2:
        geoms = np.array([_polygonal(g) for g in geoms], dtype=object)
    gdf = gdf.set_geometry(gpd.GeoSeries(geoms, index=gdf.index, crs=crs))
    return gdf[~gdf.geometry.is_empty & gdf.geometry.notna()]


def _layers(p: Path) -> list[tuple[str, str]]:
    try:
        return [tuple(x) for x in pyogrio.list_layers(p)]
    except Exception:
        return []


def _polygonal(g: shapely.Geometry | None) -> shapely.Geometry | None:
    if g is None or g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    parts = [x for x in shapely.get_parts(g) if x.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def load_rules(cfg: PipelineConfig, grid: Grid) -> dict[str, gpd.GeoDataFrame]:
    """Every rule layer of the config, clipped to the grid's bounds, in the working CRS."""
    return {role: load_layer(cfg.path(rc.path), grid.crs, bounds=grid.bounds, layer=rc.layer,
                             where=rc.where) for role, rc in cfg.rules.items()}


def load_admin(cfg: PipelineConfig, grid: Grid) -> gpd.GeoDataFrame:
    """Street-office boundaries as ``admin_code``, ``admin_name``, geometry (may be empty)."""
    if cfg.admin is None:
        return gpd.GeoDataFrame({"admin_code": [], "admin_name": []}, geometry=[], crs=grid.crs)
    a = cfg.admin
    gdf = load_layer(cfg.path(a.path), grid.crs, bounds=grid.bounds, layer=a.layer)
    for key, fld in (("code_field", a.code_field), ("name_field", a.name_field)):
        if fld not in gdf.columns:
            avail = ", ".join(c for c in gdf.columns if c != gdf.geometry.name)
            raise ConfigError(f"{cfg.path(a.path)}: admin.{key} {fld!r} is not a field of the "
                              f"layer; available: {avail}")
    return gpd.GeoDataFrame({"admin_code": gdf[a.code_field].astype(str).to_numpy(),
                             "admin_name": gdf[a.name_field].astype(str).to_numpy()},
                            geometry=gdf.geometry.to_numpy(), crs=grid.crs)
