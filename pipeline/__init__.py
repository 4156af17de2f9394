"""tuban: satellite change detection for land and urban-management enforcement (图斑)."""

from __future__ import annotations

__version__ = "0.1.0"
