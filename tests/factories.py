"""Build real DICOM test data from the shared data sets (nothing here is a mock: the pixels are real CT).

OpenKBP NPZ arrays carry no origin or direction. We state ours: identity direction (LPS), voxel (0, 0, 0) at
x = -(X-1)/2 * sx, y = -(Y-1)/2 * sy, z = 0, slice k at z = k * sz (Z ascends toward the head).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OPENKBP = SHARED_DATA / "openkbp"
DICOM_DATA = SHARED_DATA / "dicom"

OPENKBP_ORGANS = {  # OpenKBP key -> TG-263 name
    "Brainstem": "Brainstem",
    "SpinalCord": "SpinalCord",
    "RightParotid": "Parotid_R",
    "LeftParotid": "Parotid_L",
    "Esophagus": "Esophagus",
    "Larynx": "Larynx",
    "Mandible": "Bone_Mandible",
}


@dataclass
class OpenKbpCase:
    ct: np.ndarray  # int16 (Z, Y, X) HU
    spacing_zyx: tuple[float, float, float]
    masks: dict[str, np.ndarray]  # OpenKBP name -> uint8 (Z, Y, X)
    name: str


def load_openkbp(split: str = "validation", index: int = 0, upsample: int = 1) -> OpenKbpCase:
    """One OpenKBP patient; ``upsample`` > 1 repeats pixels in-plane (e.g. 4 gives real CT at 512x512)."""
    path = sorted((OPENKBP / split).glob("*.npz"))[index]
    with np.load(path) as data:
        ct = data["ct"]
        masks = {k[5:]: data[k] for k in data.files if k.startswith("mask_")}
        sz, sy, sx = (float(v) for v in data["spacing"])
    if upsample > 1:
        ct = ct.repeat(upsample, axis=1).repeat(upsample, axis=2)
        masks = {k: m.repeat(upsample, axis=1).repeat(upsample, axis=2) for k, m in masks.items()}
        sy, sx = sy / upsample, sx / upsample
    return OpenKbpCase(ct=ct, spacing_zyx=(sz, sy, sx), masks=masks, name=path.stem)


def ct_series(
    ct: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    patient_id: str = "KBP001",
    series_description: str = "Planning CT",
    body_part: str = "HEADNECK",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> list[Dataset]:
    """A CT Image Storage series (Explicit VR Little Endian) for an int16 (Z, Y, X) HU array."""
    nz, ny, nx = ct.shape
    sz, sy, sx = spacing_zyx
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    origin = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, 0.0)
    today = dt.date.today().strftime("%Y%m%d")
    datasets = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "OpenKBP^Test", patient_id, "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "OpenKBP", body_part
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = series_description, 1, k + 1
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = "120", 1, "HFS"
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{k * sz:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
        ds.SliceThickness = f"{sz:.6g}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.ascontiguousarray(ct[k], dtype="<i2").tobytes()
        datasets.append(ds)
    return datasets


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"IMG{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
