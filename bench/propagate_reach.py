"""How far should a seed-mode front travel past its seed? Dice against PropagationSettings.max_travel.

Each organ of the chosen OpenKBP **train** patients is seeded on its middle slice and propagated with every stop
criterion off except "vanished", up to ``--margin`` slices past its clinical extent; the result is then cut at
each candidate reach (``max_travel`` x the seed's equivalent diameter, :func:`models.extent.reach`) and scored.
Slices further than the margin past the extent are counted as if the front went on with its last area and no
overlap (what it does: see the per-step table with ``--steps``). Tune here, report on validation.

The second table cuts at ``reach_fraction`` x each structure's *learned* reach instead: the median over the
OpenKBP train split of :func:`models.extent.learned_reach` (what ``dicom-node finetune`` records per label);
the third at ``reach_fraction`` x its :class:`models.extent.ReachLaw` fitted over the same split (what the
engine uses when the package has one). ``--write-reach PKG`` writes both into a package's manifest (how the
shipped hn-litemedsam got them).

    python bench/propagate_reach.py --patients 95 96 97 [--checkpoint hn-litemedsam] [--steps] [--follow-anatomy]
    python bench/propagate_reach.py --extent-only   # masks only: the reach predictors with a perfect decoder
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPENKBP = ROOT.parent / "shared" / "data" / "openkbp" / "train"
TRAVELS = (0.6, 0.8, 1.0, 1.2, 1.5, 2.0, None)
FRACTIONS = (0.5, 0.75, 1.0, 1.25, 1.5)


def train_reach(labels) -> tuple[dict[str, float], dict[str, object], dict[str, object]]:
    """Median learned reach of each label over the OpenKBP train split, its ReachLaw and the Abutments (seconds:
    masks only); what ``dicom-node finetune`` records from its training cases."""
    from models.data import read_npz
    from models.extent import fit_abutments, learn_reach, middle_slice_extent, pair_gaps

    extents: dict[str, list[tuple[float, float]]] = {}
    gaps: dict[tuple[str, str], list[float]] = {}
    for path in sorted(OPENKBP.glob("*.npz")):
        case = read_npz(path, labels)
        present = [c for c in range(len(labels)) if case.present[c]]
        for c in present:
            e = middle_slice_extent(case.masks[c], case.spacing_xyz)
            if e is not None and e[0] > 0:
                extents.setdefault(labels[c].name, []).append(e)
        for pair, g in pair_gaps({labels[c].name: case.masks[c] > 0 for c in present}, case.spacing_xyz[2]).items():
            gaps.setdefault(pair, []).append(g)
    learned = {name: learn_reach(v) for name, v in extents.items()}
    abutments = fit_abutments(gaps, {name: float(np.median([h for _, h in v])) for name, v in extents.items()})
    return ({name: median for name, (median, _) in learned.items()},
            {name: law for name, (_, law) in learned.items() if law is not None}, abutments)


def _cut_dice(truth: np.ndarray, lo: int, hi: int) -> float:
    """Dice of ``truth`` kept on slices lo..hi, slices past its ends counted with the end slice's area."""
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    areas = truth.sum(axis=(1, 2))
    kept = int(areas[lo:hi + 1].sum())
    over = int(areas[zs[0]]) * max(int(zs[0]) - lo, 0) + int(areas[zs[-1]]) * max(hi - int(zs[-1]), 0)
    return 2.0 * kept / (kept + over + int(areas.sum()))


def extent_only(labels) -> None:
    """Masks only (seconds): each train structure's clinical contour kept in-slice and cut at its seed's predicted
    extent (middle slice +- the reach; slices past the true ends count with the end slice's area, as a front that
    ran on): Dice by predictor, i.e. what each bound would cost a perfect decoder. The last row adds the learned
    abutments to the law (models.propagate.abut: a cord ends below the brainstem's predicted extent)."""
    from models.data import read_npz
    from models.evaluate_propagation import seed_slices
    from models.extent import Abutment, ReachLaw
    from models.propagate import Seed, abut, within_reach

    medians, laws, abutments = train_reach(labels)
    fixed = {name: ReachLaw(law.half_extent_mm(law.diameter_mm), law.diameter_mm, 0.0)  # type: ignore[attr-defined]
             for name, law in laws.items()}
    names = {label.name.lower(): label.name for label in labels}
    rules = {name: Abutment(names[a.other], a.gap_mm) for name, a in abutments.items()}  # type: ignore[attr-defined]
    scores: dict[str, dict[str, list[float]]] = {}
    for path in sorted(OPENKBP.glob("*.npz")):
        case = read_npz(path, labels)
        truths = {label.name: case.masks[c] > 0 for c, label in enumerate(labels) if case.present[c]}
        depth = case.image.shape[0]
        for kind, travels in (("median", medians), ("fixed mm", fixed), ("law", laws), ("law + abutments", laws)):
            seeds = {name: within_reach(Seed({z: t[z] for z in seed_slices(t)}), depth, case.spacing_xyz,
                                        travels[name])  # type: ignore[arg-type]
                     for name, t in truths.items() if name in travels}
            if kind == "law + abutments":
                seeds = abut(seeds, rules, case.spacing_xyz[2], depth)
            for name, seed in seeds.items():
                scores.setdefault(kind, {}).setdefault(name, []).append(_cut_dice(truths[name], *seed.extent))
    order = list(scores["median"])
    print("\n| extent from | " + " | ".join(order) + " | mean |")
    print("| --- " * (len(order) + 2) + "|")
    for kind, by_name in scores.items():
        means = [float(np.mean(by_name[n])) for n in order]
        print(f"| {kind} | " + " | ".join(f"{m:.3f}" for m in means) + f" | **{np.mean(means):.3f}** |")


def write_reach(package_dir: str, table: dict[str, float], laws: dict[str, object],
                abutments: dict[str, object]) -> None:
    from dataclasses import asdict

    from models.package import AbutmentSpec, ReachLawSpec, load_package, write_manifest

    package = load_package(package_dir)
    names = {lab.name.lower(): lab.name for lab in package.manifest.labels}

    def abuts(name: str) -> AbutmentSpec | None:
        a = abutments.get(name)
        return None if a is None else AbutmentSpec(label=names[a.other], gap_mm=a.gap_mm)  # type: ignore[attr-defined]

    labels = tuple(lab.model_copy(update={
        "reach": table.get(lab.name),
        "reach_law": ReachLawSpec(**asdict(laws[lab.name])) if lab.name in laws else None,  # type: ignore[arg-type]
        "abuts": abuts(lab.name)})
        for lab in package.manifest.labels)
    write_manifest(package.path, package.manifest.model_copy(update={"labels": labels}))


def cut_dice(pred: np.ndarray, truth: np.ndarray, seed_z: int, limit: int, margin_end: tuple[int, int]) -> float:
    """Dice of ``pred`` kept within ``limit`` slices of ``seed_z``; slices beyond the recorded range (outside
    ``margin_end``) are extrapolated with the last recorded slice's area and no overlap."""
    zs = np.arange(pred.shape[0])
    keep = np.abs(zs - seed_z) <= limit
    kept = pred & keep[:, None, None]
    area, inter = int(kept.sum()), int((kept & truth).sum())
    lo, hi = margin_end
    for end, room in ((lo, lo), (hi, pred.shape[0] - 1 - hi)):  # room: slices that exist beyond the recorded end
        extra = min(limit - abs(end - seed_z), room)
        if extra > 0:
            area += int(pred[end].sum()) * extra
    return 2.0 * inter / max(area + int(truth.sum()), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", nargs="+", type=int, default=[95, 96, 97], help="train_pt_<N> numbers")
    parser.add_argument("--checkpoint", default=None, help="fine-tuned package (default: zero-shot LiteMedSAM)")
    parser.add_argument("--margin", type=int, default=10, help="slices past the clinical extent to propagate")
    parser.add_argument("--steps", action="store_true", help="print area / truth / Dice per step past the seed")
    parser.add_argument("--follow-anatomy", action="store_true", help="every structure follows the anatomy "
                        "(PropagationSettings.follow_anatomy 0); default: none")
    parser.add_argument("--write-reach", metavar="PKG", help="write the train split's learned reach into PKG and stop")
    parser.add_argument("--extent-only", action="store_true", help="masks only: what each reach predictor costs a "
                        "perfect decoder over the whole train split (the median, a fixed length in mm, the law)")
    args = parser.parse_args()

    from models.data import read_npz
    from models.evaluate_propagation import HN_ORGANS, seed_slices
    from models.extent import reach
    from models.prompting import load_engine
    from models.propagate import EncodingCache, PropagationSettings, Seed, propagate

    if args.extent_only:
        return extent_only(HN_ORGANS)
    learned, laws, abutments = train_reach(HN_ORGANS)
    print("learned reach (median over the train split, middle-slice diameters):", learned, flush=True)
    print("learned reach laws (half mm at the reference diameter mm, exponent):", laws, flush=True)
    print("learned abutments:", abutments, flush=True)
    if args.write_reach:
        write_reach(args.write_reach, learned, laws, abutments)
        print(f"written into {args.write_reach}")
        return
    engine = load_engine("litemedsam", args.checkpoint)
    free = PropagationSettings(min_area_fraction=0.0, max_growth=1e9, min_overlap=0.0, max_travel=None,
                               follow_anatomy=0.0 if args.follow_anatomy else None)
    scores: dict[object, dict[str, list[float]]] = {t: {} for t in TRAVELS}
    by_fraction: dict[float, dict[str, list[float]]] = {f: {} for f in FRACTIONS}
    by_law: dict[float, dict[str, list[float]]] = {f: {} for f in FRACTIONS}
    for number in args.patients:
        case = read_npz(OPENKBP / f"train_pt_{number}.npz", HN_ORGANS)
        image = case.image.astype(np.float32)
        started = time.perf_counter()
        seeds, bounds = {}, {}
        for c, label in enumerate(HN_ORGANS):
            if not case.present[c]:
                continue
            truth = case.masks[c].astype(bool)
            zs = np.flatnonzero(truth.any(axis=(1, 2)))
            z = seed_slices(truth)[0]
            lo, hi = max(int(zs[0]) - args.margin, 0), min(int(zs[-1]) + args.margin, truth.shape[0] - 1)
            seeds[label.name], bounds[label.name] = Seed({z: truth[z]}, extent=(lo, hi)), (z, lo, hi, c)
        found = propagate(engine, image, seeds, free, EncodingCache(capacity=2048), case.spacing_xyz)
        print(f"train_pt_{number}: {time.perf_counter() - started:.0f} s", flush=True)
        for name, (z, lo, hi, c) in bounds.items():
            truth, pred = case.masks[c].astype(bool), found[name].mask
            if args.steps:
                cells = []
                for d in range(lo - z, hi - z + 1):
                    p, t = pred[z + d], truth[z + d]
                    overlap = 2.0 * int((p & t).sum()) / max(int(p.sum()) + int(t.sum()), 1)
                    cells.append(f"{d:+d}:{int(p.sum())}/{int(t.sum())}/{overlap:.2f}")
                print(f"  {name}: area/truth/Dice by slice from the seed: {' '.join(cells)}")
            for t in TRAVELS:
                limit = reach(truth[z], case.spacing_xyz, t) if t is not None else truth.shape[0]
                scores[t].setdefault(name, []).append(cut_dice(pred, truth, z, limit, (lo, hi)))
            for f in FRACTIONS:
                limit = reach(truth[z], case.spacing_xyz, f * learned[name])
                by_fraction[f].setdefault(name, []).append(cut_dice(pred, truth, z, limit, (lo, hi)))
                law = laws.get(name)
                limit = reach(truth[z], case.spacing_xyz, law.scaled(f)) if law is not None else limit
                by_law[f].setdefault(name, []).append(cut_dice(pred, truth, z, limit, (lo, hi)))
    names = list(scores[TRAVELS[0]])
    for title, table in (("max_travel", scores), ("reach_fraction", by_fraction),
                         ("reach_fraction x law", by_law)):
        print(f"\n| {title} | " + " | ".join(names) + " | mean |")
        print("| --- " * (len(names) + 2) + "|")
        for t, by_name in table.items():
            means = [float(np.mean(by_name[n])) for n in names]
            print(f"| {t} | " + " | ".join(f"{m:.2f}" for m in means) + f" | **{np.mean(means):.3f}** |")


if __name__ == "__main__":
    main()
