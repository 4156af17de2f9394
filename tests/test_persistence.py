"""persistence: confirm changes that persist over a time series of periods."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
import shapely

from pipeline.persistence import confirm, keep_confirmed

ROOT = Path(__file__).resolve().parents[1]
P = ["2024-03", "2024-06", "2024-09"]
CRS = "EPSG:4547"


def table(*rows: tuple[float, str, float, float]) -> gpd.GeoDataFrame:
    """Patches as (x of a 10 m square, category, ndvi_before, ndvi_after)."""
    return gpd.GeoDataFrame(
        {"category": [r[1] for r in rows], "ndvi_before": [r[2] for r in rows],
         "ndvi_after": [r[3] for r in rows]},
        geometry=[shapely.box(r[0], 0, r[0] + 10, 10) for r in rows], crs=CRS)


BUILD = (0.0, "illegal_construction", 0.5, 0.1)  # grass -> roof, stays
HARVEST = (100.0, "other_change", 0.7, 0.2)  # crop -> stubble
REGROW = (100.0, "other_change", 0.2, 0.7)  # stubble -> crop: back to the before-state
SITE = (200.0, "other_change", 0.5, 0.2)  # construction site ...
SITE_BUILT = (200.0, "illegal_construction", 0.2, 0.1)  # ... becoming a building


def test_span_confirms_persisting_and_drops_seasonal() -> None:
    changes = {(0, 1): table(BUILD, HARVEST, SITE), (1, 2): table(REGROW, SITE_BUILT),
               (0, 2): table(BUILD, (200.0, "illegal_construction", 0.5, 0.1))}
    j = confirm(changes, P, persist_periods=2)
    first = j[j["pair"] == "2024-03→2024-06"].set_index(j[j["pair"] == "2024-03→2024-06"]
                                                         .geometry.bounds.minx)
    assert first.loc[0.0, "persistence"] == "confirmed"  # in (0, 2): the building stayed
    assert first.loc[100.0, "persistence"] == "transient"  # harvest not in (0, 2)
    assert first.loc[200.0, "persistence"] == "confirmed"
    assert first.loc[0.0, "seen_periods"] == 2
    last = j[j["pair"] == "2024-06→2024-09"].set_index(j[j["pair"] == "2024-06→2024-09"]
                                                        .geometry.bounds.minx)
    assert (last["persistence"] == "pending").all()  # no fourth period yet
    assert last.loc[200.0, "first_seen"] == "2024-06"  # the site was seen in period 2
    assert last.loc[100.0, "first_seen"] == "2024-09"  # regrowth reverts the harvest
    assert len(keep_confirmed(j)) == 2 and len(keep_confirmed(j, pending=True)) == 4


def test_without_span_continuing_change_counts_but_reversal_does_not() -> None:
    changes = {(0, 1): table(HARVEST, SITE, BUILD), (1, 2): table(REGROW, SITE_BUILT)}
    j = confirm(changes, P, persist_periods=2).iloc[:3]
    assert j["persistence"].tolist() == ["transient", "confirmed", "transient"]
    # a finished building shows no change in (1, 2): without the (0, 2) span it cannot be told
    # from a transient one; pass the span to confirm it.


def test_persist_periods_one_families_and_errors() -> None:
    changes = {(0, 1): table(HARVEST), (0, 2): table((100.0, "illegal_construction", 0.7, 0.1))}
    assert confirm(changes, P, persist_periods=1)["persistence"].tolist() == ["confirmed"]
    assert confirm(changes, P)["persistence"].tolist() == ["confirmed"]  # one family by default
    fam = {"other_change": "other", "illegal_construction": "built"}
    assert confirm(changes, P, families=fam)["persistence"].tolist() == ["transient"]
    four = [*P, "2024-12"]
    ch3 = {(0, 1): table(BUILD), (0, 2): table(BUILD), (0, 3): table()}
    assert confirm(ch3, four, persist_periods=3)["persistence"].tolist() == ["transient"]
    ch3[(0, 3)] = table(BUILD)
    assert confirm(ch3, four, persist_periods=3)["seen_periods"].tolist() == [3]
    assert confirm({}, P).empty
    with pytest.raises(ValueError, match="persist_periods must be ≥ 1"):
        confirm(changes, P, persist_periods=0)


def test_three_period_sample_scene_harvest_is_transient(tmp_path: Path) -> None:
    """On the generated 3-period scene (crops harvested in period 2, regrown in period 3).

    What this shows, honestly: ``tuban compare`` is run without rule layers, so the classifier
    cannot exclude the harvest as seasonal farming (that needs the farmland layer) and reports
    the harvested fields as change in the 2-period comparison 03→06. The direct comparison
    03→09 no longer shows them, so :func:`confirm` marks them transient, while the planted
    violations (which persist) stay confirmed. With rule layers the classifier already drops
    the harvest on two periods; persistence is the rule-free safeguard.
    """
    from pipeline import jobs

    scene = tmp_path / "s3"
    subprocess.run([sys.executable, str(ROOT / "sample_tiles" / "make_samples.py"), "--periods",
                    "3", "--size", "512", "--out", str(scene)], check=True, capture_output=True)
    cfg = tmp_path / "spectral.yaml"  # synthetic imagery: as configs/sample.yaml says why
    cfg.write_text("detection: {method: spectral}\n", encoding="utf-8")
    changes = {}
    for i, k in ((0, 1), (1, 2), (0, 2)):
        out = jobs.compare(scene / P[i], scene / P[k], tmp_path / f"out{i}{k}", config=cfg,
                           workers=1)
        changes[(i, k)] = gpd.read_file(out / "patches.gpkg")
    judged = confirm(changes, P, persist_periods=2)
    pair = judged[judged["pair"] == "2024-03→2024-06"]
    truth = tmp_path / "s3" / "truth"
    harvest = gpd.read_file(truth / "distractors.geojson").query("kind == 'harvest'")
    viol = gpd.read_file(truth / "violations.geojson")
    on_harvest = gpd.sjoin(pair, harvest.to_crs(pair.crs)[["geometry"]], predicate="intersects")
    on_viol = gpd.sjoin(pair, viol.to_crs(pair.crs)[["geometry"]], predicate="intersects")
    on_viol = on_viol[~on_viol.index.duplicated()]
    assert len(on_harvest) >= 1  # the 2-period comparison reports the harvest ...
    assert (on_harvest["persistence"] == "transient").all()  # ... persistence drops it
    kept = on_viol.loc[on_viol["persistence"] == "confirmed", "area_m2"].sum()
    assert kept >= 0.9 * on_viol["area_m2"].sum()  # violations persist
    assert (judged.loc[judged["pair"] == "2024-06→2024-09", "persistence"] == "pending").all()
