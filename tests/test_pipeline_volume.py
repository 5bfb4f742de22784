"""Series -> Volume on real DICOM: geometry equals SimpleITK's reader, compressed syntaxes decode, bad series fail."""

from __future__ import annotations

import copy
import random

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.errors import PipelineError, SeriesError
from pipeline.volume import load_volume, series_geometry, sort_slices
from tests.factories import DICOM_DATA, ct_series, load_openkbp

TOTALSEG = DICOM_DATA / "totalsegmentator" / "example_ct_dicom"
ORIENTED = DICOM_DATA / "rt_utils" / "oriented_data"


def _read_folder(folder):
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.suffix != ".txt"]


def _sitk(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture(scope="module")
def totalseg():
    return _read_folder(TOTALSEG)


@pytest.fixture(scope="module")
def kbp_series():
    case = load_openkbp("validation", 0)
    return case, ct_series(case.ct[:40], case.spacing_zyx)


@pytest.mark.parametrize("folder", [TOTALSEG, ORIENTED, DICOM_DATA / "dcmqi" / "ct-3slice"], ids=lambda p: p.name)
def test_geometry_and_pixels_match_simpleitk(folder):
    datasets = _read_folder(folder)
    random.Random(0).shuffle(datasets)
    volume = load_volume(datasets)
    image = _sitk(folder)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.direction, image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(volume.array, sitk.GetArrayFromImage(image), atol=1e-3)


def test_jpeg2000_ct_is_decoded_to_hu(totalseg):
    assert totalseg[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    volume = load_volume(totalseg)
    assert volume.shape == (20, 512, 512) and volume.array.dtype == np.int16
    assert volume.modality == "CT"
    assert -1100 < volume.array.min() < -900 and volume.array.max() > 1000  # air and bone in HU


def test_oblique_series_index_to_patient_hits_each_slice_position():
    datasets = _read_folder(ORIENTED)
    volume = load_volume(datasets)
    by_position = sort_slices(datasets)
    corners = volume.index_to_physical(np.array([[k, 0, 0] for k in range(volume.shape[0])]))
    expected = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in by_position])
    np.testing.assert_allclose(corners, expected, atol=1e-4)
    assert not np.allclose(volume.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_all_transfer_syntaxes_give_identical_pixels():
    volumes = {p.name: load_volume([pydicom.dcmread(p)]) for p in sorted((DICOM_DATA / "dcm_qa_ts").glob("*.dcm"))}
    assert len(volumes) == 9
    reference = volumes["1.dcm"].array
    assert reference.any()
    for name, volume in volumes.items():
        np.testing.assert_array_equal(volume.array, reference, err_msg=name)


def test_factory_series_roundtrips_hu_and_grid(kbp_series):
    case, datasets = kbp_series
    volume = load_volume(datasets[::-1])
    np.testing.assert_array_equal(volume.array, case.ct[:40])
    sz, sy, sx = case.spacing_zyx
    np.testing.assert_allclose(volume.spacing, (sx, sy, sz), rtol=1e-5)
    again = load_volume(series_geometry(datasets[::-1]))  # a checked geometry decodes to the same volume
    np.testing.assert_array_equal(again.array, volume.array)
    assert (again.spacing, again.origin, again.direction) == (volume.spacing, volume.origin, volume.direction)


def test_rescale_slope_and_intercept_are_applied(kbp_series):
    _, datasets = kbp_series
    scaled = [copy.deepcopy(ds) for ds in datasets[:3]]
    for ds in scaled:
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    volume = load_volume(scaled)
    raw = np.stack([np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns) for ds in scaled])
    np.testing.assert_array_equal(volume.array, raw.astype(np.int32) * 2 - 1024)


def test_missing_slice_is_refused(totalseg):
    with pytest.raises(SeriesError, match=r"about 1 missing slice"):
        load_volume(totalseg[:7] + totalseg[8:])


def test_missing_slice_error_is_a_pipeline_error(totalseg):
    with pytest.raises(PipelineError):
        series_geometry(totalseg[:3] + totalseg[5:])


def test_mixed_sizes_are_refused(kbp_series):
    _, datasets = kbp_series
    mixed = [copy.deepcopy(ds) for ds in datasets[:4]]
    mixed[2].Rows, mixed[2].Columns = 64, 64
    with pytest.raises(SeriesError, match="image sizes differ"):
        load_volume(mixed)


def test_gantry_tilt_is_refused(kbp_series):
    _, datasets = kbp_series
    tilted = [copy.deepcopy(ds) for ds in datasets[:10]]
    for k, ds in enumerate(tilted):  # 15 degrees: each slice shifted along y by tan(15°) * z
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + np.tan(np.radians(15)) * z, z]
        ds.GantryDetectorTilt = 15
    with pytest.raises(SeriesError, match=r"gantry tilt about 15\.0"):
        load_volume(tilted)


def test_duplicate_positions_are_refused(kbp_series):
    _, datasets = kbp_series
    twice = [datasets[0], copy.deepcopy(datasets[0]), datasets[1]]
    twice[1].SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(SeriesError, match="share the position"):
        load_volume(twice)


def test_mixed_orientation_and_series_are_refused(kbp_series):
    _, datasets = kbp_series
    turned = [copy.deepcopy(ds) for ds in datasets[:3]]
    turned[1].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    with pytest.raises(SeriesError, match="orientation differs"):
        load_volume(turned)
    other = [copy.deepcopy(ds) for ds in datasets[:3]]
    other[0].SeriesInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(SeriesError, match="series differ"):
        load_volume(other)


def test_multiframe_and_empty_input_are_refused():
    enhanced = pydicom.dcmread(DICOM_DATA / "pydicom_data" / "eCT_Supplemental.dcm")
    with pytest.raises(SeriesError, match=r"multi-frame images \(2 frames\) are not supported"):
        load_volume([enhanced])
    with pytest.raises(SeriesError, match="no instances"):
        load_volume([])


def test_undecodable_pixels_name_the_instance(kbp_series):
    _, datasets = kbp_series
    broken = [copy.deepcopy(ds) for ds in datasets[:2]]
    broken[1].PixelData = b"\x00" * 10
    with pytest.raises(SeriesError, match=f"instance {broken[1].SOPInstanceUID}: cannot decode"):
        load_volume(broken)
