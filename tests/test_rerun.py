"""Stage commands that redo a finished run from a stage on: ``tuban align|detect|classify|
vectorize RUN_DIR``, in place, with the register kept consistent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import yaml
from synthetic_cases import write_case
from test_cli import ROOT, _assert_clean_failure, sample_config, tuban

from pipeline import align
from pipeline.track import later_runs, withdraw


def _patches(run: Path) -> gpd.GeoDataFrame:
    return gpd.read_file(run / "patches.gpkg").sort_values("patch_id").reset_index(drop=True)


def _same_patches(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame, conf_tol: float = 0.0) -> None:
    assert a["patch_id"].tolist() == b["patch_id"].tolist()
    assert a["category"].tolist() == b["category"].tolist()
    assert all(x.equals_exact(y, 1e-6) for x, y in zip(a.geometry, b.geometry, strict=True))
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=conf_tol)


@pytest.fixture()
def own_permits(tmp_path: Path) -> tuple[Path, Path]:
    """A sample config whose permits layer is a copy the test may edit; a first run of it."""
    permits = tmp_path / "permits.geojson"
    shutil.copy(ROOT / "sample_tiles" / "rules" / "permits.geojson", permits)
    cfg = sample_config(tmp_path)
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["rules"]["permits"]["path"] = str(permits)
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    res = tuban("run", cfg, "--run-id", "first")
    assert res.returncode == 0, res.stderr
    return cfg, permits


def test_classify_applies_a_new_permit_without_detecting_again(
        own_permits: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, permits = own_permits
    run = tmp_path / "runs" / "first"
    before = _patches(run)
    scores = run / "work" / "scores-0-1.tif"
    stored = scores.read_bytes()
    permitted = json.loads((run / "run.json").read_text(encoding="utf-8"))["excluded"]["permit"]
    # the bureau learns that one reported building had a permit after all
    built = before[before["category"] == "illegal_construction"]
    assert len(built) >= 2
    pid = built["patch_id"].iloc[0]
    layer = gpd.read_file(permits)
    new = gpd.GeoDataFrame({"permit_no": ["穗规建证〔2024〕0999号"], "holder": ["某公司"]},
                           geometry=[built.geometry.iloc[0].buffer(3.0)], crs=before.crs)
    pd.concat([layer, new.to_crs(layer.crs)]).to_file(permits, driver="GeoJSON")
    assert (run / "evidence" / f"{pid}.png").exists()

    res = tuban("classify", run)
    assert res.returncode == 0, res.stderr
    after = _patches(run)
    assert pid not in set(after["patch_id"])
    _same_patches(before[before["patch_id"] != pid].reset_index(drop=True), after)
    assert not (run / "evidence" / f"{pid}.png").exists()  # its evidence went with it
    assert pid not in (run / "tasks.csv").read_text(encoding="utf-8-sig")
    man = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert man["rerun"]["stage"] == "classify" and man["run_id"] == "first"
    assert man["excluded"]["permit"] == permitted + 1
    assert scores.read_bytes() == stored  # the decisions were read, not made again
    # the register forgets the withdrawn patch: it was issued by this run alone
    reg = gpd.read_file(tmp_path / "runs" / "register.gpkg", layer="patches")
    assert set(reg["patch_id"]) == set(after["patch_id"])
    hist = gpd.read_file(tmp_path / "runs" / "register.gpkg", layer="history")
    assert pid not in set(hist["patch_id"])
    assert sorted(hist["patch_id"]) == sorted(after["patch_id"])  # one row each, no duplicate


def test_classify_with_another_rules_folder(tmp_path: Path) -> None:
    """A compare classified again with a new delivery of rule layers (another folder): the
    permitted building goes, and the run keeps using the new folder from then on."""
    sample = ROOT / "sample_tiles"
    out = tmp_path / "out"
    assert tuban("compare", sample / "2024-03" / "scene.tif", sample / "2024-06" / "scene.tif",
                 "-o", out, "--rules", sample / "rules", "--config",
                 ROOT / "configs" / "sample.yaml").returncode == 0
    before = _patches(out)
    built = before[before["category"] == "illegal_construction"]
    pid = built["patch_id"].iloc[0]
    q3 = tmp_path / "rules-2024Q3"
    shutil.copytree(sample / "rules", q3)
    layer = gpd.read_file(q3 / "permits.geojson")
    grant = gpd.GeoDataFrame({"permit_no": ["new"]}, geometry=[built.geometry.iloc[0].buffer(3)],
                             crs=before.crs).to_crs(layer.crs)
    pd.concat([layer, grant]).to_file(q3 / "permits.geojson", driver="GeoJSON")
    (q3 / "street_offices.geojson").unlink()  # the offices stay the run's
    res = tuban("classify", out, "--rules", q3)
    assert res.returncode == 0, res.stderr
    after = _patches(out)
    _same_patches(before[before["patch_id"] != pid].reset_index(drop=True), after)
    assert after["admin_code"].notna().all()
    cfg = json.loads((out / "run.json").read_text(encoding="utf-8"))["config"]
    assert Path(cfg["rules"]["permits"]["path"]) == q3 / "permits.geojson"
    assert Path(cfg["admin"]["path"]) == sample / "rules" / "street_offices.geojson"
    assert tuban("classify", out).returncode == 0  # the new folder is the run's now
    _same_patches(after, _patches(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_failure(tuban("classify", out, "--rules", empty), "empty", "rule layers")
    _assert_clean_failure(tuban("classify", out, "--config", ROOT / "configs" / "sample.yaml"),
                          "sample.yaml", "--rules")  # a compare takes new layers, not configs


def _edited(cfg: Path, name: str, **changes: dict) -> Path:
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    out = cfg.with_name(name)
    out.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return out


def test_rerun_with_another_config(own_permits: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, _ = own_permits
    run = tmp_path / "runs" / "first"
    before = _patches(run)
    assert (before["category"] == "forest_grave").any()
    # new minimum areas: graves under 10 ha are no longer reported, nothing else changes
    big = _edited(cfg, "big.yaml", categories={"forest_grave": {"min_area_m2": 1e5}})
    res = tuban("classify", run, "--config", big)
    assert res.returncode == 0, res.stderr
    after = _patches(run)
    _same_patches(before[before["category"] != "forest_grave"].reset_index(drop=True), after)
    man = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert man["config"]["categories"]["forest_grave"]["min_area_m2"] == 1e5
    assert man["config_path"] == str(big)
    reg = gpd.read_file(tmp_path / "runs" / "register.gpkg", layer="patches")
    assert set(reg["patch_id"]) == set(after["patch_id"])
    # a setting the stored decisions were made with: classify refuses, detect takes it
    net = _edited(cfg, "net.yaml", detection={"method": "learned"})
    kept = (run / "run.json").read_bytes()
    _assert_clean_failure(tuban("classify", run, "--config", net), "net.yaml",
                          "detection.method", "tuban detect")
    assert (run / "run.json").read_bytes() == kept
    res = tuban("detect", run, "--config", net)
    assert res.returncode == 0, res.stderr
    man = json.loads((run / "run.json").read_text(encoding="utf-8"))
    assert man["detector"]["name"] == "learned" and man["rerun"]["stage"] == "detect"
    # other imagery or another register: a new run, not a rerun
    other = _edited(cfg, "other.yaml", register=str(tmp_path / "elsewhere.gpkg"))
    _assert_clean_failure(tuban("align", run, "--config", other), "other.yaml", "new run")


def test_detect_and_align_reruns_reproduce_the_run(own_permits: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    run = tmp_path / "runs" / "first"
    first = _patches(run)
    for stage in ("detect", "align", "vectorize"):
        res = tuban(stage, run, "--workers", "2")
        assert res.returncode == 0, res.stderr
        _same_patches(first, _patches(run))
        man = json.loads((run / "run.json").read_text(encoding="utf-8"))
        assert man["rerun"]["stage"] == ("classify" if stage == "vectorize" else stage)
    assert set(_patches(run)["status"]) == {"new"}  # the same run, not a second sighting


def test_classify_replays_the_learned_detector(tmp_path: Path) -> None:
    """10 m RGB: the learned detector decides; a replay of its stored decisions gives the
    same patches (its spectral evidence computed again)."""
    case = tmp_path / "s" / "c"
    write_case(case, seed=3, res_m=10.0)
    out = tmp_path / "out"
    res = tuban("compare", case / "before.tif", case / "after.tif", "-o", out)
    assert res.returncode == 0, res.stderr
    man = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert man["detector"]["name"] == "learned"
    first = _patches(out)
    assert len(first) >= 5
    res = tuban("classify", out)
    assert res.returncode == 0, res.stderr
    _same_patches(first, _patches(out))


def test_reruns_refuse_changed_imagery_and_missing_scores(tmp_path: Path) -> None:
    case = tmp_path / "s" / "c"
    write_case(case, seed=4, res_m=10.0)
    out = tmp_path / "out"
    assert tuban("compare", case / "before.tif", case / "after.tif", "-o", out).returncode == 0
    manifest = (out / "run.json").read_bytes()
    with rasterio.open(case / "after.tif", "r+") as dst:  # a re-delivered after image
        a = dst.read()
        dst.write(255 - a)
    for stage in ("classify", "detect"):  # stored alignment and decisions no longer fit
        _assert_clean_failure(tuban(stage, out), "after.tif", "tuban align")
        assert (out / "run.json").read_bytes() == manifest  # nothing written
        assert not list(tmp_path.glob("out.partial-*"))
        assert not list(tmp_path.glob(".out.work*"))
    (out / "work" / "scores-0-1.tif").unlink()
    _assert_clean_failure(tuban("classify", out), "scores-0-1.tif", "tuban detect")
    # align makes everything again, from the new imagery
    assert tuban("align", out).returncode == 0
    assert (out / "work" / "scores-0-1.tif").is_file()
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["inputs"] != json.loads(
        manifest)["inputs"]
    _assert_clean_failure(tuban("classify", tmp_path), "run.json")
    # a run of a tuban before stage reruns kept no alignment per pair
    man = json.loads((out / "run.json").read_text(encoding="utf-8"))
    del man["pairs"]
    (out / "run.json").write_text(json.dumps(man), encoding="utf-8")
    for stage in ("classify", "detect"):
        _assert_clean_failure(tuban(stage, out), "run.json", "tuban align")


def test_only_the_latest_run_is_tracked_again(own_permits: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    cfg, _ = own_permits
    assert tuban("run", cfg, "--run-id", "second").returncode == 0
    register = tmp_path / "runs" / "register.gpkg"
    kept = register.read_bytes()
    for stage in ("track", "classify"):
        _assert_clean_failure(tuban(stage, tmp_path / "runs" / "first"), "register.gpkg",
                              "second", "first")
        assert register.read_bytes() == kept
    res = tuban("track", tmp_path / "runs" / "second")
    assert res.returncode == 0, res.stderr
    assert set(_patches(tmp_path / "runs" / "second")["status"]) == {"persisting"}


# ------------------------------------------------------------------------ pure parts


def _register(rows: list[dict]) -> gpd.GeoDataFrame:
    df = pd.DataFrame(rows)
    return gpd.GeoDataFrame(df, geometry=[shapely.box(i, 0, i + 1, 1) for i in range(len(df))],
                            crs="EPSG:4547")


def test_withdraw_undoes_what_a_rerun_no_longer_reports() -> None:
    reg = _register([
        {"patch_id": "A", "first_run": "r1", "last_run": "r2", "last_seen": "2024-06",
         "status": "persisting", "times_seen": 2},   # seen again by r2, gone in its rerun
        {"patch_id": "B", "first_run": "r2", "last_run": "r2", "last_seen": "2024-06",
         "status": "new", "times_seen": 1},          # issued by r2, gone in its rerun
        {"patch_id": "C", "first_run": "r2", "last_run": "r2", "last_seen": "2024-06",
         "status": "new", "times_seen": 1},          # still reported
        {"patch_id": "D", "first_run": "r1", "last_run": "r1", "last_seen": "2024-03",
         "status": "new", "times_seen": 1},          # not this run's
        {"patch_id": "E", "first_run": "r2", "last_run": "r2", "last_seen": "2024-06",
         "status": "suppressed", "times_seen": 1, "verification": "false_positive"},
    ])  # E: issued by r2 and verified since: the analysts' finding stays
    hist = pd.DataFrame({"patch_id": ["A", "D", "A", "A", "B", "C"],
                         "run_id": ["r1", "r1", "verification:f.csv", "r2", "r2", "r2"],
                         "date": ["2024-03", "2024-03", "2024-04", "2024-06", "2024-06",
                                  "2024-06"],
                         "status": ["new", "new", "verified_violation", "persisting", "new",
                                    "new"],
                         "area_m2": [1.0] * 6})
    out = withdraw(reg, hist, "r2", kept={"C"})
    assert out["patch_id"].tolist() == ["A", "C", "D", "E"]
    a = out.iloc[0]
    assert (a["last_run"], a["last_seen"], a["status"], a["times_seen"]) == (
        "r1", "2024-03", "new", 1)
    rest = out.iloc[1:].drop(columns="geometry").to_dict("records")
    assert str(rest) == str(reg.iloc[[2, 3, 4]].drop(columns="geometry").to_dict("records"))
    assert withdraw(reg, hist, "r2", kept={"A", "B", "C"}) is reg


def test_later_runs_skip_verification() -> None:
    hist = pd.DataFrame({"run_id": ["r1", "r2", "verification:x.csv", "r2"]})
    assert later_runs(hist, "r2") == []
    assert later_runs(hist, "r1") == ["r2"]
    assert later_runs(hist, "r3") == []


def test_alignment_record_round_trip() -> None:
    p = align.AlignParams((1.5, -0.25), (0.9, 1.1), (0.01, -0.02), ("red", "nir"), 7,
                          ((0.01, 0.3), (0.02, 0.5)), ((0.015, 0.31), (0.0, 0.45)),
                          (("bright", 0.12), ("texture", 0.03)),
                          ((256.0, 256.0, 1.5, -0.25), (1280.0, 256.0, 2.75, -0.5)))
    rec = json.loads(json.dumps(align.params_record(p)))
    assert align.params_from_record(rec) == p
    del rec["local_shifts"]  # a run.json from before shifts could vary: one shift
    assert align.params_from_record(rec).local_shifts == ()


def test_classify_replays_the_default_on_sub_metre_rgb_nir(tmp_path: Path) -> None:
    """1 m RGB+NIR (GF-2-like), the default detector: the RGB model with its network, and
    the spectral detector's decisions inside forest, farmland and ecological land
    (``change_any``). A replay of both stored decisions gives the same patches."""
    sample = ROOT / "sample_tiles"
    out = tmp_path / "out"
    res = tuban("compare", sample / "2024-03" / "scene.tif", sample / "2024-06" / "scene.tif",
                "-o", out, "--rules", sample / "rules", "--bands",
                "blue=1,green=2,red=3,nir=4")
    assert res.returncode == 0, res.stderr
    man = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert man["detector"]["name"] == "learned" and "open_ground" in man["detector"]
    first = _patches(out)
    assert {"forest_grave", "land_occupation"} <= set(first["category"])  # change_any's
    with rasterio.open(out / "work" / "scores-0-1.tif") as src:
        change, change_any = src.read()
    assert (change_any > 0).sum() > (change > 0).sum()  # two different decisions stored
    res = tuban("classify", out)
    assert res.returncode == 0, res.stderr
    _same_patches(first, _patches(out), conf_tol=0.002)
