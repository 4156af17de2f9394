"""Change detectors selected by name: ``"spectral"``, ``"learned"`` and ``"auto"``."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..classify import ILLUM_MAX_LOG_RATIO, ILLUM_SHAPE, ILLUM_SPREAD
from ..errors import ConfigError
from . import learned as L
from .base import ChangeDetector
from .spectral import STATE_KEYS, THRESHOLD, SpectralDetector

log = logging.getLogger(__name__)

#: names accepted by :func:`get_detector` ("cva" is the spectral detector's change vector)
DETECTORS: tuple[str, ...] = ("auto", "spectral", "cva", "learned")


def _learned(roles: tuple[str, ...], res_m: float, exact: bool, network: bool = True,
             stretch: tuple[np.ndarray, np.ndarray] | None = None,
             medians: Mapping[str, float] | None = None,
             open_ground: bool = False, threshold: float | None = None,
             ) -> ChangeDetector | None:
    """The learned detector for these bands, or None when it or its model is unavailable.

    ``exact``: only a model trained for this pixel size (``auto``). ``open_ground`` and
    ``threshold`` (of the spectral detector there): see :class:`_WithEvidence`.
    """
    try:
        if not L.has_model(roles, res_m, exact=exact):
            return None
        det = L.LearnedDetector(roles=roles, res_m=res_m, exact=exact, network=network,
                                stretch=stretch, medians=medians)
    except Exception as err:  # noqa: BLE001 - missing/invalid model: fall back
        log.info("learned detector has no usable model for bands %s: %s", roles, err)
        return None
    try:  # smoke test: the model loads and runs on these bands
        z = np.zeros((len(roles), 16, 16), np.float32)
        det(z, z, np.ones((16, 16), bool), roles, res_m)
    except Exception as err:  # noqa: BLE001 - e.g. lightgbm missing, model/feature mismatch
        log.warning("learned detector unusable for bands %s (%s); using spectral", roles, err)
        return None
    return _WithEvidence(det, res_m, open_ground=open_ground, threshold=threshold)


class _WithEvidence:
    """Wraps a detector so its output carries every layer the classifier reads.

    Layers the wrapped detector lacks (e.g. ``chroma_*_after``) come from the spectral
    detector (its per-date states alone, :meth:`SpectralDetector.evidence`, unless its
    decisions are needed: ``open_ground``); ``change`` stays the wrapped one's. The spectral
    illumination evidence (``shape_score``, ``ratio_spread``) is not passed on: a learned
    model was trained on illumination differences and judges them itself, while the spectral
    veto would discard real change that brightens every band alike (new roofs on bare
    ground, storm debris).

    ``open_ground`` (imagery up to 4.5 m under the RGB model): ``change_any``, which classify
    reads inside forest, farmland and ecological land only
    (:func:`pipeline.classify.zoned_change`), is the wrapped detector's ``change`` (with its
    network: new and vanished buildings) joined by the spectral detector's change. There its
    vegetation evidence (NDVI, or excess green without NIR) finds tomb clearings and soil on
    farmland, which the RGB model, trained on buildings, passes over. The learned detector's
    own ``change_any`` (its pixel model's decision without the network), which merges whole
    parcels with harvests and takes clouds for change, is replaced. Elsewhere the RGB model
    and its network decide.
    """

    #: spectral layers that would let classify veto the wrapped detector's decisions
    NOT_PASSED: tuple[str, ...] = ("shape_score", "ratio_spread")

    def __init__(self, det: ChangeDetector, res_m: float, *,
                 open_ground: bool = False, threshold: float | None = None) -> None:
        self.det = det
        self.spectral = SpectralDetector(res_m, threshold=threshold)
        self.open_ground = open_ground
        #: context pixels each side: the larger of the two detectors'
        self.halo = max(int(det.halo), self.spectral.halo)

    def __call__(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        return self._at_work_scale(self._both, before, after, valid, roles, res_m)

    def evidence(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                 roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        """What ``__call__`` returns but the decisions (see :func:`evidence_of`)."""
        return evidence_of(self._at_work_scale(self._evidence, before, after, valid, roles,
                                               res_m))

    def _at_work_scale(self, fn: Callable[..., dict[str, np.ndarray]], before: np.ndarray,
                       after: np.ndarray, valid: np.ndarray, roles: tuple[str, ...],
                       res_m: float) -> dict[str, np.ndarray]:
        f = work_factor(self)
        if f == 1:
            return fn(before, after, valid, roles, res_m)
        # imagery finer than the models' (learned.WORK_RES_M): both detectors on the same cells,
        # averaged once (per pixel, the spectral detector took 26 of 63 s of block work on a
        # 4096² scene at 0.125 m); brightness and vegetation stay per pixel
        cells = L.to_cells(before, after, valid, f)
        out = L.from_cells(fn(*cells, roles, res_m * f), f, valid)
        return {**out, **L.spectral_evidence(before, after, valid, roles)}

    def _both(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
              roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        return self._with_spectral(dict(self.det(before, after, valid, roles, res_m)),
                                   before, after, valid, roles, res_m)

    def _evidence(self, before: np.ndarray, after: np.ndarray, valid: np.ndarray,
                  roles: tuple[str, ...], res_m: float) -> dict[str, np.ndarray]:
        return self._with_spectral(evidence_of(self.det, before, after, valid, roles, res_m),
                                   before, after, valid, roles, res_m)

    def _with_spectral(self, out: dict[str, np.ndarray], before: np.ndarray, after: np.ndarray,
                       valid: np.ndarray, roles: tuple[str, ...], res_m: float,
                       ) -> dict[str, np.ndarray]:
        if self.open_ground:  # the whole spectral detector (for evidence alone too: the
            # layers classify reads must be the same when it runs again on stored decisions)
            extra = self.spectral(before, after, valid, roles, res_m)
            if "change" in out:  # not when only evidence is asked for (evidence_of)
                out["change_any"] = np.maximum(out["change"], open_ground_change(extra))
        elif any(k not in out for k in STATE_KEYS):  # its per-date states only
            extra = self.spectral.evidence(before, after, valid, roles, res_m)
        else:
            return out
        out.update({k: v for k, v in extra.items()
                    if k not in out and k not in self.NOT_PASSED})
        return out


#: the layers a detector decides with; the rest of its output is evidence for classify
DECISIONS: tuple[str, ...] = ("change", "change_any")


def evidence_of(det: ChangeDetector | Mapping[str, np.ndarray], *args: object,
                ) -> dict[str, np.ndarray]:
    """A detector's output without its decisions: the layers classify reads beside change
    scores stored by an earlier pass (``tuban classify RUN_DIR``). Detectors with an
    ``evidence`` method give that (the learned one: its spectral evidence, no model, no
    network); others run whole. Given a dict of layers instead, those layers without the
    decisions."""
    if isinstance(det, Mapping):
        out = det
    else:
        fn = getattr(det, "evidence", None)
        out = fn(*args) if fn is not None else det(*args)  # type: ignore[operator]
    return {k: v for k, v in out.items() if k not in DECISIONS}


def open_ground_change(spectral: Mapping[str, np.ndarray]) -> np.ndarray:
    """The spectral detector's ``change`` less where it is illumination alone: classify's
    object test (:func:`pipeline.classify._illumination`) pixel by pixel, since its layers
    are not passed on (they would veto the RGB model's decisions too)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.abs(np.log(np.maximum(spectral["bright_after"], 1e-3)
                              / np.maximum(spectral["bright_before"], 1e-3)))
        illum = ((spectral["shape_score"] < ILLUM_SHAPE)
                 & (spectral["ratio_spread"] < ILLUM_SPREAD) & (ratio < ILLUM_MAX_LOG_RATIO))
    return np.where(illum, np.float32(0), spectral["change"]).astype(np.float32, copy=False)


def get_detector(name: str, roles: Sequence[str], res_m: float, *,
                 threshold: float | None = None, network: bool = True,
                 stretch: tuple[np.ndarray, np.ndarray] | None = None,
                 medians: Mapping[str, float] | None = None) -> ChangeDetector:
    """Detector ``name`` for these band roles and pixel size.

    ``"auto"`` chooses by bands and pixel size only: the learned detector when
    :mod:`pipeline.detect.learned` ships a model for them (RGB imagery: the RGB model; RGB+NIR:
    an RGB+NIR model, else the RGB model with its NIR ignored), else the spectral one. On
    imagery up to ``learned.OPEN_GROUND_MAX_RES_M`` (4.5 m: aerial, GF-2, Jilin-1, GF-1) the
    spectral detector's change joins the learned one inside forest, farmland and ecological
    land, where its vegetation evidence finds the small clearings the RGB model misses
    (``open_ground``, see :class:`_WithEvidence`). ``"learned"`` is the same but raises where
    no model serves the bands, and takes a model outside its trained pixel sizes.

    ``threshold`` (noise units) applies to the spectral detector; ``network`` lets the learned
    detector add its change network (:mod:`pipeline.detect.cnn`) where one covers the pixel
    size; ``stretch`` (the scene's 2/98 % percentiles per band of ``roles``, ``(bands, 2)`` per
    date) makes the learned detector's result independent of the block, as do ``medians`` (the
    scene medians of its ``*_rel`` features' bases, see :func:`scene_samples`). Unknown names
    raise :class:`~pipeline.errors.ConfigError`.
    """
    roles = tuple(roles)
    key = name.strip().lower()
    if key not in DETECTORS:
        raise ConfigError(f"unknown detection method {name!r}; use one of {', '.join(DETECTORS)}")
    if key in ("auto", "learned"):
        # up to 4.5 m: the RGB model decides, joined by the spectral detector inside forest,
        # farmland and ecological land (see _WithEvidence)
        open_ground = res_m <= L.OPEN_GROUND_MAX_RES_M
        det = _learned(roles, res_m, exact=key == "auto", network=network, stretch=stretch,
                       medians=medians, open_ground=open_ground, threshold=threshold)
        if det is not None:
            return det
        if key == "learned":
            raise ConfigError(f"detection method 'learned' has no model for bands {roles}; "
                              "use method: spectral or auto")
    return SpectralDetector(res_m, threshold=threshold)


def _inner(det: ChangeDetector) -> ChangeDetector:
    """The detector itself, without the :class:`_WithEvidence` wrapper."""
    return det.det if isinstance(det, _WithEvidence) else det


def block_multiple(det: ChangeDetector) -> int:
    """Block sizes and halos that are multiples of this many pixels give ``det`` the cells and
    pooling lattice of a whole-image pass (1: any; see ``LearnedDetector.block_multiple``)."""
    return int(getattr(_inner(det), "block_multiple", 1))


def work_factor(det: ChangeDetector) -> int:
    """Pixels per side of the cells ``det`` detects on (1: every pixel; see
    :data:`pipeline.detect.learned.WORK_RES_M`)."""
    return int(getattr(_inner(det), "work_factor", 1))


def takes_scene_samples(det: ChangeDetector) -> bool:
    """Whether ``det`` takes scene statistics from sample windows (:func:`scene_samples`)."""
    return callable(getattr(_inner(det), "median_samples", None))


def scene_samples(det: ChangeDetector, before: np.ndarray, after: np.ndarray,
                  valid: np.ndarray, roles: Sequence[str], res_m: float,
                  keep: np.ndarray | None = None, threads: int = 1,
                  ) -> dict[str, np.ndarray] | None:
    """One sample window's share (at the pixels ``keep``) of the scene statistics ``det``
    takes as ``medians`` (None when it takes none: the spectral detector), on up to
    ``threads`` threads."""
    fn = getattr(_inner(det), "median_samples", None)
    return fn(before, after, valid, tuple(roles), res_m, keep, threads) if callable(fn) else None


def describe(det: ChangeDetector, roles: Sequence[str], res_m: float) -> dict[str, object]:
    """What made the decisions, for ``run.json``: the detector's name and the model files it
    uses on these bands and pixel size, each with the first 16 hex digits of its SHA-256 (the
    spectral detector: its threshold in noise units; ``open_ground``: the spectral detector
    that decides inside forest, farmland and ecological land, see :class:`_WithEvidence`;
    ``work_factor``: imagery finer than the models' detected on cells of that many pixels a
    side, see :data:`pipeline.detect.learned.WORK_RES_M`)."""
    files = getattr(_inner(det), "model_files", None)
    if not callable(files):
        return {"name": "spectral", "models": {},
                "threshold": float(getattr(det, "threshold", THRESHOLD))}
    out: dict[str, object] = {
        "name": "learned",
        "models": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                   for p in files(roles, res_m)}}
    if getattr(det, "open_ground", False):  # the spectral detector decides on open ground
        out["open_ground"] = {"name": "spectral", "threshold": det.spectral.threshold}
    if work_factor(det) > 1:  # imagery finer than the models': the pixels per cell side
        out["work_factor"] = work_factor(det)
    return out
