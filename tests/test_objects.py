"""Object stage of the learned detector: per-object features, model file, accept / reject."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.detect import features as F
from pipeline.detect import objects as O

needs_lgb = pytest.mark.skipif(importlib.util.find_spec("lightgbm") is None,
                               reason="lightgbm not installed")
ROLES = ("red", "green", "blue")


def _col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, O.feature_names().index(name)]


def _stack(shape: tuple[int, int], res_m: float) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    img = (0.2 + 0.05 * rng.random((3, *shape))).astype(np.float32)
    return F.compute(img, img, np.ones(shape, bool), ROLES, res_m)


def test_planted_square_and_bar_shape() -> None:
    res = 2.0
    mask = np.zeros((60, 80), bool)
    mask[10:20, 10:20] = True  # 10 x 10 px square: 400 m²
    mask[40:42, 10:70] = True  # 2 x 60 px bar: 480 m², elongated
    lab, n = O.label_objects(mask)
    assert n == 2
    raw = np.where(mask, 0.9, 0.1).astype(np.float32)
    names, stack = _stack(mask.shape, res)
    x = O.object_features(lab, n, raw, 0.5, names, stack, np.ones(mask.shape, bool), res)
    assert x.shape == (2, len(O.feature_names())) and np.isfinite(x).all()
    sq, bar = (lab[15, 15] - 1), (lab[41, 40] - 1)
    assert 10 ** _col(x, "log_area_m2")[sq] == pytest.approx(400.0, rel=1e-4)
    assert 10 ** _col(x, "log_area_m2")[bar] == pytest.approx(480.0, rel=1e-4)
    assert _col(x, "compact")[sq] == pytest.approx(math.pi / 4, rel=1e-3)  # 4πA/P², P = 40
    assert _col(x, "compact")[bar] < 0.3
    assert _col(x, "elong")[sq] == pytest.approx(1.0, abs=1e-3)
    assert _col(x, "elong")[bar] > 20
    assert _col(x, "box_fill")[sq] == pytest.approx(1.0, rel=1e-3)
    assert 10 ** _col(x, "log_length_m")[bar] == pytest.approx(120.0, rel=1e-3)  # 60 px × 2 m
    # score margins: logit(0.9) - logit(0.5) inside, logit(0.1) in the ring
    assert _col(x, "m_mean")[sq] == pytest.approx(math.log(9), rel=1e-4)
    assert _col(x, "m_max")[sq] == pytest.approx(math.log(9), rel=1e-4)
    assert _col(x, "m_core")[sq] == pytest.approx(1.0)
    assert _col(x, "m_ring")[sq] == pytest.approx(-math.log(9), rel=1e-4)
    assert _col(x, "scene_frac")[sq] == pytest.approx(220 / (60 * 80))


def test_area_in_metres_not_pixels() -> None:
    """The same ground object at 0.5 m and 2 m gets (nearly) the same size features."""
    out = {}
    for res, px in ((0.5, 40), (2.0, 10)):
        mask = np.zeros((120, 120), bool)
        mask[30:30 + px, 30:30 + px] = True
        lab, n = O.label_objects(mask)
        names, stack = _stack(mask.shape, res)
        raw = np.where(mask, 0.8, 0.2).astype(np.float32)
        out[res] = O.object_features(lab, n, raw, 0.5, names, stack,
                                     np.ones(mask.shape, bool), res)[0]
    for name in ("log_area_m2", "log_length_m", "elong"):
        i = O.feature_names().index(name)
        assert out[0.5][i] == pytest.approx(out[2.0][i], abs=0.01)


def test_ring_width_in_metres_and_nearest_object() -> None:
    lab = np.zeros((80, 80), np.int32)
    lab[20:30, 20:30] = 1
    lab[20:30, 60:70] = 2
    valid = np.ones(lab.shape, bool)
    valid[:, 75:] = False
    ring = O.ring_labels(lab, valid, 1.0)  # RING_M = 6 m = 6 px at 1 m
    assert ring[25, 35] == 1 and ring[25, 36] == 0  # 6 px right of object 1, then outside
    assert ring[25, 55] == 2 and ring[25, 53] == 0
    assert (ring[lab > 0] == 0).all() and (ring[:, 75:] == 0).all()
    ring30 = O.ring_labels(lab, valid, 30.0)  # at least one pixel at 30 m
    assert ring30[25, 30] == 1 and ring30[25, 31] == 0


def test_object_truth_positive_cover() -> None:
    lab = np.zeros((10, 10), np.int32)
    lab[0:2, 0:5] = 1
    lab[5:7, 0:5] = 2
    label = np.zeros((10, 10), np.uint8)
    label[0:2, 0:3] = 1  # object 1: 6 of 10 change
    label[5:7, 0:4] = 255  # object 2: 8 ignored, 2 no-change
    ch, no, pos = O.object_truth(lab, 2, label)
    assert list(ch) == [6, 0] and list(no) == [4, 2] and list(pos) == [True, False]


def _write_object_model(d: Path, threshold: float = 0.5,
                        by_res: dict[str, float] | None = None) -> None:
    """A tiny object model that learned: high mean score margin = change."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    k = len(O.feature_names())
    x = rng.normal(size=(400, k)).astype(np.float32)
    y = (x[:, O.feature_names().index("m_mean")] > 0).astype(float)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1, "seed": 0,
                         "min_data_in_leaf": 5}, lgb.Dataset(x, y), 30)
    txt, js = O.object_model_paths("rgb", d)
    booster.save_model(str(txt))
    js.write_text(json.dumps({"features": O.feature_names(), "candidate_shift": 0.0,
                              "threshold": threshold,
                              **({"threshold_by_max_res_m": by_res} if by_res else {})}))


@needs_lgb
def test_object_model_rejects_known_false_object(tmp_path) -> None:
    _write_object_model(tmp_path)
    model = O.load_object_model("rgb", tmp_path)
    assert model is not None and model.candidate_threshold(0.6) == pytest.approx(0.6)
    assert O.load_object_model("rgb", tmp_path / "absent") is None
    res = 1.0
    cand = np.zeros((60, 60), bool)
    cand[5:15, 5:15] = True  # strong: raw 0.95
    cand[35:45, 35:45] = True  # weak: raw 0.3, below the pixel threshold 0.5
    raw = np.zeros(cand.shape, np.float32) + 0.05
    raw[5:15, 5:15] = 0.95
    raw[35:45, 35:45] = 0.3
    names, stack = _stack(cand.shape, res)
    kept = O.filter_objects(model, cand, raw, 0.5, names, stack, np.ones(cand.shape, bool), res)
    assert kept[5:15, 5:15].all()
    assert not kept[35:45, 35:45].any()
    assert not kept[~cand].any()


@needs_lgb
def test_object_threshold_by_resolution_class(tmp_path) -> None:
    """Each pixel size takes the threshold of the finest class that holds it; sizes beyond
    every class (and models without classes) take the overall threshold."""
    _write_object_model(tmp_path, threshold=0.3, by_res={"20.0": 0.6, "2.0": 0.1})
    model = O.load_object_model("rgb", tmp_path)
    assert model is not None
    assert [model.threshold_for(r) for r in (0.5, 2.0, 2.5, 10.0, 20.0, 30.0)] == [
        0.1, 0.1, 0.6, 0.6, 0.6, 0.3]
    # the class threshold decides: a strong object (mean probability ~1) passes 0.6 at 10 m
    # and fails an impossible class threshold at 1 m
    _write_object_model(tmp_path, threshold=0.3, by_res={"2.0": 1.01, "20.0": 0.6})
    O._load.cache_clear()
    model = O.load_object_model("rgb", tmp_path)
    cand = np.zeros((40, 40), bool)
    cand[10:30, 10:30] = True
    raw = np.where(cand, np.float32(0.95), np.float32(0.05))
    for res, kept in ((10.0, True), (1.0, False)):
        names, stack = _stack(cand.shape, res)
        got = O.filter_objects(model, cand, raw, 0.5, names, stack, np.ones(cand.shape, bool),
                               res)
        assert got[cand].all() == kept and not got[~cand].any()
    _write_object_model(tmp_path, threshold=0.4)
    O._load.cache_clear()
    assert O.load_object_model("rgb", tmp_path).threshold_for(1.0) == 0.4


@needs_lgb
def test_object_model_feature_mismatch(tmp_path) -> None:
    _write_object_model(tmp_path)
    js = O.object_model_paths("rgb", tmp_path)[1]
    meta = json.loads(js.read_text())
    meta["features"] = meta["features"][:-1]
    js.write_text(json.dumps(meta))
    d = tmp_path / "x"
    d.mkdir()
    for p in O.object_model_paths("rgb", tmp_path):
        shutil.copy(p, d / p.name)
    with pytest.raises(ValueError, match="retrain"):
        O.load_object_model("rgb", d)


@needs_lgb
def test_detector_applies_object_model_from_model_dir(tmp_path) -> None:
    """The object stage runs when its file sits next to the pixel model, and is skipped when it
    is absent or switched off."""
    from pipeline.detect import learned

    for p in learned.model_paths("rgb", learned.MODEL_DIR):
        shutil.copy(p, tmp_path / p.name)
    for p in O.object_model_paths("rgb", tmp_path):
        p.unlink(missing_ok=True)
    rng = np.random.default_rng(4)
    before = (0.1 + 0.2 * rng.random((3, 120, 120))).astype(np.float32)
    after = before.copy()
    after[:, 40:80, 40:80] = np.array([0.6, 0.55, 0.5], np.float32)[:, None, None]
    valid = np.ones((120, 120), bool)

    def found(**kw: bool) -> float:
        det = learned.LearnedDetector(ROLES, 0.5, model_dir=tmp_path, **kw)
        out = det(before, after, valid, ROLES, 0.5)
        return float(learned.decide(out["change"], valid, 0.5)[40:80, 40:80].mean())

    assert found() > 0.6  # no object model: pixel decision
    _write_object_model(tmp_path, threshold=1.01)  # rejects every object
    O._load.cache_clear()
    assert found() == 0.0
    assert found(objects=False) > 0.6


@needs_lgb
def test_shipped_object_model_loads() -> None:
    from pipeline.detect import learned

    model = O.load_object_model("rgb", learned.MODEL_DIR)
    assert model is not None and model.features == tuple(O.feature_names())
    txt, js = O.object_model_paths("rgb", learned.MODEL_DIR)
    assert txt.stat().st_size < 1_000_000
    meta = json.loads(js.read_text())
    assert 0.0 < model.threshold < 1.0 and model.candidate_shift == 0.0
    assert {"landsat", "levir", "oscd", "oscd-rgb", "macro"} <= set(meta["held_out"])
    assert set(meta["held_out_cases"]) == set(meta["held_out"])
    assert "research" in meta["licence"]
