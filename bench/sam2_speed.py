"""Seconds per tracked slice of the sam2 engine on this machine, for a SAM2.1 config at several input sizes.

    nice -n 19 .venv/bin/python bench/sam2_speed.py [--config configs/sam2.1/sam2.1_hiera_t.yaml]
        [--sizes 256 512 1024] [--slices 9] [--threads 1]

Speed only: the weights are random (seeded), which costs the same arithmetic as trained ones, and the stop
criteria are switched off so every slice is tracked. One OpenKBP validation CT, one structure (brainstem) seeded on
the middle slice of ``--slices`` slices, tracked up and down. Prints wall and CPU seconds per tracked slice (CPU
time is the steadier figure on a shared machine), the torch thread count and the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--slices", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from models.propagate import PropagationSettings, Seed
    from models.sam2_checkpoint import package_dir
    from models.sam2_engine import Sam2Engine, build_predictor

    torch.set_num_threads(args.threads)
    with np.load(sorted((OPENKBP / "validation").glob("*.npz"))[0]) as data:
        ct, truth = data["ct"].astype(np.float32), data["mask_Brainstem"].astype(bool)
    zs = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    mid, half = int(zs[len(zs) // 2]), args.slices // 2
    image, seed = ct[mid - half:mid + half + 1], truth[mid]
    follow_all = PropagationSettings(min_area_fraction=0.0, max_growth=1e9, min_overlap=0.0, min_pixels=0)
    source = (package_dir() / args.config).read_text()
    print(f"{args.config}, {len(image)} slices of {image.shape[1]}x{image.shape[2]}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            config = Path(folder) / "bench.yaml"
            config.write_text(source.replace("image_size: 1024", f"image_size: {size}"))
            torch.manual_seed(0)
            engine = Sam2Engine(build_predictor(config), "random")
        wall, cpu = time.perf_counter(), time.process_time()
        result = engine.propagate_volume(image, {"B": Seed(masks={half: seed})}, follow_all)["B"]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        tracked = len(image)  # the seed slice is encoded too (SAM2 keeps it in memory)
        print(f"input {size:5d}: {wall / tracked:6.2f} s wall, {cpu / tracked:6.2f} s CPU per slice "
              f"({'; '.join(result.stops)})")


if __name__ == "__main__":
    main()
