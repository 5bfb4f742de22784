"""Binary masks <-> planar contours, exactly.

Forward (``mask_to_polygons``): a polygon follows the *edges* of the boundary pixels (the outline of the union of
the foreground pixel squares), not their centres, so filling it again at pixel centres gives back the very same
mask. Each island is one closed polygon with its holes joined in by zero-width "keyhole" cuts, so readers that OR a
slice's contours (plastimatch by default) and those that XOR them (planning systems) agree; islands inside holes
are separate polygons. The tracing runs ``cv2.findContours`` on a grid of twice the
resolution whose samples are pixel centres, edge midpoints and pixel corners: a sample is set when it lies in the
closed union of foreground squares, so the traced border samples lie exactly on the true boundary.

Inverse (``polygons_to_mask``): even-odd scanline filling at pixel centres (half-open rule on vertices), for the
read-back of our own and third-party RTSTRUCTs.

Coordinates: 2-D polygons are (N, 2) arrays of fractional pixel indices (row, column), pixel (r, c) covering
[r - 0.5, r + 0.5] x [c - 0.5, c + 0.5]. 3-D contours are (N, 3) arrays of patient coordinates (mm, LPS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import cv2
import numpy as np

from pipeline.errors import StructureError

__all__ = [
    "Grid",
    "mask_to_polygons",
    "polygons_to_mask",
    "mask_to_contours",
    "contours_to_mask",
    "index_to_patient",
    "patient_to_index",
]

_KERNEL = np.ones((3, 3), np.uint8)


class Grid(Protocol):
    """Anything with a (Z, Y, X) shape and SimpleITK-style geometry: ``Volume`` or ``SeriesGeometry``."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def index_to_patient(grid: Grid, zyx: np.ndarray) -> np.ndarray:
    """(N, 3) fractional voxel indices (z, y, x) -> (N, 3) patient coordinates."""
    xyz = np.asarray(zyx, dtype=float)[:, ::-1] * np.asarray(grid.spacing, dtype=float)
    return xyz @ np.asarray(grid.direction, dtype=float).reshape(3, 3).T + np.asarray(grid.origin, dtype=float)


def patient_to_index(grid: Grid, points: np.ndarray) -> np.ndarray:
    """(N, 3) patient coordinates -> (N, 3) fractional voxel indices (z, y, x)."""
    rel = np.asarray(points, dtype=float) - np.asarray(grid.origin, dtype=float)
    xyz = rel @ np.asarray(grid.direction, dtype=float).reshape(3, 3) / np.asarray(grid.spacing, dtype=float)
    return xyz[:, ::-1]


def mask_to_polygons(mask: np.ndarray, *, keyholes: bool = True) -> list[np.ndarray]:
    """Closed polygons (row, col) along the pixel edges of a 2-D mask, any number of islands and holes.

    With ``keyholes`` (the default) each hole is joined to its island's outline by a zero-width cut along a pixel
    column, so one polygon describes an island with its holes: readers that OR a slice's contours (plastimatch's
    default) and readers that XOR them (most planning systems) both get the holes right. Islands inside holes stay
    separate polygons. Without ``keyholes`` holes are separate polygons (even-odd readers only).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise StructureError(f"mask_to_polygons needs a 2-D mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    crop = mask[r0:rows[-1] + 1, c0:cols[-1] + 1]
    h, w = crop.shape
    # Sample (a, b) of the doubled grid sits at pixel coordinate (a / 2 - 1 + r0, b / 2 - 1 + c0): pixel centres at
    # even samples, corners at odd ones; one sample of zero padding keeps OpenCV's border handling out of the way.
    doubled = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    doubled[2:-1:2, 2:-1:2] = crop
    doubled = cv2.dilate(doubled, _KERNEL)
    found, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    offset = np.array([r0 - 1.0, c0 - 1.0])
    polygons = [_simplify(_through_corners(c[:, 0, ::-1])) / 2.0 + offset for c in found]
    if not keyholes:
        return polygons
    parents = hierarchy[0][:, 3]
    return [_bridge_holes(polygons[i], [polygons[j] for j in np.flatnonzero(parents == i)])
            for i in np.flatnonzero(parents < 0)]


def _bridge_holes(outline: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Join each hole to the polygon by a vertical zero-width cut from the hole's top edge up to the nearest
    horizontal edge above it. Holes go top first, so whatever lies above a hole is already part of the polygon."""
    merged = outline
    for hole in sorted(holes, key=lambda p: p[:, 0].min()):
        nxt = np.roll(hole, -1, axis=0)
        top = hole[:, 0].min()
        k = int(np.flatnonzero((hole[:, 0] == top) & (nxt[:, 0] == top))[0])
        column = min(hole[k, 1], nxt[k, 1]) + 0.5  # a pixel-centre column: never on a vertical edge
        start = np.array([top, column])
        ring = np.vstack([start, np.roll(hole, -(k + 1), axis=0), start])
        m_next = np.roll(merged, -1, axis=0)
        spans = ((merged[:, 0] == m_next[:, 0]) & (merged[:, 0] < top)
                 & (np.minimum(merged[:, 1], m_next[:, 1]) < column) & (np.maximum(merged[:, 1], m_next[:, 1]) > column))
        candidates = np.flatnonzero(spans)
        i = int(candidates[np.argmax(merged[candidates, 0])])
        landing = np.array([merged[i, 0], column])
        merged = np.vstack([merged[:i + 1], landing, ring, landing, merged[i + 1:]])
    return merged


def _through_corners(points: np.ndarray) -> np.ndarray:
    """Put back the pixel corner that 8-connected tracing cuts at concave corners.

    Border samples are pixel corners (odd, odd on the doubled grid) and edge midpoints; a diagonal step joins two edge midpoints and
    skips the corner between them, which is foreground (it touches the pixel that makes either midpoint
    foreground) and lies on the true boundary.
    """
    following = np.roll(points, -1, axis=0)
    step = following - points
    diagonal = np.flatnonzero((np.abs(step[:, 0]) == 1) & (np.abs(step[:, 1]) == 1))
    if diagonal.size == 0:
        return points
    p, q = points[diagonal], following[diagonal]
    p_row_on_corner = (p[:, 0] % 2) == 1
    corner = np.where(p_row_on_corner[:, None], np.column_stack([p[:, 0], q[:, 1]]), np.column_stack([q[:, 0], p[:, 1]]))
    return np.insert(points, diagonal + 1, corner, axis=0)


def _simplify(points: np.ndarray) -> np.ndarray:
    """Drop points in the middle of straight runs (all steps are axis-aligned here)."""
    incoming = points - np.roll(points, 1, axis=0)
    outgoing = np.roll(points, -1, axis=0) - points
    turn = (incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]) != 0
    reverse = (incoming * outgoing).sum(axis=1) < 0
    keep = turn | reverse
    return points[keep] if keep.sum() >= 3 else points


def polygons_to_mask(polygons: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of (row, col) polygons, sampled at pixel centres; returns a bool (rows, cols) mask."""
    height, width = shape
    rows_all, xs_all = [], []
    for poly in polygons:
        p = np.asarray(poly, dtype=float)
        if p.ndim != 2 or p.shape[0] < 3:
            continue
        y0, x0 = p[:, 0], p[:, 1]
        y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        first = np.maximum(np.ceil(lo), 0).astype(np.int64)  # half-open [lo, hi): first centre row >= lo
        last = np.minimum(np.ceil(hi) - 1, height - 1).astype(np.int64)
        count = np.where(hi > lo, np.maximum(last - first + 1, 0), 0)
        if count.sum() == 0:
            continue
        edge = np.repeat(np.arange(p.shape[0]), count)
        row = first[edge] + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
        t = (row - y0[edge]) / (y1[edge] - y0[edge])
        rows_all.append(row)
        xs_all.append(x0[edge] + t * (x1[edge] - x0[edge]))
    toggles = np.zeros((height, width + 1), np.int32)
    if rows_all:
        rows_cat, xs_cat = np.concatenate(rows_all), np.concatenate(xs_all)
        col = np.clip(np.floor(xs_cat).astype(np.int64) + 1, 0, width)  # first centre strictly right of x
        np.add.at(toggles, (rows_cat, col), 1)
    return (np.cumsum(toggles[:, :width], axis=1) % 2).astype(bool)


def mask_to_contours(mask: np.ndarray, grid: Grid, *, keyholes: bool = True) -> list[tuple[int, np.ndarray]]:
    """(slice index, (N, 3) patient-coordinate polygon) for every island (holes cut in, see ``mask_to_polygons``)
    of a (Z, Y, X) mask."""
    mask = np.asarray(mask, dtype=bool)
    if tuple(mask.shape) != tuple(grid.shape):
        raise StructureError(f"mask shape {mask.shape} does not match the series grid {tuple(grid.shape)}")
    out = []
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        for poly in mask_to_polygons(mask[z], keyholes=keyholes):
            zyx = np.column_stack([np.full(len(poly), float(z)), poly])
            out.append((int(z), index_to_patient(grid, zyx)))
    return out


def contours_to_mask(contours: Sequence[np.ndarray], grid: Grid, *, tolerance: float = 0.01) -> np.ndarray:
    """Even-odd fill of patient-coordinate planar contours on ``grid``; each must lie on one slice plane.

    ``tolerance`` is the largest allowed distance from a slice plane, as a fraction of the slice spacing.
    """
    nz, ny, nx = grid.shape
    per_slice: dict[int, list[np.ndarray]] = {}
    for points in contours:
        zyx = patient_to_index(grid, np.asarray(points, dtype=float).reshape(-1, 3))
        z = int(np.round(zyx[:, 0].mean()))
        if np.abs(zyx[:, 0] - z).max() > tolerance:
            raise StructureError(f"contour is not on a slice plane (index z from {zyx[:, 0].min():.3f} to "
                                 f"{zyx[:, 0].max():.3f}, tolerance {tolerance})")
        if 0 <= z < nz:
            per_slice.setdefault(z, []).append(zyx[:, 1:])
    mask = np.zeros((nz, ny, nx), bool)
    for z, polys in per_slice.items():
        mask[z] = polygons_to_mask(polys, (ny, nx))
    return mask
