"""Tests for the patch table: overlap with every rule layer the classifier uses."""

from __future__ import annotations

import geopandas as gpd
import pytest
from shapely.geometry import box

from pipeline.patches import OVERLAP_ROLES, build_patches

CRS = "EPSG:32650"


def test_overlap_areas_with_each_rule_layer() -> None:
    records = [{"geometry": box(0, 0, 10, 10), "category": "land_occupation",
                "confidence": 0.9, "area_m2": 100.0},
               {"geometry": box(100, 0, 120, 10), "category": "other_change",
                "confidence": 0.6, "area_m2": 200.0}]
    water = gpd.GeoDataFrame(geometry=[box(5, -5, 50, 20), box(8, 0, 9, 10)], crs=CRS)
    built = gpd.GeoDataFrame(geometry=[box(110, 0, 130, 10)], crs=CRS)
    df = build_patches(records, CRS, rules={"water": water, "construction_land": built},
                       admin=None, meta={"run_id": "r"})
    assert {f"{r}_m2" for r in OVERLAP_ROLES} <= set(df.columns)
    # the two water polygons overlap each other: their union is counted once
    assert df["water_m2"].tolist() == pytest.approx([50.0, 0.0])
    assert df["construction_land_m2"].tolist() == pytest.approx([0.0, 100.0])
    assert df["forest_m2"].tolist() == [0.0, 0.0]  # a layer not given
