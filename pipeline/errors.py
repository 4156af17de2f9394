"""Error hierarchy. Every user-facing error carries one line naming the file and the fix."""

from __future__ import annotations


class TubanError(Exception):
    """Root of tuban's errors; the CLI prints ``str(err)`` as one line and exits non-zero."""

    exit_code = 2


class ConfigError(TubanError, ValueError):
    """A configuration file is missing, malformed or has unknown/mistyped keys."""


class InputError(TubanError, ValueError):
    """An input file (image or vector) is missing, unreadable or unusable."""


class MissingFileError(InputError, FileNotFoundError):
    """An input path does not exist."""


class NotRasterError(InputError):
    """A path exists but GDAL cannot open it as a raster."""


class MissingCRSError(InputError):
    """A raster or vector has no coordinate reference system."""


class NoOverlapError(InputError):
    """Images (or an image and the area of interest) do not overlap."""


class BandRoleError(InputError):
    """Band roles are missing, out of range or inconsistent with the file."""


class RegisterError(TubanError):
    """The patch register cannot be read or updated."""


class OutputExistsError(TubanError):
    """An output exists and would be overwritten."""


class TubanWarning(UserWarning):
    """Base class for tuban's warnings."""


def one_line(msg: str) -> str:
    """Collapse whitespace so a message prints as a single line."""
    return " ".join(str(msg).split())
