"""Which rules take a complete series: pure functions over the series' facts and the rules.

``route`` gives the rules that apply, in order (the first match wins unless it says ``continue``);
``explain`` also says why each other rule did not match, for ``dicom-node rules test``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from config.rules import SERIES_FACTS, Condition, Rule, RulesConfig
from pipeline.base import load_pipeline, validate_params
from pipeline.errors import PipelineError

__all__ = ["SeriesFacts", "RuleVerdict", "attributes_of", "check_rules", "condition_failure", "explain", "mismatches",
           "route", "tests_structure_set"]


@dataclass(frozen=True)
class SeriesFacts:
    """What rules can test: the first instance's attributes (keyword -> value) and facts about the series."""

    attributes: Mapping[str, Any]
    calling_ae: str = ""
    called_ae: str = ""
    instances: int = 0
    has_structure_set: bool = False  # an RTSTRUCT held by the node references this series
    patient_has_structure_set: bool = False  # any RTSTRUCT of this patient

    def value(self, key: str) -> Any:
        if key in ("calling_ae", "called_ae", "instances", "has_structure_set", "patient_has_structure_set"):
            return getattr(self, key)
        return self.attributes.get(key)


@dataclass(frozen=True)
class RuleVerdict:
    rule: Rule
    matched: bool
    applied: bool  # matched and reached (an earlier match without `continue` stops evaluation)
    reasons: tuple[str, ...] = field(default_factory=tuple)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\\".join(_text(v) for v in value)
    return str(value).strip()


def _number(value: Any) -> float | None:
    try:
        return float(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0)


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool):
        return bool(value) is expected if isinstance(value, bool) else _text(value).lower() == str(expected).lower()
    if isinstance(expected, (int, float)):
        number = _number(value)
        return number is not None and number == float(expected)
    return _text(value) == str(expected).strip()


def condition_failure(key: str, condition: Condition, value: Any) -> str | None:
    """Why ``value`` fails ``condition``, or None if it holds."""
    shown = "absent" if _is_empty(value) else repr(_text(value))
    if condition.present is not None:
        if condition.present and _is_empty(value):
            return f"{key} is absent, required present"
        if not condition.present and not _is_empty(value):
            return f"{key} is {shown}, required absent"
    checks_value = any(v is not None for v in (condition.equals, condition.in_, condition.regex, condition.min,
                                                condition.max))
    if checks_value and _is_empty(value) and not isinstance(value, bool):
        return f"{key} is absent"
    if condition.equals is not None and not _same(value, condition.equals):
        return f"{key} is {shown}, not {condition.equals!r}"
    if condition.in_ is not None and not any(_same(value, v) for v in condition.in_):
        return f"{key} is {shown}, not one of {list(condition.in_)}"
    if condition.regex is not None and not re.search(condition.regex, _text(value)):
        return f"{key} is {shown}, does not match /{condition.regex}/"
    if condition.min is not None or condition.max is not None:
        number = _number(value)
        if number is None:
            return f"{key} is {shown}, not a number"
        if condition.min is not None and number < condition.min:
            return f"{key} is {number:g}, below {condition.min:g}"
        if condition.max is not None and number > condition.max:
            return f"{key} is {number:g}, above {condition.max:g}"
    return None


def mismatches(rule: Rule, facts: SeriesFacts) -> list[str]:
    """Every condition of ``rule`` that ``facts`` fail (empty: the rule matches)."""
    return [reason for key, condition in rule.match.items()
            if (reason := condition_failure(key, condition, facts.value(key))) is not None]


def explain(facts: SeriesFacts, rules: RulesConfig) -> list[RuleVerdict]:
    verdicts = []
    stopped = False
    for rule in rules.rules:
        reasons = mismatches(rule, facts)
        matched = not reasons
        verdicts.append(RuleVerdict(rule, matched, matched and not stopped, tuple(reasons)))
        if matched and not stopped and not rule.continue_:
            stopped = True
    return verdicts


def route(facts: SeriesFacts, rules: RulesConfig) -> list[Rule]:
    """The rules that apply to a series, in order."""
    return [v.rule for v in explain(facts, rules) if v.applied]


def tests_structure_set(rules: RulesConfig) -> bool:
    """Whether any rule's match depends on a structure set referencing the series (then it may be worth waiting
    for one: ``node.structure_set_wait_seconds``)."""
    return any("has_structure_set" in rule.match for rule in rules.rules)


def check_rules(rules: RulesConfig) -> list[str]:
    """Problems with the pipelines the rules name (unknown pipeline, refused parameters), with key paths."""
    problems = []
    for i, rule in enumerate(rules.rules):
        for j, step in enumerate(rule.run):
            where = f"rules.{i}.run.{j} (rule {rule.name!r})"
            try:
                validate_params(load_pipeline(step.pipeline), step.params)
            except PipelineError as exc:
                problems.append(f"{where}: {exc}")
    return problems


def attributes_of(dataset: Any, keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` in a pydicom dataset (absent keys are left out)."""
    out = {}
    for key in keys:
        if key in SERIES_FACTS:  # facts about the transfer, not DICOM keywords
            continue
        if key in dataset:
            value = dataset.get(key)
            out[key] = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else value
    return out
