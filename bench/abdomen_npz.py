"""The TotalSegmentator example (real abdominal CT, 20 slices, JPEG 2000) as an NPZ case for evaluate-propagation.

    .venv/bin/python bench/abdomen_npz.py OUT_DIR
    .venv/bin/dicom-node evaluate-propagation OUT_DIR --structure Liver --structure Spleen \\
        --structure Stomach --out runs/evalprop/abdomen

Writes ``OUT_DIR/totalsegmentator_example.npz`` with ``ct`` (Z, Y, X) HU, ``spacing`` (sz, sy, sx) and
``mask_<TG-263 name>`` for five organs of its automatic segmentation (TotalSegmentator v1 label ids: 1 spleen,
2 right kidney, 3 left kidney, 5 liver, 6 stomach). SimpleITK reads the series (sorted by position) and the
segmentation is resampled onto it by nearest neighbour in patient coordinates, so no axis convention is assumed.
The labels are a model's output, not a clinician's: Dice against them measures agreement with TotalSegmentator.
These 20 slices (upper abdomen) hold no kidney: the kidney masks are empty and the evaluation skips them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "totalsegmentator"
LABELS = {"Spleen": 1, "Kidney_R": 2, "Kidney_L": 3, "Liver": 5, "Stomach": 6}


def abdomen_case(data: Path = DATA) -> dict[str, np.ndarray]:
    """The arrays of the NPZ (see the module docstring)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data / "example_ct_dicom")))
    ct = reader.Execute()
    seg = sitk.Resample(sitk.ReadImage(str(data / "example_seg_dicom.nii.gz")), ct, sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0)
    if not np.allclose(np.reshape(ct.GetDirection(), (3, 3)), np.eye(3), atol=1e-3):
        raise SystemExit(f"expected an axial series with identity direction, got {ct.GetDirection()}")
    labels = sitk.GetArrayFromImage(seg)
    out = {"ct": sitk.GetArrayFromImage(ct).astype(np.int16), "spacing": np.asarray(ct.GetSpacing()[::-1], float)}
    out.update({f"mask_{name}": (labels == value).astype(np.uint8) for name, value in LABELS.items()})
    return out


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/abdomen")
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = abdomen_case()
    np.savez_compressed(out_dir / "totalsegmentator_example.npz", **arrays)
    sizes = ", ".join(f"{k[5:]} {int(v.any(axis=(1, 2)).sum())} slices" for k, v in arrays.items() if k[:5] == "mask_")
    print(f"{out_dir / 'totalsegmentator_example.npz'}: {arrays['ct'].shape}, spacing {arrays['spacing']}; {sizes}")


if __name__ == "__main__":
    main()
