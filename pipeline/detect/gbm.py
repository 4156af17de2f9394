"""LightGBM for the learned detector's models, imported without its scikit-learn layer in
tuban's own processes.

``import lightgbm`` imports scikit-learn whenever it is installed (for LightGBM's estimator API):
0.55 s of a 0.8 s import on this machine, paid by the main process and by every local worker.
tuban only loads and runs ``Booster`` models. Where :data:`pipeline.blocks.LEAN_LIGHTGBM_ENV`
is ``1`` (the ``tuban`` command sets it, and its local worker fork server gets it) scikit-learn
is hidden from that import, unless something imported it already. A notebook importing
:mod:`pipeline`, or a Dask worker, keeps the usual import: LightGBM's estimator API stays whole
where user code may want it.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from ..blocks import LEAN_LIGHTGBM_ENV


def _import(lean: bool) -> ModuleType:
    if not lean or "lightgbm" in sys.modules or "sklearn" in sys.modules:
        import lightgbm

        return lightgbm
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # `import sklearn` now fails
    try:
        import lightgbm
    finally:
        del sys.modules["sklearn"]
    return lightgbm


lgb = _import(os.environ.get(LEAN_LIGHTGBM_ENV) == "1")
