"""The ``propagate`` pipeline: a planner's seed contours (one or a few slices per ROI, or clicks) completed
through the whole series by a promptable engine (LiteMedSAM by default), slice by slice.

Seeds come from the RT Structure Set(s) that reference the series (``PipelineInput.structure_sets``; the node's
worker loads them). Each seeded ROI comes back under its own name and RT ROI Interpreted Type, its seed slices
exactly as drawn. A series without a seed is rejected (not retried): the message says what was missing.

    run: [{pipeline: propagate, params: {engine: litemedsam, source: seed, structures: [GTV]}}]

``source: prior`` takes its prompts from the patient's earlier study instead (``PipelineInput.prior``, found by
the node's worker): see :mod:`pipeline.prior`.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from models.errors import EngineError
from models.prompting import available_engines, check_engine, load_engine
from models.prior import MIN_AGREEMENT
from models.propagate import PropagationSettings, Seed, propagate
from models.types import Structure, StructureSet
from pipeline.base import PipelineInput, PipelineParams
from pipeline.prior import run_prior
from pipeline.seeds import SeedError, seed_rois

__all__ = ["PropagateParams", "PropagatePipeline", "SEED_WARNINGS"]

SEED_WARNINGS = "seed warnings"  # key of StructureSet.notes listing skipped ROIs and rasterisation warnings

log = logging.getLogger(__name__)
DEFAULTS = PropagationSettings()  # one source of truth for the knobs both layers expose


class PropagateParams(PipelineParams):
    engine: str = Field("litemedsam", description="Promptable engine by name (see models.prompting.ENGINES).")
    source: Literal["seed", "prior"] = Field(
        "seed", description="Where prompts come from: 'seed' = an RTSTRUCT referencing the series; 'prior' = the "
        "patient's earlier image series and its RTSTRUCT, registered to this one (see pipeline.prior).")
    prior: Literal["latest"] = Field(
        "latest", description="source: prior: which earlier series: the most recent one with a structure set.")
    deformable: bool = Field(True, description="source: prior: B-spline registration after the rigid one.")
    key_slices: int = Field(3, ge=1, le=9, description="source: prior: slices of each mapped ROI that prompt "
                            "propagation (1: the middle; 3: 1/4, 1/2, 3/4 of its extent).")
    min_agreement: float = Field(
        MIN_AGREEMENT, ge=0, le=1, description="source: prior: a propagated slice whose Dice with the registered "
        "contour is below this is replaced by the registered slice (1: registration only; 0: propagation wherever "
        "it reached).")
    structures: list[str] | None = Field(
        None, min_length=1, description="ROI names to propagate (case-insensitive); default: every seeded ROI.")
    checkpoint: str | None = Field(
        None, validate_default=True, description="A fine-tuned model package (name or folder) replacing the "
        "engine's default weights; for engine sam2 (no default weights), the path of a SAM2 / MedSAM2 .pt file.")
    min_area_fraction: float = Field(
        DEFAULTS.min_area_fraction, ge=0, lt=1, description="Stop a direction when the mask's area falls below "
        "this fraction of its seed's.")
    max_growth: float = Field(
        DEFAULTS.max_growth, gt=1, description="Stop a direction when the area grows more than this factor from "
        "one slice to the next (leak into a neighbour).")
    learned_growth: bool = Field(
        DEFAULTS.use_learned_growth, description="With a fine-tuned package that learned how much its structures' "
        "area grows from one slice to the next in its training contours (its labels' growth: a horseshoe mandible "
        "doubles where the rami meet the body), a structure it knows stops only beyond the larger of that and "
        "max_growth; false: max_growth for every structure.")
    max_travel: float | None = Field(
        DEFAULTS.max_travel, gt=0, description="source: seed: beyond the outermost seed slice, stop after this many "
        "times the seed's equivalent diameter (a size prior: past a structure's end the engine keeps finding "
        "something); null: no limit. Seed a long structure on its first and last slices instead of raising this.")
    reach_fraction: float | None = Field(
        DEFAULTS.reach_fraction, gt=0, description="source: seed, with a fine-tuned package that learned its "
        "structures' reach (how far a structure runs from its middle slice in its training contours: its reach "
        "law, mm against the seed's size, else the median in seed diameters): a structure it knows goes at most "
        "this fraction of that reach beyond its outermost seed instead of max_travel; null: max_travel for every "
        "structure.")
    follow_anatomy: float | None = Field(
        DEFAULTS.follow_anatomy, ge=0, description="Structures whose learned reach (a fine-tuned package's, see "
        "reach_fraction) is at least this many seed diameters shift each prompt box by the image's motion between "
        "the two slices (phase correlation around the structure) before decoding: long, thin structures that drift "
        "with the anatomy, e.g. a spinal cord along the spine's curve, are followed instead of left behind. 0: "
        "every structure; null: none.")
    slice_step: int = Field(DEFAULTS.slice_step, ge=1, le=8, description="Decode every n-th slice and "
                            "interpolate the slices between (about n times fewer encodings, the bulk of the time; a "
                            "failed jump retries the next slice, so fronts end where they would have).")
    long_slice_step: int | None = Field(
        DEFAULTS.long_slice_step, ge=1, le=16, description="The slice_step of long structures (those that follow "
        "the anatomy, see follow_anatomy; a multiple of slice_step keeps every front on one grid of slices); null: "
        "slice_step.")
    crop_reuse: float = Field(DEFAULTS.crop_reuse, ge=1, le=2, description="Decode a structure on a crop another "
                              "structure already encoded on that slice when it holds the box and its side is "
                              "within this factor of the ideal crop's (1: every structure its own crops).")
    refine: int = Field(DEFAULTS.refine, ge=0, le=3, description="A structure whose seed fills its box badly "
                        "(under 45 %, e.g. a horseshoe mandible) decodes each new slice again this many times, "
                        "prompted with the box of its own first mask instead of the neighbour's (on the same crop: "
                        "a decode, no encoding).")
    abut: bool = Field(DEFAULTS.abut, description="source: seed, with a fine-tuned package that learned which "
                       "structures end beside another in every training case (a spinal cord below the brainstem): "
                       "such a structure, seeded together with its neighbour, ends where the neighbour's extent "
                       "begins, and as far from its seed on the other side (reach laws assume the seed is the "
                       "middle slice).")

    def needs_prior_study(self) -> bool:
        return self.source == "prior"

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in available_engines():
            raise ValueError(f"unknown engine {value!r}; known engines: {', '.join(available_engines())}")
        return value

    @field_validator("checkpoint")
    @classmethod
    def _engine_checkpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Checks that need no weights (sam2: package installed, checkpoint file and config present) fail here,
        # when rules load, rather than in the first job.
        if "engine" in info.data:  # absent when the engine itself was refused
            try:
                check_engine(info.data["engine"], value)
            except EngineError as exc:
                raise ValueError(str(exc)) from None
        return value


class PropagatePipeline:
    """Seed contours -> full 3-D contours, by slice-by-slice prompted segmentation."""

    name: ClassVar[str] = "propagate"
    version: ClassVar[str] = "0.1"
    Params: ClassVar[type[PipelineParams]] = PropagateParams

    def run(self, data: PipelineInput) -> StructureSet:
        p = data.params if isinstance(data.params, PropagateParams) else \
            PropagateParams.model_validate(data.params.model_dump())
        if p.source == "prior":
            return run_prior(data, load_engine(p.engine, p.checkpoint), PropagationSettings(
                min_area_fraction=p.min_area_fraction, max_growth=p.max_growth,
                use_learned_growth=p.learned_growth, slice_step=p.slice_step,
                long_slice_step=p.long_slice_step, crop_reuse=p.crop_reuse, follow_anatomy=p.follow_anatomy,
                refine=p.refine),
                structures=p.structures,
                deformable=p.deformable, key_slices=p.key_slices, min_agreement=p.min_agreement,
                version=self.version)
        if not data.structure_sets:
            raise SeedError("no RT Structure Set references this series: the propagate pipeline needs seed "
                            "contours (send the RTSTRUCT with the images, or within node.structure_set_wait_seconds)")
        rois, warnings = seed_rois(data.structure_sets, data.volume, p.structures)
        for warning in warnings:
            log.warning("seed: %s", warning)
        if not rois:
            raise SeedError(f"the {len(data.structure_sets)} structure set(s) of this series hold no contoured ROI")
        engine = load_engine(p.engine, p.checkpoint)
        settings = PropagationSettings(min_area_fraction=p.min_area_fraction, max_growth=p.max_growth,
                                       use_learned_growth=p.learned_growth,
                                       max_travel=p.max_travel, reach_fraction=p.reach_fraction,
                                       follow_anatomy=p.follow_anatomy, slice_step=p.slice_step,
                                       long_slice_step=p.long_slice_step, crop_reuse=p.crop_reuse,
                                       refine=p.refine, abut=p.abut)
        seeds = {r.name: Seed(masks=r.masks, points=r.points) for r in rois}
        results = propagate(engine, data.volume.array.astype("float32"), seeds, settings,
                            spacing_xyz=data.volume.spacing)
        structures = tuple(
            Structure(name=r.name, mask=results[r.name].mask, color=r.color, roi_type=r.roi_type,
                      algorithm=engine.name, algorithm_version=engine.version) for r in rois)
        notes = {r.name: "; ".join(results[r.name].stops) for r in rois}
        if warnings:  # e.g. an empty ROI, skipped: the job record says so, not only the log
            notes[SEED_WARNINGS] = "; ".join(warnings)
        return StructureSet(structures=structures, label="PROPAGATED",
                            description=f"dicom-node propagate {self.version}: {engine.name} {engine.version} "
                                        f"from seeds on {sum(len(r.masks) for r in rois)} slice(s)", notes=notes)
