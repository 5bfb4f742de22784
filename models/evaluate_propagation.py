"""Evaluate prompted propagation on NPZ cases: per case and structure Dice and HD95, engines side by side.

A *mode* turns one case's clinical masks into predicted masks with an engine:

- ``seed``: each structure keeps only its clinical contour on its middle slice (or on 1/4, 1/2, 3/4 of its z
  extent with ``seed_slices=3``) and :func:`models.propagate.propagate` completes it; the seed slices are part of
  the result, as they are in the node's output.
- ``truebox``: every slice prompted with its own true box on a zoomed crop, no propagation
  (:func:`models.propagate.segment_slices`): the upper bound of what propagation can reach with these prompts.
  After a seed run of the same engine on the case, a slice whose propagation crop holds the true box (and is
  within 1.25x the ideal crop's side) is decoded on that crop rather than encoded again.

- ``prior``: the prior-study mode (:func:`models.prior.follow_up_case`): a follow-up scan is simulated from the
  case (seed = CRC-32 of its case id, so every run sees the same one), the undeformed CT is registered to it and
  its masks propagate from 3 key slices as in the node; scored against the *moved* masks, with the registered
  masks alone and propagation alone as two more columns.

Modes are looked up in :data:`MODES` by name, so another prompt source is one more entry. Metrics are :func:`models.evaluate.structure_metrics` (MONAI) on each case's own grid.

:func:`seed_slices`, :func:`comparison_markdown` and the mode functions are pure given an engine;
:func:`evaluate_propagation` reads the cases and writes ``scores.csv``, ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import csv
import json
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.data import LabelSource, find_cases, read_npz
from models.errors import TrainingError
from models.evaluate import CaseScore, score_case, summarise
from models.prior import follow_up_case
from models.prompting import PromptEngine
from models.propagate import EncodingCache, PropagationSettings, Seed, propagate, segment_slices

__all__ = ["HN_ORGANS", "MODES", "Run", "RunScore", "seed_slices", "seed_mode", "truebox_mode",
           "evaluate_case", "evaluate_propagation", "comparison_markdown", "write_report"]

# The seven OpenKBP organs at risk under their TG-263 names (as config/train.example.yaml maps them).
HN_ORGANS = (
    LabelSource("Brainstem", ("BrainStem",)), LabelSource("SpinalCord", ("Spinal_Cord",)),
    LabelSource("Parotid_R", ("RightParotid",)), LabelSource("Parotid_L", ("LeftParotid",)),
    LabelSource("Esophagus"), LabelSource("Larynx"), LabelSource("Bone_Mandible", ("Mandible",)),
)

# mode(engine, image (Z, Y, X) HU, truth by structure, settings, cache, seed slice count, spacing (x, y, z) mm)
# -> predicted masks
ModeFn = Callable[[PromptEngine, np.ndarray, Mapping[str, np.ndarray], PropagationSettings, EncodingCache, int,
                   Sequence[float]], dict[str, np.ndarray]]


def seed_slices(mask: np.ndarray, count: int = 1) -> list[int]:
    """``count`` slices spread over the structure's z extent (its middle for 1; 1/4, 1/2, 3/4 for 3), each one
    holding the structure (the nearest contoured slice when the extent has a gap)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return []
    wanted = [(zs[0] + zs[-1]) / 2.0] if count == 1 else \
        [zs[0] + (zs[-1] - zs[0]) * f for f in np.linspace(0.25, 0.75, count)]
    return sorted({int(zs[np.argmin(np.abs(zs - w))]) for w in wanted})


def seed_mode(engine: PromptEngine, image: np.ndarray, truth: Mapping[str, np.ndarray], settings: PropagationSettings,
              cache: EncodingCache, count: int, spacing_xyz: Sequence[float]) -> dict[str, np.ndarray]:
    seeds = {k: Seed({z: m[z] for z in seed_slices(m, count)}) for k, m in truth.items()}
    return {k: r.mask for k, r in propagate(engine, image, seeds, settings, cache, spacing_xyz).items()}


def truebox_mode(engine: PromptEngine, image: np.ndarray, truth: Mapping[str, np.ndarray],
                 settings: PropagationSettings, cache: EncodingCache, count: int,
                 spacing_xyz: Sequence[float]) -> dict[str, np.ndarray]:
    # Crops an earlier run of the same engine encoded around the true box are reused (within 1.25x the ideal
    # crop's side): the upper bound costs about half as much after a seed run.
    return {k: segment_slices(engine, image, m, settings, cache, reuse=REUSE) for k, m in truth.items()}


REUSE = 1.25
# None: scored against a simulated follow-up, not the case's own masks (see evaluate_case)
MODES: dict[str, ModeFn | None] = {"seed": seed_mode, "truebox": truebox_mode, "prior": None}


@dataclass(frozen=True)
class Run:
    """One column of the comparison: an engine (zero-shot or fine-tuned weights) in one mode."""

    label: str  # column title, e.g. "zero-shot seed"
    engine: PromptEngine
    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(sorted(MODES))}, got {self.mode!r}")


@dataclass(frozen=True)
class RunScore(CaseScore):
    run: str = ""
    seconds: float = 0.0  # wall clock of this run on this case (all structures)


def evaluate_case(run: Run, image: np.ndarray, truth: Mapping[str, np.ndarray], spacing_xyz: Sequence[float],
                  case_id: str, settings: PropagationSettings, seed_count: int = 1,
                  cache: EncodingCache | None = None) -> list[RunScore]:
    """Scores of one run on one case (every structure of ``truth``), with the run's seconds."""
    started = time.perf_counter()
    mode = MODES[run.mode]
    if mode is None:
        return _prior_scores(run, image, truth, spacing_xyz, case_id, settings, started)
    predicted = mode(run.engine, image.astype(np.float32), truth, settings,
                                cache if cache is not None else EncodingCache(), seed_count, spacing_xyz)
    seconds = time.perf_counter() - started
    return [RunScore(**asdict(s), run=run.label, seconds=seconds)
            for s in score_case(predicted, dict(truth), spacing_xyz, case_id)]


def _prior_scores(run: Run, image: np.ndarray, truth: Mapping[str, np.ndarray], spacing_xyz: Sequence[float],
                  case_id: str, settings: PropagationSettings, started: float) -> list[RunScore]:
    moved, found = follow_up_case(run.engine, image, truth, tuple(spacing_xyz), zlib.crc32(case_id.encode()),  # type: ignore[arg-type]
                                  settings=settings)
    seconds = time.perf_counter() - started
    labels = {"fused": run.label, "propagated": f"{run.label}: propagation alone",
              "registered": f"{run.label}: registration alone"}
    return [RunScore(**asdict(s), run=labels[method], seconds=seconds)
            for method, masks in found.items() for s in score_case(masks, moved, spacing_xyz, case_id)]


def evaluate_propagation(runs: Sequence[Run], data: Sequence[Path], out_dir: Path, *,
                         labels: Sequence[LabelSource] = HN_ORGANS, seed_count: int = 1, limit: int | None = None,
                         settings: PropagationSettings | None = None,
                         progress: Callable[[str], None] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Every run over the NPZ cases in ``data`` (files or folders; the first ``limit``); writes ``scores.csv``
    (run x case x structure), ``summary.json`` and ``summary.md`` into ``out_dir`` after every case, so a long
    evaluation stopped early keeps what it measured. Returns run label -> :func:`models.evaluate.summarise`."""
    paths = [p for d in data for p in ([Path(d)] if Path(d).is_file() else find_cases([Path(d)]))][:limit]
    if not paths:
        raise TrainingError(f"no *.npz cases in {[str(d) for d in data]}")
    s = settings or PropagationSettings()
    out_dir.mkdir(parents=True, exist_ok=True)
    scores: list[RunScore] = []
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    for n, path in enumerate(paths, 1):
        case = read_npz(path, labels)
        truth = {lab.name: case.masks[c] > 0 for c, lab in enumerate(labels) if case.present[c]}
        caches: dict[object, EncodingCache] = {}  # runs of one image encoder share its encodings of this case
        for run in runs:
            cache = caches.setdefault(getattr(run.engine, "encoder_id", id(run.engine)), EncodingCache(capacity=384))
            found = evaluate_case(run, case.image, truth, case.spacing_xyz, case.case_id, s, seed_count, cache)
            scores += found
            if progress:
                progress(f"{case.case_id} {run.label}: mean Dice {np.mean([x.dice for x in found]):.3f} "
                         f"({found[0].seconds if found else 0:.0f} s)")
        columns = dict.fromkeys([r.label for r in runs] + [x.run for x in scores])  # prior mode adds columns
        summaries = {label: summarise([x for x in scores if x.run == label]) for label in columns}
        write_report(scores, summaries, n, seed_count, out_dir,
                     {r.label: (f"{r.engine.name} {r.engine.version}", r.mode) for r in runs})
    return summaries


def comparison_markdown(summaries: Mapping[str, Mapping[str, Mapping[str, float]]], counts: Mapping[str, int]
                        | None = None) -> str:
    """Structures x runs: 'Dice mean (HD95 mean mm)' per cell, the mean over structures last; ``counts`` (cases
    per structure) adds an n column."""
    runs = list(summaries)
    structures = list(dict.fromkeys(k for s in summaries.values() for k in s if k != "mean"))
    head = ["structure"] + (["n"] if counts else []) + [f"{r}: Dice (HD95 mm)" for r in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def cell(row: Mapping[str, float] | None) -> str:
        return "-" if row is None else f"{row['dice_mean']:.3f} ({row['hd95_mean_mm']:.1f})"

    for name in structures:
        lines.append("| " + " | ".join([name] + ([str(counts.get(name, 0))] if counts else [])
                                       + [cell(summaries[r].get(name)) for r in runs]) + " |")
    lines.append("| " + " | ".join(["**mean**"] + ([""] if counts else [])
                                   + [f"**{cell(summaries[r].get('mean'))}**" for r in runs]) + " |")
    return "\n".join(lines) + "\n"


def write_report(scores: Sequence[RunScore], summaries: Mapping[str, Mapping[str, Mapping[str, float]]],
                 cases: int, seed_count: int | None, out_dir: Path,
                 engines: Mapping[str, tuple[str, str]] | None = None) -> None:
    """``scores.csv``, ``summary.json`` and ``summary.md`` in ``out_dir``; ``engines``: run -> (engine, mode)."""
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        fields = ["run", "case", "structure", "dice", "hd95_mm", "surface_dice", "truth_ml", "predicted_ml", "seconds"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for s in scores:
            row = asdict(s)
            writer.writerow({k: (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in fields})
    first = next(iter(summaries))
    counts = {k: int(v["cases"]) for k, v in summaries[first].items() if k != "mean"}
    per_case = {r: {s.case: s.seconds for s in scores if s.run == r} for r in summaries}
    seconds = {k: float(np.mean(list(v.values()) or [0.0])) for k, v in per_case.items()}
    (out_dir / "summary.json").write_text(json.dumps(
        {"cases": cases, "seed_slices": seed_count, "seconds_per_case": seconds,
         "runs": {r: {"engine": e, "mode": m} for r, (e, m) in (engines or {}).items()},
         "structures": summaries}, indent=1))
    (out_dir / "summary.md").write_text(
        comparison_markdown(summaries, counts) + "\nseconds per case: "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f" ({cases} cases)\n")
