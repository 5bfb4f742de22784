"""Clinical structure names -> TG-263 names for ``dicom-node convert`` (``config/structure_map.yaml``).

The mapping file only adds what the TG-263 table (``config/tg263.yaml``) does not already know: site-specific
exact names, regular expressions, and labels to drop silently. ``StructureMap.resolve(label)`` tries, in order:

1. the TG-263 table (names and synonyms), then the map's ``names`` (both compared with ``normalize_label``:
   ignoring case, spaces, '-', '_' and '.');
2. ``patterns``, in file order, searched case-insensitively; the first match wins;
3. ``ignore`` patterns: the label is dropped and not reported as unmapped.

Anything else is *unmapped*: not exported, listed in the conversion report. Nothing here is executed; the file is
validated when it is loaded (bad regexes, duplicate labels, impossible names) with key paths in the messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from config.node import ConfigError, format_validation_errors
from config.structures import StructureTable, load_structure_table, normalize_label, read_yaml

__all__ = ["DEFAULT_MAP", "Pattern", "StructureMapFile", "StructureMap", "Resolution", "load_structure_map",
           "parse_structure_map", "TG263_NAME"]

DEFAULT_MAP = Path(__file__).with_name("structure_map.yaml")
# TG-263: at most 16 characters, letters, digits and _ ^ ~ ! # % - (we are a little more lenient on the set).
TG263_NAME = re.compile(r"^[A-Za-z0-9_^~!#%+\-]{1,16}$")


def _check_name(value: str) -> str:
    if not TG263_NAME.match(value):
        raise ValueError(f"must be a TG-263 style name (1-16 of A-Z a-z 0-9 _ ^ ~ ! # % + -), got {value!r}")
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pattern(_Strict):
    regex: str = Field(description="Python regular expression, searched case-insensitively in the clinical label.")
    name: str = Field(description="TG-263 name the matching labels map to.")

    _regex = field_validator("regex")(_check_regex)
    _name = field_validator("name")(_check_name)


class StructureMapFile(_Strict):
    names: dict[str, list[str]] = Field(default_factory=dict,
                                        description="TG-263 name -> exact clinical labels (normalised comparison).")
    patterns: list[Pattern] = Field(default_factory=list, description="Regexes tried in order after exact names.")
    ignore: list[str] = Field(default_factory=list,
                              description="Regexes of labels dropped silently (helper and planning structures).")

    @field_validator("names")
    @classmethod
    def _names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name in value:
            _check_name(name)
        return value

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, value: list[str]) -> list[str]:
        for regex in value:
            _check_regex(regex)
        return value

    @model_validator(mode="after")
    def _no_label_twice(self) -> StructureMapFile:
        seen: dict[str, str] = {}
        problems = []
        for name, labels in self.names.items():
            for label in labels:
                other = seen.setdefault(normalize_label(label), name)
                if other != name:
                    problems.append(f"names.{name}: {label!r} already maps to {other!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


@dataclass(frozen=True)
class Resolution:
    """How one clinical label resolved: ``name`` is the TG-263 name (None: unmapped or ignored)."""

    label: str
    name: str | None
    how: str  # "exact" (TG-263 table or names), "pattern", "ignore" or "unmapped"


class StructureMap:
    """A validated mapping file together with the TG-263 table; ``resolve`` is pure and cheap."""

    def __init__(self, spec: StructureMapFile, table: StructureTable) -> None:
        self.spec = spec
        self._exact: dict[str, str] = {}
        for name, sspec in table.structures.items():
            for label in (name, *sspec.synonyms):
                self._exact[normalize_label(label)] = name
        for name, labels in spec.names.items():
            for label in (name, *labels):
                self._exact.setdefault(normalize_label(label), name)
        self._patterns = [(re.compile(p.regex, re.IGNORECASE), p.name) for p in spec.patterns]
        self._ignore = [re.compile(r, re.IGNORECASE) for r in spec.ignore]

    def resolve(self, label: str) -> Resolution:
        exact = self._exact.get(normalize_label(label))
        if exact is not None:
            return Resolution(label, exact, "exact")
        for regex, name in self._patterns:
            if regex.search(label.strip()):
                return Resolution(label, name, "pattern")
        if any(regex.search(label.strip()) for regex in self._ignore):
            return Resolution(label, None, "ignore")
        return Resolution(label, None, "unmapped")


def parse_structure_map(data: object, source: str = "<structure map>",
                        table: StructureTable | None = None) -> StructureMap:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): must be a mapping, got {type(data).__name__}"])
    try:
        spec = StructureMapFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_errors(exc, "Converting clinical exports for training")) from None
    return StructureMap(spec, table or load_structure_table())


@cache
def load_structure_map(path: Path = DEFAULT_MAP) -> StructureMap:
    """Read and validate a mapping file (the packaged ``structure_map.yaml`` by default)."""
    return parse_structure_map(read_yaml(path), str(path))
