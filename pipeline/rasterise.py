"""RTSTRUCT contours and SEG frames -> binary masks on an image series' grid, for the offline converter.

RTSTRUCT: every CLOSED_PLANAR contour goes from patient coordinates to fractional voxel indices through the full
geometry (``pipeline.contours.patient_to_index``: any orientation, not only axial), must lie on an image plane,
and is filled at pixel centres. All contours of one ROI on one slice are filled together with the even-odd rule
(XOR), so a hole drawn as a second contour stays a hole. Contours that lie on no image plane, or beyond the first
or last slice, are left out and reported; so are POINT and OPEN contours, which enclose nothing.

SEG: each frame is placed by its Plane Position (Patient) (or, without one, by the source image it derives from);
frames must share the image grid's orientation and pixel spacing and sit on a slice plane at a whole-pixel offset.
FRACTIONAL segments are thresholded at one half.

Both functions take a parsed Dataset and return values; they never read files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pipeline.contours import Grid, patient_to_index, polygons_to_mask
from pipeline.errors import StructureError

__all__ = ["Rasterised", "rtstruct_masks", "seg_masks", "contour_points", "PLANE_TOLERANCE"]

PLANE_TOLERANCE = 0.01  # largest distance of a contour from a slice plane, as a fraction of the slice spacing
_PIXEL_TOLERANCE = 0.01  # SEG frames: largest in-plane offset from a whole pixel, in pixels
_CONTOUR_DATA = Tag(0x3006, 0x0050)


@dataclass
class Rasterised:
    """Masks in the order of the source object (label -> bool (Z, Y, X)) and what was left out, per label."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def contour_points(contour: Dataset) -> np.ndarray:
    """Contour Data as an (N, 3) float array, parsed straight from the encoded text when pydicom has not parsed
    it yet (a clinical RTSTRUCT holds millions of DS values; one DSfloat each would dominate the conversion)."""
    element = contour.get_item(_CONTOUR_DATA)
    if element is None:
        return np.empty((0, 3))
    if isinstance(element, RawDataElement):
        raw = (element.value or b"").strip(b" \x00")
        values = np.array(raw.split(b"\\")).astype(float) if raw else np.empty(0)
    else:
        values = np.asarray(contour.ContourData, dtype=float).reshape(-1)
    if values.size % 3:
        raise StructureError(f"Contour Data has {values.size} values, not a multiple of 3")
    return values.reshape(-1, 3)


def _fill(plane: np.ndarray, polygons: list[np.ndarray]) -> None:
    """Even-odd fill of (row, col) polygons into ``plane``, computed on their bounding box only (organs cover a
    small part of a 512 x 512 slice; the fill costs per pixel of the box). Same centres, same result."""
    points = np.concatenate(polygons)
    r0, c0 = (max(int(np.floor(v)), 0) for v in points.min(axis=0))
    r1, c1 = (int(np.ceil(v)) + 1 for v in points.max(axis=0))
    r1, c1 = min(r1, plane.shape[0]), min(c1, plane.shape[1])
    if r0 >= r1 or c0 >= c1:
        return
    offset = np.array([r0, c0], dtype=float)
    plane[r0:r1, c0:c1] = polygons_to_mask([p - offset for p in polygons], (r1 - r0, c1 - c0))


def _roi_names(ds: Dataset) -> dict[int, str]:
    names: dict[int, str] = {}
    for item in ds.get("StructureSetROISequence", []):
        number = int(item.ROINumber)
        names[number] = str(item.get("ROIName", "") or f"ROI {number}").strip()
    return names


def _describe_positions(indices: list[float]) -> str:
    shown = ", ".join(f"{z:.2f}" for z in sorted(indices)[:5])
    return shown + (", ..." if len(indices) > 5 else "")


def rtstruct_masks(ds: Dataset, grid: Grid, *, tolerance: float = PLANE_TOLERANCE) -> Rasterised:
    """Rasterise every ROI of an RT Structure Set on ``grid`` (see the module docstring for the rules)."""
    if str(ds.get("Modality", "")) != "RTSTRUCT":
        raise StructureError(f"not an RT Structure Set (Modality {ds.get('Modality')!r})")
    names = _roi_names(ds)
    nz, ny, nx = grid.shape
    out = Rasterised()
    contoured: set[int] = set()
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        name = names.get(number, f"ROI {number}")
        if number not in names:
            out.warnings.append(f"ROI {number}: contours without a Structure Set ROI entry, named {name!r}")
        per_slice: dict[int, list[np.ndarray]] = {}
        outside, off_plane, skipped_types = [], [], {}
        for contour in roi.get("ContourSequence", []):
            kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR"))
            if kind != "CLOSED_PLANAR":
                skipped_types[kind] = skipped_types.get(kind, 0) + 1
                continue
            points = contour_points(contour)
            if len(points) < 3:
                continue
            zyx = patient_to_index(grid, points)
            z_mean = float(zyx[:, 0].mean())
            z = int(np.round(z_mean))
            if np.abs(zyx[:, 0] - z).max() > tolerance:
                off_plane.append(z_mean)
            elif not 0 <= z < nz:
                outside.append(z_mean)
            else:
                per_slice.setdefault(z, []).append(zyx[:, 1:])
        mask = np.zeros((nz, ny, nx), bool)
        for z, polygons in per_slice.items():
            _fill(mask[z], polygons)
        if name in out.masks:
            out.warnings.append(f"{name}: two ROIs share this name; their masks are combined (OR)")
            mask |= out.masks[name]
        out.masks[name] = mask
        contoured.add(number)
        if outside:
            out.warnings.append(f"{name}: {len(outside)} contour(s) on slices with no image (slice index "
                                f"{_describe_positions(outside)}; the series has 0..{nz - 1}); left out")
        if off_plane:
            out.warnings.append(f"{name}: {len(off_plane)} contour(s) between image planes or not parallel to "
                                f"them (slice index {_describe_positions(off_plane)}); left out")
        for kind, count in skipped_types.items():
            out.warnings.append(f"{name}: {count} {kind} contour(s) enclose no area; left out")
    for number, name in names.items():
        if number not in contoured and name not in out.masks:
            out.masks[name] = np.zeros((nz, ny, nx), bool)
            out.warnings.append(f"{name}: the ROI has no contours (empty mask)")
    return out


def _frame_groups(ds: Dataset, k: int) -> Dataset | None:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    return per_frame[k] if per_frame is not None and k < len(per_frame) else None


def _functional(ds: Dataset, k: int, keyword: str) -> Dataset | None:
    """Item of a functional group macro for frame k: per-frame first, then shared."""
    for groups in (_frame_groups(ds, k), (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        items = groups.get(keyword) if groups is not None else None
        if items:
            return items[0]
    return None


def _check_plane(ds: Dataset, grid: Grid) -> None:
    orientation = _functional(ds, 0, "PlaneOrientationSequence")
    direction = np.asarray(grid.direction, dtype=float).reshape(3, 3)
    if orientation is not None:
        iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
        expected = np.concatenate([direction[:, 0], direction[:, 1]])
        if np.abs(iop - expected).max() > 1e-3:
            raise StructureError(f"SEG frames are oriented {np.round(iop, 4).tolist()}, the image series "
                                 f"{np.round(expected, 4).tolist()}; resampling is not supported")
    measures = _functional(ds, 0, "PixelMeasuresSequence")
    if measures is not None and "PixelSpacing" in measures:
        spacing = [float(v) for v in measures.PixelSpacing]  # (row spacing, column spacing)
        expected = [grid.spacing[1], grid.spacing[0]]
        if not np.allclose(spacing, expected, rtol=1e-3, atol=1e-4):
            raise StructureError(f"SEG pixel spacing {spacing} differs from the image series' {expected}; "
                                 "resampling is not supported")


def _frame_index(ds: Dataset, k: int, grid: Grid, sop_index: Mapping[str, int]) -> tuple[int, int, int] | str:
    """(z, row offset, column offset) of frame k on the grid, or the reason it cannot be placed."""
    position = _functional(ds, k, "PlanePositionSequence")
    if position is not None and "ImagePositionPatient" in position:
        zyx = patient_to_index(grid, np.asarray([[float(v) for v in position.ImagePositionPatient]]))[0]
        whole = np.round(zyx)
        if abs(zyx[0] - whole[0]) > PLANE_TOLERANCE or np.abs(zyx[1:] - whole[1:]).max() > _PIXEL_TOLERANCE:
            return f"frame {k + 1} lies between image planes or pixels (index {np.round(zyx, 3).tolist()})"
        return int(whole[0]), int(whole[1]), int(whole[2])
    derivation = _functional(ds, k, "DerivationImageSequence")
    for source in (derivation.get("SourceImageSequence", []) if derivation is not None else []):
        z = sop_index.get(str(source.get("ReferencedSOPInstanceUID", "")))
        if z is not None:
            return z, 0, 0
    return f"frame {k + 1} has neither a plane position nor a source image in the series"


def _segment_names(ds: Dataset) -> dict[int, str]:
    names: dict[int, str] = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        names[number] = str(item.get("SegmentLabel", "") or item.get("SegmentDescription", "")
                            or f"Segment {number}").strip()
    return names


def seg_masks(ds: Dataset, grid: Grid, sop_index: Mapping[str, int] | None = None) -> Rasterised:
    """Map every segment of a DICOM SEG onto ``grid``; ``sop_index`` maps image SOP Instance UIDs to slice indices
    (used for frames without a plane position)."""
    if str(ds.get("Modality", "")) != "SEG":
        raise StructureError(f"not a Segmentation (Modality {ds.get('Modality')!r})")
    _check_plane(ds, grid)
    nz, ny, nx = grid.shape
    names = _segment_names(ds)
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises several types for missing handlers / corrupt data
        raise StructureError(f"cannot decode the SEG pixel data: {exc}") from exc
    frames = frames.reshape(-1, int(ds.Rows), int(ds.Columns))
    if str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames * 2 > int(ds.get("MaximumFractionalValue", 255))
    out = Rasterised(masks={name: np.zeros((nz, ny, nx), bool) for name in names.values()})
    problems: list[str] = []
    outside = 0
    for k in range(frames.shape[0]):
        ident = _functional(ds, k, "SegmentIdentificationSequence")
        number = int(ident.ReferencedSegmentNumber) if ident is not None else 1
        name = names.get(number)
        if name is None:
            problems.append(f"frame {k + 1} refers to segment {number}, which the SEG does not describe")
            continue
        place = _frame_index(ds, k, grid, sop_index or {})
        if isinstance(place, str):
            problems.append(place)
            continue
        z, r0, c0 = place
        if not 0 <= z < nz:
            outside += 1
            continue
        frame = frames[k].astype(bool)
        rs, cs = max(r0, 0), max(c0, 0)
        re_, ce = min(r0 + frame.shape[0], ny), min(c0 + frame.shape[1], nx)
        if rs < re_ and cs < ce:
            out.masks[name][z, rs:re_, cs:ce] |= frame[rs - r0:re_ - r0, cs - c0:ce - c0]
    if outside:
        out.warnings.append(f"{outside} SEG frame(s) on slices with no image; left out")
    if problems:
        out.warnings.append(f"{len(problems)} SEG frame(s) could not be placed, e.g. {problems[0]}; left out")
    return out
