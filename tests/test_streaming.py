"""Streaming paths: small blocks on the sample scene give exactly the big-block outputs."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine

from pipeline import align, batch, ingest
from pipeline.config import load_config
from pipeline.detect import features as F
from pipeline.grid import Grid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli import sample_config  # noqa: E402


def run_sample(tmp: Path, block_size: int, workers: int, method: str = "spectral") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = sample_config(tmp, block_size=block_size)
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data.setdefault("detection", {})["method"] = method
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--run-id", "r",
                          "--workers", str(workers)], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "runs" / "r"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("stream")
    big = run_sample(tmp / "b512", 512, workers=1)  # inline
    small = run_sample(tmp / "b64", 64, workers=2)  # 256 blocks on the process pool
    return big, small


def test_small_blocks_give_identical_patches_and_raster(runs: tuple[Path, Path]) -> None:
    big, small = runs
    a, b = gpd.read_file(big / "patches.gpkg"), gpd.read_file(small / "patches.gpkg")
    assert len(a) > 0
    ka = sorted((c, g.normalize().wkb) for c, g in zip(a["category"], a.geometry, strict=True))
    kb = sorted((c, g.normalize().wkb) for c, g in zip(b["category"], b.geometry, strict=True))
    assert ka == kb
    with rasterio.open(big / "change.tif") as x, rasterio.open(small / "change.tif") as y:
        np.testing.assert_array_equal(x.read(1), y.read(1))


def _changed(run: Path) -> np.ndarray:
    with rasterio.open(run / "change.tif") as src:
        cat = src.read(1)
    return (cat != 0) & (cat != 255)


def test_learned_detector_hardly_depends_on_the_block(tmp_path: Path) -> None:
    """The learned detector (pixel model, object stage, building network) with the scene's
    stretch and feature medians from the alignment windows: 96 px blocks on two workers find
    what one block per 512 px finds, but for the network's context at block edges."""
    big = run_sample(tmp_path / "b512", 512, workers=1, method="learned")
    small = run_sample(tmp_path / "b96", 96, workers=2, method="learned")
    meds = [json.loads((r / "run.json").read_text())["alignment"]["feature_medians"]
            for r in (big, small)]
    assert meds[0] == meds[1] and sorted(meds[0]) == sorted(F.REL_BASES)
    a, b = _changed(big), _changed(small)
    assert a.sum() > 500
    assert (a & b).sum() / (a | b).sum() > 0.98


def test_block_results_are_small() -> None:
    """What a block sends back is its uint8 core plus its polygons: no float layers."""
    cfg = load_config(ROOT / "configs" / "sample.yaml")
    before, after = (ingest.open_period(p, cfg.base_dir) for p in cfg.periods)
    grid = ingest.working_grid([before, after], crs=cfg.crs, resolution=cfg.resolution)
    params = align.fit_alignment(before, after, grid)
    job = batch.BlockJob(before, after, grid, params, ingest.load_rules(cfg, grid),
                         cfg.detection.model_copy(update={"method": "spectral"}),
                         dict(cfg.categories))
    block = next(b for b in grid.blocks(256, halo=64) if b.index == 5)
    res = batch.process_block(job, block)
    core_px = int(block.core.width * block.core.height)
    assert res.category.dtype == np.uint8 and res.category.size == core_px
    # polygons are a few hundred bytes each; the block's pixels dominate
    assert len(pickle.dumps(res)) < 2 * core_px + 2_000 * max(1, len(res.polygons.geoms))


def test_scene_medians_take_the_alignment_reads_where_the_shift_is_zero(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The scene medians' windows are the alignment's: where the after date's shift is zero,
    its reads serve (no window read again) and the medians are the same; with a shift they
    are read again, shifted."""
    from dataclasses import replace

    cfg = load_config(ROOT / "configs" / "sample.yaml")
    before, after = (ingest.open_period(p, cfg.base_dir) for p in cfg.periods)
    grid = ingest.working_grid([before, after], crs=cfg.crs, resolution=cfg.resolution)
    monkeypatch.setattr(batch, "MEDIAN_WHOLE_PX", 0)  # the windows, not the whole scene
    reads: dict = {}
    params = align.fit_alignment(before, after, grid, coregister=False, reads=reads)
    assert params.shift_px == (0.0, 0.0) and params.gain != (1.0,) * len(params.gain)
    assert sorted(reads) == sorted(align.window_key(w) for w in batch.median_windows(grid))
    job = batch.BlockJob(before, after, grid, params, {},
                         cfg.detection.model_copy(update={"method": "learned"}),
                         dict(cfg.categories))
    calls: list[int] = []
    read = align.read_block
    monkeypatch.setattr(align, "read_block", lambda *a, **k: calls.append(1) or read(*a, **k))
    plain = batch.with_scene_medians(job)
    assert len(calls) == 2 * len(reads)
    calls.clear()
    assert batch.with_scene_medians(job, reads) == plain and calls == []
    shifted = replace(job, params=replace(params, shift_px=(0.5, 0.0)))
    assert batch.with_scene_medians(shifted, reads) == batch.with_scene_medians(shifted)
    assert len(calls) == 4 * len(reads)  # read again both times


def test_blocks_go_to_workers_in_runs_of_row_neighbours() -> None:
    from affine import Affine

    from pipeline.batch import _runs
    from pipeline.grid import Grid

    grid = Grid((300, 500), Affine(1.0, 0, 0, 0, -1.0, 300), "EPSG:4547")
    blocks = list(grid.blocks(100, halo=8))  # 3 rows of 5
    runs = _runs(blocks)
    assert [len(r) for r in runs] == [2, 2, 1] * 3
    assert [b.index for r in runs for b in r] == [b.index for b in blocks]
    assert all(len({b.core.row_off for b in r}) == 1 for r in runs)  # never across rows


def test_scene_median_windows_sample_each_pixel_once() -> None:
    """Overlapping windows sample the grid's lattice once each, away from their inner sides
    (margin) but up to the grid's own edges."""
    from rasterio.windows import Window

    shape, margin = (10, 12), 1
    wins = [Window(0, 0, 6, 6), Window(4, 2, 8, 8), Window(1, 1, 3, 3)]
    hits = np.zeros(shape, int)
    for k, w in enumerate(wins):
        keep = batch._sample_lattice(w, wins[:k], shape, margin, step=2)
        assert keep.shape == (w.height, w.width)
        hits[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width] += keep
    want = np.zeros(shape, int)
    want[0:5:2, 0:5:2] = 1  # window 0 without its last row and column (inside the grid)
    want[4:10:2, 6:12:2] = 1  # window 1 from row 3 and column 5, to the grid's edges
    # window 2 lies inside window 0: nothing of its own
    np.testing.assert_array_equal(hits, want)
    assert len(batch.median_windows(Grid((1024, 1024), Affine.identity(), "EPSG:32650"))) == 1
    assert len(batch.median_windows(Grid((1025, 1024), Affine.identity(), "EPSG:32650"))) == 9


def _write_rgb(path: Path, img: np.ndarray, res: float) -> None:
    prof = {"driver": "GTiff", "width": img.shape[2], "height": img.shape[1], "count": 3,
            "dtype": img.dtype.name, "crs": "EPSG:32650", "tiled": True,
            "transform": Affine(res, 0, 500_000.0, 0, -res, 2_500_000.0)}
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(img)


def _compare(tmp: Path, tag: str, block: int, workers: int) -> np.ndarray:
    cfg = tmp / f"{tag}-{block}.yaml"
    cfg.write_text(f"block_size: {block}\n", encoding="utf-8")
    out = tmp / f"{tag}-{block}"
    res = subprocess.run([sys.executable, "-m", "pipeline", "compare", str(tmp / f"{tag}-0.tif"),
                          str(tmp / f"{tag}-1.tif"), "-o", str(out), "--config", str(cfg),
                          "--bands", "red=1,green=2,blue=3", "--workers", str(workers)],
                         capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return _changed(out)


def test_fine_imagery_is_detected_as_at_the_trained_size(tmp_path: Path) -> None:
    """RGB at 0.25 m is detected on 2×2 cells (0.5 m, the finest the models learned from):
    the sample's new sheds at 1 m, each pixel made 4×4, are found as at 1 m; and blocks of 301
    px start on the detector's lattice (a multiple of 128 px: the cells, and the building
    network's poolings), so that every block finds what one block finds."""
    from scipy import ndimage as ndi

    win = rasterio.windows.Window(200, 0, 256, 256)  # three new sheds of the sample, on grass
    for k, period in enumerate(("2024-03", "2024-06")):
        with rasterio.open(ROOT / "sample_tiles" / period / "scene.tif") as src:
            rgb = src.read((3, 2, 1), window=win)
        _write_rgb(tmp_path / f"m1-{k}.tif", rgb, 1.0)
        _write_rgb(tmp_path / f"q-{k}.tif", np.repeat(np.repeat(rgb, 4, 1), 4, 2), 0.25)
    at_1m = _compare(tmp_path, "m1", 1024, 1)
    one, many = _compare(tmp_path, "q", 1024, 1), _compare(tmp_path, "q", 301, 2)
    lab, n = ndi.label(np.repeat(np.repeat(at_1m, 4, 0), 4, 1))
    assert n == 3
    # the same three sheds, and nothing more than 5 m from them
    assert set(np.unique(lab[one])) >= {1, 2, 3}
    assert not (one & ~ndi.binary_dilation(lab > 0, iterations=20)).any()
    assert (one & many).sum() / (one | many).sum() > 0.98
    run = json.loads((tmp_path / "q-301" / "run.json").read_text())
    assert run["detector"]["name"] == "learned" and run["detector"]["work_factor"] == 2
    assert "work_factor" not in json.loads((tmp_path / "m1-1024" / "run.json").read_text()
                                           )["detector"]
