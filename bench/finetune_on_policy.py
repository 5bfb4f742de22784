"""One on-policy round on an existing LiteMedSAM package: its decoder trained on the boxes its own propagation gives.

``dicom-node finetune`` runs these rounds after supervised training when the config sets ``on_policy.rounds``
(models/on_policy.py: what a round does). This script runs one round from a package that already exists, with the
crops of the ``dicom-node finetune`` run that made it: hn-litemedsam 1.5.0 is one round from 1.4.0, 1.6.0 one from
1.5.1. Cases are OpenKBP **train** patients; each organ is seeded on its middle slice.

    python bench/finetune_on_policy.py --from hn-litemedsam --crops runs/hn-litemedsam-170/cache \\
        --cases-file bench/on_policy_cases.txt --out runs/op --version 1.5.0 --workers 2

Collection costs one propagation per case (~90 s with one thread; ``--workers`` runs cases in parallel, one torch
thread each) and keeps every decode's encoding (~2 MB each, ~60 per case) under ``OUT/onpolicy``; a rerun reuses
what is there. Training reads them all into memory with the original crops (64 cases + 1799 crops: ~12 GB).
The first ``--hold`` cases (sorted by name) are left out of training: their decode Dice, before and after, is a
quick check that the decoder learned the on-policy prompts. Choose and evaluate on patients that are not collected
(``--exclude`` keeps bench/propagate.py's seven train patients out when cases are drawn with ``--count``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp" / "train"
BENCH_PATIENTS = (120, 30, 10, 50, 70, 100, 140)  # bench/propagate.py's train patients (sorted indices)


def read_crops(folder: Path):
    """A ``dicom-node finetune`` run's cached crops of one split (models.finetune's shard format)."""
    import torch

    from models.finetune import CropSet, crop_item_from_dict, unpack_native

    items, embeddings, targets, native = [], [], [], []
    for shard in sorted(folder.glob("*.pt")):
        d = torch.load(shard, weights_only=False)
        items += [crop_item_from_dict(x) for x in d["items"]]
        embeddings.append(d["embeddings"])
        targets.append(d["targets"])
        native += unpack_native(d)
    return CropSet(items, torch.cat(embeddings), torch.cat(targets), native)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="checkpoint", default="hn-litemedsam", help="package to start from")
    parser.add_argument("--crops", type=Path, help="a finetune run's cache folder (train/, validation/): its crops "
                        "are mixed in and its validation crops scored; without it only the decodes train "
                        "(hn-litemedsam 1.7.0)")
    parser.add_argument("--cases-file", type=Path, help="train case names to collect, one per line")
    parser.add_argument("--count", type=int, default=64, help="without --cases-file: this many train cases, drawn "
                                                                "at random (seed 23) outside --exclude")
    parser.add_argument("--exclude", type=int, nargs="*", default=list(BENCH_PATIENTS))
    parser.add_argument("--hold", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--mask-prompt", type=float, default=0.0, help="fraction of decodes trained with the mask "
                        "prompt their front offered (0: box only; hn-litemedsam 1.7.0: 0.8)")
    parser.add_argument("--collect-only", action="store_true", help="stop after collecting (a rerun without it "
                        "reuses the collected decodes and trains)")
    args = parser.parse_args()

    paths = sorted(OPENKBP.glob("*.npz"))
    if args.cases_file:
        wanted = set(args.cases_file.read_text().split())
        chosen = [p for p in paths if p.stem in wanted]
        if len(chosen) != len(wanted):
            raise SystemExit(f"{args.cases_file}: {sorted(wanted - {p.stem for p in chosen})} not in {OPENKBP}")
    else:
        order = [i for i in range(len(paths)) if i not in set(args.exclude)]
        np.random.default_rng(23).shuffle(order)
        chosen = [paths[i] for i in order[:args.count]]
    from models.data import KeyMap
    from models.evaluate_propagation import HN_ORGANS
    from models.on_policy import collect_case

    folder = args.out / "onpolicy"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in chosen if not (folder / f"{p.stem}.pt").is_file()]
    print(f"collecting {len(todo)} of {len(chosen)} cases with {args.checkpoint}", flush=True)
    threads = 1 if args.workers > 1 else args.threads
    jobs = [(p, folder / f"{p.stem}.pt", args.checkpoint, HN_ORGANS, KeyMap(), threads) for p in todo]
    if args.workers > 1:
        from models.on_policy import _collect

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for line in pool.imap_unordered(_collect, jobs):
                print(line, flush=True)
    else:
        for job in jobs:
            print(collect_case(*job), flush=True)
    if args.collect_only:
        return

    import logging

    import torch

    from config.finetune import OnPolicy, PromptMix
    from models.finetune import CropSet, freeze_all_but, tuned_state, validate
    from models.litemedsam import LiteMedSamEngine
    from models.on_policy import decode_dice, read_decodes, round_package, train_pass
    from models.package import find_package, load_package

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    shards = sorted(folder / f"{p.stem}.pt" for p in chosen)
    held, used = shards[:args.hold], shards[args.hold:]
    decodes, held_decodes = read_decodes(used), read_decodes(held)
    if args.crops:
        crops, val = read_crops(args.crops / "train"), read_crops(args.crops / "validation")
    else:
        crops, val = CropSet([], torch.zeros(0, 256, 64, 64, dtype=torch.float16),
                             torch.zeros(0, 256, 256, dtype=torch.bool), []), None
    print(f"on-policy decodes: {len(decodes)} from {len(used)} cases "
          f"({int((~decodes.targets.flatten(1).any(1)).sum())} past an organ's end), {len(held_decodes)} held from "
          f"{len(held)}; original crops {len(crops)}", flush=True)

    base = load_package(args.checkpoint) if Path(args.checkpoint).is_dir() else find_package(args.checkpoint)
    names = [label.name for label in base.manifest.labels]
    engine = LiteMedSamEngine.load(args.checkpoint, "cpu", backend="torch")
    net, masked = engine.net, engine.mask_prompt or args.mask_prompt > 0
    params = freeze_all_but(net, ["prompt_encoder", "mask_decoder"])
    prompts = PromptMix()  # config/finetune.example.yaml's prompt mix for the original crops
    scores = {"before": {"held": decode_dice(net, held_decodes, mask_prompt=engine.mask_prompt),
                         "val": validate(net, val, names, 0.15, "cpu") if val else None}}
    print(f"before: held on-policy decode Dice {scores['before']['held']:.3f}; validation slices "
          f"{scores['before']['val'] and scores['before']['val']['mean']}", flush=True)
    started = time.perf_counter()
    losses = train_pass(net, params, decodes, crops, prompts,
                        OnPolicy(epochs=args.epochs, lr=args.lr, mask_prompt=args.mask_prompt),
                        batch_size=8, dice_weight=1.0, seed=0, device="cpu")
    scores["after"] = {"held": decode_dice(net, held_decodes, mask_prompt=masked),
                       "val": validate(net, val, names, 0.15, "cpu") if val else None}
    print(f"after: held on-policy decode Dice {scores['after']['held']:.3f}; validation slices "
          f"{scores['after']['val'] and scores['after']['val']['mean']}", flush=True)
    rounds = base.manifest.training.get("on_policy", [])
    record = {"round": len(rounds if isinstance(rounds, list) else [rounds]) + 1,
              "from": f"{base.manifest.name} {base.manifest.version}", "base_sha256": base.manifest.weights.sha256,
              "cases": [p.stem for p in used], "held_cases": [p.stem for p in held], "decodes": len(decodes),
              "supervised_crops": len(crops), "epochs": args.epochs, "lr": args.lr, "mask_prompt": args.mask_prompt,
              "final_loss": float(np.mean(losses[-50:])), "script": "bench/finetune_on_policy.py",
              "seconds": round(time.perf_counter() - started, 1)}
    state = tuned_state(net, ["prompt_encoder", "mask_decoder"])
    package = round_package(base, args.out / "package" / base.manifest.name, state, record, scores, args.version,
                            "float32", mask_prompt=masked)
    print(f"wrote {package.path} ({record['seconds']:.0f} s of training)")


if __name__ == "__main__":
    main()
