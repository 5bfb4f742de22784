"""Weight-free built-in pipelines: ``body`` (External), ``lungs`` (Lung_L / Lung_R, or Lungs), ``bones`` (Bones).

Classic CT processing (HU thresholds, connected components, per-slice hole filling) so a clinic sees real
contours on any CT without a model. Names, colours and ROI types come from the TG-263 table. Each is a thin class
over pure functions (``body_mask``, ``lung_masks``, ``bone_mask``) that take an HU array and return masks.
"""

from __future__ import annotations

import logging
from typing import ClassVar, TypeVar

import numpy as np
from pydantic import Field
from scipy import ndimage as ndi

from config.structures import load_structure_table
from models.types import RoiType, Structure, StructureSet, Volume
from pipeline.base import PipelineInput, PipelineParams

__all__ = [
    "body_mask", "lung_masks", "bone_mask",
    "BodyPipeline", "LungsPipeline", "BonesPipeline",
    "BodyParams", "LungsParams", "BonesParams",
]

logger = logging.getLogger(__name__)
P = TypeVar("P", bound=PipelineParams)
_FAMILY = {"algorithm_family": "MorphologicalOperations"}
_IN_PLANE = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)  # 4-connected within a slice only


def _fill_holes_per_slice(mask: np.ndarray, max_hole_pixels: int | None = None) -> np.ndarray:
    """Fill enclosed background slice by slice; with ``max_hole_pixels`` only holes up to that area."""
    out = mask.copy()
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        filled = ndi.binary_fill_holes(mask[z])
        if max_hole_pixels is not None:
            holes, n = ndi.label(filled & ~mask[z])
            if n:
                small = np.bincount(holes.ravel()) <= max_hole_pixels
                small[0] = False
                filled = mask[z] | small[holes]
        out[z] = filled
    return out


def _largest_components(mask: np.ndarray, keep_fraction: float) -> np.ndarray:
    """The largest connected component, and every other of at least ``keep_fraction`` of its size."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= max(sizes.max() * keep_fraction, 1)
    if keep_fraction <= 0:
        keep = np.arange(sizes.size) == int(np.argmax(sizes))
    return keep[labels]


def _components(mask: np.ndarray, min_voxels: int) -> list[np.ndarray]:
    """Connected components (26-connected) of at least ``min_voxels``, largest first."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= min_voxels]
    return [labels == i for i in order]


def body_mask(hu: np.ndarray, threshold_hu: float = -350.0, opening_voxels: int = 1,
              keep_fraction: float = 0.0) -> np.ndarray:
    """External: voxels above ``threshold_hu``, opened in-plane (cuts thin couch bridges), the largest 3-D
    component plus any other of at least ``keep_fraction`` of its size (arms beside the trunk), holes filled
    slice by slice (lungs, airways and bowel gas belong to the body)."""
    mask = hu > threshold_hu
    if opening_voxels > 0:
        mask = ndi.binary_opening(mask, structure=_IN_PLANE, iterations=opening_voxels)
    return _fill_holes_per_slice(_largest_components(mask, keep_fraction))


def _drop_airway(air: np.ndarray, body: np.ndarray, pixel_mm2: float, max_cm2: float, midline_mm: float,
                 column_mm: float) -> np.ndarray:
    """Remove, slice by slice, small air regions near the body's midline: trachea, main bronchi, pharynx."""
    out = air.copy()
    for z in np.flatnonzero(air.reshape(air.shape[0], -1).any(axis=1)):
        cols = np.flatnonzero(body[z].any(axis=0))
        if cols.size == 0:
            continue
        mid = (cols[0] + cols[-1]) / 2.0
        labels, n = ndi.label(air[z])
        if n == 0:
            continue
        areas = np.bincount(labels.ravel())[1:] * pixel_mm2 / 100.0
        centres = np.asarray(ndi.center_of_mass(air[z], labels, np.arange(1, n + 1)))[:, 1]
        drop = np.flatnonzero((areas <= max_cm2) & (np.abs(centres - mid) * column_mm <= midline_mm)) + 1
        out[z] &= ~np.isin(labels, drop)
    return out


def lung_masks(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float], *,
               threshold_hu: float = -400.0, min_volume_ml: float = 100.0, airway_max_cm2: float = 6.0,
               midline_mm: float = 30.0) -> list[np.ndarray]:
    """Air-filled lung: voxels below ``threshold_hu`` inside the body, without the airway (small air regions within
    ``midline_mm`` of the body midline, slice by slice), 3-D components of at least ``min_volume_ml`` that are at
    least a fifth of the largest (bowel gas and pockets dropped). One or two masks, vessels filled per slice."""
    inside = ndi.binary_erosion(body, structure=_IN_PLANE, iterations=2)
    air = _drop_airway((hu < threshold_hu) & inside, body, spacing[0] * spacing[1], airway_max_cm2, midline_mm,
                       spacing[0])
    candidates = _components(air, int(np.ceil(min_volume_ml * 1000.0 / float(np.prod(spacing)))))
    kept = [c for c in candidates[:2] if c.sum() >= 0.2 * candidates[0].sum()] if candidates else []
    return [_fill_holes_per_slice(c) for c in kept]


def bone_mask(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float], *,
              threshold_hu: float = 200.0, min_volume_ml: float = 0.5, max_hole_cm2: float = 0.8) -> np.ndarray:
    """Bone: voxels above ``threshold_hu`` inside the body, components of at least ``min_volume_ml`` kept,
    marrow cavities up to ``max_hole_cm2`` filled slice by slice (the spinal canal, larger, stays open)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    labels, n = ndi.label((hu > threshold_hu) & body, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(hu.shape, bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= int(np.ceil(min_volume_ml / voxel_ml))
    keep[0] = False
    return _fill_holes_per_slice(keep[labels], int(max_hole_cm2 * 100.0 / (spacing[0] * spacing[1])))


def _params(data: PipelineInput, model: type[P]) -> P:
    """The pipeline's own params model (validated again when a caller built PipelineInput by hand)."""
    if isinstance(data.params, model):
        return data.params
    return model.model_validate(data.params.model_dump())


def _structure(name: str, mask: np.ndarray, pipeline: type) -> Structure:
    found = load_structure_table().resolve(name)
    assert found is not None, f"{name} missing from config/tg263.yaml"
    spec = found[1]
    return Structure(name=name, mask=mask, color=spec.color, roi_type=RoiType(spec.roi_type),
                     algorithm=pipeline.name, algorithm_version=pipeline.version)


def _result(structures: list[Structure], label: str) -> StructureSet:
    return StructureSet(structures=tuple(structures), label=label,
                        description=f"dicom-node built-in pipeline '{label}'", notes=dict(_FAMILY))


class BodyParams(PipelineParams):
    threshold_hu: float = Field(-350.0, ge=-1000, le=0, description="HU above which a voxel may be body.")
    opening_voxels: int = Field(1, ge=0, le=5, description="In-plane opening iterations (detach couch).")
    keep_fraction: float = Field(0.05, ge=0, le=1, description="Also keep body components of at least this "
                                 "fraction of the largest (e.g. 0.05 keeps arms); 0 keeps the largest only.")


class LungsParams(BodyParams):
    lung_threshold_hu: float = Field(-400.0, ge=-1000, le=-100, description="HU below which a voxel is air.")
    min_volume_ml: float = Field(100.0, ge=0, description="Smallest air component kept as lung (ml).")
    airway_max_cm2: float = Field(6.0, ge=0, description="Air regions up to this area (cm2) near the midline are "
                                  "airway, not lung.")
    split: bool = Field(True, description="Name two separate lungs Lung_L / Lung_R; otherwise one Lungs.")


class BonesParams(BodyParams):
    bone_threshold_hu: float = Field(200.0, ge=0, le=3000, description="HU above which a voxel is bone.")
    min_volume_ml: float = Field(0.5, ge=0, description="Smallest bone component kept (ml).")
    max_hole_cm2: float = Field(0.8, ge=0, description="Enclosed holes up to this area (cm2) are filled as marrow.")


class BodyPipeline:
    """External contour of the patient."""

    name: ClassVar[str] = "body"
    version: ClassVar[str] = "1.0"
    Params: ClassVar[type[PipelineParams]] = BodyParams

    def run(self, data: PipelineInput) -> StructureSet:
        p = _params(data, BodyParams)
        mask = body_mask(data.volume.array, p.threshold_hu, p.opening_voxels, p.keep_fraction)
        return _result([_structure("External", mask, type(self))], self.name)


class LungsPipeline:
    """Lungs by air threshold inside the body; Lung_L and Lung_R when they are two separate components."""

    name: ClassVar[str] = "lungs"
    version: ClassVar[str] = "1.0"
    Params: ClassVar[type[PipelineParams]] = LungsParams

    def run(self, data: PipelineInput) -> StructureSet:
        p = _params(data, LungsParams)
        volume = data.volume
        body = body_mask(volume.array, p.threshold_hu, p.opening_voxels, p.keep_fraction)
        lungs = lung_masks(volume.array, body, volume.spacing, threshold_hu=p.lung_threshold_hu,
                           min_volume_ml=p.min_volume_ml, airway_max_cm2=p.airway_max_cm2)
        if not lungs:
            logger.info("no lung found (no air component of %.0f ml inside the body)", p.min_volume_ml)
            return _result([], self.name)
        if p.split and len(lungs) == 2:
            return _result(self._left_right(volume, lungs), self.name)
        return _result([_structure("Lungs", np.logical_or.reduce(lungs), type(self))], self.name)

    def _left_right(self, volume: Volume, lungs: list[np.ndarray]) -> list[Structure]:
        # Patient left is +x in LPS: compare the lungs' centroids along the patient x axis.
        x_axis = np.asarray(volume.direction, float).reshape(3, 3)[0]  # patient x of one step along (x, y, z)
        centres = [np.argwhere(m).mean(axis=0)[::-1] * np.asarray(volume.spacing) @ x_axis for m in lungs]
        left, right = (lungs[0], lungs[1]) if centres[0] > centres[1] else (lungs[1], lungs[0])
        return [_structure("Lung_L", left, type(self)), _structure("Lung_R", right, type(self))]


class BonesPipeline:
    """Bones by HU threshold and connected components."""

    name: ClassVar[str] = "bones"
    version: ClassVar[str] = "1.0"
    Params: ClassVar[type[PipelineParams]] = BonesParams

    def run(self, data: PipelineInput) -> StructureSet:
        p = _params(data, BonesParams)
        volume = data.volume
        body = body_mask(volume.array, p.threshold_hu, p.opening_voxels, p.keep_fraction)
        mask = bone_mask(volume.array, body, volume.spacing, threshold_hu=p.bone_threshold_hu,
                         min_volume_ml=p.min_volume_ml, max_hole_cm2=p.max_hole_cm2)
        return _result([_structure("Bones", mask, type(self))], self.name)
