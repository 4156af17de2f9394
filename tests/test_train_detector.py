"""bench/train_detector.py, the training command of the shipped pixel and object models, on
small synthetic cases: its held-out folds never test on what they trained on, and the models it
writes load in the learned detector and find planted change on a pair it never saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lightgbm")
pytest.importorskip("sklearn")  # the trainer's Platt fit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_detector as T  # noqa: E402
from synthetic_cases import RGB, make_cases, synthetic_pair  # noqa: E402

from pipeline.detect import features as F  # noqa: E402
from pipeline.detect.learned import LearnedDetector, decide  # noqa: E402

#: two "sensors": sub-metre and 10 m, so both protocols have folds and the thresholds two classes
DATASETS = {"aerial": 0.5, "sat": 10.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("train")
    names = make_cases(root / "cases", DATASETS)
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
