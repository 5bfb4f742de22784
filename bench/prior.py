"""Prior-study mode on simulated follow-up scans of OpenKBP head-and-neck CT (zero-shot LiteMedSAM unless
--checkpoint).

    nice -n 19 .venv/bin/python bench/prior.py [--split validation] [--patients 0 1 2] [--threads 2] [--local-change]
        [--rigid] [--key-slices 3] [--csv runs/prior.csv]
    .venv/bin/python bench/prior.py --summarise runs/prior-a.csv runs/prior-b.csv   # the table of earlier runs

For each patient, a follow-up scan is simulated from the real CT and its seven organ masks
(``models.registration.simulate_follow_up``, seed = the patient's index in the split: a B-spline deformation
with control points moved up to 6 mm, a rotation up to 4 degrees about each axis and a shift up to 8 mm per
axis). The undeformed prior CT is registered to it (rigid, then B-spline unless --rigid), the prior masks are
mapped, and prior mode runs as in the node (``models.prior.propagate_from_prior``: key slices, extent bound,
fusion). Every method is scored against the *moved* masks (Dice, HD95 in mm):

    unmoved      the prior masks as they are (how far the simulated motion moved the organs)
    registered   registration alone (the mapped prior masks)
    propagated   propagation alone from the mapped key slices (no fallback)
    fused@T      the node's output with min_agreement = T (1 is the default); fused@1 = registered

--local-change adds a finer deformation (seed 1000 + index) that registration can follow only in part.

Seconds per case: simulation, registration, propagation. Figures depend on the machine's load (printed).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp"
ORGANS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
AGREEMENT = (0.5, 0.7, 0.9, 0.95, 1.0)  # must hold the default (models.prior.MIN_AGREEMENT), printed per case


# --local-change: a second, finer deformation on top of the (mesh 16 over ~500 mm: ~30 mm cells), no
# rigid part; the registration's B-spline (~60 mm mesh) can follow it only in part, as anatomy that changed
LOCAL_CHANGE = {"deformation_mm": 4.0, "mesh": 16, "shift_mm": 0.0, "rotation_deg": 0.0}


def changed_slices(fused: np.ndarray, registered: np.ndarray) -> int:
    """Slices where the fused result is not the registered contour: what propagation changed."""
    return int((fused != registered).any(axis=(1, 2)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="validation")
    parser.add_argument("--patients", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rigid", action="store_true", help="rigid registration only (no B-spline)")
    parser.add_argument("--key-slices", type=int, default=3)
    parser.add_argument("--local-change", action="store_true", help="add a fine deformation (control points every "
                        "~30 mm moved up to 4 mm) that the registration's ~60 mm mesh cannot follow")
    parser.add_argument("--checkpoint", default=None, help="fine-tuned model package (name or folder)")
    parser.add_argument("--csv", type=Path, default=None, help="append one row per case, organ and method")
    parser.add_argument("--summarise", type=Path, nargs="+", default=None, help="only print the table of CSVs")
    args = parser.parse_args()
    if args.summarise:
        return summarise(args.summarise)

    import SimpleITK as sitk
    import torch

    from models.prior import MIN_AGREEMENT, fuse, propagate_from_prior
    from models.prompting import load_engine
    from models.registration import map_masks, register, simulate_follow_up
    from models.types import Volume

    torch.set_num_threads(args.threads)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(args.threads)
    engine = load_engine("litemedsam", args.checkpoint)
    paths = sorted((OPENKBP / args.split).glob("*.npz"))
    print(f"engine {engine.name} {engine.version}; threads {args.threads}; registration "
          f"{'rigid' if args.rigid else 'rigid + B-spline'}; key slices {args.key_slices}; "
          f"{'local change; ' if args.local_change else ''}"
          f"load average at start {os.getloadavg()[0]:.1f}; split {args.split}", flush=True)
    rows: list[dict] = []
    slices: list[tuple[float, float]] = []  # (agreement, gain) per slice, all patients and organs
    writer = None
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        handle = args.csv.open("a", newline="")
        writer = csv.DictWriter(handle, ["case", "organ", "method", "dice", "hd95_mm", "registration"])
    for index in args.patients:
        with np.load(paths[index]) as data:
            ct = data["ct"]
            masks = {o: data[f"mask_{o}"].astype(bool) for o in ORGANS
                     if f"mask_{o}" in data.files and data[f"mask_{o}"].any()}
            spacing_zyx = tuple(float(v) for v in data["spacing"])
        t0 = time.perf_counter()
        motion = follow = simulate_follow_up(ct, masks, spacing_zyx, seed=index)
        if args.local_change:
            follow = simulate_follow_up(follow.image, follow.masks, spacing_zyx, seed=1000 + index, **LOCAL_CHANGE)
        spacing = spacing_zyx[::-1]
        prior, new = Volume(ct, spacing, (0.0, 0.0, 0.0)), Volume(follow.image, spacing, (0.0, 0.0, 0.0))
        t1 = time.perf_counter()
        registration = register(new, prior, deformable=not args.rigid)
        mapped = map_masks(masks, prior, new, registration.transform)
        t2 = time.perf_counter()
        # Only propagation alone is taken from here; every fusion below is computed from it.
        results = propagate_from_prior(engine, follow.image.astype(np.float32), mapped, key_count=args.key_slices)
        t3 = time.perf_counter()
        line = []
        for organ, truth in follow.masks.items():
            if not truth.any():
                continue
            empty = np.zeros_like(truth)
            propagated = results[organ].propagated if organ in results else empty
            candidates = {"unmoved": masks[organ], "registered": mapped[organ], "propagated": propagated}
            for t in AGREEMENT:
                candidates[f"fused@{t:g}"] = fuse(propagated, mapped[organ], t)[0]
            slices += slice_pairs(propagated, mapped[organ], truth)
            for method, mask in candidates.items():
                dice, hd95 = metrics(mask, truth, spacing)
                row = {"case": paths[index].stem, "organ": organ, "method": method, "dice": round(dice, 4),
                       "hd95_mm": round(hd95, 2), "registration": ("rigid" if args.rigid else "bspline")
                       + ("+local" if args.local_change else "")}
                rows.append(row)
                if writer:
                    writer.writerow(row)
            line.append(f"{organ[:6]} reg={dice_of(rows, organ, 'registered', paths[index].stem):.2f} "
                        f"prop={dice_of(rows, organ, 'propagated', paths[index].stem):.2f} "
                        f"fused={dice_of(rows, organ, f'fused@{MIN_AGREEMENT:g}', paths[index].stem):.2f} "
                        f"(changed {changed_slices(candidates[f'fused@{MIN_AGREEMENT:g}'], mapped[organ])} of "
                        f"{int(mapped[organ].any(axis=(1, 2)).sum())} registered slices)")
        if writer:
            handle.flush()
        print(f"{paths[index].stem}: simulate {t1 - t0:.0f} s, register {t2 - t1:.0f} s, propagate {t3 - t2:.0f} s; "
              f"motion shift {np.round(motion.shift_mm, 1).tolist()} mm, rotation "
              f"{np.round(motion.rotation_deg, 1).tolist()} deg; " + "; ".join(line), flush=True)
    print_table(rows, f"{len(args.patients)} {args.split} patients")
    print_agreement(slices)
    print(f"(load average at end {os.getloadavg()[0]:.1f})")


def metrics(pred: np.ndarray, truth: np.ndarray, spacing_xyz) -> tuple[float, float]:
    """(Dice, HD95 mm) on the two masks' bounding box: the same definitions as models.evaluate.structure_metrics
    (HD95 = the larger of the two directed 95th-percentile surface distances; inf for an empty prediction), but
    MONAI computes distances over the whole 128^3 grid, ~35 s per pair on this loaded CPU."""
    from scipy import ndimage as ndi

    total = int(pred.sum()) + int(truth.sum())
    dice = 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total
    if not pred.any() or not truth.any():
        return dice, float("inf")
    both = pred | truth
    box = tuple(slice(max(int(i.min()) - 2, 0), int(i.max()) + 3) for i in np.nonzero(both))
    p, t = pred[box], truth[box]
    sampling = tuple(float(v) for v in spacing_xyz[::-1])
    edge_p, edge_t = p & ~ndi.binary_erosion(p), t & ~ndi.binary_erosion(t)
    to_t = ndi.distance_transform_edt(~edge_t, sampling=sampling)
    to_p = ndi.distance_transform_edt(~edge_p, sampling=sampling)
    return dice, float(max(np.percentile(to_t[edge_p], 95), np.percentile(to_p[edge_t], 95)))


def slice_pairs(propagated: np.ndarray, registered: np.ndarray, truth: np.ndarray) -> list[tuple[float, float]]:
    """(agreement, gain) per slice where both methods have a contour: the Dice between the propagated and the
    registered slice, and the propagated slice's Dice with the truth minus the registered one's."""

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        total = int(a.sum()) + int(b.sum())
        return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total

    both = np.flatnonzero(propagated.any(axis=(1, 2)) & registered.any(axis=(1, 2)))
    return [(dice(propagated[z], registered[z]), dice(propagated[z], truth[z]) - dice(registered[z], truth[z]))
            for z in both]


def print_agreement(slices: list[tuple[float, float]]) -> None:
    """Is a propagated slice better than the registered one, by how well the two agree? (What the fusion keeps.)"""
    print(f"\nslices where both have a contour ({len(slices)}), by agreement (Dice propagated vs registered):")
    print("agreement      slices  mean slice Dice gain of propagation  propagated better")
    edges = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.01)
    for lo, hi in zip(edges, edges[1:]):
        gains = [g for a, g in slices if lo <= a < hi]
        if gains:
            print(f"{lo:.2f}-{min(hi, 1.0):.2f}  {len(gains):10d}  {np.mean(gains):+35.3f}  "
                  f"{np.mean(np.asarray(gains) > 0):17.0%}")


def print_table(rows: list[dict], what: str) -> None:
    """Mean Dice / HD95 per organ and method, and the mean of the per-organ means."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\nmean over {what}: Dice / HD95 mm (HD95 over finite values)")
    print(f"{'organ':14s}" + "".join(f"{m:>18s}" for m in methods))
    for organ in ORGANS + ("mean",):
        cells = []
        for method in methods:
            picked = [r for r in rows if r["method"] == method and (organ == "mean" or r["organ"] == organ)]
            if organ == "mean":  # mean of per-organ means
                per = [[r for r in picked if r["organ"] == o] for o in ORGANS]
                d = np.mean([np.mean([r["dice"] for r in p]) for p in per if p]) if picked else np.nan
                h = np.nanmean([np.mean([r["hd95_mm"] for r in p if np.isfinite(r["hd95_mm"])] or [np.nan])
                                for p in per if p]) if picked else np.nan
            else:
                d = np.mean([r["dice"] for r in picked]) if picked else np.nan
                h = np.mean([r["hd95_mm"] for r in picked if np.isfinite(r["hd95_mm"])] or [np.nan])
            cells.append(f"{d:.3f} / {h:4.1f}" + (f" n={len(picked)}" if organ != "mean" else ""))
        print(f"{organ:14s}" + "".join(f"{c:>18s}" for c in cells))


def summarise(paths: list[Path]) -> None:
    """The table from CSV files of earlier runs (e.g. patients split over two processes)."""
    rows = []
    for path in paths:
        with path.open() as handle:
            for row in csv.DictReader(handle, ["case", "organ", "method", "dice", "hd95_mm", "registration"]):
                rows.append({**row, "dice": float(row["dice"]), "hd95_mm": float(row["hd95_mm"])})
    cases = sorted({r["case"] for r in rows})
    print_table(rows, f"{len(cases)} patients ({', '.join(cases)})")


def dice_of(rows: list[dict], organ: str, method: str, case: str) -> float:
    return next(r["dice"] for r in rows if r["organ"] == organ and r["method"] == method and r["case"] == case)


if __name__ == "__main__":
    main()
