"""DICOM Segmentation builder (highdicom): a :class:`StructureSet` -> a BINARY SEG ``Dataset``.

Memory: highdicom's usual input is a dense (Z, Y, X, S) array, 3.3 GB of booleans for 100 segments of a
512x512x128 CT. We hand highdicom a zero-stride (Z, Y, X) placeholder instead (one byte per slice: does any
segment touch this slice) and serve each (segment, slice) frame from the structure's own mask when highdicom asks
for it, so memory stays at the encoded output plus one frame. Segments may overlap (External contains Lungs):
``SegmentsOverlap`` is set from the masks. Everything else (functional groups, dimension index, references to the
source series, algorithm identification) is highdicom's own.

Segment descriptions come from the TG-263 table (``config/tg263.yaml``): SNOMED CT category, type and laterality
modifier, display colour. Structures the table does not know are written as generic anatomical structures.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from config.structures import StructureTable, load_structure_table
from models.types import Structure, StructureSet
from pipeline.errors import StructureError
from pipeline.identity import MANUFACTURER, MODEL_NAME, software_version
from pipeline.volume import require_references, series_geometry

__all__ = ["build_seg", "segment_description"]

logger = logging.getLogger(__name__)

_FALLBACK_CATEGORY = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
_FALLBACK_TYPE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")


def _concept(table: StructureTable, key: str) -> hd.sr.CodedConcept:
    code = table.code(key)
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _algorithm(structure: Structure, family: str) -> hd.AlgorithmIdentificationSequence:
    try:
        family_code = getattr(codes.cid7162, family)
    except AttributeError:
        raise StructureError(f"algorithm family must be a CID 7162 keyword ({', '.join(codes.cid7162.dir())}), "
                             f"got {family!r}") from None
    return hd.AlgorithmIdentificationSequence(name=structure.algorithm[:64], family=family_code,
                                              version=structure.algorithm_version[:64])


def segment_description(number: int, structure: Structure, table: StructureTable,
                        family: str = "ArtificialIntelligence") -> hd.seg.SegmentDescription:
    """Segment description for one structure: TG-263 label, SNOMED codes from ``table``, colour, algorithm."""
    found = table.resolve(structure.name)
    if found is None:
        logger.warning("structure %r is not in the TG-263 table: coded as a generic anatomical structure",
                       structure.name)
        category, prop, modifier = _FALLBACK_CATEGORY, _FALLBACK_TYPE, None
    else:
        spec = found[1]
        category, prop = _concept(table, spec.category), _concept(table, spec.type)
        modifier = _concept(table, spec.modifier) if spec.modifier else None
    rgb = np.asarray(structure.color, dtype=float).reshape(1, 3) / 255.0
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.name[:64],
        segmented_property_category=category,
        segmented_property_type=prop,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(structure, family),
        display_color=hd.color.CIELabColor(*(float(v) for v in _rgb_to_lab(rgb))),
    )
    if modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def _rgb_to_lab(rgb: np.ndarray) -> tuple[float, float, float]:
    """sRGB in [0, 1] -> CIE L*a*b* (D65), as highdicom's CIELabColor expects."""
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (linear @ m.T)[0] / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return (float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127)))


class _FrameServedSegmentation(hd.seg.Segmentation):
    """A highdicom Segmentation whose frames are read from per-structure masks instead of a dense 4-D array.

    highdicom takes the plane ``placeholder[z]`` (a zero-stride view) and asks ``_get_segment_pixel_array`` for
    segment ``n`` of it; the view's address gives back ``z``. The constructor checks that this still holds.
    """

    def __init__(self, masks: Sequence[np.ndarray], slices: Sequence[np.ndarray], **kwargs: Any) -> None:
        nz, ny, nx = masks[0].shape
        occupied = np.zeros(nz, np.uint8)
        for z in slices:
            occupied[z] = 1
        self._served_masks = masks
        self._served_slices = [set(z.tolist()) for z in slices]
        self._placeholder_flags = occupied
        self._zero_frame = np.zeros((ny, nx), np.uint8)
        placeholder = np.lib.stride_tricks.as_strided(occupied, shape=(nz, ny, nx), strides=(1, 0, 0),
                                                      writeable=False)
        super().__init__(pixel_array=placeholder, **kwargs)

    def _get_segment_pixel_array(self, pixel_array: np.ndarray, segment_number: int,  # type: ignore[override]
                                 *args: Any, **kwargs: Any) -> np.ndarray:
        z = pixel_array.__array_interface__["data"][0] - self._placeholder_flags.__array_interface__["data"][0]
        if pixel_array.strides != (0, 0) or not 0 <= z < self._placeholder_flags.size:
            raise RuntimeError("highdicom no longer passes placeholder planes to _get_segment_pixel_array; "
                               "pipeline.seg needs updating for this highdicom version")
        if z not in self._served_slices[segment_number - 1]:
            return self._zero_frame
        plane = self._served_masks[segment_number - 1][z]
        return plane.view(np.uint8) if plane.dtype == np.bool_ else (plane != 0).astype(np.uint8)


def _occupied_slices(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))


def _overlap(masks: Sequence[np.ndarray], slices: Sequence[np.ndarray]) -> bool:
    """Whether any voxel belongs to two structures (only slices a structure occupies are visited)."""
    seen = np.zeros(masks[0].shape, bool)
    for mask, zs in zip(masks, slices):
        for z in zs:
            plane = mask[z] != 0
            if (seen[z] & plane).any():
                return True
            seen[z] |= plane
    return False


def build_seg(
    source_datasets: Sequence[Dataset],
    structure_set: StructureSet,
    *,
    series_description: str | None = None,
    series_number: int = 902,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    table: StructureTable | None = None,
) -> Dataset:
    """A BINARY DICOM SEG of every structure, referencing the source series; empty frames are omitted.

    The algorithm family of all segments is ``structure_set.notes["algorithm_family"]`` (a CID 7162 keyword such
    as ``MorphologicalOperations``), ``ArtificialIntelligence`` when absent.
    """
    geometry = series_geometry(source_datasets)
    require_references(geometry)
    if not structure_set.structures:
        raise StructureError("a SEG needs at least one structure")
    table = table or load_structure_table()
    family = structure_set.notes.get("algorithm_family", "ArtificialIntelligence")
    masks = []
    for s in structure_set.structures:
        if tuple(s.mask.shape) != geometry.shape:
            raise StructureError(f"structure {s.name!r}: mask shape {s.mask.shape} does not match the series "
                                 f"{geometry.shape}")
        masks.append(s.mask)
    descriptions = [segment_description(n, s, table, family)
                    for n, s in enumerate(structure_set.structures, start=1)]
    first = structure_set.structures[0]
    slices = [_occupied_slices(m) for m in masks]
    seg = _FrameServedSegmentation(
        masks,
        slices,
        source_images=list(geometry.datasets),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_version(),
        device_serial_number="0",
        series_description=(series_description or f"AUTO: {first.algorithm} {first.algorithm_version}")[:64],
        content_label=re.sub(r"[^A-Z0-9_ ]", "_", (structure_set.label or "AUTO").upper())[:16],
        content_description=(structure_set.description or None),
        omit_empty_frames=True,
    )
    seg.SegmentsOverlap = "YES" if _overlap(masks, slices) else "NO"
    return seg
