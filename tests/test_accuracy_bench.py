"""bench/accuracy.py on cases the shipped models never saw: the shipped default alone, held
out as it is, no fold model trained on the new cases, and the table says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightgbm")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import accuracy as A  # noqa: E402
from synthetic_cases import write_case  # noqa: E402


def test_shipped_training_cases_are_known() -> None:
    seen = A.shipped_training_cases()
    assert "levir/test_7" in seen  # the pixel model's and the network's
    assert "oscd/montpellier" in seen and "landsat/taizhou" in seen


def test_titles_say_whether_figures_are_held_out() -> None:
    assert A.shipped_title(0, 3, False).startswith("HELD OUT")
    assert A.shipped_title(3, 3, False).startswith("TRAINING SET (NOT held out)")
    assert "2 of 3" in A.shipped_title(2, 3, True) and "NOT held out" in A.shipped_title(2, 3, True)


def test_unseen_cases_run_the_shipped_models_held_out(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # training fold models on new cases would also replace the cached ones of the real cases
    monkeypatch.setattr(A, "fold_models", lambda *a, **k: pytest.fail("trained fold models"))
    cases = tmp_path / "cases"
    write_case(cases / "elsewhere" / "town", seed=5, res_m=10.0)
    out = tmp_path / "acc.json"
    assert A.main(["--cases", str(cases), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "HELD OUT: shipped models, `tuban compare`, on 1 case(s)" in printed
    res = json.loads(out.read_text())
    assert res["headline"] == "shipped" and list(res["held_out"]) == ["shipped"]
    assert res["held_out"]["shipped"] == res["shipped"]["table"]
    assert res["shipped"]["cases"] == 1 and res["shipped"]["cases_in_training"] == 0
    row = res["shipped"]["table"]["elsewhere"]
    # the shipped models' patches, scored: most planted roofs found, few false ones (this clean
    # synthetic pair is easy for the textbook reference too, which is scored beside them)
    assert row["recall"] > 0.5 and row["precision"] > 0.7
    assert res["reference"]["elsewhere"]["f1"] > 0.9


def test_fold_models_of_new_cases_are_cached_apart(tmp_path: Path) -> None:
    """Training folds on new cases must not replace the cached folds of the real cases."""
    real = [tmp_path / "levir" / "test_7", tmp_path / "oscd" / "montpellier"]
    new = [tmp_path / "elsewhere" / "town"]
    assert A.fold_cache(real) == A.FOLD_CACHE
    assert A.fold_cache(new) != A.FOLD_CACHE
    assert A.fold_cache(new).parent == A.FOLD_CACHE.parent
    assert A.fold_cache(new) == A.fold_cache(list(new))  # stable for the same cases


def test_stale_fold_models_are_kept_until_asked(tmp_path: Path) -> None:
    """An edit of a hashed source changes the recipe key; the cached fold models (and the fold
    networks, 48 min to train) are then kept and the bench stops, unless told to retrain."""
    cases = tmp_path / "cases"
    write_case(cases / "elsewhere" / "town", seed=5, res_m=10.0)
    dirs = A.iter_case_dirs(cases)
    cache = tmp_path / "folds"
    pixel = cache / "cases" / "0" / "learned_rgb.txt"
    net = cache / "cases" / "0" / "cnn_rgb_1m.onnx"
    for f in (pixel, net):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("made by an older recipe")
    (cache / "recipe.json").write_text(json.dumps({"key": "older"}))
    (cache / "network.json").write_text(json.dumps({"key": "older"}))
    with pytest.raises(A.StaleFolds, match="--retrain"):
        A.fold_models(cases, cache=cache)
    assert pixel.exists() and net.exists()
    # pixel models current, networks stale: the networks are kept too
    (cache / "recipe.json").write_text(json.dumps({"key": A.recipe_key(dirs)}))
    with pytest.raises(A.StaleFolds, match="networks"):
        A.fold_models(cases, cache=cache)
    assert pixel.exists() and net.exists()


def test_a_model_run_that_fell_back_to_the_spectral_detector_is_an_error(tmp_path: Path) -> None:
    """A model folder whose detector cannot run (here a model wanting another feature list) makes
    ``tuban compare`` fall back to the spectral detector with a warning; scoring that as the
    models' figures would report the wrong detector, so the bench stops and says why."""
    import shutil

    from pipeline.detect import learned

    write_case(tmp_path / "cases" / "elsewhere" / "town", seed=5, res_m=10.0)
    models = tmp_path / "models"
    models.mkdir()
    txt, js = learned.model_paths("rgb")
    shutil.copy(txt, models / txt.name)
    meta = json.loads(js.read_text())
    meta["features"] = meta["features"][::-1]
    (models / js.name).write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=r"ran the spectral detector instead of the models "
                                           r"in .*models: .*feature mismatch"):
        A.run_compare(tmp_path / "cases" / "elsewhere" / "town", tmp_path / "out", models)
    # the shipped models run as themselves
    A.run_compare(tmp_path / "cases" / "elsewhere" / "town", tmp_path / "out2", learned.MODEL_DIR)


def test_utm_crs() -> None:
    assert A.utm_crs(114.0, 23.0) == "EPSG:32650"
    assert A.utm_crs(-98.0, 30.2) == "EPSG:32614"  # LEVIR's Texas
    assert A.utm_crs(-98.0, -30.2) == "EPSG:32714"
    assert A.utm_crs(-180.0, 0.0) == "EPSG:32601" and A.utm_crs(179.9, 0.0) == "EPSG:32660"


def test_zoned_run_declares_the_case_farmland(tmp_path: Path) -> None:
    """The ``farmland`` protocol: ``tuban run`` with a farmland layer over the whole case. The
    synthetic squares on vegetation and soil are found there (vegetation lost, soil gained),
    where through compare, outside any rule layer, the building network vetoes most of them."""
    d = tmp_path / "cases" / "elsewhere" / "town"
    write_case(d, seed=5, res_m=1.0)
    case = A.load_case(d)
    zoned = A.run_zoned(d, tmp_path / "zoned", case)
    out = tmp_path / "zoned" / "elsewhere" / "town"
    man = json.loads((out / "runs" / "zoned" / "run.json").read_text())
    assert list(man["config"]["rules"]) == ["farmland"]
    assert man["detector"]["open_ground"]["name"] == "spectral"
    plain = A.run_compare(d, tmp_path / "plain")
    recall = {k: A.scores(A.counts(p, case.label))["recall"]
              for k, p in (("zoned", zoned), ("plain", plain))}
    assert recall["zoned"] > 0.7 and recall["zoned"] > recall["plain"], recall
