import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from shapely import box

from pipeline.evaluate import distractor_hits, object_scores, pixel_scores, prf

CRS = "EPSG:4547"


def _gdf(rows: list[tuple[str, tuple[float, float, float, float]]], col: str = "category"
         ) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({col: [r[0] for r in rows]}, geometry=[box(*r[1]) for r in rows],
                            crs=CRS)


def test_prf_counts() -> None:
    assert prf(8, 2, 2) == {"precision": 0.8, "recall": 0.8, "f1": 0.8, "iou": 0.6667}
    assert prf(0, 0, 0)["f1"] == 1.0
    assert prf(0, 3, 0)["precision"] == 0.0


def test_object_scores_per_category() -> None:
    truth = _gdf([("forest_grave", (0, 0, 10, 10)), ("forest_grave", (50, 50, 60, 60)),
                  ("illegal_construction", (100, 100, 120, 120))])
    pred = _gdf([("forest_grave", (1, 1, 9, 9)),            # finds truth 1
                 ("forest_grave", (200, 200, 210, 210)),    # false
                 ("illegal_construction", (50, 50, 60, 60)),  # wrong category for truth 2
                 ("illegal_construction", (110, 110, 125, 125))])  # finds truth 3
    s = object_scores(pred, truth)
    assert s["forest_grave"]["recall"] == 0.5 and s["forest_grave"]["precision"] == 0.5
    assert s["illegal_construction"]["recall"] == 1.0
    assert s["illegal_construction"]["precision"] == 0.5
    assert s["land_occupation"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "n_pred": 0,
                                    "n_truth": 0, "found": 0, "false_patches": 0,
                                    "missed": 0}


def test_small_sliver_does_not_count_as_found() -> None:
    truth = _gdf([("land_occupation", (0, 0, 100, 100))])
    pred = _gdf([("land_occupation", (99, 99, 101, 101))])
    assert object_scores(pred, truth)["land_occupation"]["recall"] == 0.0


def test_distractor_hits() -> None:
    d = _gdf([("permit", (0, 0, 10, 10)), ("harvest", (20, 20, 30, 30))], col="kind")
    pred = _gdf([("illegal_construction", (5, 5, 8, 8)), ("other_change", (21, 21, 25, 25))])
    assert distractor_hits(pred, d) == {"harvest": 0, "permit": 1}


def test_pixel_scores_only_labelled() -> None:
    t = Affine(1, 0, 0, 0, -1, 10)
    label = np.zeros((10, 10), np.uint8)
    label[0:5, 0:5] = 1
    label[:, 8:] = 255  # unlabelled: a prediction here costs nothing
    pred = _gdf([("illegal_construction", (0, 5, 5, 10)), ("forest_grave", (8, 0, 10, 10))])
    s = pixel_scores(pred, label, t)
    assert s == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "iou": 1.0})
