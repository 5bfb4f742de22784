"""``dicom-node convert`` on real data: OpenKBP CT + RTSTRUCT built with our writers, the real RTSTRUCTs and SEG
in ../shared/data/dicom, plastimatch and SimpleITK as independent readers, and an export with broken cases."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from dicom_node.cli import app
from models.types import Structure, StructureSet
from pipeline.rasterise import rtstruct_masks, seg_masks
from pipeline.rtstruct import build_rtstruct
from pipeline.volume import load_volume, series_geometry
from tests.factories import DICOM_DATA, ct_series, load_openkbp, write_series
from tests.pipeline_checks import dice, save

SECRET = "a-test-secret-of-some-length"
PATIENTS = 3  # OpenKBP validation patients at 128 x 128 (the 512 x 512 cases are in bench/convert.py)
# OpenKBP key -> the TG-263 name the converter must find for it through config/ (tg263 synonyms + structure_map)
EXPECTED = {"Brainstem": "Brainstem", "SpinalCord": "SpinalCord", "RightParotid": "Parotid_R",
            "LeftParotid": "Parotid_L", "Esophagus": "Esophagus", "Larynx": "Larynx", "Mandible": "Bone_Mandible",
            "PTV56": "PTV56", "PTV63": "PTV63", "PTV70": "PTV70"}


def plastimatch_masks(rtstruct: Path, ct_folder: Path, out: Path) -> dict[str, np.ndarray]:
    """plastimatch's rasterisation with --xor-contours: the even-odd rule we (and planning systems) apply to
    several contours on one slice; plastimatch ORs them by default, which fills holes drawn as inner contours."""
    run = subprocess.run(["plastimatch", "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_folder),
                          "--output-prefix", str(out), "--prefix-format", "nrrd", "--xor-contours"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return {p.stem: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(bool) for p in out.glob("*.nrrd")}


def _rtstruct(datasets, masks: dict[str, np.ndarray], label: str = "organs", **kwargs) -> pydicom.Dataset:
    structures = tuple(Structure(name, m.astype(bool), algorithm="clinic", algorithm_version="1")
                       for name, m in masks.items())
    ds = build_rtstruct(datasets, StructureSet(structures, label=label), **kwargs)
    ds.StructureSetLabel = label
    return ds


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A TPS-like export: one folder per patient, CT slices and the RTSTRUCT under arbitrary file names."""
    root = tmp_path_factory.mktemp("export")
    cases = {}
    for i in range(PATIENTS):
        case = load_openkbp("validation", i)
        datasets = ct_series(case.ct, case.spacing_zyx, patient_id=f"KBP{i:03d}", patient_name=f"Doe^Jane{i}")
        folder = root / f"patient{i}"
        paths = write_series(datasets, folder / "images")
        for k, path in enumerate(paths):  # any file names: no extension, not in slice order
            path.rename(path.with_name(f"{(k * 7919) % 1000:03d}x{k}"))
        save(_rtstruct(datasets, case.masks), folder / "RS.dcm")
        cases[case.name] = (case, datasets, folder)
    (root / "README.txt").write_text("not DICOM")
    return root, cases


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["convert", *args], env={"DICOM_NODE_CONVERT_SECRET": SECRET})
    return result.exit_code, result.output


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _report(out: Path) -> list[dict[str, str]]:
    return _csv(out / "report.csv")


@pytest.fixture(scope="module")
def converted(export, tmp_path_factory):
    root, cases = export
    out = tmp_path_factory.mktemp("out")
    code, output = _run([str(root), "--out", str(out), "--key-file", str(out.parent / "key.csv")])
    assert code == 0, output
    return out, cases


def _converted_cases(out: Path, cases: dict) -> list[tuple]:
    """(source case, its folder, metadata, NPZ path) per converted case, matched through the key file."""
    key = {r["case"]: r["patient_id"] for r in _csv(out.parent / "key.csv")}
    by_patient = {str(datasets[0].PatientID): (case, folder) for case, datasets, folder in cases.values()}
    found = []
    for meta_path in sorted(out.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        case, folder = by_patient[key[meta["case"]]]
        found.append((case, folder, meta, out / meta["files"][0]))
    return found


def test_openkbp_round_trip_dice_per_structure(converted):
    out, cases = converted
    assert [r["status"] for r in _report(out)] == ["converted"] * PATIENTS
    found = _converted_cases(out, cases)
    assert len(found) == PATIENTS
    worst = 1.0
    for case, _, meta, npz in found:
        assert {s["source_name"]: s["name"] for s in meta["structures"]} == {k: EXPECTED[k] for k in case.masks}
        with np.load(npz) as data:
            np.testing.assert_array_equal(data["image"], case.ct)
            np.testing.assert_allclose(data["spacing"], case.spacing_zyx)
            for key, mask in case.masks.items():
                got = data[f"mask_{EXPECTED[key]}"]
                assert got.dtype == np.uint8
                score = dice(got.astype(bool), mask.astype(bool))
                worst = min(worst, score)
                assert score >= 0.98, (case.name, key, score)
    print(f"worst Dice vs OpenKBP masks over {PATIENTS} patients: {worst:.4f}")


def test_geometry_is_what_simpleitk_reads(converted):
    out, cases = converted
    for _, folder, _, npz in _converted_cases(out, cases):
        with np.load(npz) as data:
            _same_geometry(folder / "images", data)


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _same_geometry(folder: Path, data) -> bool:
    image = _sitk_series(folder)
    np.testing.assert_allclose(data["spacing"][::-1], image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(data["origin"], image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(data["direction"].ravel(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(data["image"], sitk.GetArrayFromImage(image), rtol=1e-6)  # float32 vs float64


def test_pseudonymised_output_and_key_file(converted):
    out, cases = converted
    identifiers = []
    for _, datasets, _ in cases.values():
        first = datasets[0]
        identifiers += [str(first.PatientID), str(first.PatientName), first.StudyInstanceUID,
                        first.SeriesInstanceUID, first.FrameOfReferenceUID]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in identifiers:
                assert value.encode() not in data, (path.name, value)
    key = _csv(out.parent / "key.csv")
    assert sorted(r["patient_id"] for r in key) == [f"KBP{i:03d}" for i in range(PATIENTS)]
    assert {r["case"] for r in key} == {r["case"] for r in _report(out)}
    assert (out.parent / "key.csv").stat().st_mode & 0o077 == 0


def test_resume_skips_unchanged_and_redoes_changed_cases(export, converted, tmp_path):
    root, _ = export
    out, _ = converted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    code, output = _run([str(root), "--out", str(copy)])
    assert code == 0, output
    assert [r["status"] for r in _report(copy)] == ["unchanged"] * PATIENTS
    rs = root / "patient1" / "RS.dcm"
    rs.touch()
    code, output = _run([str(root), "--out", str(copy)])
    statuses = sorted(r["status"] for r in _report(copy))
    assert statuses == ["converted"] + ["unchanged"] * (PATIENTS - 1), output
    # same secret, same pseudonyms; another secret, other ones
    assert {r["case"] for r in _report(copy)} == {r["case"] for r in _report(out)}
    result = CliRunner().invoke(app, ["convert", str(root / "patient0"), "--out", str(tmp_path / "other")],
                                env={"DICOM_NODE_CONVERT_SECRET": "another-secret-entirely"})
    assert result.exit_code == 0, result.output
    assert not {r["case"] for r in _report(tmp_path / "other")} & {r["case"] for r in _report(out)}


def test_secret_is_required_unless_identifiers_are_kept(export, tmp_path):
    root, _ = export
    result = CliRunner().invoke(app, ["convert", str(root / "patient0"), "--out", str(tmp_path / "a")],
                                env={"DICOM_NODE_CONVERT_SECRET": ""})
    assert result.exit_code == 2 and "secret" in result.output
    result = CliRunner().invoke(app, ["convert", str(root / "patient0"), "--out", str(tmp_path / "b"),
                                      "--keep-identifiers"], env={"DICOM_NODE_CONVERT_SECRET": ""})
    assert result.exit_code == 0, result.output
    assert _report(tmp_path / "b")[0]["case"].startswith("KBP000_")


# ------------------------------------------------------------------------------------------- real RTSTRUCTs


def _real_rtstruct_cases():
    return [(DICOM_DATA / "dicomrttool_anon", "RS_Body_SpinalCord.dcm", ["CT_1.dcm", "CT_2.dcm", "CT_3.dcm",
                                                                          "CT_4.dcm"]),
            (DICOM_DATA / "rt_utils" / "mock_data", "rt.dcm", ["ct_1.dcm", "ct_2.dcm"])]


@pytest.mark.parametrize("folder,rs,images", _real_rtstruct_cases(), ids=["dicomrttool", "rt_utils"])
def test_rasterisation_agrees_with_plastimatch_on_real_rtstructs(folder, rs, images, tmp_path):
    ct = tmp_path / "ct"
    ct.mkdir()
    for name in images:
        shutil.copy(folder / name, ct / name)
    datasets = [pydicom.dcmread(ct / name) for name in images]
    volume = load_volume(datasets)
    ours = rtstruct_masks(pydicom.dcmread(folder / rs), volume)
    theirs = plastimatch_masks(folder / rs, ct, tmp_path / "pm")
    assert set(ours.masks) == set(theirs)
    for name, mask in ours.masks.items():
        assert mask.any(), name
        score = dice(mask, theirs[name])
        print(f"{folder.name}/{name}: Dice vs plastimatch {score:.4f} ({int(mask.sum())} voxels)")
        assert score >= 0.98, (name, score)


def test_rasterisation_agrees_with_plastimatch_on_openkbp(export, tmp_path):
    _, cases = export
    case, datasets, folder = next(iter(cases.values()))
    volume = load_volume(datasets)
    ours = rtstruct_masks(pydicom.dcmread(folder / "RS.dcm"), volume)
    theirs = plastimatch_masks(folder / "RS.dcm", folder / "images", tmp_path / "pm")
    for name, mask in ours.masks.items():
        assert dice(mask, theirs[name]) >= 0.98, name


def test_real_seg_frames_land_where_dcmqi_put_them():
    folder = DICOM_DATA / "dcmqi"
    datasets = [pydicom.dcmread(p) for p in sorted((folder / "ct-3slice").glob("*.dcm"))]
    geometry = series_geometry(datasets)
    volume = load_volume(datasets)
    sop_index = {ds.SOPInstanceUID: k for k, ds in enumerate(geometry.datasets)}
    ours = seg_masks(pydicom.dcmread(folder / "liver.dcm"), volume, sop_index)
    reference = sitk.ReadImage(str(folder / "liver_seg.nrrd"))
    grid = sitk.GetImageFromArray(np.zeros(volume.shape, np.uint8))
    grid.SetSpacing(volume.spacing)
    grid.SetOrigin(volume.origin)
    grid.SetDirection(volume.direction)
    on_grid = sitk.GetArrayFromImage(sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert ours.masks["Liver"].any()
    assert dice(ours.masks["Liver"], on_grid > 0) == 1.0
    overlapping = seg_masks(pydicom.dcmread(folder / "partial_overlaps.dcm"), volume, sop_index)
    assert len(overlapping.masks) == 5 and all(m.any() for m in overlapping.masks.values())


def test_oblique_series_keeps_its_true_orientation(tmp_path):
    source = DICOM_DATA / "rt_utils" / "oriented_data"
    datasets = [pydicom.dcmread(p) for p in sorted(source.glob("*.dcm"))]
    for ds in datasets:  # these real files lack the Frame of Reference UID an RTSTRUCT must reference
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    write_series(datasets, tmp_path / "in" / "ct")
    volume = load_volume(datasets)
    gtv = volume.array > np.percentile(volume.array, 70)
    save(_rtstruct(datasets, {"GTV": gtv}), tmp_path / "in" / "rs.dcm")
    out = tmp_path / "out"
    code, output = _run([str(tmp_path / "in"), "--out", str(out)])
    assert code == 0, output
    meta = json.loads(next(out.glob("*.json")).read_text())
    with np.load(out / meta["files"][0]) as data:
        _same_geometry(tmp_path / "in" / "ct", data)
        direction = data["direction"]
        assert abs(direction[0, 0]) < 0.99  # really oblique
        np.testing.assert_array_equal(data["mask_GTV"].astype(bool), gtv)


# ------------------------------------------------------------------------------------------- contours


def test_xor_holes_and_contours_off_the_series_are_reported(export):
    _, cases = export
    case, datasets, _ = next(iter(cases.values()))
    volume = load_volume(datasets)
    outer = np.zeros(volume.shape, bool)
    outer[60:64, 40:90, 40:90] = True
    inner = np.zeros(volume.shape, bool)
    inner[60:64, 55:75, 55:75] = True
    ds = _rtstruct(datasets, {"Ring": outer, "Hole": inner})
    ring, hole = ds.ROIContourSequence
    ring.ContourSequence += hole.ContourSequence  # the hole as a second contour on the same slices: XOR
    extra = pydicom.Dataset()
    extra.ContourGeometricType = "CLOSED_PLANAR"
    z_beyond = float(datasets[-1].ImagePositionPatient[2]) + 10 * float(case.spacing_zyx[0])
    extra.ContourData = [0, 0, z_beyond, 10, 0, z_beyond, 10, 10, z_beyond]
    extra.NumberOfContourPoints = 3
    ring.ContourSequence.append(extra)
    result = rtstruct_masks(ds, volume)
    np.testing.assert_array_equal(result.masks["Ring"], outer & ~inner)
    assert any("Ring: 1 contour(s) on slices with no image" in w for w in result.warnings)


# ------------------------------------------------------------------------------------------- broken inputs


@pytest.fixture(scope="module")
def broken_export(export, tmp_path_factory):
    """Good cases plus one of each failure the issue names."""
    root = tmp_path_factory.mktemp("broken")
    _, cases = export
    case, _, _ = next(iter(cases.values()))
    ct, spacing = case.ct[:24], case.spacing_zyx
    masks = {k: v[:24] for k, v in case.masks.items()}

    def patient(name: str, **kwargs):
        datasets = ct_series(ct, spacing, patient_id=name, **kwargs)
        folder = root / name
        write_series(datasets, folder / "ct")
        save(_rtstruct(datasets, masks), folder / "rs.dcm")
        return datasets, folder

    patient("good")
    _, folder = patient("missing_slice")
    (folder / "ct" / "IMG0010.dcm").unlink()
    datasets, folder = patient("bad_spacing")
    datasets[5].PixelSpacing = [9.9, 9.9]
    datasets[5].save_as(folder / "ct" / "IMG0005.dcm", enforce_file_format=True)
    _, folder = patient("no_images")
    shutil.rmtree(folder / "ct")
    _, folder = patient("truncated")
    data = (folder / "ct" / "IMG0003.dcm").read_bytes()
    (folder / "ct" / "IMG0003.dcm").write_bytes(data[:1200])
    return root


def test_broken_cases_are_reported_and_the_run_goes_on(broken_export, tmp_path):
    out = tmp_path / "out"
    code, output = _run([str(broken_export), "--out", str(out), "--workers", "2",
                         "--key-file", str(tmp_path / "key.csv")])
    assert code == 1, output
    rows = _report(out)
    key = {r["case"]: r["patient_id"] for r in _csv(tmp_path / "key.csv")}
    by_patient = {key.get(r["case"], "?"): r for r in rows if r["case"]}
    assert by_patient["good"]["status"] == "converted"
    assert "missing slice" in by_patient["missing_slice"]["reason"]
    assert "pixel spacing differs" in by_patient["bad_spacing"]["reason"]
    assert by_patient["truncated"]["status"] == "failed"
    orphan = [r for r in rows if "references images that are not in the input" in r["reason"]]
    assert len(orphan) == 1 and orphan[0]["status"] == "failed"
    assert sum(r["status"] == "converted" for r in rows) == 1
    assert len(list(out.glob("*.npz"))) == 1
    assert str(broken_export) not in (out / "report.csv").read_text()  # folder names are not for the report
