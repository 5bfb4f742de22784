"""Merge evaluate-propagation reports of disjoint case sets (e.g. runs split over processes) into one table.

    .venv/bin/python bench/merge_evaluations.py REPORT_DIR... --out DIR

Reads each ``REPORT_DIR/scores.csv``, refuses a case scored twice by the same run, and writes the merged
``scores.csv``, ``summary.json`` and ``summary.md`` as evaluate-propagation would have for all the cases.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from models.evaluate import summarise
    from models.evaluate_propagation import RunScore, comparison_markdown, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    scores: list[RunScore] = []
    for report in args.reports:
        with open(report / "scores.csv") as fh:
            for row in csv.DictReader(fh):
                scores.append(RunScore(case=row["case"], structure=row["structure"], dice=float(row["dice"]),
                                       hd95_mm=float(row["hd95_mm"]), surface_dice=float(row["surface_dice"]),
                                       truth_ml=float(row["truth_ml"]), predicted_ml=float(row["predicted_ml"]),
                                       run=row["run"], seconds=float(row["seconds"])))
    keys = [(s.run, s.case, s.structure) for s in scores]
    if len(keys) != len(set(keys)):
        raise SystemExit("a (run, case, structure) appears in more than one report")
    runs = list(dict.fromkeys(s.run for s in scores))
    summaries = {r: summarise([s for s in scores if s.run == r]) for r in runs}
    cases = len({s.case for s in scores})
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(scores, summaries, cases, None, args.out)
    print(comparison_markdown(summaries, {k: int(v["cases"]) for k, v in summaries[runs[0]].items() if k != "mean"}))


if __name__ == "__main__":
    main()
