"""Block work on a real Dask distributed cluster gives the same outputs as a local run.

Starts a ``LocalCluster`` with two worker processes on loopback, runs ``tuban compare`` with
``--scheduler`` on the sample scene and compares patches (geometry + category) and every
pixel of ``change.tif`` with the same command run on local processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_tiles"
BANDS = "blue=1,green=2,red=3,nir=4"


def compare(out: Path, *extra: str) -> None:
    res = subprocess.run([sys.executable, "-m", "pipeline", "compare",
                          str(SAMPLE / "2024-03" / "scene.tif"),
                          str(SAMPLE / "2024-06" / "scene.tif"), "-o", str(out),
                          "--bands", BANDS, *extra],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


def patch_keys(out: Path) -> list[tuple[str, bytes]]:
    gdf = gpd.read_file(out / "patches.gpkg")
    return sorted((c, g.normalize().wkb) for c, g in zip(gdf["category"], gdf.geometry,
                                                           strict=True))


def change_pixels(out: Path) -> np.ndarray:
    with rasterio.open(out / "change.tif") as src:
        return src.read(1)


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c:
        yield c


def test_compare_on_dask_matches_local(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local, dask = tmp_path / "local", tmp_path / "dask"
    compare(local, "--workers", "2")
    compare(dask, "--scheduler", cluster.scheduler_address)
    keys = patch_keys(local)
    assert keys, "the sample scene has changes"
    assert patch_keys(dask) == keys
    np.testing.assert_array_equal(change_pixels(dask), change_pixels(local))
    # a stage rerun on the cluster: the stored decisions classified again, same patches
    res = subprocess.run([sys.executable, "-m", "pipeline", "classify", str(dask),
                          "--scheduler", cluster.scheduler_address],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert patch_keys(dask) == keys
    # both workers took part
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        assert len(client.scheduler_info()["workers"]) == 2


def test_unreachable_scheduler_is_a_one_line_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pipeline", "compare",
                          str(SAMPLE / "2024-03" / "scene.tif"),
                          str(SAMPLE / "2024-06" / "scene.tif"), "-o", str(tmp_path / "o"),
                          "--bands", BANDS, "--scheduler", "tcp://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "scheduler" in res.stderr and "Traceback" not in res.stderr
