"""Ingest stage: describe each period's imagery, read windows of it onto the working grid, load
the rule layers.

- :mod:`.imagery`: what a period is (tiles, band roles, date, scale, nodata), read from
  metadata only, and the periods' common working grid;
- :mod:`.reader`: windows of a period warped onto that grid (``read_block``), and overviews;
- :mod:`.layers`: rule layers and street-office boundaries, clipped to the grid and repaired.
"""

from .imagery import (
    RASTER_EXTS,
    ROLE_ORDER,
    ImageSource,
    Tile,
    file_checksum,
    footprint,
    open_image,
    open_period,
    working_grid,
)
from .layers import layer_files, load_admin, load_layer, load_rules
from .reader import overview_grid, read_block, read_overview

__all__ = [
    "RASTER_EXTS", "ROLE_ORDER", "ImageSource", "Tile", "file_checksum", "footprint",
    "layer_files", "load_admin", "load_layer", "load_rules", "open_image", "open_period",
    "overview_grid", "read_block", "read_overview", "working_grid",
]
