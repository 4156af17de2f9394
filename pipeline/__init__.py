"""tuban: satellite change detection for land and urban-management enforcement (图斑).

The public API for notebooks and scripts (imported lazily: ``import pipeline`` stays cheap)::

    from pipeline import load_config, run, compare
    from pipeline.evaluate import evaluate
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {"load_config": "config", "run": "jobs", "compare": "jobs"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
