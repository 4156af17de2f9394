from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from pipeline import track
from pipeline.errors import RegisterError
from pipeline.track import Register, empty_register, make_patch_ids, match

CRS = "EPSG:4547"
X0, Y0 = 602500.0, 2545500.0


def patches(specs: list[tuple[float, float, float, str]], after: str = "2024-06-01",
            ) -> gpd.GeoDataFrame:
    """Squares (dx, dy, side, category) around (X0, Y0) with the vectorize-stage columns."""
    geoms = [shapely.box(X0 + dx, Y0 + dy, X0 + dx + s, Y0 + dy + s) for dx, dy, s, _ in specs]
    return gpd.GeoDataFrame({
        "category": [c for *_, c in specs],
        "confidence": 0.8,
        "area_m2": [g.area for g in geoms],
        "admin_code": "440304001",
        "admin_name": "福田街道",
        "after_date": after,
        "run_id": "x",
    }, geometry=geoms, crs=CRS)


BASE = [(0, 0, 20, "illegal_construction"), (100, 0, 30, "forest_grave"),
        (0, 100, 40, "land_occupation")]


def run(new: gpd.GeoDataFrame, reg: gpd.GeoDataFrame, run_id: str, date: str = "2024-06-01",
        ) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, pd.DataFrame]:
    return match(new, reg, run_date=date, run_id=run_id)


def verify(reg: gpd.GeoDataFrame, pid: str, value: str) -> gpd.GeoDataFrame:
    reg = reg.copy()
    reg.loc[reg["patch_id"] == pid, "verification"] = value
    return reg


def test_new_then_persisting_keeps_ids() -> None:
    out1, reg1, hist1 = run(patches(BASE), empty_register(CRS), "r1")
    assert out1["status"].tolist() == ["new"] * 3
    assert len(reg1) == 3 and len(hist1) == 3
    # next run: same footprints, slightly shifted (misregistration) and later date
    shifted = patches([(dx + 1, dy - 1, s, c) for dx, dy, s, c in BASE], after="2024-09-01")
    out2, reg2, hist2 = run(shifted, reg1, "r2", "2024-09-01")
    assert out2["status"].tolist() == ["persisting"] * 3
    assert out2["patch_id"].tolist() == out1["patch_id"].tolist()
    assert out2["first_seen"].tolist() == ["2024-06-01"] * 3
    assert len(reg2) == 3
    assert reg2["times_seen"].tolist() == [2, 2, 2]
    assert set(reg2["last_run"]) == {"r2"}
    assert hist2["status"].tolist() == ["persisting"] * 3


def test_rerun_of_same_run_reproduces_it() -> None:
    out1, reg1, _ = run(patches(BASE), empty_register(CRS), "r1")
    out1b, reg1b, _ = run(patches(BASE), reg1, "r1")
    assert out1b["status"].tolist() == ["new"] * 3
    assert out1b["patch_id"].tolist() == out1["patch_id"].tolist()
    assert reg1b["times_seen"].tolist() == [1, 1, 1]


def test_grown() -> None:
    _, reg, _ = run(patches(BASE), empty_register(CRS), "r1")
    bigger = patches([(0, 0, 25, "illegal_construction")])  # 625 > 1.2 * 400
    out, reg2, _ = run(bigger, reg, "r2")
    assert out["status"].tolist() == ["grown"]
    assert out["patch_id"].iloc[0] == reg["patch_id"].iloc[0]
    # the register keeps the re-issued footprint: the same size next time is persisting
    assert reg2["area_m2"].iloc[0] == pytest.approx(625.0)
    assert reg2.geometry.iloc[0].area == pytest.approx(625.0)
    out3, _, _ = run(bigger, reg2, "r3")
    assert out3["status"].tolist() == ["persisting"]


def test_small_growth_is_persisting_but_adds_up() -> None:
    _, reg, _ = run(patches([(0, 0, 20, "illegal_construction")]), empty_register(CRS), "r1")
    out, reg, _ = run(patches([(0, 0, 21, "illegal_construction")]), reg, "r2")  # +10 %
    assert out["status"].tolist() == ["persisting"]
    out, reg, _ = run(patches([(0, 0, 22.5, "illegal_construction")]), reg, "r3")  # +27 %
    assert out["status"].tolist() == ["grown"]


def test_merged_patches_are_not_grown() -> None:
    two = patches([(0, 0, 20, "illegal_construction"), (20, 0, 20, "illegal_construction")])
    _, reg, _ = run(two, empty_register(CRS), "r1")
    merged = gpd.GeoDataFrame({"category": ["illegal_construction"]},
                              geometry=[shapely.box(X0, Y0, X0 + 40, Y0 + 20)], crs=CRS)
    out, _, _ = run(merged, reg, "r2")
    assert out["status"].tolist() == ["persisting"]


def test_rectified_reappears_then_persists() -> None:
    out1, reg, _ = run(patches(BASE), empty_register(CRS), "r1")
    pid = out1["patch_id"].iloc[0]
    reg = verify(reg, pid, "rectified")
    out2, reg2, _ = run(patches(BASE), reg, "r2")
    assert out2["status"].tolist() == ["reappeared", "persisting", "persisting"]
    assert out2["patch_id"].iloc[0] == pid
    row = reg2.loc[reg2["patch_id"] == pid].iloc[0]
    assert row["status"] == "reappeared" and row["verification"] is None
    out3, _, _ = run(patches(BASE), reg2, "r3")
    assert out3["status"].iloc[0] == "persisting"


@pytest.mark.parametrize("verdict", ["false_positive", "legal_permit"])
def test_false_positive_suppressed_unless_grown(verdict: str) -> None:
    out1, reg, _ = run(patches(BASE), empty_register(CRS), "r1")
    pid = out1["patch_id"].iloc[1]
    reg = verify(reg, pid, verdict)
    out2, reg2, _ = run(patches(BASE), reg, "r2")
    assert out2["status"].tolist() == ["persisting", "suppressed", "persisting"]
    assert reg2.loc[reg2["patch_id"] == pid, "verification"].iloc[0] == verdict
    grown = patches([(100, 0, 40, "forest_grave")])  # 1600 > 1.2 * 900
    out3, reg3, _ = run(grown, reg2, "r3")
    assert out3["status"].tolist() == ["grown"] and out3["patch_id"].iloc[0] == pid
    assert reg3.loc[reg3["patch_id"] == pid, "verification"].iloc[0] is None


def test_category_change_within_family_keeps_id_other_family_is_new() -> None:
    out1, reg, _ = run(patches([(0, 0, 20, "land_occupation"), (100, 0, 20, "other_change")]),
                       empty_register(CRS), "r1")
    out2, _, _ = run(patches([(0, 0, 20, "illegal_construction"),
                              (100, 0, 20, "illegal_construction")]), reg, "r2")
    assert out2["status"].tolist() == ["persisting", "new"]
    assert out2["patch_id"].iloc[0] == out1["patch_id"].iloc[0]
    assert out2["patch_id"].iloc[1] != out1["patch_id"].iloc[1]


def test_prefers_same_category() -> None:
    both = patches([(0, 0, 20, "land_occupation"), (0, 0, 20, "illegal_construction")])
    out1, reg, _ = run(both, empty_register(CRS), "r1")
    out2, _, _ = run(patches([(0, 0, 20, "illegal_construction")]), reg, "r2")
    assert out2["patch_id"].iloc[0] == out1["patch_id"].iloc[1]


def test_split_patch_is_not_reissued() -> None:
    _, reg, _ = run(patches([(0, 0, 40, "illegal_construction")]), empty_register(CRS), "r1")
    halves = patches([(0, 0, 20, "illegal_construction"), (20, 0, 20, "illegal_construction")])
    out, reg2, _ = run(halves, reg, "r2")
    assert out["status"].tolist() == ["persisting", "persisting"]
    assert out["patch_id"].is_unique and len(reg2) == 2


def test_small_overlap_is_new() -> None:
    _, reg, _ = run(patches([(0, 0, 20, "illegal_construction")]), empty_register(CRS), "r1")
    out, _, _ = run(patches([(15, 15, 20, "illegal_construction")]), reg, "r2")  # 25/400
    assert out["status"].tolist() == ["new"]


def test_ids_stable_unique_and_formatted() -> None:
    p = patches(BASE + [(0, 0, 20, "illegal_construction")])  # an exact duplicate
    ids1 = make_patch_ids(p, run_date="2024-06-01")
    ids2 = make_patch_ids(p.iloc[::-1].reset_index(drop=True), run_date="2024-06-01")[::-1]
    assert ids1[1:3] == ids2[1:3] and set(ids1) == set(ids2)  # duplicates are interchangeable
    assert len(set(ids1)) == 4
    assert all(i.startswith("TB-440304001-20240601-") and len(i.split("-")[-1]) == 8
               for i in ids1)
    p["admin_code"] = None
    p["after_date"] = np.nan
    assert make_patch_ids(p.iloc[:1], run_date="2024-07-02")[0].startswith(
        "TB-000000000-20240702-")
    # sub-metre jitter does not change an id
    q = patches([(0.2, -0.2, 20, "illegal_construction")])
    assert make_patch_ids(q, run_date="x") == [ids1[0]]


def test_empty_inputs() -> None:
    out, reg, hist = run(patches([]), empty_register(CRS), "r1")
    assert len(out) == 0 and len(reg) == 0 and len(hist) == 0
    _, reg, _ = run(patches(BASE), empty_register(CRS), "r1")
    out, reg2, _ = run(patches([]), reg, "r2")
    assert len(out) == 0 and len(reg2) == 3


def test_crs_mismatch_raises() -> None:
    _, reg, _ = run(patches(BASE), empty_register(CRS), "r1")
    with pytest.raises(RegisterError, match="one register per working CRS"):
        run(patches(BASE).to_crs(32649), reg, "r2")


def test_20k_patches_no_all_pairs() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    xs = X0 + rng.uniform(0, 30_000, n)
    ys = Y0 + rng.uniform(0, 30_000, n)
    cats = rng.choice(["illegal_construction", "land_occupation", "other_change"], n)
    big = gpd.GeoDataFrame({"category": cats}, geometry=shapely.box(xs, ys, xs + 12, ys + 12),
                           crs=CRS)
    out1, reg, _ = run(big, empty_register(CRS), "r1")
    assert out1["patch_id"].is_unique
    out2, reg2, _ = run(big, reg, "r2")
    assert (out2["patch_id"] == out1["patch_id"]).all()
    assert set(out2["status"]) == {"persisting"} and len(reg2) == n


# --------------------------------------------------------------------------- Register I/O


@pytest.mark.filterwarnings("ignore:File .*bak has GPKG application_id")
def test_register_roundtrip(tmp_path: Path) -> None:
    r = Register(tmp_path / "register.gpkg")
    assert len(r.load(CRS)) == 0 and list(r.load(CRS).columns)[:-1] == list(
        track.REGISTER_COLUMNS)
    out1 = r.update(patches(BASE), "r1", "2024-06-01")
    out2 = r.update(patches(BASE), "r2", "2024-09-01")
    assert out2["status"].tolist() == ["persisting"] * 3
    assert out2["patch_id"].tolist() == out1["patch_id"].tolist()
    reg = r.load()
    assert reg.crs.to_epsg() == 4547 and len(reg) == 3
    assert reg["times_seen"].tolist() == [2, 2, 2]
    assert reg["verification"].isna().all()
    hist = r.load_history()
    assert hist["run_id"].tolist() == ["r1"] * 3 + ["r2"] * 3
    assert r.backup_path.exists() and len(Register(r.backup_path).load()) == 3
    # rerunning r2 replaces its history rows instead of duplicating them
    r.update(patches(BASE), "r2", "2024-09-01")
    assert len(r.load_history()) == 6


def _verification_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["patch_id,verification,verified_at,note"]
    lines += [f"{p},{v},2024-07-01,核查" for p, v in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    return path


def test_import_verification_csv_and_geojson(tmp_path: Path) -> None:
    r = Register(tmp_path / "register.gpkg")
    ids = r.update(patches(BASE), "r1", "2024-06-01")["patch_id"].tolist()
    csv_path = _verification_csv(tmp_path / "v.csv", [(ids[0], "rectified"), (ids[1], "误报"),
                                                      (ids[2], "")])
    assert r.import_verification(csv_path) == 2
    reg = r.load().set_index("patch_id")
    assert reg.loc[ids[0], "verification"] == "rectified"
    assert reg.loc[ids[1], "verification"] == "false_positive"
    assert reg.loc[ids[0], "verified_at"] == "2024-07-01" and reg.loc[ids[0], "note"] == "核查"
    assert reg.loc[ids[2], "verification"] is None
    out = r.update(patches(BASE), "r2", "2024-09-01")
    assert out["status"].tolist() == ["reappeared", "suppressed", "persisting"]

    gj = tmp_path / "v.geojson"
    gpd.GeoDataFrame({"patch_id": [ids[2]], "verification": ["legal_permit"]},
                     geometry=[shapely.Point(114.0, 23.0)], crs=4326).to_file(gj)
    assert r.import_verification(gj, today="2024-10-01") == 1
    row = r.load().set_index("patch_id").loc[ids[2]]
    assert row["verification"] == "legal_permit" and row["verified_at"] == "2024-10-01"
    assert r.load_history()["run_id"].str.startswith("verification:").sum() == 3


def test_import_verification_errors(tmp_path: Path) -> None:
    r = Register(tmp_path / "register.gpkg")
    ids = r.update(patches(BASE), "r1", "2024-06-01")["patch_id"].tolist()
    before = (tmp_path / "register.gpkg").read_bytes()
    bad_id = _verification_csv(tmp_path / "a.csv",
                               [(ids[0], "rectified"), ("TB-nope", "rectified")])
    with pytest.raises(RegisterError, match=r"a\.csv.*not in the register.*TB-nope") as e:
        r.import_verification(bad_id)
    assert "\n" not in str(e.value)
    bad_value = _verification_csv(tmp_path / "b.csv", [(ids[0], "maybe")])
    with pytest.raises(RegisterError, match=r"b\.csv: row 2: bad verification 'maybe'"):
        r.import_verification(bad_value)
    no_col = tmp_path / "c.csv"
    no_col.write_text("id,verification\nx,rectified\n", encoding="utf-8")
    with pytest.raises(RegisterError, match="no 'patch_id' column"):
        r.import_verification(no_col)
    assert (tmp_path / "register.gpkg").read_bytes() == before


def test_corrupt_register(tmp_path: Path) -> None:
    """The error points to the backup when there is one, and says so when there is not."""
    path = tmp_path / "register.gpkg"
    path.write_bytes(b"this is not a geopackage" * 100)
    with pytest.raises(RegisterError, match=r"no earlier version \(register\.gpkg\.bak\)"):
        Register(path).load()
    path.unlink()
    r = Register(path)
    r.update(patches(BASE), "r1", "2024-06-01")
    r.update(patches(BASE), "r2", "2024-09-01")  # keeps the first version as the backup
    assert r.backup_path.exists()
    path.write_bytes(b"this is not a geopackage" * 100)
    with pytest.raises(RegisterError, match=r"restore it from register\.gpkg\.bak") as e:
        Register(path).load()
    assert "\n" not in str(e.value)
    with pytest.raises(RegisterError, match="restore"):
        Register(path).update(patches(BASE), "r3", "2024-12-01")
    assert path.read_bytes() == b"this is not a geopackage" * 100  # left as it was


def test_crash_during_write_keeps_old_register(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    r = Register(tmp_path / "register.gpkg")
    ids = r.update(patches(BASE), "r1", "2024-06-01")["patch_id"].tolist()
    real = track._write_layers

    def crash(path: Path, reg: gpd.GeoDataFrame, hist: pd.DataFrame) -> None:
        real(path, reg, hist)  # the temp file is complete ...
        raise OSError("disk full")  # ... and then the process dies before the rename

    monkeypatch.setattr(track, "_write_layers", crash)
    more = patches(BASE + [(500, 500, 30, "illegal_construction")])
    with pytest.raises(OSError, match="disk full"):
        r.update(more, "r2", "2024-09-01")
    monkeypatch.undo()
    reg = r.load()
    assert reg["patch_id"].tolist() == ids and set(reg["last_run"]) == {"r1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["register.gpkg", "register.gpkg.lock"]


def _update_in_child(path: str, dx: float, run_id: str) -> None:
    for k in range(4):  # several updates each, so the two processes really interleave
        Register(path).update(patches([(dx, 100 * k, 20, "illegal_construction"),
                                       (dx, 100 * k + 50, 20, "land_occupation")]),
                              f"{run_id}-{k}", "2024-06-01")


def test_concurrent_updates_both_land(tmp_path: Path) -> None:
    path = str(tmp_path / "register.gpkg")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_update_in_child, args=(path, 1000.0 * i, f"run{i}"))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reg = Register(path).load()
    assert len(reg) == 16 and reg["patch_id"].is_unique
    assert {r.split("-")[0] for r in reg["first_run"]} == {"run0", "run1"}
    assert len(Register(path).load_history()) == 16
