"""The patch register: which patches were issued before, and what became of them.

The pure core is :func:`match`: it compares the patches of a run with the register and returns
the patches with ``patch_id``, ``first_seen`` and ``status``, the updated register and the
history rows. :class:`Register` is the I/O edge: a GeoPackage with a ``patches`` layer (one
row per patch ever issued) and a ``history`` table, updated under a file lock and replaced
atomically (the previous file is kept as ``<name>.bak``).

Statuses:
    ``new``: no registered patch there; issued.
    ``persisting``: matches a registered patch and has not grown; not re-issued.
    ``grown``: matches, but area > ``grow_ratio`` x the last issued area; re-issued.
    ``reappeared``: matches a patch verified ``rectified`` (closed); re-issued.
    ``suppressed``: matches a patch verified ``false_positive`` or ``legal_permit`` and has not
    grown; not issued.

A registered patch keeps the footprint it was last issued with, so slow growth over several
runs still adds up to ``grown``.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from .atomic import atomic_write, file_lock
from .errors import RegisterError
from .grid import norm_crs
from .types import VIOLATIONS

#: Field verification results analysts can import.
VERIFICATIONS: tuple[str, ...] = ("verified_violation", "false_positive", "legal_permit",
                                  "rectified")
#: Common Chinese / short spellings analysts use, mapped to :data:`VERIFICATIONS`.
VERIFICATION_ALIASES: dict[str, str] = {
    "violation": "verified_violation", "属实": "verified_violation",
    "违法": "verified_violation", "确认违法": "verified_violation",
    "fp": "false_positive", "误报": "false_positive", "不属实": "false_positive",
    "permit": "legal_permit", "legal": "legal_permit", "合法": "legal_permit",
    "有证": "legal_permit", "已整改": "rectified", "整改": "rectified", "已拆除": "rectified",
}
#: Statuses that put a patch on the task list (when it is a violation category).
ISSUED: tuple[str, ...] = ("new", "grown", "reappeared")
STATUSES: tuple[str, ...] = ("new", "persisting", "grown", "reappeared", "suppressed")

#: Categories that may turn into one another between runs and still be the same patch.
CATEGORY_FAMILY: dict[str, str] = {
    "illegal_construction": "violation",
    "forest_grave": "violation",
    "land_occupation": "violation",
    "other_change": "other",
}

REGISTER_COLUMNS: tuple[str, ...] = (
    "patch_id", "category", "area_m2", "first_seen", "last_seen", "first_run", "last_run",
    "status", "verification", "verified_at", "note", "times_seen")
HISTORY_COLUMNS: tuple[str, ...] = ("patch_id", "run_id", "date", "status", "area_m2")
_DEFAULT_ADMIN = "000000000"


# --------------------------------------------------------------------------- pure core


def empty_register(crs: Any) -> gpd.GeoDataFrame:
    """An empty register table with the right columns and dtypes."""
    cols: dict[str, Any] = {c: pd.Series(dtype=object) for c in REGISTER_COLUMNS}
    cols["area_m2"] = pd.Series(dtype="float64")
    cols["times_seen"] = pd.Series(dtype="int64")
    return gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def empty_history() -> pd.DataFrame:
    """An empty history table."""
    df = pd.DataFrame({c: pd.Series(dtype=object) for c in HISTORY_COLUMNS})
    df["area_m2"] = df["area_m2"].astype("float64")
    return df


def _family(category: object) -> str:
    return CATEGORY_FAMILY.get(str(category), str(category))


def _is_blank(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() in ("", "nan",
                                                                                        "None")


def _date8(value: object, fallback: str) -> str:
    s = fallback if _is_blank(value) else str(value)
    digits = "".join(ch for ch in s[:10] if ch.isdigit())
    return digits[:8].ljust(8, "0")


def make_patch_ids(new: gpd.GeoDataFrame, *, run_date: str,
                   taken: Iterable[str] = ()) -> list[str]:
    """Deterministic ids ``TB-{admin_code}-{YYYYMMDD}-{8 hex}`` for the rows of ``new``.

    The hash is of the category and the centroid rounded to 1 m in the working CRS, so the
    same run gives the same ids. Collisions (with each other or ``taken``) are resolved
    deterministically by re-hashing with a counter, in order of the hash key.

    Args:
        new: Patches in the working CRS (``category``; optional ``admin_code``, ``after_date``).
        run_date: ISO date used when ``after_date`` is missing.
        taken: Ids already in use (e.g. the register's).

    Returns:
        One id per row, in row order.
    """
    n = len(new)
    if n == 0:
        return []
    cent = shapely.centroid(np.asarray(new.geometry.values))
    xs = np.round(shapely.get_x(cent)).astype("int64")
    ys = np.round(shapely.get_y(cent)).astype("int64")
    admin = new["admin_code"].tolist() if "admin_code" in new else [None] * n
    after = new["after_date"].tolist() if "after_date" in new else [None] * n
    cats = new["category"].astype(str).tolist()
    prefixes = [f"TB-{_DEFAULT_ADMIN if _is_blank(a) else str(a).strip()}-{_date8(d, run_date)}"
                for a, d in zip(admin, after, strict=True)]
    keys = [f"{c}|{x}|{y}" for c, x, y in zip(cats, xs.tolist(), ys.tolist(), strict=True)]
    used = set(taken)
    out: list[str] = [""] * n
    for i in sorted(range(n), key=lambda i: (prefixes[i], keys[i])):
        k = 0
        while True:
            salt = keys[i] if k == 0 else f"{keys[i]}|{k}"
            pid = f"{prefixes[i]}-{hashlib.sha1(salt.encode()).hexdigest()[:8]}"
            if pid not in used:
                break
            k += 1
        used.add(pid)
        out[i] = pid
    return out


def _candidate_pairs(new: gpd.GeoDataFrame, register: gpd.GeoDataFrame,
                     min_overlap: float) -> pd.DataFrame:
    """Pairs (new index, register index) that overlap enough and share a category family."""
    cols = ["ni", "ri", "overlap", "inter", "same"]
    if len(new) == 0 or len(register) == 0:
        return pd.DataFrame({c: [] for c in cols})
    geoms_new = np.asarray(new.geometry.values)
    ni, ri = register.sindex.query(geoms_new, predicate="intersects")
    if len(ni) == 0:
        return pd.DataFrame({c: [] for c in cols})
    g_new = geoms_new[ni]
    g_reg = np.asarray(register.geometry.values)[ri]
    inter = shapely.area(shapely.intersection(g_new, g_reg))
    denom = np.minimum(shapely.area(g_new), shapely.area(g_reg))
    overlap = np.divide(inter, denom, out=np.zeros_like(inter), where=denom > 0)
    cat_new = new["category"].astype(str).to_numpy()[ni]
    cat_reg = register["category"].astype(str).to_numpy()[ri]
    fam_ok = np.array([_family(a) == _family(b) for a, b in zip(cat_new, cat_reg, strict=True)],
                      dtype=bool)
    keep = (overlap >= min_overlap) & fam_ok
    return pd.DataFrame({"ni": ni[keep], "ri": ri[keep], "overlap": overlap[keep],
                         "inter": inter[keep], "same": (cat_new == cat_reg)[keep]})


def _assign(pairs: pd.DataFrame) -> tuple[dict[int, int], dict[int, int]]:
    """Greedy one-to-one assignment (same category first, then overlap, then shared area).

    Returns:
        ``primary`` new -> register for one-to-one matches, and ``secondary`` new -> register
        for new patches whose best register patch was taken by another piece (a split patch).
    """
    if len(pairs) == 0:
        return {}, {}
    order = pairs.sort_values(["same", "overlap", "inter", "ni", "ri"],
                              ascending=[False, False, False, True, True], kind="mergesort")
    primary: dict[int, int] = {}
    secondary: dict[int, int] = {}
    used_r: set[int] = set()
    for n, r in zip(order["ni"].astype(int), order["ri"].astype(int), strict=True):
        if n in primary:
            continue
        if r not in used_r:
            primary[n] = r
            used_r.add(r)
            secondary.pop(n, None)
        elif n not in secondary:
            secondary[n] = r
    return primary, secondary


def _reference_areas(pairs: pd.DataFrame, register: gpd.GeoDataFrame) -> dict[int, float]:
    """Per new patch, the area it is compared with: the union of the patches it overlaps."""
    reg_area = register["area_m2"].to_numpy(dtype="float64")
    geoms = np.asarray(register.geometry.values)
    out: dict[int, float] = {}
    for n, rs in pairs.groupby("ni")["ri"]:
        rs = np.unique(rs.to_numpy(dtype="int64"))
        out[int(n)] = (float(reg_area[rs[0]]) if len(rs) == 1
                       else float(shapely.area(shapely.union_all(geoms[rs]))))
    return out


def _areas(new: gpd.GeoDataFrame) -> np.ndarray:
    """``area_m2`` where given and finite, else the geometry's area."""
    geom_area = shapely.area(np.asarray(new.geometry.values)).astype("float64")
    if "area_m2" not in new:
        return geom_area
    area = new["area_m2"].astype("float64").to_numpy().copy()
    bad = ~np.isfinite(area)
    area[bad] = geom_area[bad]
    return area


def _status_for(verification: object, grown: bool) -> str:
    v = None if _is_blank(verification) else str(verification)
    if v == "rectified":
        return "reappeared"
    if grown:
        return "grown"
    if v in ("false_positive", "legal_permit"):
        return "suppressed"
    return "persisting"


def match(new: gpd.GeoDataFrame, register: gpd.GeoDataFrame, *, run_date: str, run_id: str,
          grow_ratio: float = 1.2, min_overlap: float = 0.3,
          ) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, pd.DataFrame]:
    """Match a run's patches against the register (pure; near-linear via a spatial index).

    Args:
        new: This run's patches in the working CRS (``category``, geometry; ``area_m2``,
            ``admin_code`` and ``after_date`` are used when present).
        register: The register table (see :func:`empty_register`) in the same CRS.
        run_date: ISO date of the observation (normally the after-image date).
        run_id: This run's id. Re-matching a run already recorded reproduces its statuses.
        grow_ratio: A match is ``grown`` when its area exceeds this x the registered area.
        min_overlap: Intersection / smaller area needed for two patches to be the same.

    Returns:
        ``new`` with ``patch_id``, ``first_seen`` and ``status``; the updated register; the
        history rows of this run.

    Raises:
        RegisterError: The register is in another CRS than the patches.
    """
    new = new.reset_index(drop=True)
    reg = register.reset_index(drop=True).copy()
    if len(reg) and reg.crs is not None and new.crs is not None and reg.crs != new.crs:
        raise RegisterError(f"register CRS {reg.crs.to_string()} differs from the working CRS "
                            f"{new.crs.to_string()}; keep one register per working CRS")
    if reg.crs is None and new.crs is not None:
        reg = reg.set_crs(new.crs, allow_override=True)
    area = _areas(new)

    pairs = _candidate_pairs(new, reg, min_overlap)
    primary, secondary = _assign(pairs)
    ref_area = _reference_areas(pairs, reg)
    recs = reg.drop(columns="geometry").to_dict("records")
    ids = [""] * len(new)
    first_seen = [run_date] * len(new)
    status = ["new"] * len(new)
    rows_upd: dict[int, dict[str, Any]] = {}
    appended: list[int] = []  # new rows (by index in ``new``) that become register rows

    for n in range(len(new)):
        r = primary.get(n, secondary.get(n))
        if r is None:
            appended.append(n)
            continue
        rec = recs[r]
        same_run = str(rec["last_run"]) == run_id
        if same_run and n in primary:  # a rerun of a recorded run: reproduce it
            ids[n], first_seen[n], status[n] = rec["patch_id"], rec["first_seen"], rec["status"]
            continue
        grown = area[n] > grow_ratio * ref_area[n]
        st = _status_for(rec["verification"], grown)
        first_seen[n] = str(rec["first_seen"])
        status[n] = st
        if n in primary:
            ids[n] = str(rec["patch_id"])
            upd = {"last_seen": run_date, "last_run": run_id, "status": st,
                   "times_seen": int(rec["times_seen"]) + 1}
            if st in ISSUED:  # re-issued: new footprint, verification reopened
                upd.update(geometry=new.geometry.iloc[n], area_m2=float(area[n]),
                           category=str(new["category"].iloc[n]), verification=None,
                           verified_at=None)
            rows_upd[r] = upd
        else:  # a piece of a split patch: its own id, inherits the parent's state
            appended.append(n)

    fresh = make_patch_ids(new.iloc[appended], run_date=run_date,
                           taken=set(reg["patch_id"].astype(str)) | {i for i in ids if i})
    for n, pid in zip(appended, fresh, strict=True):
        ids[n] = pid

    for r, upd in rows_upd.items():
        for k, v in upd.items():
            reg.iat[r, reg.columns.get_loc(k)] = v
    if appended:
        add = _new_rows(new, appended, ids, first_seen, status, area, run_date, run_id)
        for j, n in enumerate(appended):  # a split piece inherits its parent's verification
            if n in secondary and status[n] == "suppressed":
                add.iat[j, add.columns.get_loc("verification")] = reg["verification"].iloc[
                    secondary[n]]
        reg = pd.concat([reg, add], ignore_index=True) if len(reg) else add
    reg = gpd.GeoDataFrame(reg, geometry="geometry", crs=new.crs or reg.crs)
    reg["times_seen"] = reg["times_seen"].astype("int64")
    reg["area_m2"] = reg["area_m2"].astype("float64")

    out = new.copy()
    out["patch_id"] = ids
    out["first_seen"] = first_seen
    out["status"] = status
    hist = pd.DataFrame({"patch_id": ids, "run_id": run_id, "date": run_date,
                         "status": status, "area_m2": area.astype("float64")})
    return out, reg, hist if len(hist) else empty_history()


#: history rows of imported field verification carry run ids with this prefix
VERIFICATION_RUN = "verification:"


def later_runs(history: pd.DataFrame, run_id: str) -> list[str]:
    """Runs recorded after ``run_id``'s rows in ``history`` (field verification aside)."""
    runs = history["run_id"].astype(str).tolist()
    if run_id not in runs:
        return []
    last = len(runs) - 1 - runs[::-1].index(run_id)
    return list(dict.fromkeys(r for r in runs[last + 1:]
                              if r != run_id and not r.startswith(VERIFICATION_RUN)))


def withdraw(register: gpd.GeoDataFrame, history: pd.DataFrame, run_id: str,
             kept: set[str]) -> gpd.GeoDataFrame:
    """Undo what an earlier pass of run ``run_id`` recorded for patches its rerun no longer
    reports (not in ``kept``; e.g. a new permit covers them): a patch it issued first leaves
    the register, one it saw again gets back its state before that run (from ``history``;
    the footprint of a re-issued patch stays the latest). A patch with a field verification
    stays as it is: the analysts' finding is kept. Pure."""
    last = register["last_run"].astype(str) == run_id
    stale = (last & ~register["patch_id"].astype(str).isin(kept)
             & register["verification"].isna())
    if not stale.any():
        return register
    reg = register.copy()
    first = stale & (reg["first_run"].astype(str) == run_id)
    earlier = history[(history["run_id"].astype(str) != run_id)
                      & ~history["run_id"].astype(str).str.startswith(VERIFICATION_RUN)]
    prev = earlier.groupby(earlier["patch_id"].astype(str)).tail(1).set_index("patch_id")
    for i in np.flatnonzero(stale & ~first):
        pid = str(reg["patch_id"].iloc[i])
        reg.iat[i, reg.columns.get_loc("times_seen")] = max(
            1, int(reg["times_seen"].iloc[i]) - 1)
        if pid in prev.index:
            row = prev.loc[pid]
            for col, val in (("last_seen", row["date"]), ("last_run", row["run_id"]),
                             ("status", row["status"])):
                reg.iat[i, reg.columns.get_loc(col)] = str(val)
    return reg[~first.to_numpy()].reset_index(drop=True)


def _new_rows(new: gpd.GeoDataFrame, idx: list[int], ids: list[str], first_seen: list[str],
              status: list[str], area: np.ndarray, run_date: str, run_id: str,
              ) -> gpd.GeoDataFrame:
    """Register rows for the patches ``idx`` of ``new`` that are not in the register yet."""
    return gpd.GeoDataFrame({
        "patch_id": [ids[n] for n in idx],
        "category": new["category"].astype(str).to_numpy()[idx],
        "area_m2": area[idx].astype("float64"),
        "first_seen": [first_seen[n] for n in idx],
        "last_seen": run_date, "first_run": run_id, "last_run": run_id,
        "status": [status[n] for n in idx],
        "verification": None, "verified_at": None, "note": None,
        "times_seen": np.ones(len(idx), dtype="int64"),
    }, geometry=np.asarray(new.geometry.values)[idx], crs=new.crs)


def issued(patches: pd.DataFrame) -> pd.Series:
    """Boolean mask of the patches that go on the task list (violations, issued statuses)."""
    cat_ok = patches["category"].isin(VIOLATIONS)
    if "status" not in patches:
        return cat_ok
    return cat_ok & patches["status"].isin(ISSUED)


# --------------------------------------------------------------------------- I/O edge


def _normalise_verification(value: object) -> str | None:
    if _is_blank(value):
        return None
    s = str(value).strip()
    key = s.lower().replace(" ", "_").replace("-", "_")
    if key in VERIFICATIONS:
        return key
    return VERIFICATION_ALIASES.get(key, VERIFICATION_ALIASES.get(s, "?" + s))


class Register:
    """The patch register stored as a GeoPackage (layers ``patches`` and ``history``).

    Args:
        path: The ``.gpkg`` file (created on the first update).
        lock_timeout_s: How long an update waits for a concurrent one.
    """

    def __init__(self, path: str | Path, lock_timeout_s: float = 600.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @property
    def backup_path(self) -> Path:
        """Where the previous version of the register is kept."""
        return self.path.with_name(self.path.name + ".bak")

    def _corrupt(self, err: object) -> RegisterError:
        why = f"{self.path}: the patch register cannot be read ({str(err).splitlines()[0]}); "
        if self.backup_path.exists():
            return RegisterError(why + f"restore it from {self.backup_path.name} (copy it over "
                                 f"{self.path.name}) and rerun")
        # written once, so no earlier version was kept
        return RegisterError(why + f"no earlier version ({self.backup_path.name}) is kept; "
                             "restore it from your own backup, or move it aside to start an "
                             "empty register (patches issued before will be issued again)")

    def load(self, crs: Any = None) -> gpd.GeoDataFrame:
        """Read the ``patches`` layer (an empty register in ``crs`` if the file is absent).

        Raises:
            RegisterError: The file exists but is not a readable register.
        """
        if not self.path.exists():
            return empty_register(crs)
        try:
            gdf = pyogrio.read_dataframe(self.path, layer="patches")
        except Exception as err:  # noqa: BLE001 - any GDAL/SQLite failure means corrupt
            raise self._corrupt(err) from None
        missing = [c for c in REGISTER_COLUMNS if c not in gdf.columns]
        if missing:
            raise self._corrupt(f"layer 'patches' lacks {missing}")
        return self._coerce(gdf)

    @staticmethod
    def _coerce(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        for c in REGISTER_COLUMNS:
            if c not in ("area_m2", "times_seen"):
                gdf[c] = gdf[c].astype(object).where(gdf[c].notna(), None)
        gdf["area_m2"] = gdf["area_m2"].astype("float64")
        gdf["times_seen"] = gdf["times_seen"].fillna(0).astype("int64")
        return gdf[[*REGISTER_COLUMNS, "geometry"]]

    def load_history(self) -> pd.DataFrame:
        """Read the ``history`` table (empty if the file is absent)."""
        if not self.path.exists():
            return empty_history()
        try:
            df = pyogrio.read_dataframe(self.path, layer="history", read_geometry=False)
        except Exception as err:  # noqa: BLE001
            raise self._corrupt(err) from None
        return pd.DataFrame(df)[list(HISTORY_COLUMNS)]

    def _write(self, reg: gpd.GeoDataFrame, history: pd.DataFrame) -> None:
        """Write a complete new GeoPackage to a temp file, keep a backup, then replace."""
        with atomic_write(self.path) as tmp:
            _write_layers(tmp, reg, history)
            if self.path.exists():  # hard-link the current file as the backup (no copy)
                bak_tmp = self.backup_path.with_name(self.backup_path.name + ".tmp")
                bak_tmp.unlink(missing_ok=True)
                try:
                    os.link(self.path, bak_tmp)
                except OSError:
                    shutil.copy2(self.path, bak_tmp)
                os.replace(bak_tmp, self.backup_path)

    def update(self, new_patches: gpd.GeoDataFrame, run_id: str, run_date: str,
               **match_kwargs: Any) -> gpd.GeoDataFrame:
        """Match a run's patches against the register and record them, under a file lock.

        Args:
            new_patches: This run's patches in the working CRS.
            run_id: The run's id.
            run_date: ISO date of the observation.
            **match_kwargs: ``grow_ratio``, ``min_overlap`` for :func:`match`.

        Returns:
            ``new_patches`` with ``patch_id``, ``first_seen`` and ``status``.
        """
        with file_lock(self.path, self.lock_timeout_s):
            reg = self.load(new_patches.crs)
            hist = self.load_history()
            later = later_runs(hist, run_id)
            if later:
                raise RegisterError(
                    f"{self.path}: run {later[-1]} was recorded after run {run_id}; only the "
                    f"latest run can be tracked again (start a new run instead)")
            out, reg, rows = match(new_patches, reg, run_date=run_date, run_id=run_id,
                                   **match_kwargs)
            # a rerun replaces its rows, and what it no longer reports is withdrawn
            reg = withdraw(reg, hist, run_id, set(out["patch_id"].astype(str)))
            hist = hist[hist["run_id"].astype(str) != run_id]
            hist = pd.concat([hist, rows], ignore_index=True) if len(hist) else rows
            self._write(reg, hist)
        return out

    def import_verification(self, path: str | Path, *, today: str | None = None) -> int:
        """Import field verification results from a CSV or vector file (GeoJSON, GPKG, ...).

        Rows need ``patch_id`` and ``verification`` (one of :data:`VERIFICATIONS`, or a
        common Chinese label such as 误报 / 已整改); ``verified_at`` and ``note`` are optional.
        Rows with a blank verification are skipped. Later rows win.

        Args:
            path: The analysts' file.
            today: Date recorded when ``verified_at`` is blank (default: today).

        Returns:
            The number of patches updated.

        Raises:
            RegisterError: Missing columns, unknown patch ids or bad verification values.
        """
        path = Path(path)
        rows = _read_table(path)
        today = today or dt.date.today().isoformat()
        for col in ("patch_id", "verification"):
            if col not in rows.columns:
                raise RegisterError(f"{path}: no '{col}' column; add columns 'patch_id' and "
                                    f"'verification' ({', '.join(VERIFICATIONS)})")
        todo: dict[str, tuple[str, str, str | None]] = {}
        for i, row in enumerate(rows.to_dict("records"), start=2):
            v = _normalise_verification(row["verification"])
            if v is None:
                continue
            if v.startswith("?"):
                raise RegisterError(f"{path}: row {i}: bad verification {v[1:]!r}; use one of "
                                    f"{', '.join(VERIFICATIONS)}")
            at = row.get("verified_at")
            note = row.get("note")
            todo[str(row["patch_id"]).strip()] = (
                v, today if _is_blank(at) else str(at)[:10], None if _is_blank(note) else
                str(note))
        with file_lock(self.path, self.lock_timeout_s):
            reg = self.load()
            known = dict(zip(reg["patch_id"].astype(str), range(len(reg)), strict=True))
            unknown = [p for p in todo if p not in known]
            if unknown:
                raise RegisterError(
                    f"{path}: {len(unknown)} patch_id(s) not in the register {self.path} "
                    f"(e.g. {unknown[0]!r}); fix or remove those rows and import again")
            if not todo:
                return 0
            hist = self.load_history()
            new_hist = []
            for pid, (v, at, note) in todo.items():
                r = known[pid]
                reg.iat[r, reg.columns.get_loc("verification")] = v
                reg.iat[r, reg.columns.get_loc("verified_at")] = at
                if note is not None:
                    reg.iat[r, reg.columns.get_loc("note")] = note
                new_hist.append({"patch_id": pid, "run_id": f"{VERIFICATION_RUN}{path.name}",
                                 "date": at, "status": v,
                                 "area_m2": float(reg["area_m2"].iloc[r])})
            hist = pd.concat([hist, pd.DataFrame(new_hist)], ignore_index=True)
            self._write(reg, hist)
        return len(todo)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise RegisterError(f"{path}: verification file not found; give a CSV or GeoJSON path")
    try:
        if path.suffix.lower() in (".csv", ".txt"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                return pd.DataFrame(list(csv.DictReader(f)))
        return pd.DataFrame(pyogrio.read_dataframe(path, read_geometry=False))
    except (OSError, UnicodeDecodeError, csv.Error, pyogrio.errors.DataSourceError) as err:
        raise RegisterError(f"{path}: cannot read verification file ({err}); save it as "
                            "UTF-8 CSV or GeoJSON with columns patch_id, verification") from None


def _write_layers(path: Path, reg: gpd.GeoDataFrame, history: pd.DataFrame) -> None:
    crs = reg.crs
    reg = gpd.GeoDataFrame(reg[[*REGISTER_COLUMNS, "geometry"]].copy(), geometry="geometry",
                           crs=crs)
    for c in REGISTER_COLUMNS:
        if c not in ("area_m2", "times_seen"):
            reg[c] = reg[c].astype(object)
    if crs is None:
        crs = norm_crs("EPSG:4326")  # only for an empty register never given a CRS
        reg = reg.set_crs(crs)
    pyogrio.write_dataframe(reg, path, layer="patches", driver="GPKG",
                            geometry_type="MultiPolygon", promote_to_multi=True,
                            spatial_index=True)
    hist = pd.DataFrame(history[list(HISTORY_COLUMNS)]).copy()
    for c in ("patch_id", "run_id", "date", "status"):
        hist[c] = hist[c].astype(object)
    hist["area_m2"] = hist["area_m2"].astype("float64")
    pyogrio.write_dataframe(hist, path, layer="history", driver="GPKG")
