"""Evidence images of patches: before/after RGB chips stretched for display, the patch outline
drawn on both, a caption strip, PNG-encoded. Pure functions from arrays to bytes:
:mod:`pipeline.chips` reads the chips (on the block workers), :mod:`pipeline.export` writes the
files.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont

from .errors import TubanError
from .types import CATEGORY_ZH, BBox
from .values import jsonable

#: Returns an RGB uint8 ``(h, w, 3)`` chip (already stretched) for bounds in the working CRS.
ChipReader = Callable[[BBox], np.ndarray]

_OUTLINE = (255, 255, 0)


def stretch_rgb(arr: np.ndarray, valid: np.ndarray | None = None,
                percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
    """Per-band percentile stretch of a ``(3, h, w)`` array to an ``(h, w, 3)`` uint8 image.

    Args:
        arr: Bands first (rasterio order), any numeric dtype.
        valid: Bool ``(h, w)``; invalid pixels are ignored for the stretch and set to 0.
        percentiles: Low and high percentiles mapped to 0 and 255.

    Returns:
        The stretched RGB image.
    """
    a = np.asarray(arr, dtype="float64")
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"stretch_rgb expects a (3, h, w) array, got shape {a.shape}")
    ok = np.isfinite(a).all(axis=0)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    out = np.zeros((a.shape[1], a.shape[2], 3), dtype=np.uint8)
    if not ok.any():
        return out
    for b in range(3):
        lo, hi = np.percentile(a[b][ok], percentiles)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        band = np.clip((a[b] - lo) * scale, 0, 255) if scale else np.full(ok.shape, 128.0)
        out[..., b] = np.where(ok, np.round(band), 0).astype(np.uint8)
    return out


def chip_bounds(geom: shapely.Geometry, *, min_size_m: float = 50.0,
                context: float = 1.6) -> BBox:
    """Square bounds centred on ``geom``: ``context`` x its larger side, at least ``min_size_m``."""
    x0, y0, x1, y1 = geom.bounds
    half = max(max(x1 - x0, y1 - y0) * context, min_size_m) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - half, cy - half, cx + half, cy + half)


def _to_pixels(coords: np.ndarray, bounds: BBox, size: tuple[int, int],
               ) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = bounds
    w, h = size
    px = (coords[:, 0] - x0) / (x1 - x0) * w
    py = (y1 - coords[:, 1]) / (y1 - y0) * h
    return list(zip(px.tolist(), py.tolist(), strict=True))


def draw_outline(img: Image.Image, geom: shapely.Geometry, bounds: BBox, *,
                 color: tuple[int, int, int] = _OUTLINE, width: int = 2) -> Image.Image:
    """Draw the rings of ``geom`` (working CRS) on ``img``, which covers ``bounds``.

    A dark halo under the line keeps it visible on bright ground. Draws in place.

    Returns:
        ``img``.
    """
    draw = ImageDraw.Draw(img)
    polys = getattr(geom, "geoms", [geom])
    rings = [r for p in polys if p.geom_type == "Polygon"
             for r in (p.exterior, *p.interiors)]
    for col, wd in (((0, 0, 0), width + 2), (color, width)):
        for ring in rings:
            pts = _to_pixels(np.asarray(ring.coords), bounds, img.size)
            if len(pts) >= 2:
                draw.line(pts, fill=col, width=wd, joint="curve")
    return img


_CJK_FONTS = ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
              "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
              "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
              "C:/Windows/Fonts/msyh.ttc", "/System/Library/Fonts/PingFang.ttc")


#: caption font size of the evidence PNGs (px)
CAPTION_PX = 13


@lru_cache(maxsize=8)
def _font(size: int) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, bool]:
    """A font, and whether it can render Chinese."""
    for p in _CJK_FONTS:
        if Path(p).exists():
            try:
                return ImageFont.truetype(p, size), True
            except OSError:
                continue
    return ImageFont.load_default(size=size), False


def has_cjk_font() -> bool:
    """Whether the evidence captions can name categories in Chinese (a CJK font is installed)."""
    return _font(CAPTION_PX)[1]


def _panel(chip: np.ndarray, size: tuple[int, int]) -> Image.Image:
    a = np.asarray(chip)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"evidence chips must be (h, w, 3) uint8 RGB, got {a.shape} {a.dtype}")
    # enlarged chips show the pixels as acquired (no invented smoothness; and repeated pixels
    # make the PNG half the size, twice as fast to encode); larger chips are reduced with an
    # antialiasing filter, since dropping pixels would alias
    up = size[0] >= a.shape[1] and size[1] >= a.shape[0]
    filt = Image.Resampling.NEAREST if up else Image.Resampling.BILINEAR
    return Image.fromarray(a, "RGB").resize(size, filt)


def render_evidence(patch: Mapping[str, Any], before_chip: np.ndarray, after_chip: np.ndarray,
                    *, bounds: BBox, panel_px: int = 256) -> bytes:
    """A before|after PNG (bytes) with the patch outline on both and a caption strip (pure).

    Args:
        patch: The patch record with ``geometry`` in the working CRS (a GeoDataFrame row).
        before_chip: RGB uint8 ``(h, w, 3)`` covering ``bounds`` on the before date.
        after_chip: The same on the after date.
        bounds: The chips' bounds in the working CRS (see :func:`chip_bounds`).
        panel_px: Width of each panel in pixels.
    """
    x0, y0, x1, y1 = bounds
    ph = max(1, round(panel_px * (y1 - y0) / (x1 - x0)))
    gap, strip = 4, 44
    font, cjk = _font(CAPTION_PX)
    img = Image.new("RGB", (2 * panel_px + gap, ph + strip), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (chip, label, date) in enumerate(((before_chip, "BEFORE", patch.get("before_date")),
                                             (after_chip, "AFTER", patch.get("after_date")))):
        panel = draw_outline(_panel(chip, (panel_px, ph)), patch["geometry"], bounds)
        pdraw = ImageDraw.Draw(panel)
        text = f"{label} {jsonable(date) or ''}".strip()
        pdraw.rectangle(pdraw.textbbox((4, 3), text, font=font), fill=(0, 0, 0))
        pdraw.text((4, 3), text, fill=(255, 255, 255), font=font)
        img.paste(panel, (i * (panel_px + gap), 0))
    cat = str(patch.get("category", ""))
    cat_txt = f"{patch.get('category_zh') or CATEGORY_ZH.get(cat, '')} {cat}" if cjk else cat
    area = jsonable(patch.get("area_m2"))
    conf = jsonable(patch.get("confidence"))
    line1 = f"{patch.get('patch_id', '')}   {cat_txt}   {patch.get('status', '') or ''}"
    line2 = (f"{'' if area is None else f'{area:,.0f} m2'}"
             f"{'' if conf is None else f'   confidence {conf:.2f}'}"
             f"   {jsonable(patch.get('before_date')) or '?'} -> "
             f"{jsonable(patch.get('after_date')) or '?'}")
    draw.text((6, ph + 5), line1, fill=(0, 0, 0), font=font)
    draw.text((6, ph + 24), line2, fill=(60, 60, 60), font=font)
    return encode_png(np.asarray(img))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless 8-bit RGB PNG of ``(h, w, 3)`` uint8 (pure).

    Every row uses PNG's "Up" filter (difference to the row above, in numpy) and zlib's
    run-length strategy at level 1: on evidence chips 2.6x faster than Pillow's encoder at its
    fastest (which tries five filters per row), for files about 20 % larger.
    """
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"encode_png takes (h, w, 3) uint8 RGB, got {a.shape}")
    h, w = a.shape[:2]
    rows = a.reshape(h, w * 3)
    data = np.empty((h, w * 3 + 1), np.uint8)
    data[:, 0] = 2  # filter type Up
    data[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=data[1:, 1:])  # modulo 256, as PNG wants
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    idat = z.compress(data.tobytes()) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bit, truecolour, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


#: what a worker needs of a patch to draw its evidence
EVIDENCE_FIELDS = ("patch_id", "category", "category_zh", "status", "area_m2", "confidence",
                   "before_date", "after_date", "geometry")


def render_all(items: Sequence[tuple[Mapping[str, Any], BBox]], panel_px: int,
               before: ChipReader, after: ChipReader) -> Iterator[bytes | str]:
    """:func:`render_evidence` for each ``(patch, bounds)`` in order, with chips from the two
    readers; the error message instead where a chip cannot be read."""
    for rec, b in items:
        try:
            chips = before(b), after(b)
        except (TubanError, OSError, ValueError) as err:
            yield str(err)
            continue
        yield render_evidence(rec, *chips, bounds=b, panel_px=panel_px)
