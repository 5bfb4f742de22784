"""On-policy fine-tuning of a LiteMedSAM package: train its decoder on the prompts its own propagation gives.

``dicom-node finetune`` prompts each crop with a box made from the clinical contours (the slice's own, a
neighbour's, or a jittered one). In seed mode the prompt is the box of the mask the engine decoded on the last
slice, which drifts, and the errors compound along a front. This script (how hn-litemedsam 1.5.0 was made from
1.4.0) runs the package's own propagation (seed on each organ's middle slice, the propagation defaults) on OpenKBP
**train** patients, records every decode (:class:`models.propagate.Decode`: the crop's encoding and the box the front
gave), and takes the clinical contour on that slice as the target, empty past the organ's end (as in DAgger).
Those items are mixed with the package's original fine-tuning crops (a ``dicom-node finetune`` run's
``cache/train``, prompted as it prompts them) for one pass at a cosine-decayed learning rate; prompt encoder and
mask decoder train, the image encoder stays frozen. Then it writes a package with the same manifest (reach laws,
abutments) and the new weights.

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
import math
import multiprocessing as mp
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp" / "train"
BENCH_PATIENTS = (120, 30, 10, 50, 70, 100, 140)  # bench/propagate.py's train patients (sorted indices)


def collect_case(path: Path, shard: Path, checkpoint: str, threads: int) -> str:
    """Propagate ``path``'s organs from their middle slices with ``checkpoint`` and save every decode as an item."""
    import torch

    from models.data import read_npz
    from models.evaluate_propagation import HN_ORGANS, seed_slices
    from models.finetune import item_target
    from models.prompting import load_engine
    from models.propagate import Decode, EncodingCache, PropagationSettings, Seed, propagate

    torch.set_num_threads(threads)
    engine = load_engine("litemedsam", checkpoint)
    started = time.perf_counter()
    case = read_npz(path, HN_ORGANS)
    names = [label.name for label in HN_ORGANS]
    truth = {n: case.masks[c] > 0 for c, n in enumerate(names) if case.present[c]}
    seeds = {n: Seed({z: t[z]}) for n, t in truth.items() for z in seed_slices(t)}
    decodes: list[Decode] = []
    propagate(engine, case.image.astype(np.float32), seeds, PropagationSettings(), EncodingCache(512),
              case.spacing_xyz, on_decode=decodes.append)
    kept = [d for d in decodes if d.prompt.points is None and d.prompt.mask_logits is None]
    slices = [truth[d.key][d.z] for d in kept]
    torch.save({
        "items": [{"case_id": path.stem, "label": names.index(d.key), "z": d.z, "window": asdict(d.window),
                   "box": [float(v) for v in d.prompt.box]} for d in kept],
        "embeddings": torch.stack([d.embedding.to(torch.float16) for d in kept]),
        "targets": torch.from_numpy(np.stack([item_target(t, d.window) for t, d in zip(slices, kept)])),
        "native": [np.packbits(t) for t in slices], "shape": tuple(case.image.shape[1:]),
    }, shard.with_suffix(".tmp"))
    shard.with_suffix(".tmp").replace(shard)
    empty = sum(1 for t in slices if not t.any())
    return f"{path.stem}: {len(kept)} decodes ({empty} past the organ), {time.perf_counter() - started:.0f} s"


def _collect(job: tuple) -> str:
    return collect_case(*job)


def read_items(shards: list[Path]):
    """(label, window, input box) per item, embeddings, crop targets and native slices of on-policy shards."""
    import torch

    from models.finetune import unpack_native
    from models.propagate import CropWindow

    items, embeddings, targets, native = [], [], [], []
    for shard in shards:
        d = torch.load(shard, weights_only=False)
        items += [(it["label"], CropWindow(**it["window"]), tuple(it["box"])) for it in d["items"]]
        embeddings.append(d["embeddings"])
        targets.append(d["targets"])
        native += unpack_native(d)
    return items, torch.cat(embeddings), torch.cat(targets), native


def read_crops(folder: Path):
    """A ``dicom-node finetune`` run's cached crops of one split (models.finetune's shard format)."""
    import torch

    from models.finetune import _item, unpack_native

    items, embeddings, targets, native = [], [], [], []
    for shard in sorted(folder.glob("*.pt")):
        d = torch.load(shard, weights_only=False)
        items += [_item(x) for x in d["items"]]
        embeddings.append(d["embeddings"])
        targets.append(d["targets"])
        native += unpack_native(d)
    return items, torch.cat(embeddings), torch.cat(targets), native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="checkpoint", default="hn-litemedsam", help="package to start from")
    parser.add_argument("--crops", type=Path, required=True, help="a finetune run's cache folder (train/, validation/)")
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
    folder = args.out / "onpolicy"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in chosen if not (folder / f"{p.stem}.pt").is_file()]
    print(f"collecting {len(todo)} of {len(chosen)} cases with {args.checkpoint}", flush=True)
    jobs = [(p, folder / f"{p.stem}.pt", args.checkpoint, 1 if args.workers > 1 else args.threads) for p in todo]
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for line in pool.imap_unordered(_collect, jobs):
                print(line, flush=True)
    else:
        for job in jobs:
            print(collect_case(*job), flush=True)
    if args.collect_only:
        return

    import torch

    from models.finetune import (PROMPT_KINDS, _freeze_all_but, _Split, _tuned_state, decode_logits, item_box,
                                 native_dice, segmentation_loss, validate)
    from models.litemedsam import LiteMedSamEngine
    from models.package import find_package, load_package, write_package

    torch.set_num_threads(args.threads)
    shards = sorted(folder / f"{p.stem}.pt" for p in chosen)
    held, used = shards[:args.hold], shards[args.hold:]
    op_items, op_emb, op_tgt, _ = read_items(used)
    ho_items, ho_emb, _, ho_native = read_items(held) if held else ([], None, None, [])
    or_items, or_emb, or_tgt, _ = read_crops(args.crops / "train")
    val = _Split(*read_crops(args.crops / "validation"))
    print(f"on-policy decodes: {len(op_items)} from {len(used)} cases ({int((~op_tgt.flatten(1).any(1)).sum())} "
          f"past an organ's end), {len(ho_items)} held from {len(held)}; original crops {len(or_items)}", flush=True)

    base = load_package(args.checkpoint) if Path(args.checkpoint).is_dir() else find_package(args.checkpoint)
    names = [label.name for label in base.manifest.labels]
    net = LiteMedSamEngine.load(args.checkpoint, "cpu", backend="torch").net
    params = _freeze_all_but(net, ["prompt_encoder", "mask_decoder"])

    @torch.no_grad()
    def held_dice() -> float:
        net.eval()
        scores = []
        for i in range(0, len(ho_items), 16):
            boxes = torch.tensor([b for _, _, b in ho_items[i:i + 16]])
            for j, lg in enumerate(decode_logits(net, ho_emb[i:i + 16].float(), boxes).numpy()):
                scores.append(native_dice(lg, ho_items[i + j][1], ho_native[i + j]))
        return float(np.mean(scores)) if scores else float("nan")

    net.eval()
    before = {"held": held_dice(), "val": validate(net, val, names, 0.15, "cpu")}
    print(f"before: held on-policy decode Dice {before['held']:.3f}; validation slices {before['val']['mean']}",
          flush=True)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    n_op, per_epoch = len(op_items), len(op_items) + len(or_items)
    total = int(args.epochs * per_epoch / 8)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    order = np.concatenate([rng.permutation(per_epoch) for _ in range(math.ceil(args.epochs))])[:total * 8]
    mix = np.array([0.25, 0.35, 0.4])  # config/finetune.example.yaml's prompt mix for the original crops
    started, losses = time.perf_counter(), []
    net.train()
    for b in range(total):
        embeddings, boxes, targets = [], [], []
        for k in order[b * 8:(b + 1) * 8]:
            if k < n_op:  # the box the front gave
                embedding, box, target = op_emb[k], op_items[k][2], op_tgt[k]
            else:
                m = k - n_op
                kind = PROMPT_KINDS[int(rng.choice(3, p=mix))]
                embedding, box, target = or_emb[m], item_box(or_items[m], kind, rng, 0.15), or_tgt[m]
            embeddings.append(embedding)
            boxes.append(box)
            targets.append(target)
        logits = decode_logits(net, torch.stack(embeddings).float(), torch.tensor(boxes, dtype=torch.float32))
        loss = segmentation_loss(logits, torch.stack(targets).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if b % 100 == 0:
            print(f"batch {b}/{total} loss {np.mean(losses[-100:]):.4f} {time.perf_counter() - started:.0f} s",
                  flush=True)
    net.eval()
    after = {"held": held_dice(), "val": validate(net, val, names, 0.15, "cpu")}
    print(f"after: held on-policy decode Dice {after['held']:.3f}; validation slices {after['val']['mean']}",
          flush=True)
    fields = base.manifest.model_dump(mode="json")
    fields.pop("weights")
    fields["version"] = args.version
    fields["training"] = {**(fields.get("training") or {}), "on_policy": {
        "from": f"{base.manifest.name} {base.manifest.version}", "cases": [p.stem for p in used],
        "decodes": n_op, "original_crops": len(or_items), "epochs": args.epochs, "lr": args.lr,
        "script": "bench/finetune_on_policy.py"}}
    fields["metrics"] = {  # one pass, nothing selected: the base's slice figures and this run's, side by side
        "selection": "none (one pass); seed mode on OpenKBP validation: README",
        "validation_mean_slice_dice_by_prompt": after["val"]["mean"],
        "base_validation_mean_slice_dice_by_prompt": before["val"]["mean"],
        "held_on_policy_decode_dice": after["held"], "base_held_on_policy_decode_dice": before["held"]}
    package = write_package(args.out / "package" / base.manifest.name, fields,
                            _tuned_state(net, ["prompt_encoder", "mask_decoder"]), dtype="float32")
    print(f"wrote {package.path} ({time.perf_counter() - started:.0f} s of training)")


if __name__ == "__main__":
    main()
