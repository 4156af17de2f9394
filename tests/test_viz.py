from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from shapely import box

from pipeline import viz
from pipeline.errors import MissingFileError

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "sample_tiles" / "2024-06" / "scene.tif"


def test_quicklook_draws_outline_in_category_colour() -> None:
    plain = np.asarray(viz.quicklook(SCENE, max_size=256))
    patch = gpd.GeoDataFrame({"category": ["illegal_construction"]},
                             geometry=[box(602100, 2545700, 602300, 2545900)], crs="EPSG:4547")
    drawn = np.asarray(viz.quicklook(SCENE, patch, max_size=256))
    assert plain.shape == drawn.shape and plain.shape[2] == 3 and max(plain.shape) <= 256
    diff = np.argwhere((plain != drawn).any(axis=2))
    # the outline sits where the box is: 1024 px scene at 1 m shown at 1/4 → rows 25..75
    assert diff.size and diff[:, 0].min() >= 20 and diff[:, 0].max() <= 80
    assert diff[:, 1].min() >= 20 and diff[:, 1].max() <= 80


def test_load_run_needs_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="run.json"):
        viz.load_run(tmp_path)
