"""How this project names itself in the DICOM objects it writes (General Equipment, algorithm identification)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

__all__ = ["MANUFACTURER", "MODEL_NAME", "software_version"]

MANUFACTURER = "dicom-node"
MODEL_NAME = "dicom-node auto-contouring"


@cache
def software_version() -> str:
    """The installed dicom-node version ("0+unknown" when running from a checkout that is not installed)."""
    try:
        return version("dicom-node")
    except PackageNotFoundError:
        return "0+unknown"
