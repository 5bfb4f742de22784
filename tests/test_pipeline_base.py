"""The pipeline plug-in surface: entry-point registry, parameter validation, output checks."""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from pydantic import Field

import pipeline.base as base
from models.types import Structure, StructureSet
from pipeline.base import (
    ENTRY_POINT_GROUP, PipelineInput, PipelineParams, available_pipelines, load_pipeline, run_pipeline,
    validate_params,
)
from pipeline.errors import PipelineError, PipelineParamsError, StructureError, UnknownPipelineError
from tests.factories import ct_series, load_openkbp


class ToyParams(PipelineParams):
    level_hu: float = Field(0.0, ge=-1000, le=3000, description="threshold")


class ToyPipeline:
    """A third-party pipeline: everything above a HU level."""

    name: ClassVar[str] = "toy"
    version: ClassVar[str] = "2.1"
    Params: ClassVar[type[PipelineParams]] = ToyParams

    def run(self, data: PipelineInput) -> StructureSet:
        return StructureSet((Structure("Above", data.volume.array > data.params.level_hu, algorithm=self.name,
                                       algorithm_version=self.version),))


class WrongShapePipeline(ToyPipeline):
    name: ClassVar[str] = "wrong-shape"

    def run(self, data: PipelineInput) -> StructureSet:
        return StructureSet((Structure("Cropped", np.zeros((1, 2, 3), bool)),))


class NotAPipeline:
    name = "nope"


@pytest.fixture
def third_party(monkeypatch):
    real = base.entry_points

    def fake(group):
        extra = [EntryPoint(name=n, value=f"tests.test_pipeline_base:{cls}", group=ENTRY_POINT_GROUP)
                 for n, cls in (("toy", "ToyPipeline"), ("wrong-shape", "WrongShapePipeline"), ("nope", "NotAPipeline"))]
        return list(real(group=group)) + extra

    monkeypatch.setattr(base, "entry_points", fake)
    load_pipeline.cache_clear()
    yield
    load_pipeline.cache_clear()


@pytest.fixture(scope="module")
def series():
    case = load_openkbp("validation", 0)
    return case, ct_series(case.ct[40:60], case.spacing_zyx)


def test_builtins_are_registered_through_the_entry_point_group():
    assert {"body", "lungs", "bones"} <= set(available_pipelines())
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    entries = declared["project"]["entry-points"][ENTRY_POINT_GROUP]
    for name in ("body", "lungs", "bones"):
        pipeline = load_pipeline(name)
        assert pipeline.name == name and entries[name].startswith("pipeline.builtin:")
        assert isinstance(pipeline, base.Pipeline)


def test_unknown_pipeline_names_the_registered_ones():
    with pytest.raises(UnknownPipelineError, match=r"unknown pipeline 'organz'; registered pipelines: .*body"):
        load_pipeline("organz")


def test_third_party_pipeline_runs_on_real_ct(third_party, series):
    case, datasets = series
    assert "toy" in available_pipelines()
    result = run_pipeline(load_pipeline("toy"), datasets[::-1], {"level_hu": 300})
    np.testing.assert_array_equal(result.structures[0].mask, case.ct[40:60] > 300)


def test_params_are_validated_with_key_allowed_values_and_received_value(third_party):
    toy = load_pipeline("toy")
    assert validate_params(toy, None) == ToyParams()
    with pytest.raises(PipelineParamsError, match=r"level_hu: Input should be less than or equal to 3000.*got 5000"):
        validate_params(toy, {"level_hu": 5000})
    with pytest.raises(PipelineParamsError, match=r"levl: unknown parameter \(allowed: level_hu\)"):
        validate_params(toy, {"levl": 1})
    with pytest.raises(PipelineParamsError, match="threshold_hu"):
        validate_params(load_pipeline("body"), {"threshold_hu": "very low"})


def test_output_that_does_not_fit_the_volume_is_refused(third_party, series):
    _, datasets = series
    with pytest.raises(StructureError, match=r"'Cropped' has mask shape \(1, 2, 3\)"):
        run_pipeline(load_pipeline("wrong-shape"), datasets)


def test_an_entry_point_that_is_not_a_pipeline_is_refused(third_party):
    with pytest.raises(PipelineError, match="does not implement the Pipeline interface"):
        load_pipeline("nope")


def test_public_api_is_what_we_intend():
    import pipeline.contours
    import pipeline.errors
    import pipeline.rtstruct
    import pipeline.seg
    import pipeline.volume

    assert set(base.__all__) == {"ENTRY_POINT_GROUP", "PipelineParams", "PipelineInput", "Pipeline",
                                 "available_pipelines", "load_pipeline", "validate_params", "run_pipeline",
                                 "PriorStudy", "load_prior"}  # PipelineInput.prior: the earlier study (source: prior)
    assert pipeline.rtstruct.__all__ == ["build_rtstruct", "format_ds"]
    assert pipeline.seg.__all__ == ["build_seg", "segment_description"]
    for module in (base, pipeline.contours, pipeline.errors, pipeline.rtstruct, pipeline.seg, pipeline.volume):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
    assert all(issubclass(getattr(pipeline.errors, n), pipeline.errors.PipelineError) for n in pipeline.errors.__all__)
