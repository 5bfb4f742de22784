"""DICOM SEG builder on real CT: valid for dciodvfy, read back by highdicom exactly, coded from the TG-263 table."""

from __future__ import annotations

import io
import tracemalloc

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.types import Structure, StructureSet
from pipeline.errors import StructureError
from pipeline.seg import build_seg
from tests.factories import OPENKBP_ORGANS, ct_series, load_openkbp
from tests.pipeline_checks import dciodvfy_errors, dice, save


def _ring(shape):
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    r = np.hypot(yy - ny / 2, xx - nx / 2) / (ny / 128)
    mask = np.zeros(shape, bool)
    mask[40:44] = (r < 20) & (r >= 9)
    return mask


@pytest.fixture(scope="module", params=[1, 4], ids=["native128", "upsampled512"])
def written(request, tmp_path_factory):
    case = load_openkbp("validation", 0, upsample=request.param)
    datasets = ct_series(case.ct, case.spacing_zyx)
    structures = tuple(Structure(OPENKBP_ORGANS.get(k, k), m.astype(bool), color=(0, 200, 0), algorithm="organs",
                                 algorithm_version="0.3") for k, m in sorted(case.masks.items()))
    structure_set = StructureSet(structures + (Structure("Ring", _ring(case.ct.shape)),), label="organs")
    ds = build_seg(datasets, structure_set)
    path = save(ds, tmp_path_factory.mktemp(f"seg{request.param}") / "seg.dcm")
    return datasets, structure_set, path


def test_seg_passes_dciodvfy(written):
    assert dciodvfy_errors(written[2]) == []


def test_highdicom_reads_back_every_segment_exactly(written):
    datasets, structure_set, path = written
    seg = hd.seg.segread(io.BytesIO(path.read_bytes()))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in datasets],
                                               assert_missing_frames_are_empty=True)
    assert pixels.shape[-1] == len(structure_set.structures)
    for n, s in enumerate(structure_set.structures):
        assert dice(pixels[..., n].astype(bool), s.mask) == 1.0, s.name
    assert seg.SegmentsOverlap == "YES"  # PTV56 contains PTV70


def test_segments_are_coded_and_reference_the_source_series(written):
    datasets, structure_set, path = written
    ds = pydicom.dcmread(path)
    assert ds.Manufacturer == "dicom-node" and ds.SeriesDescription == "AUTO: organs 0.3"
    assert ds.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    segments = {s.SegmentLabel: s for s in ds.SegmentSequence}
    assert list(segments) == structure_set.names()
    parotid = segments["Parotid_L"]
    prop = parotid.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("45289007", "SCT")
    assert prop.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert parotid.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert segments["PTV70"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "228793007"
    assert segments["Ring"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "91723000"  # not in the table
    algorithm = parotid.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("organs", "0.3")
    series = ds.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence}
    assert referenced <= {d.SOPInstanceUID for d in datasets} and referenced


def test_only_frames_holding_a_segment_are_stored(written):
    _, structure_set, path = written
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    expected = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in structure_set.structures)
    assert ds.NumberOfFrames == expected


def test_100_segments_on_512_ct_stay_far_below_a_dense_array():
    case = load_openkbp("validation", 0, upsample=4)
    nz = 32
    datasets = ct_series(case.ct[:nz], case.spacing_zyx)
    rng = np.random.default_rng(0)
    structures = []
    for n in range(100):
        mask = np.zeros((nz, 512, 512), bool)
        z, y, x = rng.integers(4, nz - 4), rng.integers(100, 400), rng.integers(100, 400)
        mask[z - 3:z + 3, y - 30:y + 30, x - 20:x + 20] = True
        structures.append(Structure(f"Blob_{n:03d}", mask))
    tracemalloc.start()
    try:
        ds = build_seg(datasets, StructureSet(tuple(structures)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense = nz * 512 * 512 * 100  # bytes of the (Z, Y, X, S) boolean array highdicom usually needs
    assert ds.NumberOfFrames == 600
    assert peak < dense / 8, f"peak {peak / 1e6:.0f} MB"


def test_bad_input_is_refused():
    case = load_openkbp("validation", 0)
    datasets = ct_series(case.ct[:8], case.spacing_zyx)
    with pytest.raises(StructureError, match="at least one structure"):
        build_seg(datasets, StructureSet(()))
    with pytest.raises(StructureError, match="does not match the series"):
        build_seg(datasets, StructureSet((Structure("External", np.ones((8, 128, 64), bool)),)))
    with pytest.raises(StructureError, match="CID 7162 keyword"):
        build_seg(datasets, StructureSet((Structure("External", np.ones((8, 128, 128), bool)),),
                                         notes={"algorithm_family": "Magic"}))
