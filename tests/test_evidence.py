"""pipeline/evidence.py: display stretch, outlines, panels and PNG encoding of evidence images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import shapely
from PIL import Image

from pipeline.evidence import _panel, draw_outline, encode_png, stretch_rgb


def test_stretch_rgb() -> None:
    rng = np.random.default_rng(1)
    arr = rng.normal(1000, 100, (3, 20, 30))
    valid = np.ones((20, 30), bool)
    valid[0, 0] = False
    arr[:, 0, 0] = 1e9  # an invalid outlier must not affect the stretch
    out = stretch_rgb(arr, valid)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0]
    assert 5 < out.mean() < 250 and out.max() == 255 and out[valid].min() == 0
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        stretch_rgb(arr[:2])


def test_draw_outline_marks_boundary() -> None:
    img = Image.new("RGB", (100, 100), (0, 128, 0))
    geom = shapely.box(25, 25, 75, 75)
    draw_outline(img, geom, (0, 0, 100, 100), width=1)
    a = np.asarray(img)
    assert a[25, 50].tolist() == [255, 255, 0] and a[50, 75].tolist() == [255, 255, 0]
    assert a[50, 50].tolist() == [0, 128, 0] and a[5, 5].tolist() == [0, 128, 0]


def test_evidence_panels_enlarge_by_pixels_and_reduce_without_aliasing() -> None:
    """Chips smaller than the panel are enlarged pixel by pixel (every panel colour is a chip
    colour); larger chips are reduced with a filter (a 1 px checkerboard turns grey, where
    dropping pixels would leave it black or white)."""
    rng = np.random.default_rng(3)
    chip = rng.integers(0, 256, (37, 41, 3), dtype=np.uint8)
    panel = np.asarray(_panel(chip, (256, 230)))
    assert panel.shape == (230, 256, 3)
    chip_colours = {tuple(c) for c in chip.reshape(-1, 3)}
    assert {tuple(c) for c in panel.reshape(-1, 3)} <= chip_colours
    assert panel[0, 0].tolist() == chip[0, 0].tolist()
    assert panel[-1, -1].tolist() == chip[-1, -1].tolist()
    board = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)
    small = np.asarray(_panel(np.repeat(board[..., None], 3, axis=2), (256, 256)))
    assert abs(float(small.mean()) - 127.5) < 2 and (small == 0).mean() < 0.01


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (300, 516, 3)])
def test_encode_png_is_lossless(shape: tuple[int, int, int]) -> None:
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    rgb[..., 0] = 255  # rows that wrap around modulo 256 under the Up filter
    back = Image.open(io.BytesIO(encode_png(rgb)))
    assert back.mode == "RGB" and back.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(back), rgb)
    with pytest.raises(ValueError, match="RGB"):
        encode_png(rgb[..., 0])
