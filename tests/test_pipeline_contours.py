"""Mask <-> contour conversion: exact at pixel edges, holes and islands kept, patient coordinates right."""

from __future__ import annotations

import numpy as np
import pytest

from models.types import Volume
from pipeline.contours import contours_to_mask, mask_to_contours, mask_to_polygons, polygons_to_mask
from pipeline.errors import StructureError
from tests.factories import load_openkbp


def _ring(size=64):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 32, xx - 30)
    mask = (r < 20) & (r >= 9)
    mask[30:33, 28:31] = True  # an island inside the hole
    mask[60, 5:40] = True  # a one-pixel-wide bar
    mask[2, 2] = mask[3, 3] = True  # two pixels touching at a corner
    return mask


def _area(poly):
    y, x = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_single_pixel_polygon_is_the_pixel_square():
    mask = np.zeros((5, 5), bool)
    mask[2, 3] = True
    (poly,) = mask_to_polygons(mask)
    assert sorted(map(tuple, poly)) == [(1.5, 2.5), (1.5, 3.5), (2.5, 2.5), (2.5, 3.5)]


def _or_of_polygons(polygons, shape):
    """How plastimatch reads a slice by default: each polygon filled on its own, results OR-ed."""
    return np.logical_or.reduce([polygons_to_mask([p], shape) for p in polygons])


def test_ring_keeps_hole_and_islands_for_or_and_xor_readers():
    mask = _ring()
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 4  # ring with its hole cut in, island in the hole, bar, corner pair
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)
    np.testing.assert_array_equal(_or_of_polygons(polygons, mask.shape), mask)
    assert sum(_area(p) for p in polygons) == pytest.approx(mask.sum())  # exact: pixel edges, hole subtracted


def test_without_keyholes_holes_are_separate_polygons():
    mask = _ring()
    polygons = mask_to_polygons(mask, keyholes=False)
    assert len(polygons) == 5
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)
    areas = sorted(_area(p) for p in polygons)
    assert areas[-1] - areas[-2] + sum(areas[:-2]) == pytest.approx(mask.sum())


def test_polygons_follow_pixel_edges_not_centres():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 4:12] = True
    (poly,) = mask_to_polygons(mask)
    assert _area(poly) == 80.0  # centre tracing would give 9 * 7 = 63
    assert poly[:, 0].min() == 4.5 and poly[:, 1].max() == 11.5


def test_random_masks_roundtrip_exactly_for_xor_and_or_readers():
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((30, 41)) < rng.uniform(0.05, 0.95)
        polygons = mask_to_polygons(mask)
        np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)
        np.testing.assert_array_equal(_or_of_polygons(polygons, mask.shape), mask)


def test_empty_mask_gives_no_polygons():
    assert mask_to_polygons(np.zeros((8, 8), bool)) == []
    assert not polygons_to_mask([], (8, 8)).any()


def test_real_organs_roundtrip_through_patient_coordinates_on_an_oblique_grid():
    case = load_openkbp("validation", 1)
    grid = Volume(array=np.zeros(case.ct.shape, np.int16), spacing=(1.1, 0.9, 2.5), origin=(-100.0, 40.0, 7.0),
                  direction=tuple(np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0].ravel()))
    for name, raw in case.masks.items():
        mask = raw.astype(bool)
        contours = mask_to_contours(mask, grid)
        assert contours and all(points.shape[1] == 3 for _, points in contours)
        rebuilt = contours_to_mask([points for _, points in contours], grid)
        np.testing.assert_array_equal(rebuilt, mask, err_msg=name)


def test_contour_off_the_slice_planes_is_refused():
    grid = Volume(array=np.zeros((4, 10, 10), np.int16), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    square = np.array([[1, 1, 4.5], [5, 1, 4.5], [5, 5, 4.5], [1, 5, 4.5]], float)  # halfway between slices
    with pytest.raises(StructureError, match="not on a slice plane"):
        contours_to_mask([square], grid)


def test_mask_of_wrong_shape_is_refused():
    grid = Volume(array=np.zeros((4, 10, 10), np.int16), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    with pytest.raises(StructureError, match=r"does not match the series grid"):
        mask_to_contours(np.zeros((4, 10, 11), bool), grid)
