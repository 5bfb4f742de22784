"""Value types passed between the loader, the pipelines and the writers.

Arrays are indexed (Z, Y, X): Z along the slice normal, Y down the rows, X along the columns, exactly as the
source series' pixel data. ``spacing``, ``origin`` and ``direction`` follow SimpleITK's (x, y, z) convention so a
:class:`Volume` converts to and from ``SimpleITK.Image`` without reordering surprises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

__all__ = ["Volume", "RoiType", "Structure", "StructureSet"]


@dataclass(frozen=True)
class Volume:
    """An image volume on an exact patient-space grid (LPS, mm)."""

    array: np.ndarray  # (Z, Y, X); HU for CT after rescale
    spacing: tuple[float, float, float]  # (x, y, z) mm: column, row, slice spacing
    origin: tuple[float, float, float]  # patient position of voxel (0, 0, 0)
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # row-major 3x3, columns = x, y, z axes
    modality: str = "CT"

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3-D (Z, Y, X), got shape {self.array.shape}")
        if len(self.direction) != 9:
            raise ValueError(f"Volume.direction must have 9 values, got {len(self.direction)}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Volume.spacing must be positive, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def index_to_physical(self, zyx: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel indices (z, y, x), fractional allowed, to (N, 3) patient coordinates."""
        xyz = np.asarray(zyx, dtype=float)[:, ::-1] * np.asarray(self.spacing)
        return xyz @ np.asarray(self.direction, dtype=float).reshape(3, 3).T + np.asarray(self.origin)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 3) patient coordinates to fractional (N, 3) voxel indices (z, y, x)."""
        rel = np.asarray(points, dtype=float) - np.asarray(self.origin)
        xyz = rel @ np.asarray(self.direction, dtype=float).reshape(3, 3) / np.asarray(self.spacing)
        return xyz[:, ::-1]


class RoiType(str, Enum):
    """RT ROI Interpreted Type (C.8.8.8) values our pipelines produce."""

    EXTERNAL = "EXTERNAL"
    ORGAN = "ORGAN"
    PTV = "PTV"
    CTV = "CTV"
    GTV = "GTV"
    AVOIDANCE = "AVOIDANCE"
    CONTROL = "CONTROL"


@dataclass(frozen=True)
class Structure:
    """One contoured structure: a binary mask on the source series' grid plus what an RTSTRUCT/SEG needs."""

    name: str  # TG-263 name
    mask: np.ndarray  # bool (Z, Y, X), same grid as the source Volume
    color: tuple[int, int, int] = (255, 0, 0)
    roi_type: RoiType = RoiType.ORGAN
    algorithm: str = "dicom-node"
    algorithm_version: str = "0"

    def __post_init__(self) -> None:
        if self.mask.ndim != 3:
            raise ValueError(f"Structure {self.name!r}: mask must be 3-D (Z, Y, X), got shape {self.mask.shape}")


@dataclass(frozen=True)
class StructureSet:
    """What a pipeline returns: structures on the grid of the series it was given."""

    structures: tuple[Structure, ...]
    label: str = "AUTO"
    description: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [s.name for s in self.structures]
