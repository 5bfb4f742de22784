"""What the node holds about a patient's other objects: the RT Structure Sets that reference a series, and the
prior study for ``propagate`` with ``source: prior``: the most recent earlier image series of the same Patient
ID and modality (another Series Instance UID) that an RT Structure Set references.

"Earlier" is by the series' DICOM date and time (Series Date/Time, else Study Date/Time, else Acquisition
Date/Time of its first instance); series with equal or missing dates are ordered by when the node received
them. Series still being received are not candidates.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.spool import Spool
from dicom_node.store import SeriesState, Store
from pipeline.seeds import references_series

__all__ = ["structure_sets_for", "acquired", "find_prior"]

log = logging.getLogger(__name__)

_REFERENCE_TAGS = ["Modality", "FrameOfReferenceUID", "ReferencedFrameOfReferenceSequence"]


def structure_sets_for(store: Store, spool: Spool, patient_id: str, series_uid: str, frame_of_reference_uid: str,
                       *, full: bool = True) -> list[Dataset]:
    """The stored RT Structure Sets that reference a series (oldest first); ``full=False`` reads only the
    reference headers, enough to know whether there is one."""
    found = []
    for relative in store.structure_set_paths(patient_id):
        path = spool.absolute(relative)
        try:
            header = dcmread(path, specific_tags=_REFERENCE_TAGS)
            if references_series(header, series_uid, frame_of_reference_uid):
                found.append(dcmread(path) if full else header)
        except (OSError, InvalidDicomError) as exc:  # a damaged file must not block the series it may seed
            log.warning("cannot read stored structure set %s: %s", relative, exc)
    return found


_DATE_TAGS = ["SeriesDate", "SeriesTime", "StudyDate", "StudyTime", "AcquisitionDate", "AcquisitionTime"]


def acquired(ds: Dataset) -> str:
    """A sortable YYYYMMDDHHMMSS.ffffff of the series' date and time; '' when it carries none."""
    for date_tag, time_tag in (("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime"),
                               ("AcquisitionDate", "AcquisitionTime")):
        date = str(ds.get(date_tag, "") or "").strip()
        if len(date) == 8 and date.isdigit():
            clock = str(ds.get(time_tag, "") or "").strip().replace(":", "")
            whole, _, fraction = clock.partition(".")
            return date + whole.ljust(6, "0")[:6] + "." + fraction.ljust(6, "0")[:6]
    return ""


def find_prior(store: Store, spool: Spool, new_series: dict[str, Any], new_first: Dataset,
               ) -> tuple[list[Dataset], list[Dataset]] | None:
    """(image instances, referencing structure sets) of the prior series of ``new_series`` (a series row), or
    None when the node holds none."""
    patient_id, modality = new_series.get("patient_id") or "", new_series.get("modality") or ""
    new_key = (acquired(new_first), new_series["first_received_at"])
    candidates = []
    for row in store.patient_series(patient_id, modality):
        if row["series_uid"] == new_series["series_uid"] or row["state"] == SeriesState.RECEIVING:
            continue
        members = store.series_instances(row["series_uid"])
        if not members:
            continue
        first = dcmread(spool.absolute(members[0]["path"]), stop_before_pixels=True, specific_tags=_DATE_TAGS +
                        ["FrameOfReferenceUID"])
        key = (acquired(first), row["first_received_at"])
        # Dates compare only when both series carry one; otherwise the order of receipt decides.
        earlier = key < new_key if key[0] and new_key[0] else key[1] < new_key[1]
        if earlier:
            candidates.append((key, row, members, first))
    for _key, row, members, first in sorted(candidates, key=lambda c: c[0], reverse=True):
        structure_sets = structure_sets_for(store, spool, patient_id, row["series_uid"],
                                            str(first.get("FrameOfReferenceUID", "")))
        if structure_sets:
            log.info("prior study for series %s: series %s (%d images, %d structure set(s))",
                     new_series["series_uid"], row["series_uid"], len(members), len(structure_sets))
            return [dcmread(spool.absolute(m["path"])) for m in members], structure_sets
    return None
