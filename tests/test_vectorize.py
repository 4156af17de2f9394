import numpy as np
import pytest
import shapely
from affine import Affine

from pipeline.vectorize import polygons_from_array

T = Affine(1.0, 0, 602000, 0, -1.0, 2546000)


def _scene() -> np.ndarray:
    cat = np.zeros((40, 40), np.uint8)
    cat[3:23, 5:25] = 1  # crosses every block edge below
    cat[30:33, 30:33] = 2
    cat[10:14, 30:38] = 3
    cat[10:12, 36:38] = 255  # not observed: never a patch
    return cat


def test_exact_square_polygon() -> None:
    cat = np.zeros((10, 10), np.uint8)
    cat[3:6, 3:6] = 1
    [rec] = polygons_from_array(cat, T)
    assert rec["category"] == "illegal_construction"
    assert rec["area_m2"] == 9.0
    assert sorted(rec["geometry"].exterior.coords)[:1] == [(602003.0, 2545994.0)]
    assert rec["geometry"].bounds == (602003.0, 2545994.0, 602006.0, 2545997.0)


@pytest.mark.parametrize("block", [7, 8, 16, 13])
def test_seams_leave_no_trace(block: int) -> None:
    whole = polygons_from_array(_scene(), T)
    tiled = polygons_from_array(_scene(), T, block_size=block)
    key = lambda r: (r["category"], r["geometry"].bounds)  # noqa: E731
    assert len(tiled) == len(whole) == 3
    for a, b in zip(sorted(whole, key=key), sorted(tiled, key=key), strict=True):
        assert a["category"] == b["category"]
        assert a["area_m2"] == b["area_m2"]
        assert a["geometry"].equals_exact(b["geometry"], 1e-9)


def test_evidence_means_exact_across_seams() -> None:
    cat = np.zeros((20, 20), np.uint8)
    cat[2:18, 2:18] = 3
    conf = np.zeros((20, 20), np.float32)
    conf[:, :10] = 0.2
    conf[:, 10:] = 0.8
    ndvi = np.full((20, 20), np.nan, np.float32)
    ndvi[:10] = 0.5
    [rec] = polygons_from_array(cat, T, {"confidence": conf, "ndvi_after": ndvi}, block_size=6)
    assert rec["confidence"] == pytest.approx(0.5)
    assert rec["ndvi_after"] == pytest.approx(0.5)  # NaNs ignored
    assert np.isnan(rec["bright_before"])


def test_min_area_per_category_and_diagonal_not_joined() -> None:
    cat = np.zeros((10, 10), np.uint8)
    cat[0:2, 0:2] = 1  # 4 m²
    cat[2:4, 2:4] = 1  # touches the first only at a corner: separate under 4-connectivity
    cat[6:9, 6:9] = 2  # 9 m²
    recs = polygons_from_array(cat, T, block_size=2)
    assert len(recs) == 3
    kept = polygons_from_array(cat, T, min_area_m2={"illegal_construction": 5.0})
    assert [r["category"] for r in kept] == ["forest_grave"]


def test_holes_kept() -> None:
    cat = np.zeros((12, 12), np.uint8)
    cat[1:11, 1:11] = 3
    cat[4:7, 4:7] = 0
    [rec] = polygons_from_array(cat, T, block_size=5)
    assert len(rec["geometry"].interiors) == 1
    assert rec["geometry"].area == 91.0


def test_object_decided_differently_across_a_seam_is_joined_under_the_larger_part() -> None:
    from rasterio.windows import Window

    from pipeline.vectorize import block_polygons, join_blocks

    cat = np.zeros((8, 16), np.uint8)
    cat[2:6, 2:8] = 1  # left block: 24 px of one category
    cat[2:6, 8:15] = 3  # right block: 28 px of the same object, decided differently
    parts = [block_polygons(cat[:, :8], Window(0, 0, 8, 8), cat.shape),
             block_polygons(cat[:, 8:], Window(8, 0, 8, 8), cat.shape)]
    joined = join_blocks(parts)
    assert len(joined.geoms) == 1 and joined.codes == [3] and joined.pixels == [52]
    assert joined.reconciled == [0] and joined.seam_conflicts == 0
    assert joined.geoms[0].equals(shapely.box(2, 2, 15, 6))
    # farmland parcel pieces are cut apart on purpose: counted, not joined
    parcel = np.zeros(cat.shape, bool)
    parcel[:, 8:] = True
    parts = [block_polygons(cat[:, :8], Window(0, 0, 8, 8), cat.shape, parcel=parcel[:, :8]),
             block_polygons(cat[:, 8:], Window(8, 0, 8, 8), cat.shape, parcel=parcel[:, 8:])]
    joined = join_blocks(parts)
    assert joined.seam_conflicts == 1 and len(joined.geoms) == 2 and not joined.reconciled
    same = cat.copy()
    same[same == 3] = 1
    parts = [block_polygons(same[:, :8], Window(0, 0, 8, 8), cat.shape),
             block_polygons(same[:, 8:], Window(8, 0, 8, 8), cat.shape)]
    joined = join_blocks(parts)
    assert joined.seam_conflicts == 0 and len(joined.geoms) == 1 and not joined.reconciled


def test_recode_raster_gives_the_joined_category_to_changed_pixels_only(tmp_path) -> None:
    import rasterio

    from pipeline.batch import recode_raster

    cat = np.zeros((8, 16), np.uint8)
    cat[2:6, 2:8] = 1
    cat[2:6, 8:15] = 3
    cat[3, 5] = 255  # not observed stays so
    path = tmp_path / "change.tif"
    with rasterio.open(path, "w", driver="GTiff", width=16, height=8, count=1,
                       dtype="uint8", tiled=True, blockxsize=16, blockysize=16,
                       crs="EPSG:4547", transform=T) as dst:
        dst.write(cat, 1)
    recode_raster(path, [(shapely.box(2, 2, 15, 6), 3)])
    with rasterio.open(path) as src:
        got = src.read(1)
    want = cat.copy()
    want[2:6, 2:8] = 3
    want[3, 5] = 255
    np.testing.assert_array_equal(got, want)
