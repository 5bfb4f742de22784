"""Registration of a prior CT to a new one (models.registration) and the fusion of prior mode (models.prior), on a
slab of a real OpenKBP CT: a known shift is recovered within a voxel, simulated follow-ups are reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from factories import load_openkbp
from models.prior import fuse, prior_seeds
from models.registration import key_slices, map_masks, register, simulate_follow_up
from models.types import Volume
from pipeline_checks import dice


@pytest.fixture(scope="module")
def slab():
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(2)
    case = load_openkbp("validation", 0)
    parotid = case.masks["RightParotid"].astype(bool)
    zs = np.flatnonzero(parotid.reshape(parotid.shape[0], -1).any(axis=1))
    z0, z1 = max(int(zs[0]) - 8, 0), min(int(zs[-1]) + 9, case.ct.shape[0])
    return case.ct[z0:z1], case.spacing_zyx, parotid[z0:z1]


def test_a_known_shift_is_recovered_within_a_voxel_on_other_grid_origins(slab):
    ct, (sz, sy, sx), parotid = slab
    voxels = np.array([2, -3, 4])  # content moved by (z, y, x) voxels in the prior
    moved = ndi.shift(ct.astype(np.float32), voxels, order=1, mode="nearest")
    fixed = Volume(ct.astype(np.float32), (sx, sy, sz), origin=(-250.0, -250.0, 0.0))
    prior = Volume(moved, (sx, sy, sz), origin=(-230.0, -260.0, 40.0))  # another frame of reference
    found = register(fixed, prior, deformable=False)
    # A fixed point p sits at p + origin offset + content shift in the prior.
    expected = np.array([20.0, -10.0, 40.0]) + voxels[::-1] * np.array([sx, sy, sz])
    centre = np.array(fixed.index_to_physical(np.array([[s / 2 for s in ct.shape]]))[0])
    error = np.array(found.transform.TransformPoint(centre.tolist())) - centre - expected
    assert np.all(np.abs(error) < np.array([sx, sy, sz])), error
    moved_mask = ndi.shift(parotid.astype(np.float32), voxels, order=0) > 0.5
    mapped = map_masks({"P": moved_mask}, prior, fixed, found.transform)["P"]
    assert dice(mapped, parotid) > 0.85


def test_simulated_follow_up_is_reproducible_and_moves_the_anatomy(slab):
    ct, spacing, parotid = slab
    a = simulate_follow_up(ct, {"P": parotid}, spacing, seed=3)
    b = simulate_follow_up(ct, {"P": parotid}, spacing, seed=3)
    c = simulate_follow_up(ct, {"P": parotid}, spacing, seed=4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks["P"], b.masks["P"])
    assert (a.shift_mm, a.rotation_deg) == (b.shift_mm, b.rotation_deg)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == ct.dtype and a.image.shape == ct.shape
    assert all(abs(v) <= 8.0 for v in a.shift_mm) and all(abs(v) <= 4.0 for v in a.rotation_deg)
    assert 0 < a.max_deformation_mm <= 6.0
    assert 0.2 < dice(a.masks["P"], parotid) < 0.95  # moved, not lost


def test_deformable_registration_undoes_a_simulated_follow_up_better_than_none(slab):
    ct, (sz, sy, sx), parotid = slab
    follow = simulate_follow_up(ct, {"P": parotid}, (sz, sy, sx), seed=0)
    prior, new = Volume(ct, (sx, sy, sz), (0.0, 0.0, 0.0)), Volume(follow.image, (sx, sy, sz), (0.0, 0.0, 0.0))
    found = register(new, prior, deformable=True)
    assert found.deformable_metric is not None
    mapped = map_masks({"P": parotid}, prior, new, found.transform)["P"]
    assert dice(mapped, follow.masks["P"]) > dice(parotid, follow.masks["P"]) + 0.1
    assert dice(mapped, follow.masks["P"]) > 0.75


def test_key_slices_and_seeds_stay_inside_the_mapped_extent():
    mask = np.zeros((20, 8, 8), bool)
    mask[4:13, 2:5, 2:5] = True
    assert key_slices(mask, 1) == [8] and key_slices(mask, 3) == [6, 8, 10]
    assert key_slices(np.zeros_like(mask)) == []
    seeds = prior_seeds({"A": mask, "gone": np.zeros_like(mask)}, 3)
    assert list(seeds) == ["A"] and seeds["A"].extent == (4, 12) and sorted(seeds["A"].masks) == [6, 8, 10]


def test_fusion_keeps_agreeing_slices_and_falls_back_elsewhere():
    registered = np.zeros((4, 10, 10), bool)
    registered[:, 2:8, 2:8] = True
    propagated = registered.copy()
    propagated[1, 2:8, 2:7] = True  # close: Dice 0.91
    propagated[1, :, 7] = False
    propagated[2] = False  # propagation stopped before slice 2
    propagated[3, 2:8, 2:8], propagated[3, 0:2, 0:2] = False, True  # leaked elsewhere
    fused, fallback = fuse(propagated, registered, 0.5)
    assert fallback == [2, 3]
    assert np.array_equal(fused[1], propagated[1]) and np.array_equal(fused[2:], registered[2:])
    assert np.array_equal(fuse(propagated, registered, 1.0)[0][1:], registered[1:])
    with pytest.raises(ValueError, match="min_agreement must be >= 0 and <= 1, got 2"):
        fuse(propagated, registered, 2)
