"""Propagation quality and speed on OpenKBP head-and-neck CT (zero-shot LiteMedSAM unless --checkpoint).

    nice -n 19 .venv/bin/python bench/propagate.py [--split validation] [--patients 0 1 2] [--threads 1]
        [--modes truebox seed1 seed3] [--set key=value ...] [--organs Mandible ...] [--stops]

For each patient and each of the seven organs the planner's seed is simulated from the clinical contour:
``seed1`` keeps the middle slice of the organ's z extent, ``seed3`` the slices at 1/4, 1/2 and 3/4 of it. The seeds
are propagated through the volume (models.propagate) and the 3-D result is compared with the clinical mask (Dice;
the seed slices are part of the result, as they are in the node's output). ``truebox`` is the upper bound the
issue quotes: every slice prompted with its own true box on a zoomed crop, no propagation.

Seconds per case = wall clock of one mode over the seven organs of one patient (encodings are not shared between
modes; each mode starts with an empty cache). Figures depend on the machine's load: the script prints the torch
thread count and the load average. ``--set`` overrides PropagationSettings fields (tuning: use --split train).
``--stops`` tabulates where the outward fronts ended against the clinical ends, by the reason they gave (reached
their bound, jumped, collapsed, vanished): a guard that stops fronts early shows there.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp"
ORGANS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")


def seed_slices(mask: np.ndarray, count: int) -> list[int]:
    """``count`` slices spread over the organ's z extent (the middle one for 1), each holding the organ."""
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if count == 1:
        wanted = [(zs[0] + zs[-1]) / 2.0]
    else:
        wanted = [zs[0] + (zs[-1] - zs[0]) * f for f in np.linspace(0.25, 0.75, count)]
    return sorted({int(zs[np.argmin(np.abs(zs - w))]) for w in wanted})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


STOP = re.compile(r"(up|down) from (\d+): (\w+).*?(\d+)$")  # StructureResult.stops: "up from 95: reached slice 110"


def stop_offsets(stops: list[str], truth: np.ndarray, seeded: list[int]) -> list[tuple[str, int]]:
    """(reason's first word, slices short of the clinical end: > 0 stopped early) of each outward front (from the
    outermost of the ``seeded`` slices; fronts between seeds end in the middle of their gap)."""
    zs = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    out = []
    for text in stops:
        m = STOP.match(text)
        if m and int(m.group(2)) == (max(seeded) if m.group(1) == "up" else min(seeded)):
            z = int(m.group(4))
            out.append((m.group(3), int(zs[-1] - z if m.group(1) == "up" else z - zs[0])))
    return out


def run_mode(mode: str, engine, ct: np.ndarray, masks: dict[str, np.ndarray], settings,
             spacing_xyz=None) -> tuple[dict, float, int, dict]:
    from models.propagate import EncodingCache, Seed, propagate, segment_slices

    cache = EncodingCache(capacity=512)
    started = time.perf_counter()
    stops: dict[str, list[tuple[str, int]]] = {}
    if mode == "truebox":
        found = {k: segment_slices(engine, ct, m, settings, cache) for k, m in masks.items()}
    else:
        count = int(mode.removeprefix("seed"))
        seeds = {k: Seed({z: m[z] for z in seed_slices(m, count)}) for k, m in masks.items()}
        results = propagate(engine, ct, seeds, settings, cache, spacing_xyz)
        found = {k: r.mask for k, r in results.items()}
        stops = {k: stop_offsets(r.stops, masks[k], list(seeds[k].masks)) for k, r in results.items()}
    seconds = time.perf_counter() - started
    return {k: dice(found[k], masks[k]) for k in masks}, seconds, cache.misses, stops


def parse_overrides(items: list[str], settings):
    kinds = {f.name: type(getattr(settings, f.name)) for f in fields(settings)}
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"--set {key}: unknown setting; known: {', '.join(sorted(kinds))}")
        kind = kinds[key]
        if value.lower() == "none":
            changes[key] = None
            continue
        if kind is type(None):  # an optional knob that is off (or left to the engine) by default
            if value.lower() in ("true", "false", "yes", "no"):
                changes[key] = value.lower() in ("true", "yes")
            else:  # a number turns it on
                changes[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            continue
        changes[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else (
            tuple(float(v) for v in value.split(",")) if kind is tuple else kind(value))
    return replace(settings, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="validation")
    parser.add_argument("--patients", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["seed1", "seed3", "truebox"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", default=None, help="fine-tuned model package (name or folder)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    parser.add_argument("--organs", nargs="+", default=list(ORGANS), choices=ORGANS,
                        help="only these organs (seconds per case then count only theirs)")
    parser.add_argument("--stops", action="store_true",
                        help="also tabulate where seed-mode fronts ended against the clinical ends, by reason")
    args = parser.parse_args()

    import torch

    from models.prompting import load_engine
    from models.propagate import PropagationSettings

    torch.set_num_threads(args.threads)
    settings = parse_overrides(args.overrides, PropagationSettings())
    engine = load_engine("litemedsam", args.checkpoint)
    paths = sorted((OPENKBP / args.split).glob("*.npz"))
    print(f"engine {engine.name} {engine.version}; torch threads {torch.get_num_threads()}; "
          f"load average at start {os.getloadavg()[0]:.1f}; split {args.split}; settings {settings}")
    scores: dict[str, dict[str, list[float]]] = {m: {o: [] for o in args.organs} for m in args.modes}
    seconds: dict[str, list[float]] = {m: [] for m in args.modes}
    ends: dict[tuple[str, str, str], list[int]] = {}  # (mode, organ, reason) -> slices short of the clinical end
    for mode in args.modes:  # modes outermost: a run cut short still has whole rows for the first modes
        for index in args.patients:
            with np.load(paths[index]) as data:
                ct = data["ct"].astype(np.float32)
                spacing_xyz = tuple(float(v) for v in data["spacing"][::-1])
                masks = {o: data[f"mask_{o}"].astype(bool) for o in args.organs
                         if f"mask_{o}" in data.files and data[f"mask_{o}"].any()}
            found, took, encodings, stops = run_mode(mode, engine, ct, masks, settings, spacing_xyz)
            for organ, offsets in stops.items():
                for reason, short in offsets:
                    ends.setdefault((mode, organ, reason), []).append(short)
            seconds[mode].append(took)
            for organ, value in found.items():
                scores[mode][organ].append(value)
            print(f"{paths[index].stem} {mode:8s} {took:6.1f} s {encodings:4d} encodings  "
                  + " ".join(f"{o[:6]}={v:.2f}" for o, v in found.items()), flush=True)
    print(f"\nmean Dice over {len(args.patients)} {args.split} patients (n = cases with that organ)")
    print(f"{'organ':14s}" + "".join(f"{m:>14s}" for m in args.modes))
    for organ in args.organs:
        cells = [f"{np.mean(v):.3f} (n={len(v)})" if (v := scores[m][organ]) else "-" for m in args.modes]
        print(f"{organ:14s}" + "".join(f"{c:>14s}" for c in cells))
    means = [np.mean([np.mean(v) for v in scores[m].values() if v]) for m in args.modes]
    print(f"{'mean of organs':14s}" + "".join(f"{v:14.3f}" for v in means))
    print(f"{'s per case':14s}" + "".join(f"{np.mean(seconds[m]):14.1f}" for m in args.modes))
    print(f"(torch threads {torch.get_num_threads()}; load average at end {os.getloadavg()[0]:.1f})")
    if args.stops:
        print("\nwhere fronts ended: slices short of the clinical end (> 0: early), by mode, organ and reason")
        for (mode, organ, reason), short in sorted(ends.items()):
            v = np.array(short)
            print(f"{mode:8s} {organ:14s} {reason:10s} fronts {len(v):3d}  median {np.median(v):5.1f}  "
                  f"over 2 early {(v > 2).sum():3d}  over 2 late {(v < -2).sum():3d}")


if __name__ == "__main__":
    main()
