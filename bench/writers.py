"""Benchmark the RTSTRUCT and SEG writers against raw rt-utils and naive highdicom, in the same run.

    .venv/bin/python bench/writers.py [--counts 10 50 100] [--naive-max 50]

Input: real head-and-neck CT (OpenKBP validation patient 0, in-plane upsampled x4 to 512x512x128) with its 10
clinical structures, plus ellipsoids (radii 8-40 mm, inside the body) up to the ROI count. Each measurement runs in
a fresh subprocess: time = wall clock of building the object and encoding it to bytes; peak = the rise of the
process's peak RSS (VmHWM, reset just before the call) above the RSS at the start of the call.

Baselines: rt-utils ``RTStructBuilder.create_new`` + ``add_roi`` per structure (it reads the series from a folder;
that read is part of its cost), and highdicom ``Segmentation`` given the dense (Z, Y, X, S) boolean array. The
naive SEG needs several GB for many segments, so it only runs up to ``--naive-max`` segments.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRITERS = ("rtstruct", "rtutils", "seg", "naive_seg")
BASELINE = {"rtstruct": "rtutils", "seg": "naive_seg"}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _structures(count: int):
    from models.types import Structure
    from tests.factories import OPENKBP_ORGANS, load_openkbp

    case = load_openkbp("validation", 0, upsample=4)
    structures = [Structure(OPENKBP_ORGANS.get(k, k), m.astype(bool), color=(0, 200, 0), algorithm="bench",
                            algorithm_version="1") for k, m in sorted(case.masks.items())][:count]
    nz, ny, nx = case.ct.shape
    sz, sy, sx = case.spacing_zyx
    body = np.argwhere(case.ct[:, ::8, ::8] > -300) * np.array([1, 8, 8])
    rng = np.random.default_rng(0)
    while len(structures) < count:
        cz, cy, cx = body[rng.integers(len(body))]
        r = rng.uniform(8, 40, size=3)  # mm
        rz, ry, rx = int(r[0] / sz) + 1, int(r[1] / sy) + 1, int(r[2] / sx) + 1
        z0, z1, y0, y1 = max(cz - rz, 0), min(cz + rz + 1, nz), max(cy - ry, 0), min(cy + ry + 1, ny)
        x0, x1 = max(cx - rx, 0), min(cx + rx + 1, nx)
        zz, yy, xx = np.ogrid[z0:z1, y0:y1, x0:x1]
        mask = np.zeros((nz, ny, nx), bool)  # untouched pages stay unallocated
        mask[z0:z1, y0:y1, x0:x1] = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        structures.append(Structure(f"Blob_{len(structures):03d}", mask, color=(255, 128, 0), algorithm="bench",
                                    algorithm_version="1"))
    return case, structures


def _measure(writer: str, count: int) -> dict:
    """Run one writer on ``count`` structures in this process; called in a fresh subprocess."""
    from models.types import StructureSet
    from tests.factories import ct_series, write_series

    case, structures = _structures(count)
    datasets = ct_series(case.ct, case.spacing_zyx)
    structure_set = StructureSet(tuple(structures), label="bench")
    with tempfile.TemporaryDirectory() as tmp:
        if writer == "rtutils":
            write_series(datasets, Path(tmp))
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure the writer only
        start_rss = _rss_mb("VmRSS")
        start = time.perf_counter()
        ds = _WRITER_FUNCS[writer](datasets, structure_set, tmp)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        seconds = time.perf_counter() - start
        peak = _rss_mb("VmHWM") - start_rss
    return {"writer": writer, "count": count, "seconds": seconds, "peak_mb": peak, "bytes": len(buffer.getvalue())}


def _ours_rtstruct(datasets, structure_set, _tmp):
    from pipeline.rtstruct import build_rtstruct

    return build_rtstruct(datasets, structure_set)


def _ours_seg(datasets, structure_set, _tmp):
    from pipeline.seg import build_seg

    return build_seg(datasets, structure_set)


def _rtutils(_datasets, structure_set, tmp):
    from rt_utils import RTStructBuilder

    rtstruct = RTStructBuilder.create_new(dicom_series_path=tmp)
    for s in structure_set.structures:  # rt-utils wants (rows, columns, slices)
        rtstruct.add_roi(mask=np.moveaxis(s.mask, 0, -1), color=list(s.color), name=s.name)
    return rtstruct.ds


def _naive_seg(datasets, structure_set, _tmp):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    stacked = np.stack([s.mask for s in structure_set.structures], axis=-1)
    algorithm = hd.AlgorithmIdentificationSequence(name="bench", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=s.name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Organ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for n, s in enumerate(structure_set.structures, start=1)]
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=stacked, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="bench", manufacturer_model_name="bench", software_versions="1",
        device_serial_number="1")


_WRITER_FUNCS = {"rtstruct": _ours_rtstruct, "rtutils": _rtutils, "seg": _ours_seg, "naive_seg": _naive_seg}


def _run_child(writer: str, count: int) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", writer, str(count)], capture_output=True, text=True,
                         cwd=ROOT, timeout=1800)
    if run.returncode != 0:
        return {"writer": writer, "count": count, "error": run.stderr.strip().splitlines()[-1:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _table(results: list[dict]) -> str:
    by_key = {(r["writer"], r["count"]): r for r in results}
    lines = [f"{'writer':<10} {'ROIs':>5} {'time s':>8} {'peak MB':>8} {'size MB':>8} {'baseline':>10} "
             f"{'time x':>7} {'mem x':>7}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['writer']:<10} {r['count']:>5}  failed: {r['error']}")
            continue
        base = by_key.get((BASELINE.get(r["writer"], ""), r["count"]))
        ratio_t = ratio_m = "-"
        if base and "error" not in base:
            ratio_t = f"{base['seconds'] / r['seconds']:.1f}"
            ratio_m = f"{base['peak_mb'] / max(r['peak_mb'], 1.0):.1f}"
        lines.append(f"{r['writer']:<10} {r['count']:>5} {r['seconds']:>8.2f} {r['peak_mb']:>8.0f} "
                     f"{r['bytes'] / 1e6:>8.1f} {BASELINE.get(r['writer'], ''):>10} {ratio_t:>7} {ratio_m:>7}")
    lines.append("time x / mem x: baseline divided by ours (higher is better for ours).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--naive-max", type=int, default=50, help="largest segment count for naive highdicom")
    parser.add_argument("--writers", nargs="+", default=list(WRITERS), choices=WRITERS)
    parser.add_argument("--child", nargs=2, metavar=("WRITER", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child[0], int(args.child[1]))))
        return 0
    results = []
    for count in args.counts:
        for writer in args.writers:
            if writer == "naive_seg" and count > args.naive_max:
                results.append({"writer": writer, "count": count, "error": f"not run (> --naive-max {args.naive_max})"})
                continue
            results.append(_run_child(writer, count))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
