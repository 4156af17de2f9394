"""Typed deployment configuration, validated at load.

``load_config(path)`` reads one YAML file into a frozen :class:`PipelineConfig`. Unknown or
mistyped keys raise :class:`~pipeline.errors.ConfigError` naming the key. Relative paths in the
file are resolved against the config file's folder's parent project (the folder holding
``configs/``) when they do not exist relative to the config file itself.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .types import BandRole, RuleRole


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PeriodConfig(_Model):
    """One imaging period: a set of tiles (files, folders or globs) or a STAC ItemCollection."""

    name: str
    date: dt.date | None = None  # else read from metadata (TIFFTAG_DATETIME / STAC datetime)
    sensor: str | None = None  # preset name, e.g. GF-2, Sentinel-2, Landsat-8, RGB
    images: list[str] = Field(min_length=1)
    bands: dict[BandRole, int] | None = None  # 1-based band index per role
    scale: float | None = None  # DN -> reflectance multiplier; None = preset or auto
    offset: float = 0.0
    nodata: float | None = None
    qa: bool = True  # use the product's cloud mask (SCL, QA60, QA_PIXEL) when it has one


class RuleLayerConfig(_Model):
    """A GIS rule layer (GeoPackage, GeoJSON, Shapefile)."""

    path: str
    layer: str | None = None
    where: str | None = None  # attribute filter, OGR SQL WHERE clause


class AdminConfig(_Model):
    """Street-office (街道办) boundaries: each patch gets the code and name it falls in."""

    path: str
    layer: str | None = None
    code_field: str = "code"
    name_field: str = "name"


class CategoryConfig(_Model):
    min_area_m2: float = Field(gt=0)
    max_area_m2: float | None = None
    priority: int = Field(default=2, ge=1, le=5)  # 1 = most urgent


def _default_categories() -> dict[str, CategoryConfig]:
    return {
        "illegal_construction": CategoryConfig(min_area_m2=20.0, priority=1),
        "forest_grave": CategoryConfig(min_area_m2=4.0, max_area_m2=400.0, priority=1),
        "land_occupation": CategoryConfig(min_area_m2=100.0, priority=2),
        "other_change": CategoryConfig(min_area_m2=50.0, priority=4),
    }


class DetectionConfig(_Model):
    """Detector choice and thresholds. Defaults are chosen from resolution and bands."""

    method: Literal["auto", "spectral", "cva", "learned"] = "auto"
    #: the spectral detector's decision threshold in noise units (default 3); "spectral" and
    #: "cva", "auto" where it picks it, "learned" on open ground (run.json: detector)
    threshold: float | None = Field(default=None, gt=0)
    coregister: bool = True
    max_shift_px: float = Field(default=8.0, gt=0)
    normalize: bool = True
    cloud_mask: bool = True
    min_confidence: float = Field(default=0.5, ge=0, le=1)
    #: RGB imagery of 0.25-4.5 m: the building-change network (pipeline/models/cnn_rgb_1m.onnx)
    #: vetoes changes that do not look like buildings, far fewer false patches on roads, car
    #: parks and cleared ground; false keeps those (e.g. to find 违法占地 on RGB-only imagery)
    building_network: bool = True
    #: a change is reported once it has lasted this many periods (needs n+1 periods; 1 = off)
    persist_periods: int = Field(default=1, ge=1)


class AlignConfig(_Model):
    resampling: Literal["nearest", "bilinear", "cubic"] = "bilinear"


class OutputConfig(_Model):
    dir: str = "runs"
    evidence: bool = True
    report: bool = True
    chip_size_px: int = Field(default=96, ge=16)


class PipelineConfig(_Model):
    """A deployment: where imagery and rule layers are, and how to judge change."""

    name: str
    crs: str  # working CRS, e.g. EPSG:4547 (CGCS2000 / 3-degree GK CM 114E)
    resolution: float = Field(gt=0)  # working resolution in CRS units (m)
    bounds: tuple[float, float, float, float] | None = None  # working extent; None = overlap
    block_size: int | None = Field(default=None, ge=64)  # px; None: by scene size and cores
    workers: int | None = None  # local parallelism; None = all cores
    periods: list[PeriodConfig] = Field(min_length=2)
    rules: dict[RuleRole, RuleLayerConfig] = Field(default_factory=dict)
    admin: AdminConfig | None = None
    align: AlignConfig = AlignConfig()
    detection: DetectionConfig = DetectionConfig()
    categories: dict[str, CategoryConfig] = Field(default_factory=_default_categories)
    output: OutputConfig = OutputConfig()
    register_path: str | None = Field(default="runs/register.gpkg", alias="register")
    base_dir: Path = Path(".")  # set by load_config; relative paths resolve here

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, v: dict[str, CategoryConfig]) -> dict[str, CategoryConfig]:
        allowed = set(_default_categories())
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"unknown category {bad[0]!r}; expected one of {sorted(allowed)}")
        return {**_default_categories(), **v}

    def path(self, p: str | Path) -> Path:
        """Resolve a path from the config against ``base_dir``."""
        p = Path(p)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def register_file(self) -> Path | None:
        """The patch register's path, resolved (None: the config keeps no register)."""
        return self.path(self.register_path) if self.register_path else None


def _format_error(path: Path, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{path}: unknown key '{loc}'; remove it or fix its spelling"
    if e["type"] == "missing":
        return f"{path}: missing required key '{loc}'; add it"
    return f"{path}: bad value for '{loc}': {e['msg']}; fix it"


def config_from_dict(data: dict[str, Any], path: Path, base_dir: Path) -> PipelineConfig:
    """Validate a dict into a :class:`PipelineConfig`; ``path`` is used in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at top level; fix the file")
    data = {**data, "base_dir": base_dir}
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(path, err)) from None


def load_config(path: str | Path, defaults: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a YAML config. Relative paths in it resolve from the project folder.

    ``defaults``: values for top-level keys the file leaves out (``tuban compare`` takes the
    grid and periods from its two images, so its config may hold only e.g. ``detection``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; give the path to a YAML config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if isinstance(data, dict) and "base_dir" in data:
        raise ConfigError(f"{path}: unknown key 'base_dir'; remove it")
    # configs/x.yaml -> paths are relative to the project root (parent of configs/).
    base = path.resolve().parent
    if base.name == "configs":
        base = base.parent
    if defaults and isinstance(data or {}, dict):
        data = {**defaults, **(data or {})}
    return config_from_dict(data or {}, path, base)
