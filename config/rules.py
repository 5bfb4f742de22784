"""Schema of the routing rules file (``rules.yaml``), referenced from node.yaml as ``rules: rules.yaml``.

A rule says which complete series it takes (``match``), which pipelines to run on them (``run``), what to write
(``output``) and where to send it (``send``). Rules are evaluated in order; the first match wins unless it says
``continue: true``. Pipeline names and parameters are checked against the pipeline registry by
``pipeline.routing.check_rules`` at start-up, since this package knows no pipelines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from config.node import ConfigError, NodeConfig, format_validation_errors

__all__ = ["Condition", "RunStep", "Rule", "RulesConfig", "load_rules", "parse_rules", "REPLY",
           "SERIES_FACTS"]

REPLY = "reply"

# Keys of `match` that are facts about the series rather than DICOM keywords of its first instance.
SERIES_FACTS = {
    "calling_ae": "the calling AE title that sent the series",
    "called_ae": "the AE title the sender called (this node's)",
    "instances": "the number of instances in the series",
    "has_structure_set": "whether the node holds an RTSTRUCT that references this series (by Series Instance "
                         "UID, or by Frame of Reference when it names no series)",
    "patient_has_structure_set": "whether the node holds any RTSTRUCT of the same patient",
}

Scalar = str | int | float | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Condition(_Strict):
    """One test on a value; all operators given must hold. A bare scalar in YAML means ``equals``."""

    equals: Scalar | None = Field(None, description="The value equals this (text compared without padding).")
    in_: list[Scalar] | None = Field(None, alias="in", description="The value is one of these.")
    regex: str | None = Field(None, description="The value matches this regular expression (re.search).")
    min: float | None = Field(None, description="The value, as a number, is at least this.")
    max: float | None = Field(None, description="The value, as a number, is at most this.")
    present: bool | None = Field(None, description="true: the attribute is present and not empty; false: absent.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("a condition needs at least one of: equals, in, regex, min, max, present")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class RunStep(_Strict):
    pipeline: str = Field(description="Registered pipeline name (see `dicom-node pipelines`).")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters of that pipeline.")


class Rule(_Strict):
    name: str = Field(min_length=1, max_length=64, description="Unique name, shown in audit and status.")
    match: dict[str, Condition] = Field(default_factory=dict, description="Conditions; all must hold.")
    run: list[RunStep] = Field(default_factory=list, description="Pipelines to run on a matching series.")
    output: list[Literal["rtstruct", "seg", "both"]] = Field(
        default_factory=lambda: ["rtstruct"], description="What to write from each pipeline's structures.")
    send: list[str] = Field(default_factory=lambda: [REPLY],
                            description="Destination names, or `reply` (the sender, looked up in destinations).")
    forward: list[str] = Field(default_factory=list, description="Destinations the series itself is sent to.")
    continue_: bool = Field(False, alias="continue", description="Also evaluate the rules after this one.")

    @field_validator("match", mode="before")
    @classmethod
    def _scalars_mean_equals(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v if isinstance(v, dict) else {"equals": v} for k, v in value.items()}
        return value

    @field_validator("match")
    @classmethod
    def _known_keys(cls, value: dict[str, Condition]) -> dict[str, Condition]:
        for key in value:
            if key not in SERIES_FACTS and tag_for_keyword(key) is None:
                raise ValueError(f"{key!r} is neither a DICOM keyword nor one of {sorted(SERIES_FACTS)}")
        return value

    @property
    def formats(self) -> list[str]:
        wanted = set()
        for item in self.output:
            wanted.update(("rtstruct", "seg") if item == "both" else (item,))
        return sorted(wanted)


class Unrouted(_Strict):
    forward: list[str] = Field(default_factory=list, description="Destinations for series no rule matched.")


class RulesConfig(_Strict):
    rules: list[Rule] = Field(default_factory=list, description="Evaluated in order.")
    unrouted: Unrouted = Field(default_factory=Unrouted, description="What happens to series no rule matched.")

    @model_validator(mode="after")
    def _unique_names(self) -> RulesConfig:
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique; repeated: {duplicates}")
        return self


def _destination_problems(rules: RulesConfig, node: NodeConfig) -> list[str]:
    known = ", ".join(sorted(node.destinations)) or "none defined"
    problems = []
    for i, rule in enumerate(rules.rules):
        for key in ("send", "forward"):
            for j, name in enumerate(getattr(rule, key)):
                if name not in node.destinations and not (key == "send" and name == REPLY):
                    problems.append(f"rules.{i}.{key}.{j} (rule {rule.name!r}): unknown destination {name!r}; "
                                    f"known: {known}" + (", or reply" if key == "send" else ""))
    for j, name in enumerate(rules.unrouted.forward):
        if name not in node.destinations:
            problems.append(f"unrouted.forward.{j}: unknown destination {name!r}; known: {known}")
    return problems


def parse_rules(data: Any, node: NodeConfig, source: str = "<rules>") -> RulesConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): must be a mapping with a 'rules' list, got {type(data).__name__}"])
    try:
        rules = RulesConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_errors(exc, "Routing rules")
        names = {str(i): r.get("name") for i, r in enumerate(data.get("rules") or []) if isinstance(r, dict)}
        raise ConfigError(source, [_with_rule_name(p, names) for p in problems]) from None
    problems = _destination_problems(rules, node)
    if problems:
        raise ConfigError(source, problems)
    return rules


def _with_rule_name(problem: str, names: dict[str, Any]) -> str:
    match = re.match(r"rules\.(\d+)\.", problem)
    if match and names.get(match[1]):
        path, _, message = problem.partition(": ")
        return f"{path} (rule {names[match[1]]!r}): {message}"
    return problem


def load_rules(path: str | Path, node: NodeConfig) -> RulesConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"(file): cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"(yaml): {exc}"]) from None
    return parse_rules(data, node, str(path))
