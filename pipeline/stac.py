"""STAC input: a period given as an Item, ItemCollection or Catalog JSON with local assets.

:func:`read_bandsets` turns each item into a :class:`~pipeline.sensors.BandSet`: band roles from
the assets' ``eo:bands`` common names (STAC 1.0 extension, or 1.1 ``bands`` with
``eo:common_name``) or from asset keys (``red``, ``B04``, ``nir08``, ``SR_B4``); quality masks
from ``SCL``/``QA60``/``qa_pixel`` assets; the date from ``datetime`` (or ``start_datetime``);
DN scaling from ``raster:bands`` or the platform's preset. Relative hrefs resolve against the
item's own file when known, else the JSON file given. No network: remote hrefs are an error.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pystac

from .errors import InputError
from .sensors import BandSet, QaKind, find_preset, role_for_name

_RASTER_EXTS = (".tif", ".tiff", ".jp2")
_QA_KEYS: dict[str, QaKind] = {"scl": "scl", "qa60": "qa60", "qa_pixel": "qa_pixel"}
_SKIP_ROLES = {"thumbnail", "overview", "metadata", "visual"}
_SKIP_KEYS = {"visual", "tci", "thumbnail", "preview", "rendered_preview"}


def _items(path: Path) -> list[pystac.Item]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable JSON file ({type(err).__name__}); give a STAC "
                         "Item, ItemCollection or Catalog") from None
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "FeatureCollection":
            return list(pystac.ItemCollection.from_dict(data, preserve_dict=False).items)
        if kind == "Feature":
            return [pystac.Item.from_dict(data)]
        if kind in ("Catalog", "Collection"):
            cat = pystac.read_file(str(path))
            return list(cat.get_items(recursive=True))  # type: ignore[union-attr]
    except (pystac.STACError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a valid STAC {kind} ({' '.join(str(err).split())[:120]})"
                         "; fix the JSON") from None
    raise InputError(f"{path}: JSON is not a STAC Item, ItemCollection or Catalog (type "
                     f"{kind!r}); give one of those")


def _href(asset: pystac.Asset, item: pystac.Item, json_path: Path) -> Path:
    href = asset.href
    if "://" in href and not href.startswith("file://"):
        raise InputError(f"{json_path}: asset {href} of item {item.id!r} is remote; download the "
                         "assets and point the hrefs at local files (tuban reads no network)")
    href = href.removeprefix("file://")
    p = Path(href)
    if p.is_absolute():
        return p
    self_href = item.get_self_href()
    base = (Path(self_href).parent if self_href and "://" not in self_href
            else json_path.parent)
    return (base / p).resolve()


def _is_raster(key: str, asset: pystac.Asset) -> bool:
    if key.lower() in _SKIP_KEYS or _SKIP_ROLES & set(asset.roles or []):
        return False
    mt = (asset.media_type or "").lower()
    if mt:
        return "tiff" in mt or "jp2" in mt
    return asset.href.lower().endswith(_RASTER_EXTS)


def _asset_bands(key: str, asset: pystac.Asset) -> list[tuple[str, int, int]]:
    """(role, 1-based band index, priority) per band of the asset; lower priority wins."""
    fields: dict[str, Any] = asset.extra_fields
    bands = fields.get("eo:bands") or fields.get("bands") or []
    out: list[tuple[str, int, int]] = []
    multi = 2 if len(bands) > 1 else 0
    for i, b in enumerate(bands, start=1):
        name = b.get("common_name") or b.get("eo:common_name")
        role = role_for_name(name) or role_for_name(b.get("name"))
        if role:
            exact = 0 if (name or "").lower() == role else 1
            out.append((role, i, multi + exact))
    if not bands and (role := role_for_name(key)):
        out.append((role, 1, 0 if key.lower() == role else 1))
    return out


def _scale(item: pystac.Item, asset: pystac.Asset | None) -> tuple[float | None, float | None]:
    rb = (asset.extra_fields.get("raster:bands") if asset is not None else None) or []
    if rb and isinstance(rb[0], dict) and "scale" in rb[0]:
        return float(rb[0]["scale"]), float(rb[0].get("offset", 0.0))
    return None, None


def _date(item: pystac.Item) -> dt.date | None:
    if item.datetime is not None:
        return item.datetime.date()
    start = item.properties.get("start_datetime")
    return dt.date.fromisoformat(start[:10]) if start else None


def item_bandset(item: pystac.Item, json_path: Path) -> BandSet:
    """One STAC item as a :class:`BandSet`.

    :raises InputError: the item has no local raster asset with a known band role.
    """
    best: dict[str, tuple[int, Path, int, str]] = {}
    qa: list[tuple[Path, QaKind]] = []
    for key, asset in item.assets.items():
        if key.lower() in _QA_KEYS:
            qa.append((_href(asset, item, json_path), _QA_KEYS[key.lower()]))
            continue
        if not _is_raster(key, asset):
            continue
        for role, idx, prio in _asset_bands(key, asset):
            if role not in best or prio < best[role][0]:
                best[role] = (prio, _href(asset, item, json_path), idx, key)
    if not best:
        raise InputError(f"{json_path}: STAC item {item.id!r} has no raster asset with a known "
                         "band role; give its assets eo:bands common_name (red, green, blue, "
                         "nir) or keys such as B04 / red")
    platform = item.properties.get("platform") or item.properties.get("constellation")
    preset = find_preset(platform)
    ref = best.get("red", next(iter(best.values())))
    scale, offset = _scale(item, item.assets[ref[3]])
    if scale is None and preset is not None and preset.scale is not None:
        scale, offset = preset.scale, preset.offset
    gsd = item.properties.get("gsd")
    return BandSet(item.id, {r: (p, i) for r, (_, p, i, _) in best.items()}, tuple(qa),
                   preset.name if preset else platform, scale, offset, _date(item),
                   float(gsd) if gsd else None)


def read_bandsets(path: str | Path) -> list[BandSet]:
    """Every item of a STAC Item / ItemCollection / Catalog JSON file, as band sets."""
    p = Path(path)
    items = _items(p)
    if not items:
        raise InputError(f"{p}: STAC file holds no items; give an ItemCollection with features")
    return [item_bandset(it, p) for it in items]
