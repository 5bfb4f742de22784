"""Receive throughput: DCMTK storescu -> DCMTK storescp vs storescu -> dicom-node, same series, same run.

The series is a real OpenKBP head-and-neck CT, upsampled in-plane to 512x512 (128 slices, 512 KiB each).
storescp writes each file without fsync; the node writes tmp + fsync + rename and indexes it in SQLite
(synchronous=FULL) with an audit record before answering. Usage: python bench/receive.py [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factories import ct_series, load_openkbp, write_series  # noqa: E402
from netutil import free_port, node_process, storescp, storescu, write_config  # noqa: E402


def _timed_send(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    result = storescu(port, files, calling="TPS", called=called)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-400:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    case = load_openkbp("validation", 0, upsample=4)
    files = write_series(ct_series(case.ct, case.spacing_zyx), work / "series")
    n = len(files)
    print(f"series: {n} CT images {case.ct.shape[1]}x{case.ct.shape[2]}, "
          f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB; {args.reps} repetitions each")
    ref_times, node_times = [], []
    with storescp(work / "storescp-out") as port:
        _timed_send(port, files[:4], "TPS")  # warm-up
        for _ in range(args.reps):
            ref_times.append(_timed_send(port, files, "TPS"))
    node_port = free_port()
    config = write_config(work / "node.yaml", {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": node_port, "storage": "./storage",
                 "database": "sqlite:///./node.db", "series_stable_seconds": 3600},
        "accept": [{"ae_title": "TPS"}],
    })
    with node_process(config, node_port):
        _timed_send(node_port, files[:4], "DICOMNODE")
        for _ in range(args.reps):
            # Each repetition is a new series (new UIDs), so every instance is really written and indexed.
            rep = write_series(ct_series(case.ct, case.spacing_zyx), work / f"rep{len(node_times)}")
            node_times.append(_timed_send(node_port, rep, "DICOMNODE"))
    ref = n / statistics.median(ref_times)
    node = n / statistics.median(node_times)
    print(f"{'receiver':<28}{'images/s (median)':>18}{'best':>10}")
    print(f"{'DCMTK storescp (no fsync)':<28}{ref:>18.1f}{n / min(ref_times):>10.1f}")
    print(f"{'dicom-node (fsync+index)':<28}{node:>18.1f}{n / min(node_times):>10.1f}")
    print(f"ratio node/storescp: {node / ref:.2f}  (target >= 0.50)")



if __name__ == "__main__":
    main()
