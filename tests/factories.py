"""Build real DICOM test data from the shared data sets (nothing here is a mock: the pixels are real CT).

OpenKBP NPZ arrays carry no origin or direction; ``pipeline.export.ct_series`` states the geometry we give them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset

from pipeline.export import ct_series  # noqa: F401  (re-exported: tests build series through factories)

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


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"IMG{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
