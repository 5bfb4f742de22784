"""Seed contours for propagation: which RTSTRUCTs belong to a series, and their ROIs as per-slice masks and clicks.

An RT Structure Set belongs to an image series when its Referenced Frame of Reference Sequence names the series
(RT Referenced Study -> RT Referenced Series -> Series Instance UID); one that names no series at all belongs to
every series on its Frame of Reference (older exports). Closed contours are rasterised exactly
(``pipeline.rasterise.rtstruct_masks``: even-odd fill at pixel centres); POINT contours become positive clicks on
their slice. Everything here takes Datasets and returns values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset

from models.types import RoiType
from pipeline.contours import Grid, patient_to_index
from pipeline.errors import StructureError
from pipeline.rasterise import PLANE_TOLERANCE, contour_points, rtstruct_masks

__all__ = ["SeedRoi", "SeedError", "referenced_series", "references_series", "seed_rois"]


class SeedError(StructureError):
    """No usable seed: no structure set for the series, an empty ROI, a ROI filter that matches nothing."""


@dataclass(frozen=True)
class SeedRoi:
    """One ROI of a seed structure set on the series' grid."""

    name: str
    roi_type: RoiType
    color: tuple[int, int, int]
    masks: dict[int, np.ndarray]  # slice -> bool (Y, X), only slices with contours
    points: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> (K, 2) (y, x) pixel clicks


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def referenced_series(ds: Dataset) -> tuple[set[str], set[str]]:
    """(Series Instance UIDs, Frame of Reference UIDs) an RT Structure Set references."""
    series, frames = set(), set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.add(_text(frame, "FrameOfReferenceUID"))
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                series.add(_text(item, "SeriesInstanceUID"))
    if _text(ds, "FrameOfReferenceUID"):
        frames.add(_text(ds, "FrameOfReferenceUID"))
    return series - {""}, frames - {""}


def references_series(ds: Dataset, series_uid: str, frame_of_reference_uid: str) -> bool:
    """Whether structure set ``ds`` belongs to the series: named in it, or (naming no series) on its frame."""
    if _text(ds, "Modality") != "RTSTRUCT":
        return False
    series, frames = referenced_series(ds)
    if series:
        return series_uid in series
    return bool(frame_of_reference_uid) and frame_of_reference_uid in frames


def _roi_types(ds: Dataset) -> dict[int, RoiType]:
    types = {}
    for obs in ds.get("RTROIObservationsSequence", []):
        value = _text(obs, "RTROIInterpretedType").upper()
        # Types outside our enum (MARKER, CAVITY, ...) are written back as CONTROL: not a target, not an organ.
        types[int(obs.ReferencedROINumber)] = RoiType(value) if value in RoiType.__members__ else (
            RoiType.ORGAN if not value else RoiType.CONTROL)
    return types


def _colors(ds: Dataset) -> dict[int, tuple[int, int, int]]:
    colors = {}
    for roi in ds.get("ROIContourSequence", []):
        value = roi.get("ROIDisplayColor")
        if value is not None and len(value) == 3:
            colors[int(roi.ReferencedROINumber)] = tuple(int(v) for v in value)  # type: ignore[assignment]
    return colors


def _clicks(ds: Dataset, grid: Grid) -> dict[int, dict[int, list[np.ndarray]]]:
    """ROI number -> slice -> (y, x) clicks of its POINT contours (on an image plane, inside the volume)."""
    out: dict[int, dict[int, list[np.ndarray]]] = {}
    nz, ny, nx = grid.shape
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            if _text(contour, "ContourGeometricType") != "POINT":
                continue
            for z, y, x in patient_to_index(grid, contour_points(contour)):
                k, r, c = int(round(z)), int(round(y)), int(round(x))
                if abs(z - k) <= PLANE_TOLERANCE and 0 <= k < nz and 0 <= r < ny and 0 <= c < nx:
                    out.setdefault(int(roi.ReferencedROINumber), {}).setdefault(k, []).append(np.array([r, c]))
    return out


def _selected(name: str, wanted: Sequence[str] | None) -> bool:
    return wanted is None or name.casefold() in {w.casefold() for w in wanted}


def seed_rois(structure_sets: Iterable[Dataset], grid: Grid, wanted: Sequence[str] | None = None,
              ) -> tuple[list[SeedRoi], list[str]]:
    """The seed ROIs of ``structure_sets`` on ``grid`` (only those named in ``wanted`` when given), and warnings.

    A POINT ROI adds its clicks to the contoured ROI of the same name, or stands alone as a click-only seed. ROIs
    with neither contours nor points raise :class:`SeedError` when asked for by name, and are skipped (with a
    warning) otherwise.
    """
    found: dict[str, SeedRoi] = {}
    warnings: list[str] = []
    held: set[str] = set()
    for ds in structure_sets:
        numbers = {int(item.ROINumber): _text(item, "ROIName") or f"ROI {item.ROINumber}"
                   for item in ds.get("StructureSetROISequence", [])}
        held.update(numbers.values())
        raster = rtstruct_masks(ds, grid)
        warnings += [w for w in raster.warnings if "POINT contour" not in w]
        types, colors, clicks = _roi_types(ds), _colors(ds), _clicks(ds, grid)
        for number, name in numbers.items():
            if not _selected(name, wanted):
                continue
            volume = raster.masks.get(name)
            masks = {} if volume is None else {int(z): volume[z] for z in
                                               np.flatnonzero(volume.reshape(volume.shape[0], -1).any(axis=1))}
            points = {z: np.stack(p) for z, p in clicks.get(number, {}).items()}
            if not masks and not points:
                if wanted is not None:
                    raise SeedError(f"seed ROI {name!r} has no contour and no point on this series")
                warnings.append(f"{name}: no contour and no point on this series; not propagated")
                continue
            if name in found:  # the same name in two structure sets (or twice): slices are combined
                old = found[name]
                masks = {**old.masks, **{z: m | old.masks.get(z, False) for z, m in masks.items()}}
                points = {**old.points, **points}
            found[name] = SeedRoi(name, types.get(number, RoiType.ORGAN), colors.get(number, (255, 0, 0)),
                                  masks, points)
    if wanted is not None:
        missing = [w for w in wanted if w.casefold() not in {n.casefold() for n in found}]
        if missing:
            raise SeedError(f"no seed ROI named {missing} in the structure set(s) of this series; "
                            f"they hold: {sorted(held) or 'none'}")
    return list(found.values()), warnings
