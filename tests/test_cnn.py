"""The RGB building-change network (0.25-4.5 m): resampling, loading, and what it finds."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.detect import cnn
from pipeline.detect.learned import MODEL_DIR, LearnedDetector, decide

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT.parent / "shared" / "data" / "cases"
RGB = ("red", "green", "blue")


def test_downsample_is_the_block_mean() -> None:
    x = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    d = cnn.downsample(x, 2)
    assert d.shape == (2, 3, 4)
    assert d[1, 0, 0] == pytest.approx(x[1, :2, :2].mean())
    assert d[0, 1, 2] == pytest.approx(x[0, 2:4, 4:6].mean())
    # the odd last row/column is padded by reflection
    assert d[0, 2, 3] == pytest.approx(np.mean([x[0, 4, 6], x[0, 4, 5], x[0, 3, 6],
                                                x[0, 3, 5]]))
    assert cnn.downsample(x, 1) is x


def test_factor_brings_pixels_near_the_working_size() -> None:
    assert [cnn.factor(r, 1.0) for r in (0.3, 0.5, 0.8, 1.0, 2.0)] == [3, 2, 1, 1, 1]
    assert cnn.factor(10.0, 10.0) == 1


def test_input_of_a_block_matches_the_whole_scene_with_its_stretch() -> None:
    from pipeline.detect import features as F

    before, after = _ground((200, 240), 5), _ground((200, 240), 6) * 1.4
    valid = np.ones((200, 240), bool)
    whole = cnn.model_input(before, after, valid)
    stretch = (F.stretch_params(before, valid), F.stretch_params(after, valid))
    part = (slice(20, 90), slice(150, 240))
    mine = cnn.model_input(before[:, part[0], part[1]], after[:, part[0], part[1]],
                           valid[part], stretch)
    assert np.array_equal(mine, whole[:, part[0], part[1]])
    own = cnn.model_input(before[:, part[0], part[1]], after[:, part[0], part[1]], valid[part])
    assert not np.allclose(own, whole[:, part[0], part[1]], atol=1e-3)


def test_folder_without_network(tmp_path) -> None:
    assert cnn.net_for(tmp_path, 0.5) is None


def test_shipped_networks_load() -> None:
    for name in ("rgb_1m",):
        onnx, js = cnn.paths(MODEL_DIR, name)
        assert onnx.stat().st_size < 5_000_000  # 0.95 M float32 weights
        assert "research" in json.loads(js.read_text())["licence"]
    net = cnn.net_for(MODEL_DIR, 0.5)
    assert net is not None and net.work_res_m == 1.0
    assert cnn.net_for(MODEL_DIR, 30.0) is None


def _ground(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Dry, textured ground (fine to coarse detail), reflectance-like RGB."""
    rng = np.random.default_rng(seed)
    g = np.full(shape, 0.25)
    for sigma, amp in ((1, 0.03), (4, 0.04), (12, 0.05)):
        t = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
        g += amp * t / t.std()
    img = np.stack([0.9 * g, g, 0.75 * g]) + 0.015 * rng.standard_normal((3, *shape))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


BOXES = [(30, 30, 54, 60), (30, 150, 56, 176), (150, 60, 176, 96), (160, 170, 186, 200)]


def _houses(img: np.ndarray, boxes: list[tuple[int, int, int, int]], seed: int) -> np.ndarray:
    """Light roofs (12-18 m at 0.5 m) with shadows cast to the south-east."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    for r0, c0, r1, c1 in boxes:
        out[:, r0 + 3:r1 + 5, c0 + 3:c1 + 5] *= 0.5
        out[:, r0:r1, c0:c1] = (np.array([0.6, 0.55, 0.5])[:, None, None]
                                + 0.03 * rng.standard_normal((3, r1 - r0, c1 - c0)))
    return np.clip(out + 0.01 * rng.standard_normal(out.shape), 0.0, 1.0).astype(np.float32)


def test_network_sees_new_houses_not_illumination() -> None:
    net = cnn.net_for(MODEL_DIR, 0.5)
    before = _ground((256, 256), 0)
    after = _houses(before, BOXES, 1)
    valid = np.ones((256, 256), bool)
    valid[:, :8] = False
    z = cnn.predict(net, before, after, valid, 0.5)
    assert z.shape == valid.shape and z.dtype == np.float32
    assert (z[:, :8] == -20.0).all()
    found = [(z[r0:r1, c0:c1] > 0).mean() > 0.5 for r0, c0, r1, c1 in BOXES]
    assert sum(found) >= 3, found
    houses = np.zeros_like(valid)
    for r0, c0, r1, c1 in BOXES:
        houses[r0:r1 + 6, c0:c1 + 6] = True
    assert (z[~ndi.binary_dilation(houses, iterations=6) & valid] > 0).mean() < 0.01
    # the same ground under other light, or simply twice, is not change
    for other in ((1.3 * before + 0.04).astype(np.float32), before):
        assert (net.vote(before, other, valid, 0.5) > 0).mean() < 0.01


def test_detector_adds_the_network_at_sub_metre_only(tmp_path) -> None:
    before = _ground((256, 256), 2)
    after = _houses(before, BOXES, 3)
    valid = np.ones((256, 256), bool)
    out = LearnedDetector(RGB, 0.5)(before, after, valid, RGB, 0.5)
    without = LearnedDetector(RGB, 0.5, network=False)(before, after, valid, RGB, 0.5)["change"]
    assert not np.array_equal(out["change"], without)
    # the decision without the network rides along for classify's open-ground layers
    assert np.array_equal(out["change_any"], without)
    # a model folder without the network decides as network=False does
    for f in MODEL_DIR.glob("learned_rgb*"):
        shutil.copy(f, tmp_path / f.name)
    bare = LearnedDetector(RGB, 0.5, model_dir=tmp_path)(before, after, valid, RGB, 0.5)
    assert np.array_equal(bare["change"], without)
    # outside every network's pixel-size range (Landsat's 30 m) none is used
    at30 = LearnedDetector(RGB, 30.0)(before, after, valid, RGB, 30.0)["change"]
    at30_off = LearnedDetector(RGB, 30.0, network=False)(before, after, valid, RGB, 30.0)
    assert np.array_equal(at30, at30_off["change"])


def test_upsample_factor_enlarges_coarser_imagery_only() -> None:
    assert [cnn.upsample_factor(r, 1.0) for r in (0.5, 1.0, 1.2, 1.6, 2.0, 2.5, 3.3, 4.4)] == [
        1, 1, 1, 2, 2, 2, 3, 4]
    assert cnn.upsample_factor(2.2, 2.0) == 1  # its 2 m scale runs as acquired


@pytest.mark.parametrize(("k", "least"), [(4, 12), (6, 10)])
def test_network_finds_houses_at_2_and_3m_enlarged_to_its_pixels(monkeypatch, k: int,
                                                                  least: int) -> None:
    """Houses of 12-18 m averaged to 2 m (GF-1, ZY-3: 6-9 px) or 3 m (PlanetScope: 4-6 px):
    run as acquired the network sees objects a half or a third of the size it learned and finds
    none; enlarged to 1 m it finds most of the 16."""
    net = cnn.net_for(MODEL_DIR, 2.0)
    assert net is not None and cnn.net_for(MODEL_DIR, 0.5 * k) is net
    assert cnn.net_for(MODEL_DIR, 4.5) is net and cnn.net_for(MODEL_DIR, 5.0) is None
    boxes = [(r0 + dr, c0 + dc, r1 + dr, c1 + dc) for dr in (0, 256) for dc in (0, 256)
             for r0, c0, r1, c1 in BOXES]
    before = _ground((512, 512), 0)
    after = _houses(before, boxes, 1)
    b2, a2 = cnn.downsample(before, k), cnn.downsample(after, k)
    valid = np.ones(b2.shape[1:], bool)
    houses = np.zeros_like(valid)
    for r0, c0, r1, c1 in boxes:
        houses[r0 // k:r1 // k + 2, c0 // k:c1 // k + 2] = True
    away = ~ndi.binary_dilation(houses, iterations=3)

    def found(z: np.ndarray) -> int:
        return sum((z[r0 // k:r1 // k, c0 // k:c1 // k] > 0).mean() > 0.5
                   for r0, c0, r1, c1 in boxes)

    z = net.vote(b2, a2, valid, 0.5 * k)
    assert z.shape == valid.shape
    assert found(z) >= least and (z[away] > 0).mean() < 0.01
    monkeypatch.setattr(cnn, "upsample_factor", lambda res_m, work_res_m: 1)
    assert found(net.vote(b2, a2, valid, 0.5 * k)) <= 2


def test_tiled_network_matches_one_call() -> None:
    """Enlarged inputs run in tiles with context margins (bounded memory); their logits match
    one call's but for small differences near the seams, and an input of one tile is one call."""
    net = cnn.net_for(MODEL_DIR, 1.0)
    boxes = [(r0 + dr, c0 + dc, r1 + dr, c1 + dc) for dr in (0, 256, 500) for dc in (0, 256, 500)
             for r0, c0, r1, c1 in BOXES]
    before = _ground((720, 720), 0)
    x = cnn.model_input(before, _houses(before, boxes, 1), np.ones((720, 720), bool))
    whole, tiled = cnn.run(net, x), cnn.run_tiled(net, x, tile=256)
    assert tiled.shape == whole.shape and not np.array_equal(tiled, whole)
    assert ((tiled > 0) == (whole > 0)).mean() > 0.999
    assert np.percentile(np.abs(tiled - whole), 99) < 0.25
    assert np.array_equal(cnn.run_tiled(net, x[:, :300, :320], tile=256), cnn.run(
        net, x[:, :300, :320]))


@pytest.mark.parametrize("up", [2, 3, 4])
def test_enlarged_windows_are_cut_from_the_whole_enlargement(up: int) -> None:
    """Each tile's input is enlarged from a crop of the block, never the whole block at once
    (4.4 m imagery: 16x its pixels), and equals that part of the whole enlargement."""
    x = np.random.default_rng(up).random((6, 37, 45)).astype(np.float32)
    whole = ndi.zoom(x, (1, up, up), order=1, mode="nearest", grid_mode=True)
    H, W = whole.shape[1:]
    for rows, cols in (((0, H), (0, W)), ((8, 40), (16, 72)), ((H - 24, H), (0, 33)),
                       ((5, 6), (W - 7, W))):
        got = cnn.enlarge_window(x, up, rows, cols)
        np.testing.assert_allclose(got, whole[:, rows[0]:rows[1], cols[0]:cols[1]], atol=1e-6)


@pytest.mark.parametrize("up", [2, 3])
def test_network_on_an_enlarged_input_tile_by_tile_matches_one_call(up: int) -> None:
    """Logits averaged back from tiles of the enlarged input keep the sign of one call on the
    whole enlargement, on whole multiples of ``up`` per tile."""
    net = cnn.net_for(MODEL_DIR, 1.0)
    boxes = [(r0 + dr, c0 + dc, r1 + dr, c1 + dc) for dr in (0, 256) for dc in (0, 256)
             for r0, c0, r1, c1 in BOXES]
    before = _ground((512, 512), 0)
    x = cnn.downsample(cnn.model_input(before, _houses(before, boxes, 1),
                                       np.ones((512, 512), bool)), up)
    big = ndi.zoom(x, (1, up, up), order=1, mode="nearest", grid_mode=True)
    whole = cnn.downsample(cnn.run(net, big), up)
    tiled = cnn.run_tiled(net, x, up, tile=96, margin=16)
    assert tiled.shape == whole.shape == x.shape[1:]
    assert ((tiled > 0) == (whole > 0)).mean() > 0.995


def test_config_switches_the_network_off() -> None:
    from pipeline.config import DetectionConfig
    from pipeline.detect.registry import get_detector

    assert DetectionConfig().building_network
    on = get_detector("auto", RGB, 0.5)
    off = get_detector("auto", RGB, 0.5, network=False)
    assert on.det.network and not off.det.network
    assert on.halo >= off.halo


@pytest.mark.skipif(not CASES.exists(), reason="../shared absent")
def test_real_levir_network_raises_precision_held_out() -> None:
    """Held out: every LEVIR case of the case split, each with the fold models that never saw
    it, pooled. One fold's network can be weak (fold networks do not retrain to the same
    weights on another machine; bench/RESULTS.md), so no single case is asserted."""
    sys.path.insert(0, str(ROOT / "bench"))
    from accuracy import FOLD_CACHE, _add, counts, load_case, scores

    folds = sorted((FOLD_CACHE / "cases").glob("*"))
    if not folds or any(cnn.net_for(f, 0.5) is None or not (f / "learned_rgb.txt").exists()
                        for f in folds):
        pytest.skip("fold models not trained (bench/accuracy.py trains them)")
    pooled: dict[bool, dict[str, float]] = {True: {}, False: {}}
    for fold in folds:
        for name in json.loads(cnn.paths(fold, "rgb_1m")[1].read_text())["test_cases"]:
            case = load_case(CASES / name)
            for net in (True, False):
                det = LearnedDetector(case.roles, case.res_m, model_dir=fold, network=net)
                out = det(case.before, case.after, case.valid, case.roles, case.res_m)
                _add(pooled[net], counts(decide(out["change"], case.valid, case.res_m),
                                         case.label))
    with_net, without = scores(pooled[True]), scores(pooled[False])
    # this cache: precision 0.287 -> 0.652, F1 0.409 -> 0.642
    assert with_net["precision"] > without["precision"] + 0.2
    assert with_net["f1"] > without["f1"] + 0.1


def test_run_record_names_the_models_used() -> None:
    from pipeline.detect.registry import describe, get_detector

    d = describe(get_detector("auto", RGB, 0.5), RGB, 0.5)
    assert d["name"] == "learned"
    assert set(d["models"]) == {"learned_rgb.txt", "learned_rgb_objects.txt", "cnn_rgb_1m.onnx"}
    assert all(len(h) == 16 for h in d["models"].values())
    off = describe(get_detector("auto", RGB, 0.5, network=False), RGB, 0.5)
    assert "cnn_rgb_1m.onnx" not in off["models"]
    assert "cnn_rgb_1m.onnx" not in describe(get_detector("auto", RGB, 30.0), RGB, 30.0)["models"]
    rgbn = ("blue", "green", "red", "nir")
    assert describe(get_detector("spectral", rgbn, 1.0), rgbn, 1.0) == {"name": "spectral",
                                                                        "models": {},
                                                                        "threshold": 3.0}
    d = describe(get_detector("auto", rgbn, 1.0), rgbn, 1.0)  # the RGB model, NIR on open ground
    assert d["name"] == "learned" and "cnn_rgb_1m.onnx" in d["models"]
    assert d["open_ground"] == {"name": "spectral", "threshold": 3.0}


def test_network_hands_its_working_memory_back_after_each_block() -> None:
    """onnxruntime's arena kept the network's peak working memory (about 300 MB for a 1024²
    block at 1 m) after every call, beneath everything a block computes after it and the
    next block's features (a worker on 1152² blocks peaked at 1.3-1.4 GiB, now 0.8-0.9)."""
    code = """
import os, numpy as np, psutil
os.environ["OMP_NUM_THREADS"] = "1"
from pipeline.detect import cnn
from pipeline.detect.learned import MODEL_DIR
net = cnn.net_for(MODEL_DIR, 1.0, threads=1)
rng = np.random.default_rng(0)
b = rng.random((3, 1024, 1024), dtype=np.float32) * 0.3
a = (b + rng.normal(0, 0.02, b.shape)).astype(np.float32)
v = np.ones((1024, 1024), bool)
net.vote(b[:, :64, :64], a[:, :64, :64], v[:64, :64], 1.0)  # the session made, warm
rss = psutil.Process().memory_info().rss
for _ in range(2):  # a block, then the next
    net.vote(b, a, v, 1.0)
print((psutil.Process().memory_info().rss - rss) / 2**20)
"""
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert float(res.stdout.split()[-1]) < 200, res.stdout  # 340 MiB kept, 116 handed back
