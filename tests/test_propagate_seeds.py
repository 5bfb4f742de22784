"""Seeds for propagation from real RTSTRUCTs on a real OpenKBP CT slab: which structure sets belong to a series,
exact rasterisation of seed slices, POINT ROIs as clicks, RT ROI types, and clear refusals. No engine needed."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from factories import ct_series, load_openkbp
from models.types import RoiType, Structure, StructureSet
from pipeline.base import PipelineInput, load_pipeline, validate_params
from pipeline.errors import PipelineParamsError
from pipeline.rtstruct import build_rtstruct
from pipeline.seeds import SeedError, references_series, seed_rois
from pipeline.volume import load_volume


@pytest.fixture(scope="module")
def slab():
    case = load_openkbp("validation", 0)
    truth = case.masks["LeftParotid"].astype(bool)
    zs = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    z0 = int(zs[0])
    datasets = ct_series(case.ct[z0:z0 + 8], case.spacing_zyx)
    return datasets, load_volume(datasets), truth[z0:z0 + 8]


def _seed(datasets, truth, slices, roi_type=RoiType.GTV, name="GTVp"):
    mask = np.zeros_like(truth)
    for z in slices:
        mask[z] = truth[z]
    return build_rtstruct(datasets, StructureSet((Structure(name, mask, roi_type=roi_type, color=(1, 2, 3)),)))


def _add_point_roi(ds: Dataset, name: str, patient_xyz: tuple[float, float, float]) -> None:
    number = max(int(r.ROINumber) for r in ds.StructureSetROISequence) + 1
    roi = Dataset()
    roi.ROINumber, roi.ROIName = number, name
    roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence.append(roi)
    contour = Dataset()
    contour.ContourGeometricType, contour.NumberOfContourPoints = "POINT", 1
    contour.ContourData = [f"{v:.4f}" for v in patient_xyz]
    item = Dataset()
    item.ReferencedROINumber, item.ROIDisplayColor = number, [0, 255, 0]
    item.ContourSequence = DicomSequence([contour])
    ds.ROIContourSequence.append(item)
    obs = Dataset()
    obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = number, number, "MARKER"
    ds.RTROIObservationsSequence.append(obs)


def test_a_structure_set_belongs_to_the_series_it_names(slab):
    datasets, _, truth = slab
    seed = _seed(datasets, truth, [3])
    series, frame = datasets[0].SeriesInstanceUID, datasets[0].FrameOfReferenceUID
    assert references_series(seed, series, frame)
    assert not references_series(seed, "1.2.3.4", frame)  # it names another series: the frame is not enough
    del seed.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence
    assert references_series(seed, "1.2.3.4", frame)  # naming no series: the frame of reference decides
    assert not references_series(seed, "1.2.3.4", "1.2.9")


def test_seed_slices_are_rasterised_exactly_with_type_and_colour(slab):
    datasets, volume, truth = slab
    (roi,), warnings = seed_rois([_seed(datasets, truth, [2, 5])], volume)
    assert warnings == []
    assert (roi.name, roi.roi_type, roi.color) == ("GTVp", RoiType.GTV, (1, 2, 3))
    assert sorted(roi.masks) == [2, 5]
    assert all(np.array_equal(roi.masks[z], truth[z]) for z in (2, 5))


def test_point_rois_become_clicks(slab):
    datasets, volume, truth = slab
    seed = _seed(datasets, truth, [2])
    y, x = np.argwhere(truth[4])[0]
    xyz = volume.index_to_physical(np.array([[4, y, x]]))[0]
    _add_point_roi(seed, "GTVp", tuple(xyz))  # same name: clicks join the contoured ROI
    _add_point_roi(seed, "Node1", tuple(xyz))  # alone: a click-only seed
    rois, _ = seed_rois([seed], volume)
    by_name = {r.name: r for r in rois}
    assert by_name["GTVp"].points[4].tolist() == [[y, x]] and sorted(by_name["GTVp"].masks) == [2]
    assert by_name["Node1"].masks == {} and by_name["Node1"].roi_type == RoiType.CONTROL  # MARKER


def test_refusals_name_what_is_missing(slab):
    datasets, volume, truth = slab
    seed = _seed(datasets, truth, [2])
    with pytest.raises(SeedError, match=r"no seed ROI named \['GTVn'\].*they hold: \['GTVp'\]"):
        seed_rois([seed], volume, ["GTVn"])
    empty = _seed(datasets, truth, [], name="Empty")
    assert seed_rois([empty], volume) == ([], ["Empty: no contour and no point on this series; not propagated"])
    with pytest.raises(SeedError, match="seed ROI 'Empty' has no contour and no point"):
        seed_rois([empty], volume, ["empty"])


def test_pipeline_without_seed_is_rejected_before_any_model_loads(slab):
    datasets, volume, _ = slab
    pipeline = load_pipeline("propagate")
    params = validate_params(pipeline, {"engine": "litemedsam", "source": "seed"})
    with pytest.raises(SeedError, match="no RT Structure Set references this series"):
        pipeline.run(PipelineInput(volume=volume, datasets=tuple(datasets), params=params))


@pytest.mark.parametrize("params, message", [
    ({"source": "previous"}, "source: Input should be 'seed' or 'prior'"),
    ({"source": "prior", "prior": "first"}, "prior: Input should be 'latest'"),
    ({"source": "prior", "min_agreement": 1.5}, "min_agreement: Input should be less than or equal to 1"),
    ({"engine": "sam9"}, "unknown engine 'sam9'; known engines: litemedsam"),
    ({"structures": []}, "structures: List should have at least 1 item"),
])
def test_params_are_checked_when_rules_load(params, message):
    with pytest.raises(PipelineParamsError, match=message):
        validate_params(load_pipeline("propagate"), params)
