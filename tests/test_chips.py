"""Evidence: chips read, drawn and encoded on the workers, handed over in the order asked for."""

from __future__ import annotations

import io

import numpy as np
import shapely
from PIL import Image

from pipeline import align, evidence, ingest
from pipeline.chips import PARALLEL_MIN, ChipJob, ChipSource, read_pair


def _pair(make_raster, texture) -> tuple[ingest.ImageSource, ingest.ImageSource]:
    rgbn = np.stack([texture((300, 300), seed=s) for s in range(4)]) * 3000 + 100
    after = rgbn.copy()
    after[:, 100:140, 100:140] = 2500  # a new bright roof
    b = make_raster("before.tif", rgbn.astype("uint16"), nodata=0)
    a = make_raster("after.tif", after.astype("uint16"), nodata=0)
    bands = {"blue": 1, "green": 2, "red": 3, "nir": 4}
    return (ingest.open_image(b, name="before", bands=bands),
            ingest.open_image(a, name="after", bands=bands))


def test_parallel_chips_equal_sequential_reads_in_order(make_raster, texture) -> None:
    before, after = _pair(make_raster, texture)
    grid = ingest.working_grid([before, after], crs=before.crs, resolution=1.0, bounds=None)
    params = align.fit_alignment(before, after, grid, coregister=False, normalize=False)
    x0, y0 = grid.bounds[0], grid.bounds[3]
    # different sizes, so that any reordering shows as a shape mismatch
    bounds = [(x0 + 5 * i, y0 - 60 - 3 * i, x0 + 40 + 6 * i, y0 - 5 * i)
              for i in range(PARALLEL_MIN + 5)]
    items = [({"patch_id": f"P{i}", "category": "illegal_construction",
               "geometry": shapely.box(b[0] + 2, b[1] + 2, b[2] - 2, b[3] - 2)}, b)
             for i, b in enumerate(bounds)]
    got = list(ChipSource(before, after, grid, params, workers=2).evidence(items, 64))
    assert len(got) == len(items)
    job = ChipJob(before, after, grid, params)
    want = evidence.render_all(items, 64, lambda b: read_pair(job, b)[0],
                               lambda b: read_pair(job, b)[1])
    for png, ref in zip(got, want, strict=True):
        assert png == ref  # byte for byte: same chips, same drawing, same order
    # panels of 64 px keep each chip's aspect ratio: the heights differ, so order shows
    heights = [Image.open(io.BytesIO(p)).height for p in got]
    assert len(set(heights)) > 5
    # the roof (40 px in a 120 px chip) stands out after, not before
    b_chip, a_chip = read_pair(job, (x0 + 60, y0 - 180, x0 + 180, y0 - 60))
    assert a_chip.shape == (120, 120, 3)
    roof = (slice(45, 75), slice(45, 75))
    assert a_chip[roof].mean() > a_chip.mean() + 60
    assert abs(b_chip[roof].mean() - b_chip.mean()) < 40
