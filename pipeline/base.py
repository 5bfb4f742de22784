"""The pipeline plug-in interface and its registry.

A pipeline is any object with a ``name``, a ``version``, a pydantic ``Params`` model (``extra="forbid"``) and
``run(PipelineInput) -> StructureSet``. It is registered under the entry-point group ``dicom_node.pipelines``; the
built-ins are registered the same way, in this project's ``pyproject.toml``::

    [project.entry-points."dicom_node.pipelines"]
    body = "pipeline.builtin:BodyPipeline"

The entry point names a class (or any zero-argument factory) returning the pipeline. Parameters are validated
with :func:`validate_params` when the node loads its rules, long before a series arrives, and again by
:func:`run_pipeline`. Masks returned by ``run`` must lie on the input grid; :func:`run_pipeline` checks that.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError
from pydicom import Dataset

from models.types import StructureSet, Volume
from pipeline.errors import PipelineError, PipelineParamsError, StructureError, UnknownPipelineError
from pipeline.volume import load_volume, series_geometry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PipelineParams",
    "PipelineInput",
    "PriorStudy",
    "Pipeline",
    "available_pipelines",
    "load_pipeline",
    "validate_params",
    "load_prior",
    "run_pipeline",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_node.pipelines"


class PipelineParams(BaseModel):
    """Base for pipeline parameter models: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def needs_prior_study(self) -> bool:
        """Whether the node must look up an earlier study of the patient for this job (loading one costs a
        whole CT, so only pipelines that use it say so)."""
        return False


@dataclass(frozen=True)
class PriorStudy:
    """An earlier image series of the same patient and the RT Structure Sets that reference it."""

    volume: Volume
    structure_sets: tuple[Dataset, ...]
    series_uid: str = ""


@dataclass(frozen=True)
class PipelineInput:
    """What a pipeline receives: the volume, its source instances in slice order, validated parameters, the
    RT Structure Sets that reference the series (seed contours; empty for pipelines that need none) and, when
    the parameters ask for one, the patient's prior study (None when the node holds none)."""

    volume: Volume
    datasets: tuple[Dataset, ...]  # datasets[k] is slice k of volume.array
    params: PipelineParams = field(default_factory=PipelineParams)
    structure_sets: tuple[Dataset, ...] = ()
    prior: PriorStudy | None = None


@runtime_checkable
class Pipeline(Protocol):
    """A contouring pipeline: pure, given the volume; it never reads or writes files."""

    name: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type[PipelineParams]]

    def run(self, data: PipelineInput) -> StructureSet: ...


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            logger.warning("pipeline %r registered twice (%s, %s): using the first", ep.name,
                           found[ep.name].value, ep.value)
            continue
        found.setdefault(ep.name, ep)
    return found


def available_pipelines() -> list[str]:
    """Names registered under the ``dicom_node.pipelines`` entry-point group, sorted."""
    return sorted(_entry_points())


@cache
def load_pipeline(name: str) -> Pipeline:
    """The pipeline registered as ``name``; :class:`UnknownPipelineError` lists the known names otherwise."""
    registered = _entry_points()
    if name not in registered:
        known = ", ".join(sorted(registered)) or "none: is dicom-node installed (pip install -e .)?"
        raise UnknownPipelineError(f"unknown pipeline {name!r}; registered pipelines: {known}")
    try:
        pipeline = registered[name].load()()
    except Exception as exc:
        raise PipelineError(f"pipeline {name!r} ({registered[name].value}) failed to load: {exc}") from exc
    if not isinstance(pipeline, Pipeline) or not (isinstance(pipeline.Params, type)
                                                  and issubclass(pipeline.Params, BaseModel)):
        raise PipelineError(f"pipeline {name!r} ({registered[name].value}) does not implement the Pipeline "
                            "interface (name, version, Params: a pydantic model, run)")
    return pipeline


def validate_params(pipeline: Pipeline, params: Mapping[str, Any] | None) -> PipelineParams:
    """Validate ``params`` against ``pipeline.Params``; errors name each key, the rule and the value received."""
    try:
        return pipeline.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            key = ".".join(str(p) for p in item["loc"]) or "(params)"
            message = item["msg"]
            if item["type"] == "extra_forbidden":
                allowed = ", ".join(pipeline.Params.model_fields) or "none"
                message = f"unknown parameter (allowed: {allowed})"
            problems.append(f"{key}: {message} (got {item.get('input')!r})")
        raise PipelineParamsError(f"pipeline {pipeline.name!r} params: " + "; ".join(problems)) from None


def _check_output(pipeline: Pipeline, result: StructureSet, volume: Volume) -> StructureSet:
    if not isinstance(result, StructureSet):
        raise StructureError(f"pipeline {pipeline.name!r} returned {type(result).__name__}, not a StructureSet")
    names = result.names()
    if len(set(names)) != len(names):
        raise StructureError(f"pipeline {pipeline.name!r} returned duplicate structure names {names}")
    for s in result.structures:
        if tuple(s.mask.shape) != volume.shape:
            raise StructureError(f"pipeline {pipeline.name!r}: structure {s.name!r} has mask shape "
                                 f"{s.mask.shape}, the volume is {volume.shape}")
    return result


def load_prior(datasets: Sequence[Dataset], structure_sets: Sequence[Dataset]) -> PriorStudy:
    """A prior study from its image instances and the structure sets that reference them."""
    return PriorStudy(volume=load_volume(datasets), structure_sets=tuple(structure_sets),
                      series_uid=str(datasets[0].get("SeriesInstanceUID", "")) if datasets else "")


def run_pipeline(pipeline: Pipeline, datasets: Sequence[Dataset], params: Mapping[str, Any] | None = None,
                 structure_sets: Sequence[Dataset] = (), prior: PriorStudy | None = None) -> StructureSet:
    """Load ``datasets`` as a volume, validate ``params`` and run ``pipeline``; check what it returns."""
    validated = validate_params(pipeline, params)
    geometry = series_geometry(datasets)
    data = PipelineInput(volume=load_volume(geometry), datasets=geometry.datasets, params=validated,
                         structure_sets=tuple(structure_sets), prior=prior)
    logger.info("running pipeline %s %s on a %s volume", pipeline.name, pipeline.version, data.volume.shape)
    return _check_output(pipeline, pipeline.run(data), data.volume)
