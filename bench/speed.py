"""Speed and memory benchmark: tuban compare vs the I/O floor and OTB's MAD detector.

Makes (seeded, cached under ``bench/.cache/``) pairs of 4-band uint16 tiled GeoTIFFs of 4000²,
8000² and 16000² px with realistic texture and planted changes, written block by block so the
generator itself runs in bounded memory. For each size it times, in one run:

(a) reading both images fully with rasterio, block by block (the I/O floor);
(b) ``tuban compare`` with the default configuration (and with ``method: spectral`` when the
    default picks another detector);
(c) ``otbcli_MultivariateAlterationDetector`` when OTB is installed (``apt-get install otb-bin``);
(d) with ``--rgb``, ``tuban compare`` on the smallest pair's RGB bands only: the learned
    detector and building network, what sub-metre RGB imagery gets;
(e) with ``--rerun``, ``tuban classify`` on a finished compare of the smallest pair: a stage
    rerun that reads the stored decisions instead of running the models;
(f) with ``--reproject``, ``tuban compare`` on the smallest pair with the working grid in
    CGCS2000 (EPSG:4547, as a bureau's config has it) instead of the pair's own UTM grid:
    every block and evidence chip is then warped;

and reports wall time, throughput (Mpx/s of one date), peak memory (RSS and PSS summed over
the process tree, sampled with psutil every 50 ms; PSS counts pages shared by forked workers
once) and the ratios tuban/floor and tuban/OTB. Each command runs twice: memory is sampled in
the first run, the wall time is the second's (sampling slows a process tree). A
scene with ~100,000 small changes times vectorize, track and export at scale, and ``--dask``
compares one and two local Dask workers on the 8000² pair (default configuration, no evidence
PNGs), beside what this machine gives for two copies of the same work at once (its parallel
ceiling).

    .venv/bin/python bench/speed.py --sizes 4000 8000 16000 [--many] [--dask] [--rgb] [--rerun]
        [--reproject] [--no-otb]

Prints a table and writes ``bench/out/speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
from affine import Affine
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
OUT = HERE / "out"
TUBAN = ROOT / ".venv" / "bin" / "tuban"
PYTHON = ROOT / ".venv" / "bin" / "python"

#: reflectance spectra (blue, green, red, nir)
VEG = np.array([0.03, 0.06, 0.04, 0.38], np.float32)
SOIL = np.array([0.10, 0.13, 0.17, 0.24], np.float32)
BUILT = np.array([0.16, 0.17, 0.18, 0.20], np.float32)
ROAD = np.array([0.08, 0.09, 0.10, 0.12], np.float32)
ROOF = np.array([0.30, 0.31, 0.32, 0.33], np.float32)
RED_ROOF = np.array([0.10, 0.10, 0.26, 0.28], np.float32)
CHUNK = 1024  # generator window


# ------------------------------------------------------------------------------ generator


def _lattice(seed: int, size: int, cell: int) -> np.ndarray:
    n = size // cell + 3
    return np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)


def _value_noise(lat: np.ndarray, cell: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Bilinear value noise of lattice ``lat`` (one value per ``cell`` px) on a window."""
    y = (r0 + np.arange(h, dtype=np.float64)) / cell
    x = (c0 + np.arange(w, dtype=np.float64)) / cell
    i, j = y.astype(int), x.astype(int)
    fy, fx = (y - i).astype(np.float32)[:, None], (x - j).astype(np.float32)[None, :]
    # smoothstep for less grid-like texture
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    a, b = lat[np.ix_(i, j)], lat[np.ix_(i, j + 1)]
    c, d = lat[np.ix_(i + 1, j)], lat[np.ix_(i + 1, j + 1)]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


@dataclass(frozen=True)
class Change:
    r: int
    c: int
    h: int
    w: int
    kind: int  # 0 roof, 1 red roof, 2 cleared soil


def planted_changes(size: int, seed: int, n: int | None = None) -> list[Change]:
    """About one 6..30 px change per 300² px, seeded."""
    rng = np.random.default_rng(seed + 7)
    n = n if n is not None else max(8, size * size // 90_000)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(6, 31, 2))
        r, c = (int(v) for v in rng.integers(8, size - 40, 2))
        out.append(Change(r, c, h, w, int(rng.integers(0, 3))))
    return out


def grid_changes(size: int, spacing: int = 12, side: int = 6) -> list[Change]:
    """A regular lattice of small roofs: ~(size/spacing)² changes (the 100k-patch scene)."""
    pos = range(spacing, size - spacing, spacing)
    return [Change(r, c, side, side, 0) for r in pos for c in pos]


def _scene_window(r0: int, c0: int, h: int, w: int, lats: dict[str, np.ndarray],
                  seed: int, period: int, changes: list[Change], plain: bool) -> np.ndarray:
    """Reflectance (4, h, w) of the synthetic district on one window, for one period."""
    land = 0.75 * _value_noise(lats["coarse"], 400, r0, c0, h, w) \
        + 0.35 * _value_noise(lats["mid"], 48, r0, c0, h, w)
    tex = _value_noise(lats["fine"], 6, r0, c0, h, w)
    if plain:
        land = np.full_like(land, 1.0)
    img = np.empty((4, h, w), np.float32)
    veg, built = land > 0.1, land < -0.45
    for b in range(4):
        v = np.where(veg, VEG[b], np.where(built, BUILT[b], SOIL[b]))
        img[b] = v * (1.0 + 0.18 * tex)
    rows = (r0 + np.arange(h))[:, None]
    cols = (c0 + np.arange(w))[None, :]
    road = ((rows % 397) < 5) | ((cols % 433) < 5)
    if not plain:
        img[:, road] = ROAD[:, None]
    # houses in built-up land: a grid of 10x12 roofs, same in both periods
    house = built & ((rows % 23) < 10) & ((cols % 19) < 12)
    img[:, house] = ROOF[:, None] * 0.9
    if period == 1:
        for ch in changes:
            rr0, cc0 = max(ch.r, r0), max(ch.c, c0)
            rr1, cc1 = min(ch.r + ch.h, r0 + h), min(ch.c + ch.w, c0 + w)
            if rr0 >= rr1 or cc0 >= cc1:
                continue
            spec = (ROOF, RED_ROOF, SOIL)[ch.kind]
            img[:, rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = spec[:, None, None]
        img *= np.float32(1.04)  # a global gain the normalisation must absorb
    rng = np.random.default_rng([seed, period, r0, c0])
    img += rng.normal(0.0, 0.004, img.shape).astype(np.float32)
    return img


def make_pair(size: int, seed: int = 0, *, kind: str = "scene") -> tuple[Path, Path]:
    """Cached before/after GeoTIFFs (uint16 DN = reflectance * 10000, 256² deflate tiles)."""
    name = f"{kind}-{size}-s{seed}"
    before, after = CACHE / f"{name}-before.tif", CACHE / f"{name}-after.tif"
    if before.exists() and after.exists():
        return before, after
    CACHE.mkdir(parents=True, exist_ok=True)
    lats = {"coarse": _lattice(seed, size, 400), "mid": _lattice(seed + 1, size, 48),
            "fine": _lattice(seed + 2, size, 6)}
    plain = kind == "many"
    changes = grid_changes(size) if plain else planted_changes(size, seed)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 4,
               "dtype": "uint16", "crs": "EPSG:32650", "nodata": 0,
               "transform": Affine(1.0, 0.0, 500_000.0, 0.0, -1.0, 2_600_000.0),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
               "interleave": "pixel", "BIGTIFF": "IF_SAFER"}
    for period, path in enumerate((before, after)):
        tmp = path.with_suffix(".part.tif")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.descriptions = ("blue", "green", "red", "nir")
            for r0 in range(0, size, CHUNK):
                for c0 in range(0, size, CHUNK):
                    h, w = min(CHUNK, size - r0), min(CHUNK, size - c0)
                    img = _scene_window(r0, c0, h, w, lats, seed, period, changes, plain)
                    dn = np.clip(np.rint(img * 10_000), 1, 65_535).astype(np.uint16)
                    dst.write(dn, window=Window(c0, r0, w, h))
        tmp.rename(path)
    meta = {"size": size, "seed": seed, "kind": kind, "n_changes": len(changes)}
    (CACHE / f"{name}.json").write_text(json.dumps(meta))
    return before, after


# ------------------------------------------------------------------------------ measuring


class PeakRSS:
    """Samples the memory of a process and all its descendants.

    ``peak`` is the largest sum of RSS (counts pages shared between forked workers once per
    process, so it overstates); ``peak_pss`` the largest sum of PSS (shared pages split
    between the processes that share them: the honest figure for a process tree).
    """

    def __init__(self, pid: int, interval: float = 0.05, pss_every: int = 5) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval, pss_every), daemon=True)
        self._t.start()

    def _run(self, interval: float, pss_every: int) -> None:
        # RSS (cheap) every sample; PSS (the kernel walks the page tables, holding each
        # process's mmap lock) every ``pss_every``-th: sampling PSS every 50 ms slowed a 4 s
        # tuban run by 0.5 s on 2 cores
        k = 0
        procs: list[psutil.Process] = []
        while not self._stop.is_set():
            if k % pss_every == 0:  # the tree changes rarely: refresh it with the PSS
                try:
                    procs = [self.proc, *self.proc.children(recursive=True)]
                except psutil.Error:
                    procs = []
            rss = pss = 0
            for p in procs:
                try:
                    if k % pss_every == 0:
                        m = p.memory_full_info()
                        pss += getattr(m, "pss", m.rss)
                    else:
                        m = p.memory_info()
                    rss += m.rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss)
            if k % pss_every == 0:
                self.peak_pss = max(self.peak_pss, pss)
            k += 1
            self._stop.wait(interval)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._t.join()
        return self.peak, self.peak_pss


def run_cmd(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 7200,
            sample: bool = True) -> dict[str, Any]:
    """Run a command; wall seconds, return code and (``sample``) the peak RSS and PSS of its
    process tree (MiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    mon = PeakRSS(p.pid) if sample else None
    out, err = p.communicate(timeout=timeout)
    wall = time.perf_counter() - t0
    res: dict[str, Any] = {"wall_s": round(wall, 3), "returncode": p.returncode}
    if mon is not None:
        peak, peak_pss = mon.stop()
        res.update(peak_rss_mib=round(peak / 2**20, 1), peak_pss_mib=round(peak_pss / 2**20, 1))
    if p.returncode != 0:
        res["stderr"] = err[-2000:]
    return res


_READ_SNIPPET = """
import sys, rasterio
for path in sys.argv[1:]:
    with rasterio.open(path) as src:
        for _, win in src.block_windows(1):
            src.read(window=win)
"""


def _read_cmd(before: Path, after: Path) -> list[str]:
    """Read both images fully, block by block, in one process (the I/O floor)."""
    return [str(PYTHON), "-c", _READ_SNIPPET, str(before), str(after)]


def io_floor(before: Path, after: Path, sample: bool = True) -> dict[str, Any]:
    return run_cmd(_read_cmd(before, after), sample=sample)


_KERNEL_SNIPPET = """
import time, numpy as np
a = np.random.default_rng(0).random((1024, 1024), np.float32)
t = time.perf_counter()
for _ in range(150):
    b = np.sqrt(a * a + 1.0); b.sum()
print(time.perf_counter() - t)
"""


def _concurrent(cmd: list[str], n: int) -> tuple[float, list[str]]:
    """Wall time of ``n`` copies of ``cmd`` started together, and what each printed."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate()[0] for p in procs]
    return time.perf_counter() - t0, outs


def machine_scaling(before: Path, after: Path) -> dict[str, Any]:
    """How much faster this machine does two copies of the same work at once than one after
    the other (2.0 on two independent cores): reading both images (decompression, memory
    copies) and a float32 numpy kernel. The ceiling for any two-worker speed-up here."""
    out: dict[str, Any] = {}
    kern = [str(PYTHON), "-c", _KERNEL_SNIPPET]
    for name, cmd, inner in (("read_both_images", _read_cmd(before, after), False),
                             ("numpy_kernel", kern, True)):
        _concurrent(cmd, 1)  # warm the page cache
        t1, o1 = _concurrent(cmd, 1)
        t2, o2 = _concurrent(cmd, 2)
        if inner:  # the kernel's own timing, without interpreter start-up
            t1, t2 = float(o1[0]), max(float(x) for x in o2)
        out[name] = {"one_s": round(t1, 3), "two_at_once_s": round(t2, 3),
                     "scaling": round(2 * t1 / t2, 2)}
    return out


#: the generated pairs' visible bands, for the RGB-only run (``--rgb``)
RGB_BANDS = "red=3,green=2,blue=1"
#: the working grid of ``--reproject``: CGCS2000 / 3-degree Gauss-Kruger CM 114E
REPROJECT_CRS = "EPSG:4547"


def tuban_compare(before: Path, after: Path, *, config: Path | None = None,
                  workers: int | None = None, scheduler: str | None = None,
                  bands: str | None = None, sample: bool = True) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="tuban-bench-")) / "out"
    cmd = [str(TUBAN), "compare", str(before), str(after), "-o", str(out)]
    if bands is not None:
        cmd += ["--bands", bands]
    if config is not None:
        cmd += ["--config", str(config)]
    if workers:
        cmd += ["--workers", str(workers)]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    res = run_cmd(cmd, sample=sample)
    man = out / "run.json"
    if man.exists():
        m = json.loads(man.read_text())
        res["stages_s"] = m.get("timings_s")
        res["patches"] = m.get("counts", {}).get("patches")
        res["detector"] = m.get("detector")
    shutil.rmtree(out.parent, ignore_errors=True)
    return res


def tuban_rerun(before: Path, after: Path, *, stage: str = "classify",
                sample: bool = True) -> dict[str, Any]:
    """``tuban compare`` (not timed), then ``tuban STAGE`` on its output (timed): a stage
    rerun, e.g. classify applying a new permit layer to a finished run."""
    out = Path(tempfile.mkdtemp(prefix="tuban-bench-")) / "out"
    first = run_cmd([str(TUBAN), "compare", str(before), str(after), "-o", str(out)],
                    sample=False)
    res = run_cmd([str(TUBAN), stage, str(out)], sample=sample)
    res["returncode"] = max(first["returncode"], res["returncode"])
    man = out / "run.json"
    if man.exists():
        res["stages_s"] = json.loads(man.read_text()).get("timings_s")
    shutil.rmtree(out.parent, ignore_errors=True)
    return res


def otb_mad(before: Path, after: Path, sample: bool = True) -> dict[str, Any] | None:
    exe = shutil.which("otbcli_MultivariateAlterationDetector")
    if exe is None:
        return None
    out = Path(tempfile.mkdtemp(prefix="otb-bench-")) / "mad.tif"
    res = run_cmd([exe, "-in1", str(before), "-in2", str(after), "-out", str(out)],
                  env={"OTB_MAX_RAM_HINT": "512"}, sample=sample)
    shutil.rmtree(out.parent, ignore_errors=True)
    return res


def _config(tmp: Path, crs: str = "EPSG:32650", **detection: Any) -> Path:
    import yaml

    tag = "-".join(f"{k}{v}" for k, v in detection.items()) or "default"
    p = tmp / f"bench-{tag}-{crs.replace(':', '')}.yaml"
    # the generated pairs are EPSG:32650 at 1 m; compare takes the grid from the config
    data: dict[str, Any] = {"name": "bench", "crs": crs, "resolution": 1.0,
                            "periods": [{"name": "x", "images": ["x"]},
                                        {"name": "y", "images": ["y"]}]}
    if detection:
        data["detection"] = detection
    p.write_text(yaml.safe_dump(data))
    return p


def _default_detector() -> str:
    out = subprocess.run([str(PYTHON), "-c",
                          "from pipeline.detect.registry import get_detector as g;"
                          "d=g('auto',('blue','green','red','nir'),1.0);"
                          "print(type(getattr(d,'det',d)).__name__)"],
                         capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "unknown"


# --------------------------------------------------------------------------------- main


def _mpx_s(size: int, wall: float) -> float:
    return round(size * size / 1e6 / wall, 2) if wall else math.nan


def _dask_speedup(before: Path, after: Path, cfg: Path) -> dict[str, Any]:
    """One and two local Dask workers on the same pair: each new cluster runs the pair twice,
    cold (workers import tuban during the run) and warm (as on a long-lived cluster)."""
    from distributed import LocalCluster

    out: dict[str, Any] = {}
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster:
            for state in ("cold", "warm"):
                out[f"workers_{n}_{state}"] = tuban_compare(before, after, config=cfg,
                                                            scheduler=cluster.scheduler_address)
    for state in ("cold", "warm"):
        w1, w2 = out[f"workers_1_{state}"]["wall_s"], out[f"workers_2_{state}"]["wall_s"]
        out[f"speedup_2_vs_1_{state}"] = round(w1 / w2, 2) if w2 else None
        d1 = (out[f"workers_1_{state}"].get("stages_s") or {}).get("detect")
        d2 = (out[f"workers_2_{state}"].get("stages_s") or {}).get("detect")
        out[f"detect_speedup_2_vs_1_{state}"] = round(d1 / d2, 2) if d1 and d2 else None
    return out


def _bench_size(size: int, args: argparse.Namespace, detector: str,
                spectral_cfg: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    before, after = make_pair(size, args.seed)
    r: dict[str, Any] = {"generate_s": round(time.perf_counter() - t0, 2)}
    r["floor"] = _timed(io_floor, before, after)
    r["tuban"] = _timed(tuban_compare, before, after)
    if detector != "SpectralDetector" and not args.no_spectral:
        r["tuban_spectral"] = _timed(tuban_compare, before, after, config=spectral_cfg)
    if not args.no_otb and shutil.which("otbcli_MultivariateAlterationDetector"):
        r["otb"] = _timed(otb_mad, before, after)
    if args.rgb and size == min(args.sizes):
        r["tuban_rgb"] = _timed(tuban_compare, before, after, bands=RGB_BANDS)
    if args.rerun and size == min(args.sizes):
        r["tuban_classify"] = _timed(tuban_rerun, before, after, stage="classify")
    if args.reproject and size == min(args.sizes):
        cfg = _config(spectral_cfg.parent, crs=REPROJECT_CRS)
        r["tuban_cgcs2000"] = _timed(tuban_compare, before, after, config=cfg)
    return r


def _timed(fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
    """``fn`` run twice: once with memory sampling (its peaks), once without (its wall time;
    reading every process's PSS costs CPU, more for tuban's four processes than for one)."""
    mem = fn(*args, sample=True, **kw)
    t = fn(*args, sample=False, **kw)
    return {**mem, "wall_s": t["wall_s"], "wall_s_while_sampling": mem["wall_s"],
            "returncode": max(mem["returncode"], t["returncode"]),
            **({"stages_s": t["stages_s"]} if t.get("stages_s") else {})}


def _rows(size: int, r: dict[str, Any]) -> list[dict]:
    rows = []
    for label in ("floor", "tuban", "tuban_spectral", "tuban_rgb", "tuban_classify",
                  "tuban_cgcs2000", "otb"):
        x = r.get(label)
        if not x:
            continue
        row = {"size": size, "what": label, "wall_s": x["wall_s"],
               "mpx_s": _mpx_s(size, x["wall_s"]), "peak_rss_mib": x["peak_rss_mib"],
               "peak_pss_mib": x.get("peak_pss_mib"), "rc": x["returncode"]}
        if label.startswith("tuban"):
            row["x_floor"] = round(x["wall_s"] / r["floor"]["wall_s"], 2)
            if r.get("otb") and r["otb"]["returncode"] == 0:
                row["x_otb"] = round(x["wall_s"] / r["otb"]["wall_s"], 2)
        if label in ("tuban_classify", "tuban_cgcs2000"):
            row["x_compare"] = round(x["wall_s"] / r["tuban"]["wall_s"], 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000, 16000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-otb", action="store_true", help="skip OTB even when installed")
    ap.add_argument("--no-spectral", action="store_true",
                    help="skip the extra spectral-only run when the default differs")
    ap.add_argument("--rgb", action="store_true",
                    help="also time the smallest pair as RGB only (learned detector and "
                         "building network, what sub-metre RGB imagery gets)")
    ap.add_argument("--rerun", action="store_true",
                    help="also time `tuban classify` on a compare of the smallest pair (a "
                         "stage rerun with the stored decisions: no models run)")
    ap.add_argument("--reproject", action="store_true",
                    help="also time the smallest pair on a CGCS2000 grid (every read warped)")
    ap.add_argument("--many", action="store_true",
                    help="also time a 4000² scene with ~100,000 small changes")
    ap.add_argument("--dask", action="store_true",
                    help="also time 1 vs 2 local Dask workers on the 8000² pair")
    ap.add_argument("--out", type=Path, default=OUT / "speed.json")
    ap.add_argument("--summary", type=Path, default=None,
                    help="only print the bench/RESULTS.md table of a speed.json written earlier")
    args = ap.parse_args(argv)
    if args.summary is not None:
        rep = json.loads(args.summary.read_text())
        print(summary_markdown(rep, rep.get("table", [])))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="tuban-bench-cfg-"))
    spectral_cfg = _config(tmp, method="spectral")
    detector = _default_detector()
    report: dict[str, Any] = {"machine": {"cpus": len(os.sched_getaffinity(0)),
                                          "load_avg": os.getloadavg(),
                                          "mem_gib": round(psutil.virtual_memory().total
                                                           / 2**30, 1)},
                              "default_detector": detector, "sizes": {}}
    rows: list[dict] = []
    for size in args.sizes:
        r = _bench_size(size, args, detector, spectral_cfg)
        report["sizes"][str(size)] = r
        rows += _rows(size, r)
        _print_rows(_rows(size, r))
        _write(args.out, report, rows)
    sizes = [s for s in args.sizes if "tuban" in report["sizes"].get(str(s), {})]
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        for key in ("peak_rss_mib", "peak_pss_mib"):
            m_lo = report["sizes"][str(lo)]["tuban"][key]
            m_hi = report["sizes"][str(hi)]["tuban"][key]
            report[f"memory_ratio_{key}_largest_vs_smallest"] = round(m_hi / m_lo, 2)
    if args.many:
        before, after = make_pair(4000, args.seed, kind="many")
        noev = tmp / "noevidence.yaml"
        noev.write_text("name: many\ncrs: EPSG:32650\nresolution: 1.0\n"
                        "periods: [{name: x, images: [x]}, {name: y, images: [y]}]\n"
                        "detection: {method: spectral}\noutput: {evidence: false}\n")
        report["many_changes"] = {"n_planted": len(grid_changes(4000)),
                                  "tuban_spectral_no_evidence": tuban_compare(
                                      before, after, config=noev)}
    if args.dask:
        before, after = make_pair(8000, args.seed)
        # the default detector, block work only: evidence chips (export, serial) would dilute
        # the comparison
        dask_cfg = tmp / "dask.yaml"
        dask_cfg.write_text(_config(tmp).read_text() + "output: {evidence: false}\n")
        report["dask_8000"] = _dask_speedup(before, after, dask_cfg)
        report["machine"]["parallel_scaling"] = machine_scaling(before, after)
    _write(args.out, report, rows)
    print()
    _print_rows(rows)
    for key in ("memory_ratio_peak_rss_mib_largest_vs_smallest",
                "memory_ratio_peak_pss_mib_largest_vs_smallest"):
        if key in report:
            print(f"{key}: {report[key]}")
    if "many_changes" in report:
        m = report["many_changes"]["tuban_spectral_no_evidence"]
        print(f"100k-change scene: {m['wall_s']} s, {m.get('patches')} patches, "
              f"stages {m.get('stages_s')}")
    if "dask_8000" in report:
        print(_dask_line(report["dask_8000"]))
        print(_scaling_line(report["machine"]))
    print()
    print(summary_markdown(report, rows))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _dask_line(d: dict[str, Any]) -> str:
    parts = [f"{st}: 1 worker {d[f'workers_1_{st}']['wall_s']} s, 2 workers "
             f"{d[f'workers_2_{st}']['wall_s']} s, speed-up {d[f'speedup_2_vs_1_{st}']} (detect "
             f"stage {d[f'detect_speedup_2_vs_1_{st}']})" for st in ("cold", "warm")]
    return "Dask 8000² (LocalCluster, 1 thread/worker) " + "; ".join(parts)


def _scaling_line(machine: dict[str, Any]) -> str:
    sc = machine.get("parallel_scaling") or {}
    parts = [f"{k.replace('_', ' ')} {v['one_s']} s alone, {v['two_at_once_s']} s two at once "
             f"({v['scaling']}×)" for k, v in sc.items()]
    return "machine, two copies of the same work at once vs one: " + "; ".join(parts)


def summary_markdown(report: dict[str, Any], rows: list[dict]) -> str:
    """The bench/RESULTS.md table: one row per size and command, then memory scaling, the
    100k-change scene and the Dask speed-up (with the issue's targets)."""
    out = ["| size | what | wall s | Mpx/s | peak RSS MiB | peak PSS MiB | × floor | × OTB |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['size']}² | {r['what']} | {r['wall_s']} | {r['mpx_s']} | "
                   f"{r['peak_rss_mib']} | {r.get('peak_pss_mib', '')} | "
                   f"{r.get('x_floor', '')} | {r.get('x_otb', '')} |")
    out.append("")
    tub = {r["size"]: r for r in rows if r["what"] == "tuban"}
    if tub:
        lo = min(tub)
        t = tub[lo]
        out.append(f"- {lo}²: tuban/floor {t.get('x_floor')} (target ≤ 3), tuban/OTB "
                   f"{t.get('x_otb')} (target ≤ 0.5)")
        hi = max(tub)
        out.append(f"- peak PSS at {hi}²: {tub[hi].get('peak_pss_mib')} MiB, RSS "
                   f"{tub[hi]['peak_rss_mib']} MiB (target < 1024)")
    for r in rows:
        if r["what"] == "tuban_classify":
            out.append(f"- {r['size']}²: `tuban classify` on the finished compare (stored "
                       f"decisions, no models) {r['wall_s']} s, {r['x_compare']}× the compare")
        if r["what"] == "tuban_cgcs2000":
            out.append(f"- {r['size']}²: `tuban compare` on a CGCS2000 grid (every read "
                       f"warped) {r['wall_s']} s, {r['x_compare']}× the compare on the pair's "
                       "own grid")
    for key in ("memory_ratio_peak_rss_mib_largest_vs_smallest",
                "memory_ratio_peak_pss_mib_largest_vs_smallest"):
        if key in report:
            out.append(f"- {key.replace('_', ' ')}: {report[key]} (target ≤ 1.3)")
    if "many_changes" in report:
        m = report["many_changes"]["tuban_spectral_no_evidence"]
        out.append(f"- 4000² with {report['many_changes']['n_planted']} planted changes: "
                   f"{m['wall_s']} s, {m.get('patches')} patches, peak PSS "
                   f"{m.get('peak_pss_mib')} MiB, stages {m.get('stages_s')}")
    if "dask_8000" in report:
        out.append(f"- {_dask_line(report['dask_8000'])}; target ≥ 1.6")
        out.append(f"- {_scaling_line(report.get('machine', {}))}")
    load = report.get("machine", {}).get("load_avg")
    if load:
        out.append(f"- machine: {report['machine'].get('cpus')} CPUs, load average at start "
                   f"{[round(x, 2) for x in load]}")
    return "\n".join(out)


def _write(path: Path, report: dict[str, Any], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "table": rows}, indent=2, default=str))


def _print_rows(rows: list[dict]) -> None:
    cols = ("size", "what", "wall_s", "mpx_s", "peak_rss_mib", "peak_pss_mib", "x_floor",
            "x_otb", "rc")
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{str(r.get(c, '')):>14}" for c in cols))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
