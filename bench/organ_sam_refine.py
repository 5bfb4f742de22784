"""Would hn-litemedsam sharpen the organ model's contours? Each slice of an hn-oar mask prompts the fine-tuned
LiteMedSAM decoder with that slice's box (``models.propagate.segment_slices``, as the evaluation's true-box upper
bound does with clinical boxes); Dice of both against the clinical contours on the case's own grid.

With clinical boxes the decoder reaches ~0.85 on validation, so if the organ model's boxes were nearly as good
this would be a cheap gain. Tune on train (the default), report on validation.

    .venv/bin/python bench/organ_sam_refine.py [--split train] [--cases 5] [--reuse 1.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organs", default="hn-oar", help="organ model package")
    parser.add_argument("--checkpoint", default="hn-litemedsam", help="LiteMedSAM package")
    parser.add_argument("--split", default="train", choices=("train", "validation"))
    parser.add_argument("--cases", type=int, default=5, help="the first N cases of the split (sorted by name)")
    parser.add_argument("--reuse", type=float, default=1.5, help="segment_slices' crop reuse between organs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from models.data import LabelSource, find_cases, read_npz
    from models.evaluate import score_case
    from models.organs import cached_network, segment
    from models.package import find_package
    from models.prompting import load_engine
    from models.propagate import EncodingCache, PropagationSettings, segment_slices

    torch.set_num_threads(args.threads)
    package = find_package(args.organs)
    network = cached_network(package, "cpu")
    engine = load_engine("litemedsam", args.checkpoint)
    labels = [LabelSource(lab.name, tuple(lab.source_names)) for lab in package.manifest.labels]
    dice: dict[str, list[tuple[float, float]]] = {lab.name: [] for lab in labels}
    for path in find_cases([OPENKBP / args.split])[:args.cases]:
        case = read_npz(path, labels)
        started = time.perf_counter()
        organs = segment(case.image, case.spacing_xyz, package, network=network, threads=args.threads)
        organ_seconds = time.perf_counter() - started
        cache = EncodingCache()
        image = case.image.astype(np.float32)
        refined = {k: segment_slices(engine, image, m, PropagationSettings(), cache, reuse=args.reuse) if m.any()
                   else m for k, m in organs.items()}
        sam_seconds = time.perf_counter() - started - organ_seconds
        truth = {lab.name: case.masks[c] > 0 for c, lab in enumerate(labels) if case.present[c]}
        pairs = zip(score_case(organs, truth, case.spacing_xyz, case.case_id),
                    score_case(refined, truth, case.spacing_xyz, case.case_id))
        line = []
        for a, b in pairs:
            dice[a.structure].append((a.dice, b.dice))
            line.append(f"{a.structure} {a.dice:.2f}/{b.dice:.2f}")
        print(f"{case.case_id}: {args.organs} {organ_seconds:.1f} s, + {args.checkpoint} {sam_seconds:.1f} s "
              f"({cache.misses} encodings); Dice organ model/refined: {', '.join(line)}", flush=True)
    means = {k: np.mean(v, axis=0) for k, v in dice.items() if v}
    for name, (a, b) in means.items():
        print(f"{name:14s} n={len(dice[name]):3d}  {args.organs} {a:.3f}  refined {b:.3f}")
    both = np.mean(list(means.values()), axis=0)
    print(f"mean over organs: {args.organs} {both[0]:.3f}, refined {both[1]:.3f}")


if __name__ == "__main__":
    main()
