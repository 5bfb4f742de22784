"""Benchmark the organ pipeline's inference: seconds per 128-slice head-and-neck CT on this CPU.

    .venv/bin/python bench/organs.py [--model hn-oar] [--cases 5] [--threads 2] [--tta] [--dicom]

Input: OpenKBP validation patients (real CT, 128 slices). Each case is timed from the HU array on its own grid to
masks on that grid: resampling to the model spacing, normalisation, the network, post-processing and resampling
back (what the node's worker does after loading the series). ``--dicom`` also times the whole pipeline from DICOM
datasets in memory (series loading and geometry checks included). The network is built and run once before timing, as a
running node keeps it warm. Target (issue 5): <= 10 s per case on the 2-core CI machine. There is no reference tool to
run beside it: the figure is absolute, and it varies with whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hn-oar")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tta", action="store_true", help="also time mirror test-time augmentation")
    parser.add_argument("--dicom", action="store_true", help="also time the pipeline from DICOM datasets")
    args = parser.parse_args()

    import torch

    from factories import ct_series, load_openkbp
    from models.organs import cached_network, segment
    from models.package import find_package
    from models.threads import set_thread_count

    set_thread_count(args.threads)
    package = find_package(args.model)
    network = cached_network(package)
    print(f"model {package.manifest.name} {package.manifest.version} ({package.manifest.architecture.name}), "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    warm = load_openkbp("validation", 0)  # a running node is warm: first-call allocations are not the figure
    segment(warm.ct, warm.spacing_zyx[::-1], package, network=network)
    modes = [False, True] if args.tta else [False]
    times: dict[str, list[float]] = {("tta" if m else "plain"): [] for m in modes}
    if args.dicom:
        times["dicom"] = []
    for index in range(args.cases):
        case = load_openkbp("validation", index)
        spacing_xyz = case.spacing_zyx[::-1]
        row = [f"{case.name} {case.ct.shape}"]
        for tta in modes:
            t0 = time.perf_counter()
            segment(case.ct, spacing_xyz, package, network=network, tta=tta)
            dt = time.perf_counter() - t0
            times["tta" if tta else "plain"].append(dt)
            row.append(f"{'tta' if tta else 'plain'} {dt:5.2f} s")
        if args.dicom:
            from pipeline.base import load_pipeline, run_pipeline

            datasets = ct_series(case.ct, case.spacing_zyx)
            t0 = time.perf_counter()
            run_pipeline(load_pipeline("organs"), datasets, {"model": args.model})
            dt = time.perf_counter() - t0
            times["dicom"].append(dt)
            row.append(f"from DICOM {dt:5.2f} s")
        print("  ".join(row))
    for mode, values in times.items():
        print(f"{mode:>6}: mean {statistics.mean(values):.2f} s, max {max(values):.2f} s per case "
              f"(target <= 10 s): {'met' if max(values) <= 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
