"""Add what ``dicom-node finetune`` now learns of each structure's slice-to-slice growth to an existing package.

Propagation stops a front whose area grows more than ``max_growth`` (2) x from one slice to the next: a leak into
a neighbour. A quarter of OpenKBP's train mandibles grow more than that where the rami meet the body, and a
decoder that draws the body there was stopped on the spot (hn-litemedsam 1.5.0: OpenKBP train mandibles 41, 115
and 169 kept 0.29-0.36 Dice, "jumped: area grew 2.2-2.7x"). Packages now record each label's ``growth``
(models.extent.learned_growth over the training contours, the largest: learn_growth) and fronts allow the
larger of that and max_growth. Packages trained before that lack it; this script measures it on the package's
training cases (OpenKBP train, all of them, as hn-litemedsam's fine-tuning used) and writes a copy with the
growth, the weights untouched:

    python bench/learn_growth.py --from models/zoo/hn-litemedsam --version 1.5.1 --out runs/growth
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp" / "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="package folder")
    parser.add_argument("--version", required=True)
    parser.add_argument("--cases", type=Path, default=OPENKBP, help="folder of the training NPZ cases")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from models.data import LabelSource, read_npz
    from models.extent import learn_growth, learned_growth
    from models.package import load_package, write_manifest

    base = load_package(Path(args.source))
    labels = [LabelSource(lab.name, tuple(lab.source_names)) for lab in base.manifest.labels]
    values: dict[str, list[float]] = {lab.name: [] for lab in labels}
    paths = sorted(args.cases.glob("*.npz"))
    for path in paths:
        case = read_npz(path, labels)
        for c, lab in enumerate(labels):
            if case.present[c] and (g := learned_growth(case.masks[c] > 0)) is not None:
                values[lab.name].append(g)
    growth = {name: learn_growth(v) for name, v in values.items() if v}
    for name, v in values.items():
        print(f"{name:14s} {len(v):3d} cases: growth {growth.get(name)} (median {np.median(v):.2f}, "
              f"over 2: {sum(g > 2 for g in v)})")
    out = args.out / base.manifest.name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base.path, out)
    training = dict(base.manifest.training or {})
    training["train"] = {**training.get("train", {}), "growth": growth}
    training["growth"] = {"from": f"{base.manifest.name} {base.manifest.version}", "cases": len(paths),
                          "script": "bench/learn_growth.py"}
    manifest = base.manifest.model_copy(update={
        "version": args.version, "training": training,
        "labels": tuple(lab.model_copy(update={"growth": growth.get(lab.name)}) for lab in base.manifest.labels)})
    write_manifest(out, manifest)
    print(f"wrote {out} (weights unchanged)")


if __name__ == "__main__":
    main()
