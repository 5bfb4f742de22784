"""Prior-study mode of the ``propagate`` pipeline (``source: prior``): the patient's earlier CT and its contours
are registered to the new series, and the mapped contours prompt propagation on key slices.

The node's worker finds the prior (the most recent earlier image series of the same patient, another series,
with an RT Structure Set referencing it) and hands it over as ``PipelineInput.prior``; this module reads no
files and no database. Steps: rasterise the prior's ROIs on the prior grid (:func:`pipeline.seeds.seed_rois`,
so the same ROI selection and error messages as seed mode), register the prior CT to the new one
(:func:`models.registration.register`: rigid, then B-spline unless ``deformable: false``), map the masks, and
propagate from key slices fused with the mapped masks (:func:`models.prior.propagate_from_prior`). With
``min_agreement`` 1 (the default, :data:`models.prior.MIN_AGREEMENT`) the fusion would keep no propagated slice,
so the mapped masks are returned without running the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from models.prior import propagate_from_prior
from models.prompting import PromptEngine
from models.propagate import PropagationSettings
from models.registration import map_masks, register
from models.types import Structure, StructureSet
from pipeline.base import PipelineInput
from pipeline.seeds import SeedError, seed_rois

__all__ = ["run_prior"]

log = logging.getLogger(__name__)


def _prior_masks(data: PipelineInput, wanted: Sequence[str] | None):  # type: ignore[no-untyped-def]
    prior = data.prior
    if prior is None:
        raise SeedError("source: prior needs an earlier image series of this patient with an RT Structure Set "
                        "referencing it; the node holds none")
    if not prior.structure_sets:
        raise SeedError(f"the prior series {prior.series_uid} has no RT Structure Set referencing it")
    rois, warnings = seed_rois(prior.structure_sets, prior.volume, wanted)
    for warning in warnings:
        log.warning("prior: %s", warning)
    masks = {}
    for roi in rois:
        if roi.masks:  # POINT-only ROIs carry no shape to register
            volume = np.zeros(prior.volume.shape, bool)
            for z, m in roi.masks.items():
                volume[z] = m
            masks[roi.name] = volume
    if not masks:
        raise SeedError(f"the prior study's structure set(s) hold no contoured ROI"
                        f"{' named ' + str(list(wanted)) if wanted else ''}")
    return {r.name: r for r in rois if r.name in masks}, masks


def run_prior(data: PipelineInput, engine: PromptEngine, settings: PropagationSettings, *,
              structures: Sequence[str] | None, deformable: bool, key_slices: int, min_agreement: float,
              version: str) -> StructureSet:
    """The prior's ROIs on the new series: registered, propagated from key slices, fused (see module doc)."""
    rois, masks = _prior_masks(data, structures)
    assert data.prior is not None
    registration = register(data.volume, data.prior.volume, deformable=deformable)
    mapped = map_masks(masks, data.prior.volume, data.volume, registration.transform)
    outside = [name for name, m in mapped.items() if not m.any()]
    if len(outside) == len(mapped):
        raise SeedError(f"no prior ROI lands inside the new series after registration ({', '.join(outside)})")
    for name in outside:
        log.warning("prior: %s lies outside the new series after registration; not returned", name)
    inside = {k: m for k, m in mapped.items() if m.any()}
    kind = "rigid + B-spline" if deformable else "rigid"
    if min_agreement >= 1:  # the fusion would keep no propagated slice (the default: see models.prior)
        structures_out = tuple(
            Structure(name=name, mask=mask, color=rois[name].color, roi_type=rois[name].roi_type,
                      algorithm="dicom-node registration", algorithm_version=version)
            for name, mask in inside.items())
        return StructureSet(structures=structures_out, label="PRIOR",
                            description=f"dicom-node propagate {version}: prior series {data.prior.series_uid} "
                                        f"registered ({kind}, Mattes MI); contours mapped, not propagated "
                                        "(min_agreement 1)",
                            notes={name: "registered contour (min_agreement 1: not propagated)" for name in inside})
    results = propagate_from_prior(engine, data.volume.array.astype("float32"), inside, key_count=key_slices,
                                   min_agreement=min_agreement, settings=settings)
    structures_out = tuple(
        Structure(name=name, mask=r.mask, color=rois[name].color, roi_type=rois[name].roi_type,
                  algorithm=engine.name, algorithm_version=engine.version) for name, r in results.items())
    notes = {name: f"{'; '.join(r.stops)}; registered contour used on {len(r.registered_slices)} slice(s)"
             for name, r in results.items()}
    return StructureSet(structures=structures_out, label="PRIOR",
                        description=f"dicom-node propagate {version}: prior series {data.prior.series_uid} "
                                    f"registered ({kind}, Mattes MI), {engine.name} {engine.version} from key slices",
                        notes=notes)
