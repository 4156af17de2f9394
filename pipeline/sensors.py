"""Sensor presets and product band layouts: band roles, DN → reflectance scaling, resolution.

A preset is what ``sensor: GF-2`` in a config (or ``--sensor`` on the command line) means: the
band roles of the vendor's stacked product, in its standard band order. ``scale`` is ``None``
where the product's DN is not reflectance and the factor depends on the processing level;
``bit_depth`` then lets ingest scale by the sensor's radiometric range (DN / (2**bits - 1)), an
approximate top-of-atmosphere-like brightness that is enough for relative normalisation and the
cloud test. Ingest always lets the data type win: 8-bit data is DN / 255 and float data in 0..1.5
is already reflectance, whatever the preset says.

Product layouts with one file per band (Sentinel-2 ``*_B04.tif``, Landsat ``*_SR_B4.TIF``) and
their quality rasters (``*_SCL*.tif``, ``*_QA60*``, ``*_QA_PIXEL.TIF``) are recognised by file
name alone: :func:`parse_band_file` and :func:`group_band_files` are pure (no I/O).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import BandRoleError

QaKind = Literal["scl", "qa60", "qa_pixel"]


@dataclass(frozen=True)
class Preset:
    """One sensor's standard product: band roles (1-based), scaling and nominal resolution."""

    name: str
    aliases: tuple[str, ...]
    bands: dict[str, int] = field(hash=False)
    scale: float | None  # DN -> reflectance; None = decide from dtype / bit_depth
    offset: float = 0.0
    res_m: float = 1.0  # nominal multispectral (or fused) pixel size
    pan_res_m: float | None = None
    bit_depth: int | None = None  # radiometric range of the DN when scale is None


_BGRN = {"blue": 1, "green": 2, "red": 3, "nir": 4}

PRESETS: tuple[Preset, ...] = (
    # GF-1 PMS: 2 m pan / 8 m MS, 10-bit (WFV is 16 m with the same band order).
    Preset("GF-1", ("gf1", "gaofen1", "gaofen-1", "gf-1 pms", "gf1pms"), _BGRN, None,
           res_m=8.0, pan_res_m=2.0, bit_depth=10),
    # GF-2 PMS: 0.8 m pan / 3.2 m MS, 10-bit.
    Preset("GF-2", ("gf2", "gaofen2", "gaofen-2", "gf-2 pms", "gf2pms"), _BGRN, None,
           res_m=3.2, pan_res_m=0.8, bit_depth=10),
    # Jilin-1 GF/KF: 0.5-0.75 m pan, usually delivered pan-sharpened; 12-bit.
    Preset("Jilin-1", ("jl1", "jilin1", "jilin", "jl-1"), _BGRN, None,
           res_m=0.75, pan_res_m=0.5, bit_depth=12),
    # ZY-3 MUX 5.8 m / nadir pan 2.1 m, 10-bit.
    Preset("ZY-3", ("zy3", "ziyuan3", "ziyuan-3"), _BGRN, None,
           res_m=5.8, pan_res_m=2.1, bit_depth=10),
    # Stacked 4-band product B02, B03, B04, B08 (L1C or L2A before baseline 04.00; DN/10000).
    Preset("Sentinel-2", ("s2", "sentinel2", "sentinel-2a", "sentinel-2b", "sentinel-2c", "s2a",
                          "s2b", "s2c", "s2 l1c", "s2 l2a", "msi"), _BGRN, 1e-4, res_m=10.0),
    # Collection-2 Level-2 surface reflectance, bands in native order SR_B1..SR_B7.
    Preset("Landsat-8", ("l8", "landsat8", "lc08", "landsat-9", "landsat9", "l9", "lc09", "oli",
                         "oli-tirs"),
           {"coastal": 1, "blue": 2, "green": 3, "red": 4, "nir": 5, "swir1": 6, "swir2": 7},
           2.75e-5, offset=-0.2, res_m=30.0),
    # TM / ETM+ Collection-2 Level-2 SR stacked without thermal: SR_B1..B5, SR_B7.
    Preset("Landsat-7", ("l7", "landsat7", "le07", "etm", "etm+", "landsat-5", "landsat5", "l5",
                         "lt05", "tm", "landsat-4", "landsat4", "lt04"),
           {"blue": 1, "green": 2, "red": 3, "nir": 4, "swir1": 5, "swir2": 6},
           2.75e-5, offset=-0.2, res_m=30.0),
    # Aerial photos, Google Earth / Tianditu mosaics: red, green, blue; 8-bit (16-bit scaled by
    # the bit depth its values need).
    Preset("RGB", ("rgb", "aerial", "google", "googleearth", "google earth", "tianditu"),
           {"red": 1, "green": 2, "blue": 3}, None, res_m=0.5, bit_depth=8),
)


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


_INDEX: dict[str, Preset] = {}
for _p in PRESETS:
    for _n in (_p.name, *_p.aliases):
        _INDEX[_key(_n)] = _INDEX[_key(_n).replace("-", "").replace(" ", "")] = _p


def known_sensors() -> list[str]:
    """Preset names, for messages and ``--help``."""
    return [p.name for p in PRESETS]


def find_preset(name: str | None) -> Preset | None:
    """:func:`resolve_preset`, or ``None`` for an unknown or missing name."""
    if not name:
        return None
    k = _key(name)
    return _INDEX.get(k) or _INDEX.get(k.replace("-", "").replace(" ", ""))


def resolve_preset(name: str) -> Preset:
    """Look a preset up by name or alias, ignoring case, spaces, ``-`` and ``_``.

    :raises BandRoleError: unknown sensor, listing the known names.
    """
    p = find_preset(name)
    if p is None:
        raise BandRoleError(f"unknown sensor {name!r}; use one of {', '.join(known_sensors())} "
                            "or give the band roles with bands: / --bands")
    return p


# ------------------------------------------------------------------------- band names -> roles

#: Band descriptions, STAC ``eo:bands`` common names / asset keys and product band names -> role.
NAME_ROLES: dict[str, str] = {
    "red": "red", "r": "red", "green": "green", "g": "green", "blue": "blue", "b": "blue",
    "nir": "nir", "nir08": "nir", "near infrared": "nir", "near-infrared": "nir", "nir1": "nir",
    "swir1": "swir1", "swir16": "swir1", "swir 1": "swir1", "swir2": "swir2", "swir22": "swir2",
    "swir 2": "swir2", "coastal": "coastal", "coastal aerosol": "coastal", "pan": "pan",
    "panchromatic": "pan", "rededge1": "rededge1", "rededge2": "rededge2",
    "rededge3": "rededge3", "rededge4": "rededge4", "rededge": "rededge1",
    "b01": "coastal", "b02": "blue", "b03": "green", "b04": "red", "b05": "rededge1",
    "b06": "rededge2", "b07": "rededge3", "b08": "nir", "b8a": "rededge4", "b11": "swir1",
    "b12": "swir2",
    "sr_b1": "coastal", "sr_b2": "blue", "sr_b3": "green", "sr_b4": "red", "sr_b5": "nir",
    "sr_b6": "swir1", "sr_b7": "swir2",
}


def role_for_name(name: str | None) -> str | None:
    """The band role a band description, common name or asset key stands for, if any."""
    return NAME_ROLES.get((name or "").strip().lower())


#: Sentinel-2 MSI band -> role (B09 water vapour and B10 cirrus have none).
S2_ROLES: dict[str, str] = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1",
    "B06": "rededge2", "B07": "rededge3", "B08": "nir", "B8A": "rededge4", "B11": "swir1",
    "B12": "swir2",
}
S2_RES_M: dict[str, float] = {"B02": 10.0, "B03": 10.0, "B04": 10.0, "B08": 10.0,
                              "B01": 60.0, "B09": 60.0, "B10": 60.0}  # others 20 m
#: Landsat 8/9 OLI band number -> role.
OLI_ROLES: dict[str, str] = {"1": "coastal", "2": "blue", "3": "green", "4": "red", "5": "nir",
                             "6": "swir1", "7": "swir2", "8": "pan"}
#: Landsat 4/5 TM and 7 ETM+ band number -> role (6 is thermal).
TM_ROLES: dict[str, str] = {"1": "blue", "2": "green", "3": "red", "4": "nir", "5": "swir1",
                            "7": "swir2", "8": "pan"}

#: Roles loaded from per-band products unless the period names others with ``bands:``.
DEFAULT_ROLES: tuple[str, ...] = ("blue", "green", "red", "nir", "swir1", "swir2")

_EXT = r"\.(?:tiff?|jp2)$"
_S2_RE = re.compile(r"^(?:(?P<prefix>.*?)[_.-])?(?P<band>B(?:0[1-9]|1[0-2]|8A))"
                    r"(?:_(?P<res>[126]0)m)?" + _EXT, re.I)
_S2_QA_RE = re.compile(r"^(?:(?P<prefix>.*?)[_.-])?(?:MSK_)?(?P<qa>SCL|QA60)"
                       r"(?:_(?P<res>[126]0)m)?" + _EXT, re.I)
_LS_RE = re.compile(r"^(?:(?P<prefix>.*?)[_.-])?(?P<sr>SR_)?B(?P<band>[1-9]|1[01])" + _EXT, re.I)
_LS_QA_RE = re.compile(r"^(?:(?P<prefix>.*?)[_.-])?(?P<qa>QA_PIXEL)" + _EXT, re.I)
_LS_SKIP_RE = re.compile(r"[_.-]ST_B\d+" + _EXT, re.I)  # surface temperature
_S2_BASELINE_RE = re.compile(r"_N(\d{2})(\d{2})(?:_|$)")
_LS_MISSION_RE = re.compile(r"^L([COTEM])0?([4-9])", re.I)
_S2_OPER_RE = re.compile(r"(?:^|[/_])S2([ABC])_OPER_.*?_A(\d{6})_", re.I)
#: launch (orbit 0) of each Sentinel-2 unit; 143 orbits every 10 days
_S2_EPOCH = {"A": dt.datetime(2015, 6, 23, 1, 52), "B": dt.datetime(2017, 3, 7, 1, 49),
             "C": dt.datetime(2024, 9, 5, 1, 50)}


def s2_sensing_date(name: str) -> dt.date | None:
    """Sensing date of an old-style ``S2A_OPER_..._A003809_T31UDP`` granule from its absolute
    orbit (the date in such names is the processing date, not the acquisition)."""
    m = _S2_OPER_RE.search(name)
    if not m:
        return None
    return (_S2_EPOCH[m[1].upper()] + dt.timedelta(days=int(m[2]) * 10 / 143)).date()


@dataclass(frozen=True)
class BandFile:
    """What a file name says: product family, tile prefix, band (or QA kind), native res."""

    path: Path
    family: Literal["sentinel-2", "landsat", "ambiguous"]
    prefix: str
    band: str | None  # "B02", "B8A" (Sentinel-2) or "4" (Landsat); None for QA files
    qa: QaKind | None = None
    res_m: float | None = None
    surface_reflectance: bool = False


def parse_band_file(path: str | Path) -> BandFile | None:
    """Recognise a Sentinel-2 / Landsat per-band or QA file by its name (``None`` otherwise).

    ``B10``/``B11`` exist in both families: such files come back as ``"ambiguous"`` and
    :func:`group_band_files` decides from the other files of the same tile.
    """
    p = Path(path)
    name = p.name
    if _LS_SKIP_RE.search(name):
        return None
    if m := _S2_QA_RE.match(name):
        qa: QaKind = "scl" if m["qa"].upper() == "SCL" else "qa60"
        res = float(m["res"]) if m["res"] else (20.0 if qa == "scl" else 60.0)
        return BandFile(p, "sentinel-2", m["prefix"] or "", None, qa, res)
    if m := _LS_QA_RE.match(name):
        return BandFile(p, "landsat", m["prefix"] or "", None, "qa_pixel", 30.0)
    if m := _S2_RE.match(name):
        band = m["band"].upper()
        res = float(m["res"]) if m["res"] else S2_RES_M.get(band, 20.0)
        family: Literal["sentinel-2", "ambiguous"] = (
            "ambiguous" if band in ("B10", "B11") else "sentinel-2")
        return BandFile(p, family, m["prefix"] or "", band, None, res)
    if m := _LS_RE.match(name):
        band = m["band"]
        return BandFile(p, "landsat", m["prefix"] or "", band, None,
                        15.0 if band == "8" else 30.0, surface_reflectance=bool(m["sr"]))
    return None


@dataclass(frozen=True)
class BandSet:
    """One tile of a product with its bands in separate files (or separate STAC assets).

    ``bands`` maps role -> (file, 1-based band index in it); ``qa`` lists the product's mask
    rasters. ``scale``/``offset``/``sensor``/``date``/``res_m`` are what the product layout
    (or STAC metadata) says, ``None`` when it says nothing.
    """

    key: str
    bands: dict[str, tuple[Path, int]] = field(hash=False)
    qa: tuple[tuple[Path, QaKind], ...] = ()
    sensor: str | None = None
    scale: float | None = None
    offset: float | None = None
    date: dt.date | None = None
    res_m: float | None = None


def _landsat_roles(prefix: str, bands: Iterable[str], sensor: str | None) -> tuple[str, dict]:
    """Mission name and band-number -> role table from the scene id, the bands or ``sensor``."""
    preset = find_preset(sensor)
    if m := _LS_MISSION_RE.match(prefix):
        n = int(m[2])
        return f"Landsat-{n}", OLI_ROLES if n >= 8 else TM_ROLES
    if preset is not None and preset.name == "Landsat-7":
        return "Landsat-7", TM_ROLES
    return "Landsat", OLI_ROLES  # no mission in the names: OLI unless the sensor says TM/ETM+


def _bandset(prefix: str, files: list[BandFile], sensor: str | None) -> BandSet | None:
    s2 = any(f.family == "sentinel-2" for f in files)
    ls = any(f.family == "landsat" for f in files)
    if s2 == ls:  # only B10/B11 (ambiguous) or a mix of both families: not a product we know
        return None
    bands: dict[str, tuple[Path, int]] = {}
    res: dict[str, float] = {}
    qa: list[tuple[Path, QaKind]] = []
    if s2:
        name = "Sentinel-2"
        table: dict[str, str] = S2_ROLES
        text = " ".join(str(f.path) for f in files)
        bl = _S2_BASELINE_RE.search(text)
        scale, offset = 1e-4, (-0.1 if bl and int(bl[1]) >= 4 else 0.0)
        date = s2_sensing_date(files[0].path.name)
    else:
        name, table = _landsat_roles(prefix, (f.band or "" for f in files), sensor)
        date = None
        sr = any(f.surface_reflectance for f in files) or re.search(r"_L2S[PR]_", prefix + "_")
        scale, offset = (2.75e-5, -0.2) if sr else (2e-5, -0.1)  # C2 L2 SR / C2 L1 TOA
    for f in sorted(files, key=lambda f: f.res_m or 0.0):  # finest copy of a band wins
        if f.qa is not None:
            if all(k != f.qa for _, k in qa):
                qa.append((f.path, f.qa))
            continue
        role = table.get(f.band or "")
        if role and role not in bands:
            bands[role] = (f.path, 1)
            res[role] = f.res_m or 0.0
    if not bands:
        return None
    core = [res[r] for r in ("blue", "green", "red", "nir") if r in res]
    return BandSet(prefix or files[0].path.parent.name, bands, tuple(qa), name, scale, offset,
                   date, min(core or list(res.values())))


def group_band_files(paths: Iterable[str | Path], sensor: str | None = None,
                     ) -> tuple[list[BandSet], list[Path]]:
    """Split ``paths`` into per-band product tiles (grouped by file-name prefix) and the rest.

    A tile is Sentinel-2 when any of its files is named like ``B0x``/``B8A``/``B12``/``SCL``/
    ``QA60``, Landsat when named like ``B1``..``B9``/``SR_Bn``/``QA_PIXEL``; Landsat band numbers
    mean OLI (8/9) unless the scene id (``LT05``, ``LE07``) or ``sensor`` says TM/ETM+.
    """
    groups: dict[tuple[str, str], list[BandFile]] = {}
    rest: list[Path] = []
    for p in paths:
        bf = parse_band_file(p)
        if bf is None:
            rest.append(Path(p))
            continue
        groups.setdefault((str(Path(p).parent), bf.prefix.lower()), []).append(bf)
    sets: list[BandSet] = []
    for (_, _), files in groups.items():
        bs = _bandset(files[0].prefix, files, sensor)
        if bs is None:
            rest += [f.path for f in files]
        else:
            sets.append(bs)
    return sets, rest
