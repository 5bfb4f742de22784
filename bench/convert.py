"""Offline conversion speed: ``dicom-node convert`` on 512x512 CT + RTSTRUCT cases, and its image part against
dcm2niix on the same series in the same run.

Cases are real OpenKBP head-and-neck CTs upsampled in-plane to 512x512 (128 slices, 64 MiB each) with an RTSTRUCT
of their clinical structures written by our own builder. Printed (no assertions):

- per series, median over the cases: dcm2niix's whole process (-z n: uncompressed NIfTI; -z y: gzip), our image
  part in-process (scan headers, read, check geometry, decode, write the NPZ image) and as a whole process
  (``dicom-node convert`` on the series alone, Python start-up included), and our contour part (read the
  RTSTRUCT, rasterise every ROI, map names); ratios against dcm2niix -z n;
- cases/min of ``convert`` over all cases with 1 and 2 workers (CT + RTSTRUCT, NPZ at zlib level 1).

Usage: python bench/convert.py [--cases 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import OPENKBP_ORGANS, ct_series, load_openkbp, write_series  # noqa: E402

from config.structure_map import load_structure_map  # noqa: E402
from dicom_node.convert import ConvertOptions, convert_inputs, scan, write_npz  # noqa: E402
from models.types import Structure, StructureSet  # noqa: E402
from pipeline.convert import map_structures  # noqa: E402
from pipeline.rasterise import rtstruct_masks  # noqa: E402
from pipeline.rtstruct import build_rtstruct  # noqa: E402
from pipeline.volume import load_volume, series_geometry  # noqa: E402

SECRET = b"benchmark-secret"


def _make_cases(root: Path, count: int) -> list[Path]:
    folders = []
    for i in range(count):
        case = load_openkbp("validation", i, upsample=4)
        datasets = ct_series(case.ct, case.spacing_zyx, patient_id=f"BENCH{i}")
        folder = root / f"case{i}"
        write_series(datasets, folder / "ct")
        structures = tuple(Structure(OPENKBP_ORGANS.get(k, k), m.astype(bool)) for k, m in sorted(case.masks.items()))
        build_rtstruct(datasets, StructureSet(structures)).save_as(folder / "rs.dcm", enforce_file_format=True)
        folders.append(folder)
    return folders


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _dcm2niix(series: Path, out: Path, gzip: bool) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = subprocess.run(["dcm2niix", "-z", "y" if gzip else "n", "-b", "n", "-o", str(out), "-f", "%s",
                          str(series)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"dcm2niix failed: {run.stdout[-400:]}{run.stderr[-400:]}")


def _image_part(series: Path, out: Path, level: int) -> None:
    infos, _, _ = scan([series])
    datasets = [pydicom.dcmread(i.path) for i in infos]
    geometry = series_geometry(datasets)
    volume = load_volume(geometry)
    write_npz(out / "image.npz", {"image": volume.array, "spacing": np.asarray(volume.spacing[::-1])}, level)


def _contour_only(folder: Path, volume) -> float:
    start = time.perf_counter()
    raster = rtstruct_masks(pydicom.dcmread(folder / "rs.dcm"), volume)
    map_structures(raster.masks, load_structure_map())
    return time.perf_counter() - start


def _cli(series_root: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("dicom-node")
    run = subprocess.run([str(exe), "convert", str(series_root), "--out", str(out)], capture_output=True, text=True,
                         env={**os.environ, "DICOM_NODE_CONVERT_SECRET": SECRET.decode()})
    if run.returncode != 0:
        raise RuntimeError(f"dicom-node convert failed: {run.stdout[-400:]}{run.stderr[-400:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        folders = _make_cases(work / "in", args.cases)
        n_slices = len(list((folders[0] / "ct").iterdir()))
        print(f"{args.cases} cases: {n_slices} CT images 512x512 each + RTSTRUCT "
              f"({sum(f.stat().st_size for f in (folders[0] / 'ct').iterdir()) / 2**20:.0f} MiB per series)")
        rows: dict[str, list[float]] = {k: [] for k in ("dcm2niix -z n", "dcm2niix -z y", "ours image (NPZ level 1)",
                                                         "ours image (NPZ stored)", "ours whole process (CT+RS)",
                                                         "ours contours")}
        _dcm2niix(folders[0] / "ct", work / "warm", gzip=False)  # warm the page cache and binaries
        _image_part(folders[0] / "ct", work, 1)
        for folder in folders:
            rows["dcm2niix -z n"].append(_timed(lambda: _dcm2niix(folder / "ct", work / "nii", gzip=False)))
            rows["dcm2niix -z y"].append(_timed(lambda: _dcm2niix(folder / "ct", work / "niigz", gzip=True)))
            rows["ours image (NPZ level 1)"].append(_timed(lambda: _image_part(folder / "ct", work, 1)))
            rows["ours image (NPZ stored)"].append(_timed(lambda: _image_part(folder / "ct", work, 0)))
            rows["ours whole process (CT+RS)"].append(_timed(lambda: _cli(folder, work / "cli")))
            volume = load_volume([pydicom.dcmread(p) for p in sorted((folder / "ct").iterdir())])
            rows["ours contours"].append(_contour_only(folder, volume))
        reference = statistics.median(rows["dcm2niix -z n"])
        image = statistics.median(rows["ours image (NPZ level 1)"])
        print(f"\nper series (median of {args.cases}):")
        print(f"{'':<30}{'seconds':>10}{'vs dcm2niix -z n':>20}{'vs our image part':>20}")
        for name, values in rows.items():
            t = statistics.median(values)
            print(f"{name:<30}{t:>10.2f}{t / reference:>19.2f}x{t / image:>19.2f}x")
        print("target: image part <= 1.5x dcm2niix; contours <= 1.0x the image part")
        print("\nthroughput (convert_inputs, in-process, CT + RTSTRUCT -> NPZ):")
        for workers in (1, 2):
            out = work / f"out{workers}"
            options = ConvertOptions(out=out, secret=SECRET)
            elapsed = _timed(lambda: convert_inputs([work / "in"], options, workers=workers))
            print(f"  {workers} worker(s): {args.cases / elapsed * 60:6.1f} cases/min ({elapsed:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
