"""Evaluate a model package on NPZ cases: per case and structure Dice, 95 % Hausdorff distance and surface Dice.

Metrics come from MONAI and are computed on each case's own grid, after the whole inference chain (resampling,
network, post-processing, resampling back): the figures a physicist gets from the node. A structure absent from a
case's ground truth is not scored for that case (clinics contour what a plan needs).

:func:`structure_metrics` and :func:`summarise` are pure; :func:`evaluate` reads the cases and writes the report
(CSV, summary, PNG box plot and overlays of the worst and median cases) into a folder.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.data import LabelSource, find_cases, read_npz
from models.errors import TrainingError
from models.organs import cached_network, segment
from models.package import ModelPackage

__all__ = ["CaseScore", "evaluate", "structure_metrics", "summarise", "SURFACE_TOLERANCE_MM"]

SURFACE_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class CaseScore:
    case: str
    structure: str
    dice: float
    hd95_mm: float  # inf when the prediction is empty
    surface_dice: float  # at SURFACE_TOLERANCE_MM
    truth_ml: float
    predicted_ml: float


def structure_metrics(pred: np.ndarray, truth: np.ndarray, spacing_xyz: Sequence[float]) -> tuple[float, float, float]:
    """(Dice, HD95 mm, surface Dice at 2 mm) of two boolean (Z, Y, X) masks on a grid of ``spacing_xyz``."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    dice = 2.0 * int((pred & truth).sum()) / total if total else 1.0
    if not pred.any() or not truth.any():
        return dice, (0.0 if not pred.any() and not truth.any() else math.inf), (1.0 if total == 0 else 0.0)
    p = torch.from_numpy(pred)[None, None]
    t = torch.from_numpy(truth)[None, None]
    spacing_zyx = [float(s) for s in reversed(spacing_xyz)]
    hd95 = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing_zyx))
    nsd = float(compute_surface_dice(p, t, class_thresholds=[SURFACE_TOLERANCE_MM], include_background=True,
                                     spacing=spacing_zyx))
    return dice, hd95, nsd


def summarise(scores: Sequence[CaseScore]) -> dict[str, dict[str, float]]:
    """Per structure: cases, mean/median Dice, mean HD95 (finite ones), mean surface Dice; plus 'mean' over
    structures (the mean of the per-structure means)."""
    table: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(s.structure for s in scores):
        rows = [s for s in scores if s.structure == name]
        finite = [s.hd95_mm for s in rows if math.isfinite(s.hd95_mm)]
        table[name] = {
            "cases": len(rows),
            "dice_mean": float(np.mean([s.dice for s in rows])),
            "dice_median": float(np.median([s.dice for s in rows])),
            "hd95_mean_mm": float(np.mean(finite)) if finite else math.inf,
            "surface_dice_mean": float(np.mean([s.surface_dice for s in rows])),
            "missed": sum(1 for s in rows if s.predicted_ml == 0),
        }
    if table:
        keys = ("dice_mean", "hd95_mean_mm", "surface_dice_mean")
        table["mean"] = {k: float(np.mean([v[k] for v in table.values()])) for k in keys}
    return table


def score_case(predicted: dict[str, np.ndarray], truth: dict[str, np.ndarray], spacing_xyz: Sequence[float],
               case_id: str) -> list[CaseScore]:
    """Scores for every structure present in ``truth`` (name -> mask), against ``predicted`` (missing = empty)."""
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    out = []
    for name, t in truth.items():
        p = predicted.get(name, np.zeros_like(t, dtype=bool))
        dice, hd95, nsd = structure_metrics(p, t, spacing_xyz)
        out.append(CaseScore(case_id, name, dice, hd95, nsd, float(t.sum()) * voxel_ml, float(p.sum()) * voxel_ml))
    return out


# ----------------------------------------------------------------------------------------------------- the report
def evaluate(package: ModelPackage, data: Sequence[Path], out_dir: Path, *, tta: bool = False, device: str = "cpu",
             limit: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Run ``package`` over the NPZ cases in ``data`` (files or folders) and write the report into ``out_dir``:
    ``scores.csv`` (case x structure), ``summary.json``, ``summary.md``, ``dice_boxplot.png`` and
    ``overlay_worst.png`` / ``overlay_median.png``. Returns the summary table."""
    manifest = package.manifest
    paths = [p for d in data for p in ([Path(d)] if Path(d).is_file() else find_cases([Path(d)]))][:limit]
    if not paths:
        raise TrainingError(f"no *.npz cases in {[str(d) for d in data]}")
    labels = [LabelSource(lab.name, tuple(lab.source_names)) for lab in manifest.labels]
    network = cached_network(package, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores: list[CaseScore] = []
    kept: dict[str, tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for path in paths:
        case = read_npz(path, labels)
        predicted = segment(case.image, case.spacing_xyz, package, network=network, device=device, tta=tta)
        truth = {lab.name: case.masks[c] > 0 for c, lab in enumerate(labels) if case.present[c]}
        case_scores = score_case(predicted, truth, case.spacing_xyz, case.case_id)
        scores += case_scores
        kept[case.case_id] = (case.image, truth, predicted)
        if progress:
            progress(f"{case.case_id}: mean Dice {np.mean([s.dice for s in case_scores]):.3f}")
    summary = summarise(scores)
    _write_scores(scores, out_dir / "scores.csv")
    (out_dir / "summary.json").write_text(json.dumps(
        {"model": manifest.name, "version": manifest.version, "cases": len(paths), "tta": tta,
         "surface_tolerance_mm": SURFACE_TOLERANCE_MM, "structures": summary}, indent=1))
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    _box_plot(scores, out_dir / "dice_boxplot.png", f"{manifest.name} {manifest.version}: Dice per structure")
    by_case = {c: float(np.mean([s.dice for s in scores if s.case == c])) for c in kept}
    ranked = sorted(by_case, key=by_case.get)  # type: ignore[arg-type]
    for tag, case_id in (("worst", ranked[0]), ("median", ranked[len(ranked) // 2])):
        image, truth, predicted = kept[case_id]
        _overlay(image, truth, predicted, out_dir / f"overlay_{tag}.png",
                 f"{tag} case {case_id}: mean Dice {by_case[case_id]:.3f} (solid: clinical, dashed: model)")
    return summary


def summary_markdown(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| structure | cases | Dice mean | Dice median | HD95 mean (mm) | surface Dice 2 mm | missed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary.items():
        if name == "mean":
            continue
        lines.append(f"| {name} | {row['cases']} | {row['dice_mean']:.3f} | {row['dice_median']:.3f} | "
                     f"{row['hd95_mean_mm']:.1f} | {row['surface_dice_mean']:.3f} | {row['missed']} |")
    if "mean" in summary:
        m = summary["mean"]
        lines.append(f"| **mean** | | **{m['dice_mean']:.3f}** | | {m['hd95_mean_mm']:.1f} | "
                     f"{m['surface_dice_mean']:.3f} | |")
    return "\n".join(lines) + "\n"


def _write_scores(scores: Sequence[CaseScore], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(scores[0])))
        writer.writeheader()
        for s in scores:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(s).items()})


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _box_plot(scores: Sequence[CaseScore], path: Path, title: str) -> None:
    plt = _pyplot()
    names = list(dict.fromkeys(s.structure for s in scores))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    ax.boxplot([[s.dice for s in scores if s.structure == n] for n in names], tick_labels=names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overlay(image: np.ndarray, truth: dict[str, np.ndarray], predicted: dict[str, np.ndarray], path: Path,
             title: str) -> None:
    """Three axial slices through the contoured range, CT in a soft-tissue window, contours per structure."""
    plt = _pyplot()
    occupied = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in truth.values()]))
    picks = [int(np.percentile(occupied, q)) for q in (20, 50, 80)] if occupied.size else [image.shape[0] // 2]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 5.4))
    for ax, z in zip(np.atleast_1d(axes), picks):
        ax.imshow(np.clip(image[z], -160, 240), cmap="gray")
        for i, name in enumerate(truth):
            colour = colours(i % 10)
            if truth[name][z].any():
                ax.contour(truth[name][z], levels=[0.5], colors=[colour], linewidths=1.2)
            if name in predicted and predicted[name][z].any():
                ax.contour(predicted[name][z], levels=[0.5], colors=[colour], linewidths=1.2, linestyles="--")
        ax.set_title(f"slice {z}")
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours(i % 10), label=n) for i, n in enumerate(truth)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
