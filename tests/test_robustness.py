"""bench/robustness.py: perturbed cases keep their place on the ground, so labels still fit; on
cases no shipped model learned from, the shipped models run and nothing is trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from robustness import write_perturbed  # noqa: E402

ROLES = ("blue", "green", "red", "nir")


@pytest.fixture()
def case(make_raster) -> Path:
    rng = np.random.default_rng(3)
    img = (rng.random((4, 64, 64)) * 3000 + 500).astype("uint16")
    for name in ("before", "after"):
        make_raster(f"oscd/c/{name}.tif", img, descriptions=ROLES, res=10.0, nodata=0)
    path = make_raster("oscd/c/label.tif", np.zeros((64, 64), "uint8"), res=10.0)
    (path.parent / "meta.json").write_text(json.dumps({"dataset": "oscd", "gsd_m": 10}))
    return path.parent


@pytest.mark.parametrize(("name", "side", "gsd"), [("coarser", 32, 20.0), ("finer", 128, 5.0),
                                                   ("tone_after", 64, 10.0)])
def test_perturbed_case_covers_the_same_ground(case: Path, tmp_path: Path, name: str,
                                               side: int, gsd: float) -> None:
    out = tmp_path / name / "oscd" / "c"
    write_perturbed(case, out, name)
    for date in ("before", "after"):
        with rasterio.open(case / f"{date}.tif") as a, rasterio.open(out / f"{date}.tif") as b:
            assert b.shape == (side, side) and b.res == (gsd, gsd)
            assert b.bounds == a.bounds and b.crs == a.crs
            assert b.descriptions == ROLES and b.dtypes == a.dtypes
            same = np.array_equal(a.read(), b.read()) if side == 64 else None
        if name == "tone_after":
            assert same is (date == "before")  # only the after date is retoned
    assert json.loads((out / "meta.json").read_text())["gsd_m"] == gsd
    assert (out / "label.tif").resolve() == (case / "label.tif").resolve()


def test_swapped_dates_trade_places(make_raster, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    imgs = {n: (rng.random((4, 32, 32)) * 3000 + 500).astype("uint16") for n in ("before", "after")}
    for name, img in imgs.items():
        make_raster(f"oscd/c/{name}.tif", img, descriptions=ROLES, res=10.0, nodata=0)
    path = make_raster("oscd/c/label.tif", np.zeros((32, 32), "uint8"), res=10.0)
    (path.parent / "meta.json").write_text(json.dumps({"dataset": "oscd", "gsd_m": 10}))
    out = tmp_path / "swap"
    write_perturbed(path.parent, out, "swap_dates")
    for date, other in (("before", "after"), ("after", "before")):
        with rasterio.open(out / f"{date}.tif") as b:
            np.testing.assert_array_equal(b.read(), imgs[other])


def test_unseen_cases_run_the_shipped_models(tmp_path: Path, monkeypatch, capsys) -> None:
    """On cases no shipped model learned from, the perturbed runs use the shipped models and
    no fold model is trained."""
    import robustness as R
    from synthetic_cases import write_case

    monkeypatch.setattr(R, "fold_models", lambda *a, **k: pytest.fail("trained fold models"))
    write_case(tmp_path / "cases" / "elsewhere" / "town", seed=5, res_m=10.0)
    out = tmp_path / "rob.json"
    assert R.main(["--cases", str(tmp_path / "cases"), "--perturb", "noise_both",
                   "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"] == "shipped"
    assert "shipped models, cases they never saw" in capsys.readouterr().out
    assert res["tables"]["none"]["elsewhere"]["recall"] > 0.5
    assert set(res["tables"]) == {"none", "noise_both"}


def test_reference_lands_on_the_label_grid_after_resampling(make_raster, tmp_path: Path) -> None:
    """The reference runs on the perturbed images and its changed pixels come back onto the
    label's grid: a planted square found where it is, the rest of the scene left alone."""
    from robustness import reference_on_label

    rng = np.random.default_rng(5)
    before = (rng.random((4, 64, 64)) * 300 + 1500).astype("uint16")
    after = before.copy()
    after[:, 16:32, 40:56] += 4000
    for name, img in (("before", before), ("after", after)):
        make_raster(f"oscd/c/{name}.tif", img, descriptions=ROLES, res=10.0, nodata=0)
    path = make_raster("oscd/c/label.tif", np.zeros((64, 64), "uint8"), res=10.0)
    (path.parent / "meta.json").write_text(json.dumps({"dataset": "oscd", "gsd_m": 10}))
    out = tmp_path / "coarser" / "oscd" / "c"
    write_perturbed(path.parent, out, "coarser")
    ref = reference_on_label(out)
    assert ref.shape == (64, 64)
    planted = np.zeros((64, 64), bool)
    planted[16:32, 40:56] = True
    assert ref[planted].mean() > 0.9 and not ref[~planted].any()
