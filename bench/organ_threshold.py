"""Which probability threshold should an organ model cut at? Dice against the threshold, on OpenKBP *train* cases.

Each case goes through the whole inference chain once (``models.organs.segment``'s steps: resampling, the
network, resampling back); the probabilities are then cut at every candidate threshold and post-processed as the
node does, and scored against the clinical contours on the case's own grid. Tune here, report on validation
(``dicom-node evaluate``). The node cuts each label at its ``labels[].threshold`` in the manifest, else at the
manifest's ``threshold``; the last rows print the best cut per label and the mean Dice that choice gives.

    .venv/bin/python bench/organ_threshold.py [--model hn-oar] [--cases 20] [--tta]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp" / "train"
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hn-oar")
    parser.add_argument("--cases", type=int, default=20, help="the first N train cases (sorted by name)")
    parser.add_argument("--tta", action="store_true", help="with flip test-time augmentation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from models.data import LabelSource, find_cases, read_npz
    from models.organs import cached_network, normalise, postprocess, predict_probabilities, resample
    from models.package import find_package

    torch.set_num_threads(args.threads)
    package = find_package(args.model)
    m = package.manifest
    network = cached_network(package)
    labels = [LabelSource(lab.name, lab.source_names) for lab in m.labels]
    dice: dict[float, dict[str, list[float]]] = {t: {lab.name: [] for lab in m.labels} for t in THRESHOLDS}
    for path in find_cases([OPENKBP])[: args.cases]:
        case = read_npz(path, labels)
        small = resample(case.image.astype(np.float32), case.spacing_xyz, m.target_spacing)
        prob = predict_probabilities(network, normalise(small, m.intensity), m, tta=args.tta)
        back = resample(np.moveaxis(prob, 0, -1), m.target_spacing, case.spacing_xyz, case.image.shape)
        back = back[..., None] if back.ndim == 3 else back
        for c, spec in enumerate(m.labels):
            if not case.present[c]:
                continue
            truth = case.masks[c].astype(bool)
            for t in THRESHOLDS:
                pred = postprocess(back[..., c] >= t, spec)
                dice[t][spec.name].append(2.0 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
        print(f"{path.stem}: " + " ".join(f"{t}={np.mean([v[-1] for v in dice[t].values() if v]):.3f}"
                                          for t in THRESHOLDS), flush=True)
    names = [lab.name for lab in m.labels]
    print(f"\n{m.name} {m.version}, {args.cases} train cases{' + TTA' if args.tta else ''} (manifest threshold "
          f"{m.threshold})\n| threshold | " + " | ".join(names) + " | mean |")
    print("| --- " * (len(names) + 2) + "|")
    for t in THRESHOLDS:
        means = [float(np.mean(dice[t][n])) if dice[t][n] else float("nan") for n in names]
        print(f"| {t} | " + " | ".join(f"{v:.3f}" for v in means) + f" | **{np.nanmean(means):.3f}** |")
    table = {n: {t: float(np.mean(dice[t][n])) for t in THRESHOLDS} for n in names if dice[THRESHOLDS[0]][n]}
    best = {n: max(row, key=row.get) for n, row in table.items()}
    print("| best per label | " + " | ".join(f"{best[n]} ({table[n][best[n]]:.3f})" if n in best else "-"
                                            for n in names)
          + f" | **{np.mean([table[n][best[n]] for n in best]):.3f}** |")
    print("\nper-label thresholds for the manifest's labels[].threshold: "
          + ", ".join(f"{n}: {best[n]}" for n in best))


if __name__ == "__main__":
    main()
