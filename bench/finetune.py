"""Zero-shot vs fine-tuned LiteMedSAM on the same held-out crops of OpenKBP validation patients.

    .venv/bin/python bench/finetune.py [--config config/finetune.example.yaml] [--package models/zoo/hn-litemedsam]
        [--first 12] [--cases 12] [--threads 2]

The fine-tuning run selects its epoch on the first ``max_val_cases`` validation patients; this script reports on
the ``--cases`` patients after ``--first`` (by default validation cases 13-24, which fine-tuning never saw). One
slice per organ per patient (seeded draw), one crop per slice placed on the slice's own box as propagation's seed
and true-box modes place it; each crop is decoded with the true box, a jittered box (edges moved up to
``prompts.box_jitter`` x the side, fixed seed) and a nearby slice's box (one propagation step's prompt: a slice up
to ``data.neighbour_distance`` away, as the config draws it for training).
Dice is on native pixels. Encodings are cached in the run folder (``cache/report``) and shared by both weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "config" / "finetune.example.yaml"))
    parser.add_argument("--package", default=str(ROOT / "models" / "zoo" / "hn-litemedsam"))
    parser.add_argument("--first", type=int, default=12, help="validation cases skipped (used for selection)")
    parser.add_argument("--cases", type=int, default=12, help="validation cases reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from config.finetune import load_finetune_config
    from models.data import find_cases
    from models.finetune import PROMPT_KINDS, build_cache, validate
    from models.litemedsam import LiteMedSamEngine

    torch.set_num_threads(args.threads)
    cfg = load_finetune_config(args.config).model_copy(update={"progress": False})
    paths = find_cases(cfg.data.val_dirs)[args.first:args.first + args.cases]
    names = [lab.name for lab in cfg.labels]
    zero = LiteMedSamEngine.load(None)
    t0 = time.monotonic()
    crops, stats = build_cache(paths, "report", cfg.output_dir, cfg, zero, 1, 0.0)
    tuned = LiteMedSamEngine.load(args.package)
    rows = {}
    for label, engine in (("zero-shot", zero), ("fine-tuned", tuned)):
        rows[label] = validate(engine.net, crops, names, cfg.prompts.box_jitter, "cpu")
    print(f"\n{len(crops)} crops from {len(paths)} validation patients ({paths[0].stem} .. {paths[-1].stem}); "
          f"{stats['encoded_now']} encoded now; {time.monotonic() - t0:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| prompt | weights | " + " | ".join(names) + " | mean |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for kind in PROMPT_KINDS:
        for label, r in rows.items():
            cells = " | ".join(f"{r['dice'][kind].get(n, float('nan')):.3f}" for n in names)
            print(f"| {kind.replace('_', ' ')} | {label} | {cells} | {r['mean'][kind]:.3f} |")
    print("\nmean over prompts and organs: " + ", ".join(f"{k} {v['score']:.3f}" for k, v in rows.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": [p.stem for p in paths], "crops": len(crops), **rows},
                                              indent=1, default=float))


if __name__ == "__main__":
    main()
