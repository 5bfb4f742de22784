"""C-ECHO / C-STORE SCP: association policy, and a C-STORE handler that persists before it answers.

The handler checks a few header tags, writes the bytes exactly as received (tmp + fsync + rename), indexes
and audits them in one transaction, and only then answers Success. No pixel decoding happens here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config.node import AcceptEntry, NodeSettings
from dicom_node import InvalidInstance, StorageError
from dicom_node.audit import Event
from dicom_node.netopts import cheap_copy_contexts, tune_connection
from dicom_node.spool import Spool, is_valid_uid
from dicom_node.status import RejectReason, Status
from dicom_node.store import InstanceRecord, Store

__all__ = ["Receiver", "check_association", "identify"]

log = logging.getLogger(__name__)

_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class Identity:
    """The few header values the handler needs, taken from the dataset and the request."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str


def check_association(
    calling_ae: str, called_ae: str, peer_host: str, our_ae: str, accept: Sequence[AcceptEntry]
) -> RejectReason | None:
    """Return why an association must be rejected, or None to accept it."""
    if called_ae.strip() != our_ae:
        return RejectReason.CALLED_AE_NOT_RECOGNISED
    for entry in accept:
        if entry.ae_title == calling_ae.strip() and (entry.host is None or entry.host == peer_host):
            return None
    return RejectReason.CALLING_AE_NOT_RECOGNISED


def identify(ds: Dataset, affected_sop_class: str, affected_sop_instance: str) -> Identity:
    """Check the identifying attributes of a received dataset; raise InvalidInstance (with the status) if bad."""
    try:
        values = {keyword: _raw_text(ds, keyword) for keyword in (
            "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality")}
    except Exception as exc:  # pydicom parses lazily: a malformed element surfaces here
        raise _invalid(Status.CANNOT_UNDERSTAND, f"unparseable dataset: {exc}") from exc
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not values[keyword]:
            raise _invalid(Status.CANNOT_UNDERSTAND, f"missing {keyword}")
        if not is_valid_uid(values[keyword]):
            raise _invalid(Status.CANNOT_UNDERSTAND, f"invalid {keyword}")
    if values["SOPInstanceUID"] != affected_sop_instance:
        raise _invalid(Status.DATASET_MISMATCH, "SOPInstanceUID differs from the request's")
    if values["SOPClassUID"] and values["SOPClassUID"] != affected_sop_class:
        raise _invalid(Status.DATASET_MISMATCH, "SOPClassUID differs from the request's")
    return Identity(
        sop_class_uid=affected_sop_class, sop_instance_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"], series_uid=values["SeriesInstanceUID"],
        patient_id=values["PatientID"][:64], modality=values["Modality"][:16],
    )


def _raw_text(ds: Dataset, keyword: str) -> str:
    """An element's text straight from its encoded bytes: no value conversion, so no validation warnings."""
    element = ds.get_item(keyword)
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip(" \0")


def _invalid(status: Status, reason: str) -> InvalidInstance:
    error = InvalidInstance(reason)
    error.status = status  # type: ignore[attr-defined]
    return error


def _reply(status: Status, comment: str | None = None) -> Dataset:
    reply = Dataset()
    reply.Status = int(status)
    if comment:
        reply.ErrorComment = comment[:64]
    return reply


class Receiver:
    """The listening side of the node. ``on_instance`` is called (after the reply is decided) for each new one."""

    def __init__(
        self, settings: NodeSettings, accept: Sequence[AcceptEntry], store: Store, spool: Spool,
        on_instance: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self.store = store
        self.spool = spool
        self.on_instance = on_instance
        self._accept: tuple[AcceptEntry, ...] = tuple(accept)
        self._server: Any = None
        self._lock = threading.Lock()
        self.ae = self._build_ae()

    @property
    def accept(self) -> tuple[AcceptEntry, ...]:
        return self._accept

    @accept.setter
    def accept(self, entries: Sequence[AcceptEntry]) -> None:
        self._accept = tuple(entries)  # swapped atomically; running associations keep their verdict

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.maximum_associations = self.settings.max_associations
        ae.network_timeout = self.settings.network_timeout
        ae.require_called_aet = False  # checked (and audited) in _on_requested
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, tune_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        address = (self.settings.host, self.settings.port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers,
                                            contexts=cheap_copy_contexts(self.ae.supported_contexts))
        log.info("listening as %s on %s:%d", self.settings.ae_title, *self.bound_address)

    @property
    def bound_address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # --- handlers: each one turns every exception into a status or an audit record, never a crash --------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        called = str(assoc.requestor.primitive.called_ae_title).strip()
        host = assoc.requestor.address
        reason = check_association(calling, called, host, self.settings.ae_title, self._accept)
        if reason is None:
            return
        log.warning("rejected association from %s@%s: %s", calling, host, reason.name)
        self._audit_quietly(Event.ASSOCIATION_REJECTED, "rejected", actor=f"{calling}@{host}",
                            detail={"called_ae": called, "reason": reason.name})
        assoc.acse.send_reject(0x01, 0x01, int(reason))
        # As pynetdicom's own rejections do: wait until the DUL has sent the A-ASSOCIATE-RJ before the
        # connection is closed, or the peer may see an abort instead of the reason.
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._audit_quietly(Event.ASSOCIATION_ACCEPTED, actor=f"{assoc.requestor.ae_title}@"
                            f"{assoc.requestor.address}", detail={"called_ae": self.settings.ae_title})

    def _on_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> Dataset | int:
        assoc = event.assoc
        calling, host = assoc.requestor.ae_title, assoc.requestor.address
        request = event.request
        stream = request.DataSet.getbuffer()  # the bytes exactly as received, no copy
        try:
            identity = identify(event.dataset, str(request.AffectedSOPClassUID),
                                str(request.AffectedSOPInstanceUID))
        except InvalidInstance as exc:
            return self._reject_instance(event, stream, exc, calling, host)
        except Exception as exc:  # decoding the stream failed outright
            error = _invalid(Status.CANNOT_UNDERSTAND, f"unparseable dataset: {exc}")
            return self._reject_instance(event, stream, error, calling, host)
        try:
            outcome = self._persist(event, stream, identity, calling, host)
        except StorageError as exc:
            log.error("storage failure: %s", exc)
            self._audit_quietly(Event.INSTANCE_FAILED, "failed", actor=f"{calling}@{host}",
                                study_uid=identity.study_uid, series_uid=identity.series_uid,
                                sop_instance_uid=identity.sop_instance_uid, detail={"error": str(exc)})
            return _reply(Status.OUT_OF_RESOURCES, "storage failure; please retry")
        except Exception as exc:  # database down or similar: the sender keeps the data and retries
            log.exception("could not index instance")
            self._audit_quietly(Event.INSTANCE_FAILED, "failed", actor=f"{calling}@{host}",
                                sop_instance_uid=identity.sop_instance_uid, detail={"error": repr(exc)})
            return _reply(Status.OUT_OF_RESOURCES, "could not index instance; please retry")
        if outcome != "duplicate" and self.on_instance is not None:
            self.on_instance(identity.series_uid)
        return int(Status.SUCCESS)

    def _persist(self, event: evt.Event, stream: memoryview, identity: Identity, calling: str, host: str) -> str:
        digest = hashlib.sha256(stream).hexdigest()
        relative = self.spool.instance_path(identity.study_uid, identity.series_uid, identity.sop_instance_uid)
        # Only a file already in place can make this a resend: skip the index lookup for new instances.
        existing = self.store.find_instance(identity.sop_instance_uid) if self.spool.exists(relative) else None
        is_resend = existing is not None and existing["sha256"] == digest and existing["path"] == relative
        if not is_resend:
            self.spool.write_atomic(relative, _PREAMBLE + encode_file_meta(event.file_meta), stream)
        record = InstanceRecord(
            sop_instance_uid=identity.sop_instance_uid, sop_class_uid=identity.sop_class_uid,
            series_uid=identity.series_uid, study_uid=identity.study_uid, patient_id=identity.patient_id,
            modality=identity.modality, transfer_syntax=str(event.context.transfer_syntax), path=relative,
            size=len(stream), sha256=digest,
        )
        try:
            return self.store.record_instance(record, calling_ae=calling, called_ae=self.settings.ae_title,
                                              peer_host=host)
        except Exception:
            if existing is None:  # never acknowledged and never indexed: leave nothing behind
                self.spool.absolute(relative).unlink(missing_ok=True)
            raise

    def _reject_instance(self, event: evt.Event, stream: memoryview, error: InvalidInstance, calling: str,
                         host: str) -> Dataset:
        status: Status = getattr(error, "status", Status.CANNOT_UNDERSTAND)
        reason = str(error)
        kept = self.spool.quarantine(
            _PREAMBLE + encode_file_meta(event.file_meta) + stream, reason,
            {"calling_ae": calling, "peer": host, "affected_sop_instance_uid":
             str(event.request.AffectedSOPInstanceUID)[:80], "received": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())},
        )
        log.warning("refused instance from %s@%s: %s", calling, host, reason)
        self._audit_quietly(Event.INSTANCE_QUARANTINED, "rejected", actor=f"{calling}@{host}", detail={
            "reason": reason, "status": f"0x{int(status):04X}", "quarantine": kept.name if kept else None})
        return _reply(status, reason)

    def _audit_quietly(self, event_type: str, outcome: str = "ok", **fields: Any) -> None:
        try:
            self.store.record(event_type, outcome, **fields)
        except Exception:  # an audit failure must not take the listener down; it is logged loudly instead
            log.exception("could not write audit record %s", event_type)
