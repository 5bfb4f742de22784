"""The pure half of ``dicom-node convert``: instances -> cases, names -> TG-263, masks -> output arrays, pseudonyms.

``dicom_node.convert`` reads the files and writes the results; everything here takes values and returns values:

- ``instance_info(ds)``: the few header facts a file contributes to pairing (no pixels).
- ``plan_cases(infos, selection)``: group image instances (CT, MR) into series and pair each series with the
  RTSTRUCT / SEG objects that reference it, by referenced series, then referenced SOP instances, then frame of
  reference (only when it names a single series). ``selection`` picks among several: ``latest``, ``all`` (one case
  each) or a regular expression on the structure set label (the latest match).
- ``map_structures(masks, structure_map, wanted)``: clinical labels -> TG-263 names, with what was unmapped.
- ``npz_arrays`` / ``medsam_arrays`` / ``label_map``: the arrays each output format holds.
- ``Pseudonymiser``: keyed hashes (HMAC-SHA256 with the user's secret) for patient pseudonyms, case ids and UIDs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset

from config.structure_map import StructureMap
from models.types import Volume

__all__ = [
    "IMAGE_MODALITIES", "InstanceInfo", "Annotation", "CasePlan", "Orphan", "Plan", "instance_info", "plan_cases",
    "MappedStructures", "map_structures", "label_map", "npz_arrays", "medsam_arrays", "nnunet_dataset_json",
    "Pseudonymiser", "parse_selection",
]

IMAGE_MODALITIES = ("CT", "MR")
ANNOTATION_MODALITIES = ("RTSTRUCT", "SEG")


@dataclass(frozen=True)
class InstanceInfo:
    """What one DICOM file tells the planner. ``path`` is opaque here (the I/O layer's handle)."""

    path: str
    modality: str
    sop_uid: str
    series_uid: str
    study_uid: str
    frame_of_reference: str
    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    label: str = ""  # structure set label / SEG content label / series description
    timestamp: str = ""  # YYYYMMDDHHMMSS-ish, for "latest"
    referenced_series: tuple[str, ...] = ()
    referenced_sops: tuple[str, ...] = ()


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _rtstruct_references(ds: Dataset) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    series, sops, frames = [], [], []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.append(_text(frame, "FrameOfReferenceUID"))
        for study in frame.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                series.append(_text(ser, "SeriesInstanceUID"))
                sops += [_text(im, "ReferencedSOPInstanceUID") for im in ser.get("ContourImageSequence", [])]
    if not series and not sops:  # older exports reference images only from the contours themselves
        for roi in ds.get("ROIContourSequence", []):
            for contour in roi.get("ContourSequence", []):
                sops += [_text(im, "ReferencedSOPInstanceUID") for im in contour.get("ContourImageSequence", [])]
    return tuple(s for s in series if s), tuple(dict.fromkeys(s for s in sops if s)), next((f for f in frames if f), "")


def _seg_references(ds: Dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    series, sops = [], []
    for ser in ds.get("ReferencedSeriesSequence", []):
        series.append(_text(ser, "SeriesInstanceUID"))
        sops += [_text(im, "ReferencedSOPInstanceUID") for im in ser.get("ReferencedInstanceSequence", [])]
    return tuple(s for s in series if s), tuple(s for s in sops if s)


def instance_info(path: str, ds: Dataset) -> InstanceInfo:
    """Header facts of one instance (``ds`` may be read without pixel data)."""
    modality = _text(ds, "Modality").upper()
    series, sops, frame = (), (), _text(ds, "FrameOfReferenceUID")
    label = _text(ds, "SeriesDescription")
    stamp = _text(ds, "SeriesDate") + _text(ds, "SeriesTime")
    if modality == "RTSTRUCT":
        series, sops, frame = _rtstruct_references(ds)
        label = _text(ds, "StructureSetLabel") or _text(ds, "StructureSetName") or label
        stamp = (_text(ds, "StructureSetDate") + _text(ds, "StructureSetTime")) or stamp
    elif modality == "SEG":
        series, sops = _seg_references(ds)
        label = _text(ds, "ContentLabel") or label
        stamp = (_text(ds, "ContentDate") + _text(ds, "ContentTime")) or stamp
    return InstanceInfo(
        path=path, modality=modality, sop_uid=_text(ds, "SOPInstanceUID"), series_uid=_text(ds, "SeriesInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"), frame_of_reference=frame, patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"), birth_date=_text(ds, "PatientBirthDate"), label=label,
        timestamp=stamp, referenced_series=series, referenced_sops=sops,
    )


@dataclass(frozen=True)
class Annotation:
    """An RTSTRUCT or SEG paired with an image series, and how it was paired."""

    info: InstanceInfo
    paired_by: str  # "series", "instances" or "frame of reference"


@dataclass(frozen=True)
class CasePlan:
    """One output case: an image series and (at most) one annotation object."""

    key: str  # stable identity of the case: image series UID + annotation SOP UID
    images: tuple[InstanceInfo, ...]
    annotation: Annotation | None
    warnings: tuple[str, ...] = ()
    skip_reason: str = ""  # non-empty: planned but not converted (no annotation, label not matched)

    @property
    def first(self) -> InstanceInfo:
        return self.images[0]


@dataclass(frozen=True)
class Orphan:
    """An annotation object that cannot be converted, and why (no or ambiguous image series)."""

    info: InstanceInfo
    reason: str


@dataclass
class Plan:
    cases: list[CasePlan] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)  # modality -> files that are neither images nor annotations


def parse_selection(value: str) -> str | re.Pattern[str]:
    """``latest``, ``all`` or a regular expression on the structure set label (ValueError naming the problem)."""
    if value in ("latest", "all"):
        return value
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"--structure-set must be latest, all or a regular expression; {value!r}: {exc}") from None


def _pair(annotation: InstanceInfo, series: Mapping[str, list[InstanceInfo]], sop_series: Mapping[str, str],
          by_frame: Mapping[str, list[str]]) -> tuple[str, str] | str:
    """(series UID, how) or the reason none could be chosen."""
    hits = [s for s in dict.fromkeys(annotation.referenced_series) if s in series]
    if len(hits) == 1:
        return hits[0], "series"
    votes = Counter(sop_series[s] for s in annotation.referenced_sops if s in sop_series)
    if votes:
        return votes.most_common(1)[0][0], "instances"
    if hits:
        return hits[0], "series"
    candidates = by_frame.get(annotation.frame_of_reference, []) if annotation.frame_of_reference else []
    if len(candidates) == 1:
        return candidates[0], "frame of reference"
    if len(candidates) > 1:
        return (f"{annotation.modality} references no image series of the input directly, and its frame of "
                f"reference holds {len(candidates)} image series: ambiguous")
    wanted = len(annotation.referenced_series) + len(annotation.referenced_sops)
    return (f"{annotation.modality} references images that are not in the input ({wanted} series/instance "
            "reference(s), none found)" if wanted else
            f"{annotation.modality} references no image series, and none shares its frame of reference")


def _choose(annotations: list[Annotation], selection: str | re.Pattern[str]) -> tuple[list[Annotation], str]:
    ordered = sorted(annotations, key=lambda a: (a.info.timestamp, a.info.sop_uid))
    if selection == "all":
        return ordered, ""
    if selection == "latest":
        return ordered[-1:], ""
    assert isinstance(selection, re.Pattern)
    matching = [a for a in ordered if selection.search(a.info.label)]
    if not matching:
        return [], (f"no structure set label matches {selection.pattern!r} "
                    f"({len(ordered)} structure set(s) reference the series)")
    return matching[-1:], ""


def plan_cases(infos: Iterable[InstanceInfo], selection: str | re.Pattern[str] = "latest") -> Plan:
    """Group instances into image series and pair each with its annotation objects (see the module docstring)."""
    plan = Plan()
    series: dict[str, list[InstanceInfo]] = defaultdict(list)
    annotations: list[InstanceInfo] = []
    seen_sops: set[str] = set()
    for info in infos:
        if info.sop_uid in seen_sops:  # the same instance exported twice: the first copy serves
            continue
        seen_sops.add(info.sop_uid)
        if info.modality in IMAGE_MODALITIES:
            # some anonymisers blank the Series Instance UID: the folder and frame of reference stand in for it
            key = info.series_uid or f"(no series UID) {info.path.rpartition('/')[0]} {info.frame_of_reference}"
            series[key].append(info)
        elif info.modality in ANNOTATION_MODALITIES:
            annotations.append(info)
        else:
            plan.ignored[info.modality or "unknown"] += 1
    sop_series = {i.sop_uid: uid for uid, items in series.items() for i in items}
    by_frame: dict[str, list[str]] = defaultdict(list)
    for uid, items in series.items():
        frame = items[0].frame_of_reference
        if frame:
            by_frame[frame].append(uid)
    paired: dict[str, list[Annotation]] = defaultdict(list)
    for info in annotations:
        found = _pair(info, series, sop_series, by_frame)
        if isinstance(found, str):
            plan.orphans.append(Orphan(info, found))
        else:
            paired[found[0]].append(Annotation(info, found[1]))
    for uid in sorted(series, key=lambda u: (series[u][0].patient_id, u)):
        images = tuple(sorted(series[uid], key=lambda i: i.path))
        chosen, reason = _choose(paired.get(uid, []), selection) if uid in paired else (
            [], "no RTSTRUCT or SEG references this series")
        if not chosen:
            plan.cases.append(CasePlan(key=uid, images=images, annotation=None, skip_reason=reason))
        for annotation in chosen:
            warnings = []
            if annotation.paired_by != "series":
                warnings.append(f"{annotation.info.modality} paired with its image series by {annotation.paired_by}")
            frame = images[0].frame_of_reference
            if annotation.info.frame_of_reference and frame and annotation.info.frame_of_reference != frame:
                warnings.append(f"{annotation.info.modality} frame of reference differs from the image series'")
            plan.cases.append(CasePlan(key=f"{uid}|{annotation.info.sop_uid}", images=images,
                                       annotation=annotation, warnings=tuple(warnings)))
    return plan


@dataclass
class MappedStructures:
    """Masks under TG-263 names, in the order found, plus the source label of each and what was left out."""

    masks: dict[str, np.ndarray] = field(default_factory=dict)
    source_names: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    not_selected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # wanted names this case does not have
    warnings: list[str] = field(default_factory=list)


def map_structures(masks: Mapping[str, np.ndarray], structure_map: StructureMap,
                   wanted: Sequence[str] | None = None) -> MappedStructures:
    """Rename clinical labels to TG-263 names; keep ``wanted`` ones only (all mapped ones when None).

    Two labels mapping to one name: the first non-empty one is kept and the other reported.
    """
    out = MappedStructures()
    for label, mask in masks.items():
        found = structure_map.resolve(label)
        if found.name is None:
            (out.ignored if found.how == "ignore" else out.unmapped).append(label)
            continue
        if wanted is not None and found.name not in wanted:
            out.not_selected.append(label)
            continue
        if found.name in out.masks:
            keep_old = out.masks[found.name].any() or not mask.any()
            kept, dropped = (out.source_names[found.name], label) if keep_old else (label, out.source_names[found.name])
            out.warnings.append(f"{kept!r} and {dropped!r} both map to {found.name}; kept {kept!r}")
            if keep_old:
                continue
        out.masks[found.name] = mask
        out.source_names[found.name] = label
    if wanted is not None:
        out.masks = {name: out.masks[name] for name in wanted if name in out.masks}
        out.missing = [name for name in wanted if name not in out.masks]
    return out


def label_map(masks: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[np.ndarray, int]:
    """Label map with value i + 1 for ``names[i]`` (absent names leave no voxels) and the count of voxels claimed
    by more than one structure (later names win there)."""
    shape = next(iter(masks.values())).shape if masks else None
    if shape is None:
        raise ValueError("label_map needs at least one mask")
    dtype = np.uint8 if len(names) < 256 else np.uint16
    labels = np.zeros(shape, dtype)
    count = np.zeros(shape, np.uint8)
    for i, name in enumerate(names):
        if name in masks:
            labels[masks[name]] = i + 1
            count += masks[name]
    return labels, int((count > 1).sum())


def npz_arrays(volume: Volume, masks: Mapping[str, np.ndarray], *, as_label_map: bool = False
               ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Arrays of the NPZ output (schema in README) and warnings. ``as_label_map`` writes ``labels`` and
    ``label_names`` when no two structures overlap, otherwise one ``mask_<name>`` each (with a warning)."""
    arrays: dict[str, np.ndarray] = {
        "image": volume.array,
        "spacing": np.asarray(volume.spacing[::-1], dtype=np.float64),  # (z, y, x): the array axes, as OpenKBP
        "origin": np.asarray(volume.origin, dtype=np.float64),
        "direction": np.asarray(volume.direction, dtype=np.float64).reshape(3, 3),
    }
    warnings = []
    if as_label_map and masks:
        names = list(masks)
        labels, overlap = label_map(masks, names)
        if overlap == 0:
            arrays["labels"] = labels
            arrays["label_names"] = np.asarray(["background", *names])
            return arrays, warnings
        warnings.append(f"structures overlap ({overlap} voxels): written as one mask each, not a label map")
    for name, mask in masks.items():
        mask = np.asarray(mask)
        arrays[f"mask_{name}"] = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)  # no copy
    return arrays, warnings


def medsam_arrays(volume: Volume, masks: Mapping[str, np.ndarray], names: Sequence[str],
                  window: tuple[float, float] = (40.0, 400.0)) -> tuple[dict[str, np.ndarray], list[str]]:
    """``imgs`` uint8 (Z, Y, X), ``gts`` label map, ``spacing`` (x, y, z) as MedSAM's pre-processing writes them.

    CT is windowed (level, width) to 0-255; MR is clipped to its 0.5-99.5 percentiles of non-zero voxels.
    """
    image = volume.array.astype(np.float32)
    if volume.modality == "CT":
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        inside = image[image > 0]
        lo, hi = (np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0))
    scaled = (np.clip(image, lo, hi) - lo) / max(hi - lo, 1e-6) * 255.0
    arrays: dict[str, np.ndarray] = {"imgs": np.round(scaled).astype(np.uint8)}
    warnings = []
    if masks:
        labels, overlap = label_map(masks, names)
        if overlap:
            warnings.append(f"structures overlap ({overlap} voxels): in gts the later structure wins")
    else:
        labels = np.zeros(volume.shape, np.uint8)
    arrays["gts"] = labels
    arrays["spacing"] = np.asarray(volume.spacing, dtype=np.float64)
    return arrays, warnings


def nnunet_dataset_json(names: Sequence[str], modality: str, num_training: int, description: str = "") -> dict:
    """dataset.json of an nnU-Net v2 raw dataset (one channel, labels 1..N in ``names`` order)."""
    return {
        "channel_names": {"0": "CT" if modality == "CT" else modality or "image"},
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(names)}},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "description": description or "converted with dicom-node convert",
    }


class Pseudonymiser:
    """Stable keyed hashes: the same secret gives the same pseudonyms, so runs and resumes agree; without the
    secret they cannot be reversed or recomputed from the identifiers. ``secret=None`` keeps identifiers (for
    data that is already anonymous); case ids then use plain hashes of the UIDs."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret

    def _digest(self, kind: str, value: str) -> bytes:
        message = f"{kind}\x00{value}".encode()
        if self.secret is None:
            return hashlib.sha256(message).digest()
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def patient(self, patient_id: str) -> str:
        if self.secret is None:
            return re.sub(r"[^A-Za-z0-9-]+", "-", patient_id).strip("-") or "anonymous"
        return "P" + self._digest("patient", patient_id).hex()[:12]

    def case(self, patient_id: str, case_key: str) -> str:
        return f"{self.patient(patient_id)}_{self._digest('case', case_key).hex()[:8]}"

    def uid(self, uid: str) -> str:
        """A valid DICOM UID (2.25 + 128-bit integer) standing for ``uid``; empty stays empty."""
        if not uid or self.secret is None:
            return uid
        return "2.25." + str(int.from_bytes(self._digest("uid", uid)[:16], "big"))

    def fingerprint(self, parts: Iterable[str]) -> str:
        return self._digest("fingerprint", "\n".join(parts)).hex()[:32]
