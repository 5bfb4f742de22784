"""``dicom-node convert``: MedSAM and nnU-Net outputs, label maps, structure-set selection, pairing rules and the
structure-name mapping file."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from config.node import ConfigError
from config.structure_map import load_structure_map, parse_structure_map
from dicom_node.cli import app
from models.types import Structure, StructureSet
from pipeline.convert import InstanceInfo, map_structures, plan_cases
from pipeline.rtstruct import build_rtstruct
from tests.factories import ct_series, load_openkbp, write_series
from tests.pipeline_checks import dice, save

SECRET = "a-test-secret-of-some-length"
SLICES = slice(40, 72)  # 32 slices of a real OpenKBP patient keep these tests quick


def _rtstruct(datasets, masks, label, when):
    structures = tuple(Structure(n, m.astype(bool)) for n, m in masks.items())
    ds = build_rtstruct(datasets, StructureSet(structures, label=label), now=when)
    ds.StructureSetLabel = label
    return ds


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """One CT with two structure sets: 'Clinical' (older, clinical spellings) and 'Research' (newer)."""
    root = tmp_path_factory.mktemp("formats")
    case = load_openkbp("validation", 1)
    ct = case.ct[SLICES]
    masks = {k: v[SLICES].astype(bool) for k, v in case.masks.items()}
    datasets = ct_series(ct, case.spacing_zyx, patient_id="FMT001")
    write_series(datasets, root / "p" / "ct")
    clinical = {"Lt Parotid": masks["LeftParotid"], "PAROTID_R": masks["RightParotid"], "Cord": masks["SpinalCord"],
                "zOpt_ring": masks["SpinalCord"], "Couch": np.zeros_like(masks["SpinalCord"]),
                "Mystery": masks["Brainstem"]}
    save(_rtstruct(datasets, clinical, "Clinical", dt.datetime(2020, 1, 1)), root / "p" / "rs_old.dcm")
    save(_rtstruct(datasets, {"SpinalCord": masks["SpinalCord"]}, "Research", dt.datetime(2021, 1, 1)),
         root / "p" / "rs_new.dcm")
    return root, ct, masks


def _run(args):
    result = CliRunner().invoke(app, ["convert", *args], env={"DICOM_NODE_CONVERT_SECRET": SECRET})
    return result.exit_code, result.output


def _report(out: Path) -> list[dict[str, str]]:
    with (out / "report.csv").open() as f:
        return list(csv.DictReader(f))


def test_structure_set_selection_and_name_mapping(export, tmp_path):
    root, _, masks = export
    code, output = _run([str(root), "--out", str(tmp_path / "latest")])
    assert code == 0, output
    [row] = _report(tmp_path / "latest")
    assert row["structure_set"] == "Research" and row["structures"] == "SpinalCord"
    code, output = _run([str(root), "--out", str(tmp_path / "all"), "--structure-set", "all"])
    assert code == 0, output
    assert sorted(r["structure_set"] for r in _report(tmp_path / "all")) == ["Clinical", "Research"]
    code, output = _run([str(root), "--out", str(tmp_path / "rx"), "--structure-set", "^clin"])
    assert code == 0, output
    [row] = _report(tmp_path / "rx")
    assert row["structure_set"] == "Clinical"
    assert row["structures"] == "Parotid_L; Parotid_R; SpinalCord"
    assert row["unmapped"] == "Mystery" and row["ignored"] == "zOpt_ring; Couch"
    code, output = _run([str(root), "--out", str(tmp_path / "none"), "--structure-set", "nothing-like-this"])
    assert code == 0 and _report(tmp_path / "none")[0]["status"] == "skipped"
    assert "no structure set label matches" in _report(tmp_path / "none")[0]["reason"]


def test_label_map_npz(export, tmp_path):
    root, ct, masks = export
    out = tmp_path / "out"
    code, output = _run([str(root), "--out", str(out), "--structure-set", "Clinical", "--label-map",
                         "--structures", "Parotid_L,Parotid_R,SpinalCord,Brainstem"])
    assert code == 0, output
    [row] = _report(out)
    assert row["missing"] == "Brainstem"
    with np.load(next(out.glob("*.npz"))) as data:
        assert list(data["label_names"]) == ["background", "Parotid_L", "Parotid_R", "SpinalCord"]
        labels = data["labels"]
        assert not any(k.startswith("mask_") for k in data.files)
    assert dice(labels == 1, masks["LeftParotid"]) == 1.0 and dice(labels == 3, masks["SpinalCord"]) == 1.0


def test_medsam_format(export, tmp_path):
    root, ct, masks = export
    out = tmp_path / "out"
    code, output = _run([str(root), "--out", str(out), "--format", "medsam", "--structure-set", "Clinical",
                         "--structures", "SpinalCord,Parotid_L", "--window", "40,400"])
    assert code == 0, output
    meta = json.loads(next(out.glob("*.json")).read_text())
    with np.load(out / meta["files"][0]) as data:
        assert sorted(data.files) == ["gts", "imgs", "spacing"]
        imgs, gts = data["imgs"], data["gts"]
        assert imgs.dtype == np.uint8 and imgs.shape == ct.shape
        assert (imgs[ct <= -160] == 0).all() and (imgs[ct >= 240] == 255).all()
        np.testing.assert_allclose(data["spacing"], [meta["spacing_zyx"][2], meta["spacing_zyx"][1],
                                                     meta["spacing_zyx"][0]])
    assert {s["name"]: s["label"] for s in meta["structures"]} == {"SpinalCord": 1, "Parotid_L": 2}
    assert dice(gts == 1, masks["SpinalCord"]) == 1.0 and dice(gts == 2, masks["LeftParotid"]) == 1.0


def test_nnunet_dataset(export, tmp_path):
    root, ct, masks = export
    out = tmp_path / "Dataset501_Test"
    code, output = _run([str(root), "--out", str(out), "--format", "nnunet"])
    assert code == 2 and "--structures" in output
    code, output = _run([str(root), "--out", str(out), "--format", "nnunet", "--structure-set", "all",
                         "--structures", "SpinalCord,Parotid_L,Parotid_R"])
    assert code == 0, output
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "SpinalCord": 1, "Parotid_L": 2, "Parotid_R": 3}
    assert dataset["numTraining"] == 2 and dataset["channel_names"] == {"0": "CT"} \
        and dataset["file_ending"] == ".nii.gz"
    labels = sorted(out.glob("labelsTr/*.nii.gz"))
    images = sorted(out.glob("imagesTr/*_0000.nii.gz"))
    assert [p.name.removesuffix(".nii.gz") for p in labels] == \
        [p.name.removesuffix("_0000.nii.gz") for p in images]
    for label_path, image_path in zip(labels, images):
        image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)
        assert image.GetSpacing() == label.GetSpacing() and image.GetOrigin() == label.GetOrigin()
        assert dice(sitk.GetArrayFromImage(label) == 1, masks["SpinalCord"]) == 1.0


def _info(path, modality, series="", sop="", frame="F1", refs=(), sops=(), stamp="", label=""):
    return InstanceInfo(path=path, modality=modality, sop_uid=sop or path, series_uid=series, study_uid="S",
                        frame_of_reference=frame, label=label, timestamp=stamp, referenced_series=refs,
                        referenced_sops=sops)


def test_pairing_by_series_instances_and_frame_of_reference():
    images = [_info(f"a/{k}", "CT", "A", f"a{k}", "F1") for k in range(3)] + \
             [_info(f"b/{k}", "CT", "B", f"b{k}", "F2") for k in range(3)] + \
             [_info(f"c/{k}", "MR", "C", f"c{k}", "F2") for k in range(3)]
    annotations = [
        _info("rs1", "RTSTRUCT", refs=("A",), frame="F1"),
        _info("rs2", "RTSTRUCT", sops=("b0", "b1"), frame="F2"),  # no series reference: by its instances
        _info("seg", "SEG", frame="F1"),  # only the frame of reference, which names one series
        _info("rs3", "RTSTRUCT", frame="F2"),  # two series share F2: ambiguous
        _info("rs4", "RTSTRUCT", refs=("Z",), frame="F9"),  # its images are not there
        _info("plan", "RTPLAN"),
    ]
    plan = plan_cases(images + annotations, "all")
    pairs = {c.annotation.info.path: (c.first.series_uid, c.annotation.paired_by) for c in plan.cases if c.annotation}
    assert pairs == {"rs1": ("A", "series"), "rs2": ("B", "instances"), "seg": ("A", "frame of reference")}
    orphans = {o.info.path: o.reason for o in plan.orphans}
    assert "ambiguous" in orphans["rs3"] and "not in the input" in orphans["rs4"]
    assert [c.first.series_uid for c in plan.cases if c.skip_reason] == ["C"]
    assert plan.ignored == {"RTPLAN": 1}


def test_mapping_file_is_validated_with_key_paths():
    with pytest.raises(ConfigError) as err:
        parse_structure_map({"names": {"Parotid L!?": ["x"]}, "patterns": [{"regex": "(", "name": "PTV"}],
                             "colour": 1})
    text = str(err.value)
    assert "names" in text and "patterns.0.regex" in text
    assert "colour: unknown key (check spelling; see README 'Converting clinical exports for training')" in text
    with pytest.raises(ConfigError, match="already maps to"):
        parse_structure_map({"names": {"A": ["left thing"], "B": ["Left-Thing"]}})


def test_duplicate_labels_keep_the_non_empty_one():
    full = np.ones((1, 2, 2), bool)
    mapped = map_structures({"Parotid L": np.zeros_like(full), "Lt Parotid": full}, load_structure_map())
    assert mapped.source_names == {"Parotid_L": "Lt Parotid"} and mapped.warnings


def test_seg_export_converts_through_the_cli(export, tmp_path):
    from pipeline.seg import build_seg

    _, ct, masks = export
    datasets = ct_series(ct, (2.5, 3.0, 3.0), patient_id="SEG001")
    write_series(datasets, tmp_path / "in" / "ct")
    structures = (Structure("SpinalCord", masks["SpinalCord"]), Structure("Parotid_L", masks["LeftParotid"]))
    save(build_seg(datasets, StructureSet(structures)), tmp_path / "in" / "seg.dcm")
    code, output = _run([str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert code == 0, output
    [row] = _report(tmp_path / "out")
    assert row["annotation"] == "SEG" and row["structures"] == "SpinalCord; Parotid_L"
    with np.load(next((tmp_path / "out").glob("*.npz"))) as data:
        assert dice(data["mask_SpinalCord"].astype(bool), masks["SpinalCord"]) == 1.0
        assert dice(data["mask_Parotid_L"].astype(bool), masks["LeftParotid"]) == 1.0
