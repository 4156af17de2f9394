import threading

import numpy as np
import pytest
import rasterio.warp
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.grid import Grid, transform_bounds


def test_from_bounds_snaps_outward() -> None:
    g = Grid.from_bounds((602000.3, 2545000.2, 602010.1, 2545010.9), 1.0, "EPSG:4547")
    assert g.bounds == (602000.0, 2545000.0, 602011.0, 2545011.0)
    assert g.shape == (11, 11)
    assert g.pixel_area_m2 == 1.0


def test_blocks_cover_grid_once_with_clipped_halo() -> None:
    g = Grid.from_bounds((0, 0, 100, 70), 1.0, "EPSG:32650")
    seen = np.zeros(g.shape, int)
    blocks = list(g.blocks(32, halo=8))
    assert len(blocks) == g.n_blocks(32) == 12
    for b in blocks:
        r, c = int(b.core.row_off), int(b.core.col_off)
        seen[r:r + int(b.core.height), c:c + int(b.core.width)] += 1
        assert b.outer.row_off >= 0 and b.outer.col_off >= 0
        assert b.outer.row_off + b.outer.height <= g.height
        outer = np.arange(int(b.outer.height * b.outer.width)).reshape(
            int(b.outer.height), int(b.outer.width))
        assert outer[b.inner_slices].shape == (int(b.core.height), int(b.core.width))
    assert (seen == 1).all()


def test_subgrid_and_shift() -> None:
    g = Grid.from_bounds((0, 0, 100, 100), 2.0, "EPSG:32650")
    sub = g.subgrid(Window(10, 5, 20, 20))
    assert sub.bounds == (20.0, 50.0, 60.0, 90.0)
    assert sub.transform.c == 20.0 and sub.transform.f == 90.0
    s = g.shifted(0.5, -0.25)
    assert s.transform.c == 1.0 and s.transform.f == 100.5


def test_auto_block_size() -> None:
    g = Grid.from_bounds((0, 0, 1024, 1024), 1.0, "EPSG:32650")
    assert g.auto_block_size(2) == 512  # four blocks for two workers
    mid = Grid.from_bounds((0, 0, 4000, 4000), 1.0, "EPSG:32650")
    assert mid.auto_block_size(2) == 1024
    big = Grid.from_bounds((0, 0, 16000, 16000), 1.0, "EPSG:32650")
    assert big.auto_block_size(2) == 768
    small = Grid.from_bounds((0, 0, 200, 200), 1.0, "EPSG:32650")
    assert small.auto_block_size(8) == 256


def test_auto_block_size_fits_each_workers_memory() -> None:
    mid = Grid.from_bounds((0, 0, 4000, 4000), 1.0, "EPSG:32650")
    assert mid.auto_block_size(2, worker_px=5000**2) == 1024  # plenty: as without a budget
    assert mid.auto_block_size(2, worker_px=690**2) == 512  # 690 - 2 * 64 halo -> 512
    assert mid.auto_block_size(2, worker_px=0) == 256  # never below the smallest


def test_worker_memory_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pipeline.blocks import MAIN_MIB, worker_memory_mib, worker_px
    from pipeline.errors import TubanError

    monkeypatch.setenv("TUBAN_MEMORY_MIB", "2112")
    assert worker_memory_mib(2) == (2112 - MAIN_MIB) / 2
    # (800 - 350) MiB a worker at 450 B/px: 1024² px with the halo
    assert worker_px(2) == 1024**2
    monkeypatch.delenv("TUBAN_MEMORY_MIB")
    assert worker_memory_mib(2) > 0  # half of what is available now
    monkeypatch.setenv("TUBAN_MEMORY_MIB", "lots")
    with pytest.raises(TubanError, match="TUBAN_MEMORY_MIB='lots': expected a number of MiB"):
        worker_memory_mib(2)


def test_fewer_workers_when_the_memory_cannot_hold_them(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pipeline.blocks import fit_workers, worker_px

    smallest = (256 + 2 * 64) ** 2
    monkeypatch.setenv("TUBAN_MEMORY_MIB", "2512")
    assert fit_workers(2, smallest) == 2
    # 1000 MiB: (1000 - 512) / 2 is under a worker's fixed 350 MiB; one worker holds 567² px
    monkeypatch.setenv("TUBAN_MEMORY_MIB", "1000")
    assert worker_px(2) == 0 and fit_workers(2, smallest) == 1
    assert fit_workers(4, smallest) == 1
    monkeypatch.setenv("TUBAN_MEMORY_MIB", "3912")  # 850 MiB for each of 4 workers
    assert fit_workers(8, smallest) == 8 and fit_workers(8, 1024**2) == 4
    monkeypatch.setenv("TUBAN_MEMORY_MIB", "100")  # nothing fits: still one worker
    assert fit_workers(2, smallest) == 1


@pytest.mark.parametrize(("src", "dst", "bounds"), [
    (32650, 4547, (500_000.0, 2_545_000.0, 500_160.0, 2_545_160.0)),  # UTM 50N -> CGCS2000
    (4326, 26915, (-94.52, 37.06, -94.50, 37.07)),  # lon/lat -> NAD83 UTM 15N (Joplin)
    (26915, 4326, (366_700.0, 4_103_300.0, 367_800.0, 4_104_200.0)),
    (4326, 32614, (-97.5, 30.0, -97.4, 30.1)),
])
def test_transform_bounds_matches_rasterio_in_any_thread(src: int, dst: int,
                                                          bounds: tuple) -> None:
    a, b = CRS.from_epsg(src), CRS.from_epsg(dst)
    want = rasterio.warp.transform_bounds(a, b, *bounds, densify_pts=21)
    assert transform_bounds(a, b, *bounds) == pytest.approx(want, rel=0, abs=1e-9)
    # the same figures from another thread, which gets a transformer of its own
    got: list = []
    t = threading.Thread(target=lambda: got.append(transform_bounds(a, b, *bounds)))
    t.start()
    t.join()
    assert got[0] == pytest.approx(want, rel=0, abs=1e-9)
