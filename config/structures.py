"""The TG-263 structure table (``config/tg263.yaml``): names, synonyms, colours, ROI types, SNOMED CT codes.

``load_structure_table()`` validates the file (pydantic, ``extra="forbid"``, every code key resolved) and raises
:class:`config.node.ConfigError` with key paths; ``StructureTable.resolve(label)`` maps a pipeline label or a common
synonym onto its TG-263 entry.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.node import ConfigError, format_validation_errors

__all__ = [
    "CodeSpec", "StructureSpec", "StructureTable", "DEFAULT_TABLE",
    "load_structure_table", "parse_structure_table", "normalize_label",
]

DEFAULT_TABLE = Path(__file__).with_name("tg263.yaml")
RoiTypeName = Literal["EXTERNAL", "ORGAN", "PTV", "CTV", "GTV", "AVOIDANCE", "CONTROL"]


def normalize_label(label: str) -> str:
    """Lower case without spaces, '-', '_' or '.': the form synonyms are compared in."""
    return re.sub(r"[\s\-_.]+", "", label).lower()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    scheme: str = Field(description="Coding scheme designator, e.g. SCT (SNOMED CT) or DCM.")
    value: str = Field(description="Code value in that scheme.")
    meaning: str = Field(description="Code meaning as written into DICOM.")


class StructureSpec(_Strict):
    synonyms: list[str] = Field(default_factory=list, description="Other labels that map onto this TG-263 name.")
    color: tuple[int, int, int] = Field(description="Display colour [R, G, B], each 0-255.")
    roi_type: RoiTypeName = Field(description="RT ROI Interpreted Type.")
    category: str = Field(description="Key into `codes`: SEG Segmented Property Category.")
    type: str = Field(description="Key into `codes`: SEG Segmented Property Type.")
    modifier: str | None = Field(None, description="Key into `codes`: laterality modifier of the type.")

    @model_validator(mode="after")
    def _check_color(self) -> StructureSpec:
        if any(not 0 <= c <= 255 for c in self.color):
            raise ValueError(f"color values must be 0-255, got {list(self.color)}")
        return self


class StructureTable(_Strict):
    codes: dict[str, CodeSpec] = Field(description="Named codes that structures refer to.")
    structures: dict[str, StructureSpec] = Field(description="TG-263 name -> its description.")

    @model_validator(mode="after")
    def _cross_check(self) -> StructureTable:
        problems, seen = [], {}
        for name, spec in self.structures.items():
            for key in ("category", "type", "modifier"):
                ref = getattr(spec, key)
                if ref is not None and ref not in self.codes:
                    problems.append(f"structures.{name}.{key}: unknown code {ref!r} (known: {', '.join(self.codes)})")
            for label in [name, *spec.synonyms]:
                other = seen.setdefault(normalize_label(label), name)
                if other != name:
                    problems.append(f"structures.{name}.synonyms: {label!r} already maps to {other!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolve(self, label: str) -> tuple[str, StructureSpec] | None:
        """(TG-263 name, spec) for a label or synonym, or None when the table does not know it."""
        key = normalize_label(label)
        for name, spec in self.structures.items():
            if key == normalize_label(name) or key in (normalize_label(s) for s in spec.synonyms):
                return name, spec
        return None

    def code(self, key: str) -> CodeSpec:
        return self.codes[key]


def parse_structure_table(data: object, source: str = "<tg263>") -> StructureTable:
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): must be a mapping, got {type(data).__name__}"])
    try:
        return StructureTable.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_errors(exc, "Structure names (`config/tg263.yaml`)")) from None


@cache
def load_structure_table(path: Path = DEFAULT_TABLE) -> StructureTable:
    """Read and validate a structure table (the packaged ``tg263.yaml`` by default)."""
    return parse_structure_table(read_yaml(path), str(path))


def read_yaml(path: Path) -> object:
    """A YAML file's content; unreadable files and YAML errors become a :class:`ConfigError` naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"(file): cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"(yaml): {exc}"]) from None
