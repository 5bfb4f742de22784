"""C-STORE SCU and C-ECHO: send files to a peer, one association per batch, per-instance statuses back.

Files go out exactly as stored when the peer accepts their transfer syntax; otherwise they are decoded and sent
in Explicit VR Little Endian, which every storage SCP must accept for uncompressed data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config.node import Destination
from dicom_node.netopts import tune_connection

__all__ = ["SendResult", "send_files", "echo", "collect_files", "keep_responses_for_the_caller"]

log = logging.getLogger(__name__)

# Send stored files from disk without decoding them (exact bytes; needs an exactly matching context).
_config.STORE_SEND_CHUNKED_DATASET = True

_MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class SendResult:
    path: Path
    sop_instance_uid: str | None
    status: int | None  # DIMSE status; None when nothing was sent for this file
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0 or self.status in (0xB000, 0xB006, 0xB007))


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named, and every file below folders named (recursively), in a stable order."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file()))
        else:
            found.append(item)
    return found


def _read_header(path: Path) -> _Header:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = ds.file_meta
    return _Header(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                   str(meta.TransferSyntaxUID))


def _contexts(headers: Sequence[_Header]) -> list[list]:
    """Presentation contexts in chunks of at most 128: per (SOP class, transfer syntax) pair, exact first."""
    wanted: dict[str, set[str]] = {}
    for h in headers:
        wanted.setdefault(h.sop_class, set()).add(h.transfer_syntax)
    contexts = []
    for sop_class, syntaxes in wanted.items():
        for ts in sorted(syntaxes):
            contexts.append(build_context(sop_class, [ts]))
        # Fallback for peers that do not take the stored (e.g. compressed) encoding.
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return [contexts[i:i + _MAX_CONTEXTS] for i in range(0, len(contexts), _MAX_CONTEXTS)]


def send_files(
    destination: Destination, paths: Sequence[Path], *, calling_ae: str = "DICOMNODE", timeout: float = 30,
) -> list[SendResult]:
    """Send files to ``destination``; returns one result per file (status None + error if not sent)."""
    results: list[SendResult] = []
    headers: list[_Header] = []
    for path in paths:
        try:
            headers.append(_read_header(Path(path)))
        except Exception as exc:
            results.append(SendResult(Path(path), None, None, f"not a readable DICOM file: {exc}"))
    by_chunk: dict[int, list[_Header]] = {}
    chunks = _contexts(headers)
    for h in headers:  # place each file in the first chunk that proposes its SOP class
        index = next(i for i, c in enumerate(chunks) if any(x.abstract_syntax == h.sop_class for x in c))
        by_chunk.setdefault(index, []).append(h)
    for index, members in by_chunk.items():
        results.extend(_send_batch(destination, chunks[index], members, calling_ae, timeout))
    return results


def _send_batch(destination: Destination, contexts: list, headers: Sequence[_Header], calling_ae: str,
                timeout: float) -> list[SendResult]:
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = contexts
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = 0
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association (peer down or unreachable)"
        return [SendResult(h.path, h.sop_instance, None, f"{reason}: {destination}") for h in headers]
    keep_responses_for_the_caller(assoc)
    results = []
    try:
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        for msg_id, h in enumerate(headers, start=1):
            results.append(_send_one(assoc, h, accepted, msg_id % 0x10000 or 1))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    sent = {r.path for r in results}
    results.extend(SendResult(h.path, h.sop_instance, None, "association lost before sending")
                   for h in headers if h.path not in sent)
    return results


def keep_responses_for_the_caller(assoc) -> None:
    """Put a DIMSE response that pynetdicom's reactor thread took back on the queue for the waiting send_*() call.

    pynetdicom (3.0) pauses its reactor around a send_*() call with a checkpoint, but a reactor already woken by the
    previous call's un-pause can pass the checkpoint after the next call cleared it, and then takes that call's
    response off the queue: it logs "Received unexpected C-STORE service message", drops it, and send_c_store()
    waits out the DIMSE timeout; the peer stored the instance, we retry it and it arrives twice. Back-to-back
    stores to a fast peer on a loaded CPU hit it (tests/test_restart.py: 1 run in 20 with a training run beside it).
    """
    serve = assoc._serve_request

    def serve_or_requeue(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_requeue


def _send_one(assoc, header: _Header, accepted: set[tuple[str, str]], msg_id: int = 1) -> SendResult:
    try:
        if (header.sop_class, header.transfer_syntax) in accepted:
            status = assoc.send_c_store(header.path, msg_id=msg_id)
        elif any(sop == header.sop_class and UID(ts) in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                 for sop, ts in accepted):
            ds = dcmread(header.path)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            ts = next(UID(t) for s, t in accepted if s == header.sop_class)
            ds.file_meta.TransferSyntaxUID = ts
            status = assoc.send_c_store(ds, msg_id=msg_id)
        else:
            return SendResult(header.path, header.sop_instance, None,
                              f"peer accepted no context for {header.sop_class} / {header.transfer_syntax}")
    except Exception as exc:
        return SendResult(header.path, header.sop_instance, None, f"send failed: {exc}")
    if not status or "Status" not in status:
        return SendResult(header.path, header.sop_instance, None, "no response (timeout or abort)")
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "")) or None
    return SendResult(header.path, header.sop_instance, code, None if code == 0 else comment)


def echo(destination: Destination, *, calling_ae: str = "DICOMNODE", timeout: float = 10) -> int | None:
    """C-ECHO; returns the DIMSE status, or None if no association could be made."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return None
    keep_responses_for_the_caller(assoc)
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()
