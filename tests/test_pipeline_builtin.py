"""Weight-free built-in pipelines on real CT: plausible External, lungs and bones; valid RTSTRUCT/SEG from them."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import CTImageStorage, generate_uid

from models.types import StructureSet

from pipeline.base import load_pipeline, run_pipeline
from pipeline.builtin import BodyParams, BonesParams, LungsParams
from pipeline.errors import SeriesError
from pipeline.rtstruct import build_rtstruct
from pipeline.seg import build_seg
from tests.factories import DICOM_DATA, ct_series, load_openkbp
from tests.pipeline_checks import dciodvfy_errors, save

TOTALSEG = DICOM_DATA / "totalsegmentator"


@pytest.fixture(scope="module")
def kbp():
    case = load_openkbp("validation", 0)
    return case, ct_series(case.ct, case.spacing_zyx)


@pytest.fixture(scope="module")
def abdomen():
    datasets = [pydicom.dcmread(p) for p in sorted((TOTALSEG / "example_ct_dicom").iterdir())]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(TOTALSEG / "example_seg_dicom.nii.gz")))
    return datasets, labels


def _inside(part: np.ndarray, whole: np.ndarray) -> float:
    return float((part & whole).sum() / part.sum())


def test_body_contains_every_clinical_structure_and_is_hole_free(kbp):
    case, datasets = kbp
    (external,) = run_pipeline(load_pipeline("body"), datasets).structures
    assert external.name == "External" and external.roi_type.value == "EXTERNAL"
    for name, mask in case.masks.items():
        assert _inside(mask.astype(bool), external.mask) > 0.99, name
    assert 0.05 < external.mask.mean() < 0.6  # the patient, not the field of view
    assert not (case.ct[external.mask] < -900).mean() > 0.05  # air inside only where the lungs/airway are


def test_lungs_are_left_and_right_in_patient_coordinates(kbp):
    case, datasets = kbp
    result = run_pipeline(load_pipeline("lungs"), datasets)
    assert result.names() == ["Lung_L", "Lung_R"]
    left, right = (s.mask for s in result.structures)
    x_left, x_right = np.argwhere(left)[:, 2].mean(), np.argwhere(right)[:, 2].mean()
    assert x_left > x_right  # column index grows toward the patient's left (LPS, identity direction)
    voxel_ml = np.prod(case.spacing_zyx) / 1000
    for mask in (left, right):
        assert 300 < mask.sum() * voxel_ml < 4000
        assert np.median(case.ct[mask]) < -500
    for organ in ("SpinalCord", "Esophagus", "Larynx"):
        if organ in case.masks:
            assert _inside(case.masks[organ].astype(bool), left | right) < 0.05, organ


def test_bones_hold_the_mandible_but_not_the_spinal_cord(kbp):
    case, datasets = kbp
    (bones,) = run_pipeline(load_pipeline("bones"), datasets).structures
    assert bones.name == "Bones"
    assert _inside(case.masks["Mandible"].astype(bool), bones.mask) > 0.9
    assert _inside(case.masks["SpinalCord"].astype(bool), bones.mask) < 0.05


def test_abdomen_ct_body_holds_every_organ_and_bones_match_high_hu(abdomen, tmp_path):
    datasets, labels = abdomen
    body = run_pipeline(load_pipeline("body"), datasets)
    bones = run_pipeline(load_pipeline("bones"), datasets)
    lungs = run_pipeline(load_pipeline("lungs"), datasets)
    # DICOM slice k is seg[:, ::-1, k].T in NIfTI (x, y, z) order, i.e. sitk's (z, y, x) array flipped in y
    organs = labels[:, ::-1, :] > 0
    assert _inside(organs, body.structures[0].mask) > 0.995
    assert lungs.structures == ()  # an abdominal scan below the lungs: bowel gas is not lung
    bone = bones.structures[0].mask
    assert 0.01 < bone.sum() / body.structures[0].mask.sum() < 0.15
    structure_set = StructureSet(body.structures + bones.structures, label="body+bones", notes=body.notes)
    with pytest.raises(SeriesError, match="empty StudyInstanceUID"):  # these anonymised files have blank UIDs
        build_rtstruct(datasets, structure_set)
    datasets = [copy.deepcopy(ds) for ds in datasets]
    study, series = generate_uid(), generate_uid()
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    assert dciodvfy_errors(save(build_rtstruct(datasets, structure_set), tmp_path / "rt.dcm")) == []
    assert dciodvfy_errors(save(build_seg(datasets, structure_set), tmp_path / "seg.dcm")) == []


@pytest.mark.parametrize("model", [BodyParams, LungsParams, BonesParams])
def test_every_parameter_is_documented(model):
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description"
