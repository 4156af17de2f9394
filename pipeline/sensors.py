"""Sensor presets: band roles in the vendor's standard band order, DN → reflectance scaling.

A preset is what ``sensor: GF-2`` in a config (or ``--sensor`` on the command line) means.
``scale`` is ``None`` where the product's DN is not reflectance and the factor depends on the
processing level; ``bit_depth`` then lets ingest scale by the sensor's radiometric range
(DN / (2**bits - 1)), an approximate top-of-atmosphere-like brightness that is enough for
relative normalisation and the cloud test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BandRoleError


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
    Preset("GF-1", ("gf1", "gaofen1", "gaofen-1", "gf-1 pms", "gf1pms"), _BGRN, None,
           res_m=8.0, pan_res_m=2.0, bit_depth=10),
    Preset("GF-2", ("gf2", "gaofen2", "gaofen-2", "gf-2 pms", "gf2pms"), _BGRN, None,
           res_m=4.0, pan_res_m=1.0, bit_depth=10),
    Preset("Jilin-1", ("jl1", "jilin1", "jilin", "jl-1"), _BGRN, None,
           res_m=0.75, pan_res_m=0.5, bit_depth=12),
    Preset("ZY-3", ("zy3", "ziyuan3", "ziyuan-3"), _BGRN, None,
           res_m=5.8, pan_res_m=2.1, bit_depth=10),
    # Stacked 4-band product B02, B03, B04, B08 (L1C or L2A before baseline 04.00; DN/10000).
    Preset("Sentinel-2", ("s2", "sentinel2", "sentinel-2a", "sentinel-2b", "s2a", "s2b",
                          "s2 l1c", "s2 l2a", "msi"), _BGRN, 1e-4, res_m=10.0),
    # Collection-2 Level-2 surface reflectance, bands in native order SR_B1..SR_B7.
    Preset("Landsat-8", ("l8", "landsat8", "lc08", "landsat-9", "landsat9", "l9", "lc09", "oli"),
           {"coastal": 1, "blue": 2, "green": 3, "red": 4, "nir": 5, "swir1": 6, "swir2": 7},
           2.75e-5, offset=-0.2, res_m=30.0),
    # Aerial photos, Google Earth / Tianditu mosaics: 8-bit red, green, blue.
    Preset("RGB", ("rgb", "aerial", "google", "googleearth", "google earth", "tianditu"),
           {"red": 1, "green": 2, "blue": 3}, 1.0 / 255.0, res_m=0.5),
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


def resolve_preset(name: str) -> Preset:
    """Look a preset up by name or alias, ignoring case, spaces, ``-`` and ``_``.

    :raises BandRoleError: unknown sensor, listing the known names.
    """
    k = _key(name)
    p = _INDEX.get(k) or _INDEX.get(k.replace("-", "").replace(" ", ""))
    if p is None:
        raise BandRoleError(f"unknown sensor {name!r}; use one of {', '.join(known_sensors())} "
                            "or give the band roles with bands: / --bands")
    return p
