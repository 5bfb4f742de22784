"""Independent checks used by the pipeline tests: dciodvfy, plastimatch read-back, Dice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for a file (an empty list means the object is valid)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def plastimatch_masks(rtstruct: Path, ct_folder: Path, out: Path) -> dict[str, np.ndarray]:
    """Rasterise an RTSTRUCT with plastimatch on the CT grid: ROI name -> bool (Z, Y, X)."""
    run = subprocess.run(["plastimatch", "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_folder),
                          "--output-prefix", str(out), "--prefix-format", "nrrd"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return {p.stem: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(bool) for p in out.glob("*.nrrd")}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
