"""Start-up reconciliation: index instance files the database does not know about.

Every instance file is fsync'd and renamed into place before the node answers, but the SQLite index is committed
with synchronous=NORMAL, so a power loss can roll back the last few index rows. The files are the truth: any
file in a series folder touched since shortly before the newest index row is indexed again (audited with
``recovered_from_storage``), so its series completes and is forwarded as usual.
"""

from __future__ import annotations

import hashlib
import logging

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble

from dicom_node.spool import Spool, is_valid_uid
from dicom_node.store import InstanceRecord, Store

__all__ = ["recover_unindexed"]

log = logging.getLogger(__name__)

MARGIN_SECONDS = 600  # how far before the newest index row to look for files written around a crash


def recover_unindexed(store: Store, spool: Spool) -> int:
    """Index files present in storage but absent from the database; returns how many were recovered."""
    latest = store.latest_received_at()
    cutoff = None if latest is None else latest - MARGIN_SECONDS
    recovered = 0
    for folder in spool.series_folders_changed_since(cutoff):
        known = store.indexed_paths(folder.name)
        for path in sorted(folder.glob("*.dcm")):
            relative = path.relative_to(spool.root).as_posix()
            if relative in known:
                continue
            try:
                record = _record_for(path, relative)
            except Exception as exc:
                log.error("cannot re-index %s: %s", relative, exc)
                continue
            store.record_instance(record, calling_ae="", called_ae="", peer_host="recovery", recovered=True)
            recovered += 1
    if recovered:
        log.warning("re-indexed %d instance file(s) missing from the database", recovered)
    return recovered


def _record_for(path, relative: str) -> InstanceRecord:
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        stream = fp.read()
    ds = dcmread(path, stop_before_pixels=True)
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    if not all(map(is_valid_uid, uids)) or relative != f"instances/{uids[0]}/{uids[1]}/{uids[2]}.dcm":
        raise ValueError("file name does not match its UIDs")
    return InstanceRecord(
        sop_instance_uid=uids[2], sop_class_uid=str(meta.MediaStorageSOPClassUID), series_uid=uids[1],
        study_uid=uids[0], patient_id=str(ds.get("PatientID", ""))[:64], modality=str(ds.get("Modality", ""))[:16],
        transfer_syntax=str(meta.TransferSyntaxUID), path=relative, size=len(stream),
        sha256=hashlib.sha256(stream).hexdigest(),
    )
