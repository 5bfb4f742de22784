"""``dicom-node rules test``: group DICOM files into series and explain what the rules would do with each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from config.node import NodeConfig
from config.rules import REPLY, RulesConfig
from pipeline.routing import SeriesFacts, attributes_of, explain

__all__ = ["SeriesOnDisk", "scan_series", "describe_series"]


@dataclass
class SeriesOnDisk:
    series_uid: str
    files: list[Path]


def scan_series(path: Path) -> Iterator[SeriesOnDisk]:
    groups: dict[str, list[Path]] = {}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        try:
            ds = dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:
            continue  # not DICOM: a dry run just skips it
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(file)
    for uid, members in groups.items():
        yield SeriesOnDisk(uid, members)


def describe_series(series: SeriesOnDisk, rules: RulesConfig, config: NodeConfig, *, calling_ae: str,
                    has_structure_set: bool) -> list[str]:
    first = dcmread(series.files[0], stop_before_pixels=True)
    keys = sorted({k for rule in rules.rules for k in rule.match})
    facts = SeriesFacts(attributes_of(first, keys), calling_ae=calling_ae, called_ae=config.node.ae_title,
                        instances=len(series.files), has_structure_set=has_structure_set)
    lines = [f"series {series.series_uid} ({first.get('Modality', '?')}, {len(series.files)} instances, "
             f"\"{first.get('SeriesDescription', '')}\")"]
    verdicts = explain(facts, rules)
    for v in verdicts:
        if v.applied:
            lines.append(f"  MATCH    {v.rule.name}")
            for step in v.rule.run:
                lines.append(f"           run {step.pipeline} {step.params or ''} -> {', '.join(v.rule.formats)}")
            for name in v.rule.send:
                lines.append(f"           send to {_describe_target(name, calling_ae, config)}")
            if v.rule.forward:
                lines.append(f"           forward the series to {', '.join(v.rule.forward)}")
        elif v.matched:
            lines.append(f"  skipped  {v.rule.name}: matches, but an earlier rule matched without 'continue'")
        else:
            lines.append(f"  no       {v.rule.name}: " + "; ".join(v.reasons))
    if not any(v.applied for v in verdicts):
        targets = rules.unrouted.forward
        lines.append("  UNROUTED" + (f": forwarded to {', '.join(targets)}" if targets else ": recorded only"))
    return lines


def _describe_target(name: str, calling_ae: str, config: NodeConfig) -> str:
    if name != REPLY:
        return f"{name} ({config.destinations[name]})"
    reply = next((n for n, d in config.destinations.items() if d.ae_title == calling_ae), None)
    return f"reply -> {reply} ({config.destinations[reply]})" if reply else \
        f"reply -> no destination has AE title {calling_ae!r}: results would be kept, not sent"
