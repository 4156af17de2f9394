"""bench/train_detector.py, the training command of the shipped pixel and object models, on
small synthetic cases: its held-out folds never test on what they trained on, and the models it
writes load in the learned detector and find planted change on a pair it never saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from scipy import ndimage as ndi

pytest.importorskip("lightgbm")
pytest.importorskip("sklearn")  # the trainer's Platt fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_detector as T  # noqa: E402

from pipeline.detect import features as F  # noqa: E402
from pipeline.detect.learned import LearnedDetector, decide  # noqa: E402

RGB = ("red", "green", "blue")
#: two "sensors": sub-metre and 10 m, so both protocols have folds and the thresholds two classes
DATASETS = {"aerial": 0.5, "sat": 10.0}
SIZE = 160


def synthetic_pair(seed: int, res_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured ground (vegetation and soil) and, on the after date only, bright new roofs of
    8-20 m (at least 3 px) a side: (before, after) reflectance (3, h, w) and the label."""
    rng = np.random.default_rng(seed)
    land = ndi.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 8) > 0
    tex = ndi.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 1.5).astype(np.float32)
    veg, soil = np.array([0.05, 0.09, 0.05]), np.array([0.20, 0.17, 0.13])
    before = np.where(land, veg[:, None, None], soil[:, None, None]).astype(np.float32)
    before *= 1 + 0.4 * tex
    after = before * np.float32(1.05)  # a global gain: not change
    label = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(10):
        side = max(3, int(rng.integers(8, 21) / res_m))
        side = min(side, 24)
        r, c = (int(v) for v in rng.integers(4, SIZE - side - 4, 2))
        after[:, r:r + side, c:c + side] = np.array([0.42, 0.40, 0.38])[:, None, None]
        label[r:r + side, c:c + side] = 1
    noise = [rng.normal(0, 0.004, before.shape).astype(np.float32) for _ in range(2)]
    return np.clip(before + noise[0], 0, 1), np.clip(after + noise[1], 0, 1), label


def _write(path: Path, arr: np.ndarray, res_m: float, descriptions: tuple[str, ...] = ()) -> None:
    arr = arr if arr.ndim == 3 else arr[None]
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=len(arr),
                       dtype=arr.dtype, crs="EPSG:32650",
                       transform=Affine(res_m, 0, 500_000, 0, -res_m, 2_545_000)) as dst:
        dst.write(arr)
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)


def make_cases(root: Path) -> list[str]:
    names = []
    for k, (ds, res) in enumerate(DATASETS.items()):
        for i in range(3):
            d = root / ds / f"case{i}"
            d.mkdir(parents=True)
            before, after, label = synthetic_pair(10 * k + i, res)
            for name, img in (("before", before), ("after", after)):
                _write(d / f"{name}.tif", np.rint(img * 255).astype(np.uint8), res, RGB)
            _write(d / "label.tif", label, res)
            (d / "meta.json").write_text(json.dumps({"dataset": ds, "gsd_m": res,
                                                     "bands": list(RGB)}))
            names.append(f"{ds}/case{i}")
    return names


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("train")
    names = make_cases(root / "cases")
    out, folds = root / "models", root / "folds"
    assert T.main(["--cases", str(root / "cases"), "--out", str(out), "--sets", "rgb",
                   "--folds", str(folds)]) == 0
    return out, folds, names


def test_writes_the_models_the_detector_reads(trained) -> None:
    out, _, names = trained
    for f in ("learned_rgb.txt", "learned_rgb.json", "learned_rgb_objects.txt",
              "learned_rgb_objects.json"):
        assert (out / f).stat().st_size > 0, f
    meta = json.loads((out / "learned_rgb.json").read_text())
    z = np.zeros((3, 8, 8), np.float32)
    assert meta["features"] == F.compute(z, z, np.ones((8, 8), bool), RGB, 1.0, kind="rgb")[0]
    assert sorted(meta["training_cases"]) == sorted(names)
    # a decision threshold per resolution class with training cases, each a probability
    ts = meta["calibration"]["threshold_raw_by_max_res_m"]
    assert set(ts) == {str(T.res_class(r)) for r in DATASETS.values()}
    assert all(0 < t < 1 for t in ts.values())


def test_folds_never_test_on_their_training_cases(trained) -> None:
    _, folds, names = trained
    seen: dict[str, set[str]] = {"lodo": set(), "cases": set()}
    for js in folds.glob("*/*/learned_rgb.json"):
        meta = json.loads(js.read_text())
        test, train = set(meta["test_cases"]), set(meta["training_cases"])
        assert test and not test & train, js
        assert test | train == set(names), js
        if meta["protocol"] == "lodo":  # one whole dataset held out
            assert {c.split("/")[0] for c in test} == {js.parent.name}
        seen[meta["protocol"]] |= test
    assert seen == {"lodo": set(names), "cases": set(names)}


@pytest.mark.parametrize("res_m", DATASETS.values())
def test_trained_model_finds_planted_roofs_on_an_unseen_pair(trained, res_m: float) -> None:
    out, _, _ = trained
    before, after, label = synthetic_pair(99, res_m)
    valid = np.ones(label.shape, bool)
    det = LearnedDetector(RGB, res_m, model_dir=out, network=False)
    found = decide(det(before, after, valid, RGB, res_m)["change"], valid, res_m)
    tp = (found & (label == 1)).sum()
    assert tp / (label == 1).sum() > 0.8  # the roofs are found
    assert tp / max(found.sum(), 1) > 0.8  # and untouched ground left alone
