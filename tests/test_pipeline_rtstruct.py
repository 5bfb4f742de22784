"""RTSTRUCT builder on real CT: valid for dciodvfy, read back by plastimatch with Dice >= 0.98 per structure."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from models.types import RoiType, Structure, StructureSet
from pipeline.contours import contours_to_mask
from pipeline.errors import SeriesError, StructureError
from pipeline.rtstruct import build_rtstruct, format_ds
from pipeline.volume import load_volume
from tests.factories import DICOM_DATA, OPENKBP_ORGANS, ct_series, load_openkbp, write_series
from tests.pipeline_checks import dciodvfy_errors, dice, plastimatch_masks, save


def _ring_structure(shape, z_range):
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    r = np.hypot(yy - ny / 2, xx - nx / 2) / (ny / 128)
    ring = (r < 20) & (r >= 9)
    island = (np.abs(yy - ny / 2) < 3 * ny / 128) & (np.abs(xx - nx / 2) < 3 * nx / 128)
    far_island = (np.abs(yy - ny * 0.15) < 4 * ny / 128) & (np.abs(xx - nx * 0.8) < 5 * nx / 128)
    mask = np.zeros(shape, bool)
    mask[z_range] = ring | island | far_island
    return Structure("Ring", mask, color=(255, 0, 0), roi_type=RoiType.CONTROL, algorithm="test", algorithm_version="1")


def _openkbp_structures(case):
    structures = [Structure(OPENKBP_ORGANS.get(k, k), m.astype(bool), color=(0, 200, 0), algorithm="organs",
                            algorithm_version="0.3") for k, m in sorted(case.masks.items())]
    return StructureSet(tuple(structures) + (_ring_structure(case.ct.shape, slice(30, 34)),), label="organs")


@pytest.fixture(scope="module", params=[1, 4], ids=["native128", "upsampled512"])
def written(request, tmp_path_factory):
    case = load_openkbp("validation", 0, upsample=request.param)
    datasets = ct_series(case.ct, case.spacing_zyx)
    folder = tmp_path_factory.mktemp(f"rt{request.param}")
    write_series(datasets, folder / "ct")
    structure_set = _openkbp_structures(case)
    ds = build_rtstruct(datasets, structure_set)
    path = save(ds, folder / "rtstruct.dcm")
    return datasets, structure_set, path, folder


def test_rtstruct_passes_dciodvfy(written):
    _, _, path, _ = written
    assert dciodvfy_errors(path) == []


def test_plastimatch_reads_back_every_structure_with_dice_098(written):
    datasets, structure_set, path, folder = written
    masks = plastimatch_masks(path, folder / "ct", folder / "pm")
    assert set(masks) == set(structure_set.names())
    scores = {s.name: dice(masks[s.name], s.mask) for s in structure_set.structures}
    assert min(scores.values()) >= 0.98, scores
    assert scores["Ring"] == 1.0  # hole and islands survive in a third-party reader


def test_read_back_with_pydicom_references_and_attributes(written):
    datasets, structure_set, path, _ = written
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and ds.Manufacturer == "dicom-node"
    assert ds.SeriesDescription == "AUTO: organs 0.3"
    assert ds.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == {d.SOPInstanceUID for d in datasets}
    names = [roi.ROIName for roi in ds.StructureSetROISequence]
    assert names == structure_set.names()
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert types[names.index("Ring") + 1] == "CONTROL" and types[1] == "ORGAN"
    by_uid = {d.SOPInstanceUID: d for d in datasets}
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            ref = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            z = float(ref.ImagePositionPatient[2])
            assert np.allclose(np.asarray(contour.ContourData, float).reshape(-1, 3)[:, 2], z, atol=1e-3)


def test_ring_contours_are_keyholed_ring_and_two_islands(written):
    datasets, structure_set, path, _ = written
    ds = pydicom.dcmread(path)
    number = structure_set.names().index("Ring") + 1
    roi = next(r for r in ds.ROIContourSequence if r.ReferencedROINumber == number)
    assert len(roi.ContourSequence) == 4 * 3  # 4 slices x (ring with its hole cut in, centre island, far island)
    volume = load_volume(datasets)
    rebuilt = contours_to_mask([np.asarray(c.ContourData, float).reshape(-1, 3) for c in roi.ContourSequence],
                               volume)
    np.testing.assert_array_equal(rebuilt, structure_set.structures[number - 1].mask)


def test_every_ds_value_fits_16_characters():
    text = format_ds(np.array([-123456.123456, 1e-9, -0.00001, 99999.99999]))
    assert all(len(v) <= 16 for v in text.split("\\"))
    assert text.split("\\")[1:3] == ["0.0000", "0.0000"]


def test_oblique_series_and_empty_structure_are_valid(tmp_path):
    datasets = [pydicom.dcmread(p) for p in sorted((DICOM_DATA / "rt_utils" / "oriented_data").glob("*.dcm"))]
    volume = load_volume(datasets)
    mask = volume.array > np.percentile(volume.array, 70)
    with pytest.raises(SeriesError, match="no FrameOfReferenceUID"):  # these real files lack it
        build_rtstruct(datasets, StructureSet((Structure("GTV", mask),)))
    for ds in datasets:
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    ds = build_rtstruct(datasets, StructureSet((Structure("GTV", mask, roi_type=RoiType.GTV),
                                                Structure("Empty", np.zeros_like(mask)))),
                        series_description="AUTO: test 1")
    path = save(ds, tmp_path / "oblique.dcm")
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(io.BytesIO(path.read_bytes()))
    roi = back.ROIContourSequence[0]
    rebuilt = contours_to_mask([np.asarray(c.ContourData, float).reshape(-1, 3) for c in roi.ContourSequence], volume)
    np.testing.assert_array_equal(rebuilt, mask)
    assert "ContourSequence" not in back.ROIContourSequence[1]
    assert back.SeriesDescription == "AUTO: test 1"


def test_bad_structure_sets_are_refused():
    case = load_openkbp("validation", 0)
    datasets = ct_series(case.ct[:8], case.spacing_zyx)
    with pytest.raises(StructureError, match="does not match the series"):
        build_rtstruct(datasets, StructureSet((Structure("A", np.zeros((8, 128, 127), bool)),)))
    with pytest.raises(StructureError, match="unique"):
        build_rtstruct(datasets, StructureSet((Structure("A", np.zeros((8, 128, 128), bool)),) * 2))
    with pytest.raises(SeriesError, match="missing slice"):
        build_rtstruct(datasets[:3] + datasets[4:], StructureSet(()))


def test_a_contour_too_long_for_explicit_vr_is_written_in_implicit_vr(tmp_path):
    """A ragged mask (an untrained network, noisy thresholding) gives one keyhole contour of thousands of points:
    its ContourData exceeds the 64 KB that Explicit VR allows DS. The object must still be valid and exact."""
    case = load_openkbp("validation", 0)
    datasets = ct_series(case.ct[60:63], case.spacing_zyx)
    write_series(datasets, tmp_path / "ct")
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 128, 128), bool)
    mask[1, 10:118, 10:118] = rng.random((108, 108)) < 0.7  # many holes, all joined into one outline by keyholes
    ragged = StructureSet((Structure("Ragged", mask, algorithm="test", algorithm_version="1"),), label="ragged")
    ds = build_rtstruct(datasets, ragged)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    path = save(ds, tmp_path / "rtstruct.dcm")  # pytest turns pydicom's "changed to UN" warning into an error
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    data = back.ROIContourSequence[0].ContourSequence
    assert max(len(c.ContourData) for c in data) * 9 > 0xFFFE  # the case the test is about
    masks = plastimatch_masks(path, tmp_path / "ct", tmp_path / "pm")
    assert dice(masks["Ragged"], mask) >= 0.98


def test_ordinary_structure_sets_stay_explicit_vr(written):
    _, _, path, _ = written
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
        pydicom.uid.ExplicitVRLittleEndian
