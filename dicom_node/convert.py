"""``dicom-node convert``: the disk-touching half of the offline DICOM -> training-data converter.

Scan the inputs (recursively, any file names, DICOMDIR skipped), plan cases with ``pipeline.convert.plan_cases``,
convert each case in a worker process (read, ``load_volume``, rasterise, map names, build arrays) and write its
outputs atomically (temporary file + rename), the case's JSON last: a JSON with the current fingerprint means the
case is complete, so an interrupted run resumes where it stopped and an unchanged case is skipped. Every case gets
one row in ``report.csv``; nothing a case does stops the run.

Layout of ``--out``::

    npz / medsam:  <case>.npz  <case>.json  report.csv
    nnunet:        imagesTr/<case>_0000.nii.gz  labelsTr/<case>.nii.gz  dataset.json  metadata/<case>.json
                   report.csv
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from config.structure_map import DEFAULT_MAP, StructureMap, load_structure_map
from pipeline.convert import (
    CasePlan, InstanceInfo, Plan, Pseudonymiser, instance_info, label_map, map_structures, medsam_arrays,
    nnunet_dataset_json, npz_arrays, parse_selection, plan_cases,
)
from pipeline.errors import PipelineError
from pipeline.rasterise import rtstruct_masks, seg_masks
from pipeline.volume import load_volume, series_geometry

__all__ = ["FORMATS", "ConvertOptions", "Summary", "scan", "convert_inputs", "REPORT_FIELDS"]

logger = logging.getLogger(__name__)

FORMATS = ("npz", "medsam", "nnunet")
SCHEMA = "dicom-node.convert/1"
REPORT_FIELDS = ["case", "patient", "status", "reason", "modality", "shape", "spacing", "annotation",
                 "structure_set", "structures", "voxels", "missing", "unmapped", "ignored", "warnings", "seconds"]
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides what a case's output looks like (it is part of the resume fingerprint)."""

    out: Path
    format: str = "npz"
    selection: str = "latest"
    structures: tuple[str, ...] | None = None
    mapping: Path = DEFAULT_MAP
    secret: bytes | None = None  # None: identifiers are kept (data already anonymous)
    as_label_map: bool = False
    window: tuple[float, float] = (40.0, 400.0)
    compression: int = 1  # zlib level of NPZ members; 0 stores them uncompressed

    def check(self) -> None:
        """ValueError with the allowed values and the value received, before any file is read."""
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        parse_selection(self.selection)
        if self.format == "nnunet" and not self.structures:
            raise ValueError("--format nnunet needs --structures: nnU-Net wants the same label numbers in every "
                             "case, so name the structures (in label order)")
        if not 0 <= self.compression <= 9:
            raise ValueError(f"--compression must be 0-9, got {self.compression}")
        if self.window[1] <= 0:
            raise ValueError(f"--window width must be > 0, got {self.window[1]}")

    def digest(self) -> str:
        mapping = hashlib.sha256(Path(self.mapping).read_bytes()).hexdigest()
        return json.dumps([SCHEMA, self.format, self.selection, self.structures, mapping, self.as_label_map,
                           self.window, self.compression, self.secret is None])


@dataclass
class Summary:
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0
    not_dicom: int = 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0


# ---------------------------------------------------------------------------------------------------- scanning

def _files(inputs: Sequence[Path]) -> list[str]:
    out = []
    for root in inputs:
        if root.is_file():
            out.append(str(root))
            continue
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            out += [os.path.join(folder, n) for n in sorted(names) if n.upper() != "DICOMDIR"]
    return out


def _read_header(path: str) -> InstanceInfo | str | None:
    """InstanceInfo, the reason a DICOM file is unreadable, or None for a file that is not DICOM at all."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        try:  # DICOM without the 128-byte preamble, as some exports write it
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SOPInstanceUID" not in ds or "Modality" not in ds:
                return None
        except Exception:
            return None
    except Exception as exc:  # truncated or corrupt: pydicom raises many types
        return f"{type(exc).__name__}: {exc}"
    if str(ds.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS or \
            str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS:
        return None
    try:
        return instance_info(path, ds)
    except Exception as exc:
        return f"unreadable header: {type(exc).__name__}: {exc}"


def _read_headers(paths: list[str]) -> list[InstanceInfo | str | None]:
    return [_read_header(p) for p in paths]


def scan(inputs: Sequence[Path], pool: ProcessPoolExecutor | None = None, progress: bool = False
         ) -> tuple[list[InstanceInfo], dict[str, str], int]:
    """(instances, unreadable DICOM files -> reason, count of non-DICOM files) under ``inputs``."""
    from tqdm import tqdm

    paths = _files(inputs)
    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    results = pool.map(_read_headers, chunks) if pool is not None else map(_read_headers, chunks)
    infos, unreadable, not_dicom = [], {}, 0
    with tqdm(total=len(paths), unit="file", desc="scanning", disable=not progress, leave=False) as bar:
        for chunk, found in zip(chunks, results):
            for path, item in zip(chunk, found):
                if isinstance(item, InstanceInfo):
                    infos.append(item)
                elif item is None:
                    not_dicom += 1
                else:
                    unreadable[path] = item
            bar.update(len(chunk))
    return infos, unreadable, not_dicom


# ---------------------------------------------------------------------------------------------------- writing

def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_npz(path: Path, arrays: dict[str, np.ndarray], level: int) -> None:
    """An NPZ that ``np.load`` reads, with a chosen zlib level (numpy's savez_compressed always uses 6, which
    costs several times level 1's time for a few percent of size on CT)."""
    def write(tmp: Path) -> None:
        method = zipfile.ZIP_DEFLATED if level else zipfile.ZIP_STORED
        with zipfile.ZipFile(tmp, "w", compression=method, compresslevel=level or None) as zf:
            for name, array in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    _atomic(path, write)


def write_nifti(path: Path, array: np.ndarray, volume) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    _atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def write_json(path: Path, data: dict) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n"))


def _outputs(options: ConvertOptions, case_id: str) -> tuple[Path, list[Path]]:
    """(metadata JSON, data files) of a case."""
    out = options.out
    if options.format == "nnunet":
        return (out / "metadata" / f"{case_id}.json",
                [out / "imagesTr" / f"{case_id}_0000.nii.gz", out / "labelsTr" / f"{case_id}.nii.gz"])
    return out / f"{case_id}.json", [out / f"{case_id}.npz"]


# ---------------------------------------------------------------------------------------------------- one case

@dataclass(frozen=True)
class _Task:
    case: CasePlan
    case_id: str
    patient: str
    fingerprint: str
    options: ConvertOptions


def _fmt(values: Iterable[Any]) -> str:
    return "; ".join(str(v) for v in values)


def _convert(task: _Task) -> dict[str, Any]:
    """Read, convert and write one case; returns its report row and never raises."""
    start = time.perf_counter()
    row: dict[str, Any] = {"case": task.case_id, "patient": task.patient, "status": "failed", "reason": ""}
    try:
        row.update(_convert_case(task))
        row["status"] = "converted" if not row.get("reason") else "skipped"
    except PipelineError as exc:
        row["reason"] = str(exc)
    except Exception as exc:  # a broken file must not stop the run; the row says what happened
        logger.debug("case %s failed", task.case_id, exc_info=True)
        row["reason"] = f"{type(exc).__name__}: {exc}"
    if row["status"] == "failed":
        row["reason"] = _scrub(" ".join(row["reason"].split()), [i.path for i in task.case.images]
                               + ([task.case.annotation.info.path] if task.case.annotation else []))
        meta, files = _outputs(task.options, task.case_id)
        for path in (meta, *files):  # no stale output from an earlier run may pass for this one
            path.unlink(missing_ok=True)
        if task.case.warnings:
            row["warnings"] = _fmt(task.case.warnings)
    row["seconds"] = f"{time.perf_counter() - start:.2f}"
    return row


def _scrub(text: str, paths: list[str]) -> str:
    """Error messages may quote file paths, and folder names often carry patient names: the report does not."""
    for path in sorted({*paths, *(os.path.dirname(p) for p in paths)}, key=len, reverse=True):
        if path:
            text = text.replace(path, "<source>")
    return text


def _convert_case(task: _Task) -> dict[str, Any]:
    case, options = task.case, task.options
    pseudo = Pseudonymiser(options.secret)
    datasets = [pydicom.dcmread(info.path) for info in case.images]
    geometry = series_geometry(datasets)
    volume = load_volume(geometry)
    annotation = case.annotation
    assert annotation is not None
    source = pydicom.dcmread(annotation.info.path)
    if annotation.info.modality == "RTSTRUCT":
        raster = rtstruct_masks(source, volume)
    else:
        raster = seg_masks(source, volume, {str(ds.SOPInstanceUID): k for k, ds in enumerate(geometry.datasets)})
    structure_map: StructureMap = load_structure_map(Path(options.mapping))
    mapped = map_structures(raster.masks, structure_map, options.structures)
    warnings = [*case.warnings, *raster.warnings, *mapped.warnings]
    voxels = {name: int(np.count_nonzero(mask)) for name, mask in mapped.masks.items()}
    result = {
        "modality": volume.modality, "shape": "x".join(str(n) for n in volume.shape),
        "spacing": "x".join(f"{s:.4g}" for s in volume.spacing[::-1]), "annotation": annotation.info.modality,
        "structure_set": annotation.info.label, "structures": _fmt(mapped.masks),
        "voxels": _fmt(f"{n}={v}" for n, v in voxels.items()),
        "missing": _fmt(mapped.missing), "unmapped": _fmt(mapped.unmapped), "ignored": _fmt(mapped.ignored),
    }
    if not mapped.masks:
        result["warnings"] = _fmt(warnings)
        result["reason"] = ("none of the selected structures is in the structure set" if options.structures
                            else "no structure name maps to a TG-263 name (see unmapped)")
        return result
    meta_path, files = _outputs(options, task.case_id)
    names = list(options.structures or mapped.masks)
    if options.format == "nnunet":
        labels_array, overlap = label_map(mapped.masks, names)
        more = [f"structures overlap ({overlap} voxels): in the label map the later structure wins"] if overlap else []
        write_nifti(files[0], volume.array, volume)
        write_nifti(files[1], labels_array, volume)
    elif options.format == "medsam":
        arrays, more = medsam_arrays(volume, mapped.masks, names, options.window)
        write_npz(files[0], arrays, options.compression)
    else:
        arrays, more = npz_arrays(volume, mapped.masks, as_label_map=options.as_label_map)
        write_npz(files[0], arrays, options.compression)
    warnings += more
    first = geometry.datasets[0]
    labels = {name: (names.index(name) + 1) for name in mapped.masks} if options.format != "npz" else None
    metadata = {
        "schema": SCHEMA, "case": task.case_id, "patient": task.patient, "format": options.format,
        "fingerprint": task.fingerprint, "files": [str(p.relative_to(options.out)) for p in files],
        "modality": volume.modality, "series_description": str(first.get("SeriesDescription", "")),
        "body_part": str(first.get("BodyPartExamined", "")), "manufacturer": str(first.get("Manufacturer", "")),
        "shape_zyx": list(volume.shape), "spacing_zyx": list(volume.spacing[::-1]), "origin": list(volume.origin),
        "direction": list(volume.direction),
        "source": {
            "study_uid": pseudo.uid(case.first.study_uid), "series_uid": pseudo.uid(case.first.series_uid),
            "frame_of_reference_uid": pseudo.uid(case.first.frame_of_reference),
            "annotation_uid": pseudo.uid(annotation.info.sop_uid), "annotation_modality": annotation.info.modality,
            "structure_set_label": annotation.info.label, "paired_by": annotation.paired_by,
        },
        "structures": [{"name": n, "source_name": mapped.source_names[n], "voxels": voxels[n],
                        **({"label": labels[n]} if labels else {})} for n in mapped.masks],
        "missing": mapped.missing, "unmapped": mapped.unmapped, "ignored": mapped.ignored,
        "not_selected": mapped.not_selected, "warnings": warnings, "pseudonymised": options.secret is not None,
    }
    write_json(meta_path, metadata)  # last: its presence with this fingerprint marks the case complete
    result["warnings"] = _fmt(warnings)
    return result


# ---------------------------------------------------------------------------------------------------- the run

def _fingerprint(pseudo: Pseudonymiser, options_digest: str, case: CasePlan) -> str:
    parts = [options_digest, case.key]
    for info in (*case.images, *([case.annotation.info] if case.annotation else [])):
        st = os.stat(info.path)
        parts.append(f"{info.path}\t{st.st_size}\t{st.st_mtime_ns}")
    return pseudo.fingerprint(parts)


def _unchanged_row(options: ConvertOptions, case_id: str, fingerprint: str) -> dict[str, Any] | None:
    meta_path, files = _outputs(options, case_id)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint or not all(p.exists() for p in files):
        return None
    structures = meta.get("structures", [])
    return {"case": case_id, "patient": meta.get("patient", ""), "status": "unchanged", "reason": "",
            "modality": meta.get("modality", ""), "shape": "x".join(str(n) for n in meta.get("shape_zyx", [])),
            "spacing": "x".join(f"{s:.4g}" for s in meta.get("spacing_zyx", [])),
            "annotation": meta.get("source", {}).get("annotation_modality", ""),
            "structure_set": meta.get("source", {}).get("structure_set_label", ""),
            "structures": _fmt(s["name"] for s in structures),
            "voxels": _fmt(f"{s['name']}={s['voxels']}" for s in structures),
            "missing": _fmt(meta.get("missing", [])), "unmapped": _fmt(meta.get("unmapped", [])),
            "ignored": _fmt(meta.get("ignored", [])), "warnings": _fmt(meta.get("warnings", [])), "seconds": "0"}


def _unreadable_note(case: CasePlan, unreadable: dict[str, str]) -> str:
    folders = {os.path.dirname(i.path) for i in case.images}
    bad = [_scrub(reason, [path]) for path, reason in unreadable.items() if os.path.dirname(path) in folders]
    return f"{len(bad)} unreadable DICOM file(s) beside this series' images (e.g. {bad[0]})" if bad else ""


def _plan_rows(plan: Plan, pseudo: Pseudonymiser, unreadable: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for case in plan.cases:
        if case.skip_reason:
            rows.append({"case": pseudo.case(case.first.patient_id, case.key), "status": "skipped",
                         "patient": pseudo.patient(case.first.patient_id), "reason": case.skip_reason,
                         "modality": case.first.modality})
    for orphan in plan.orphans:
        rows.append({"case": pseudo.case(orphan.info.patient_id, orphan.info.sop_uid), "status": "failed",
                     "patient": pseudo.patient(orphan.info.patient_id), "reason": orphan.reason,
                     "annotation": orphan.info.modality, "structure_set": orphan.info.label})
    for i, (path, reason) in enumerate(sorted(unreadable.items())):
        rows.append({"case": "", "status": "failed", "reason": f"unreadable DICOM file #{i + 1} "
                     f"(its path is in the log and the key file): {_scrub(reason, [path])}"})
    return rows


def _key_rows(plan: Plan, pseudo: Pseudonymiser, unreadable: dict[str, str]) -> list[dict[str, str]]:
    rows = []
    for case in plan.cases:
        rows.append({"patient": pseudo.patient(case.first.patient_id), "case": pseudo.case(case.first.patient_id, case.key),
                     "patient_id": case.first.patient_id, "patient_name": case.first.patient_name,
                     "birth_date": case.first.birth_date, "study_uid": case.first.study_uid,
                     "series_uid": case.first.series_uid,
                     "annotation_uid": case.annotation.info.sop_uid if case.annotation else "",
                     "source": os.path.dirname(case.first.path)})
    for i, path in enumerate(sorted(unreadable)):
        rows.append({"case": f"unreadable DICOM file #{i + 1}", "source": path})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in fields})
    _atomic(path, write)


def _write_dataset_json(options: ConvertOptions, rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if r["status"] in ("converted", "unchanged")]
    modalities = Counter(r.get("modality", "") for r in done)
    modality = modalities.most_common(1)[0][0] if modalities else "CT"
    count = len(list((options.out / "labelsTr").glob("*.nii.gz")))
    write_json(options.out / "dataset.json", nnunet_dataset_json(options.structures or (), modality, count))


def convert_inputs(inputs: Sequence[Path], options: ConvertOptions, *, workers: int = 1,
                   key_file: Path | None = None, progress: bool = False) -> Summary:
    """Convert everything under ``inputs`` into ``options.out``; the summary's rows are the report."""
    options.check()
    load_structure_map(Path(options.mapping))  # a bad mapping file fails here, before any work
    options.out.mkdir(parents=True, exist_ok=True)
    pseudo = Pseudonymiser(options.secret)
    digest = options.digest()
    summary = Summary()
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        infos, unreadable, summary.not_dicom = scan(inputs, pool, progress)
        summary.files = len(infos) + len(unreadable) + summary.not_dicom
        for path, reason in unreadable.items():
            logger.warning("unreadable DICOM file %s: %s", path, reason)
        plan = plan_cases(infos, parse_selection(options.selection))
        summary.rows += _plan_rows(plan, pseudo, unreadable)
        tasks = []
        for case in plan.cases:
            if case.skip_reason:
                continue
            case_id = pseudo.case(case.first.patient_id, case.key)
            note = _unreadable_note(case, unreadable)
            if note:
                case = CasePlan(case.key, case.images, case.annotation, (*case.warnings, note))
            fingerprint = _fingerprint(pseudo, digest, case)
            row = _unchanged_row(options, case_id, fingerprint)
            if row is not None:
                summary.rows.append(row)
            else:
                tasks.append(_Task(case, case_id, pseudo.patient(case.first.patient_id), fingerprint, options))
        summary.rows += _run(tasks, pool, progress)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if options.format == "nnunet":
        _write_dataset_json(options, summary.rows)
    _write_csv(options.out / "report.csv", summary.rows, REPORT_FIELDS)
    if key_file is not None:
        _write_key_file(key_file, _key_rows(plan, pseudo, unreadable))
    return summary


def _run(tasks: list[_Task], pool: ProcessPoolExecutor | None, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(tasks), unit="case", desc="converting", disable=not progress) as bar:
        if pool is None:
            for task in tasks:
                rows.append(_convert(task))
                bar.update()
            return rows
        futures = {pool.submit(_convert, task): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                rows.append(future.result())
            except Exception as exc:  # the worker process died (out of memory, a crash in a decoder)
                rows.append({"case": task.case_id, "patient": task.patient, "status": "failed",
                             "reason": f"worker process failed: {type(exc).__name__}: {exc}"})
            bar.update()
    return rows


def _write_key_file(path: Path, rows: list[dict[str, str]]) -> None:
    fields = ["patient", "case", "patient_id", "patient_name", "birth_date", "study_uid", "series_uid",
              "annotation_uid", "source"]
    _write_csv(path, rows, fields)
    os.chmod(path, 0o600)
