"""Forwarding through the durable outbox to a real DCMTK storescp: delivery, retries, give-up, requeue."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from dicomutil import dataset_bytes, sop_uid
from netutil import free_port, storescp, storescu, wait_until


def _received(folder: Path) -> Counter:
    return Counter(sop_uid(p) for p in folder.iterdir() if p.is_file()) if folder.exists() else Counter()


def _tps(port: int) -> dict:
    return {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}}


def test_complete_series_is_forwarded_byte_identical(make_node, openkbp_series, tmp_path):
    out = tmp_path / "tps"
    with storescp(out) as port:
        node = make_node(destinations=_tps(port), forward=["tps"], stable=1.0)
        assert storescu(node.port, openkbp_series).returncode == 0
        series_uid = next(iter(node.store.series_states()))
        wait_until(lambda: node.store.series_states()[series_uid] == "forwarded", 30, what="forwarded")
    received = {sop_uid(p): p for p in out.iterdir()}
    assert len(received) == 128 and _received(out).most_common(1)[0][1] == 1
    for path in openkbp_series:
        assert dataset_bytes(received[sop_uid(path)]) == dataset_bytes(path)
    events = [r["event"] for r in node.store.audit_records(series_uid=series_uid)]
    assert events.count("series.complete") == 1 and events.count("series.forwarded") == 1


def test_destination_down_retries_with_backoff_then_delivers(make_node, openkbp_series, tmp_path):
    port = free_port()  # nothing listens here yet
    node = make_node(destinations=_tps(port), forward=["tps"], stable=0.5,
                     outbox={"backoff_seconds": 0.3, "backoff_max_seconds": 1, "poll_seconds": 0.1,
                             "max_attempts": 100})
    assert storescu(node.port, openkbp_series[:5]).returncode == 0
    wait_until(lambda: node.store.status()["outbox"] and min(o["attempts"] for o in node.store.status()["outbox"])
               >= 2, 20, what="two failed attempts")
    outbox = node.store.status()["outbox"]
    assert len(outbox) == 5 and all(o["state"] in ("pending", "sending") for o in outbox)
    assert all("no association" in (o["last_error"] or "no association") for o in outbox)
    failures = node.store.audit_records(event="send.failure")
    assert failures and failures[0]["outcome"] == "retry"
    out = tmp_path / "tps"
    with storescp(out, port=port):
        series_uid = next(iter(node.store.series_states()))
        wait_until(lambda: node.store.series_states()[series_uid] == "forwarded", 20, what="delivery")
        time.sleep(0.5)  # nothing more may arrive
    assert _received(out) == Counter({sop_uid(p): 1 for p in openkbp_series[:5]})


def test_gives_up_after_max_attempts_and_retry_requeues(make_node, openkbp_series, tmp_path):
    port = free_port()
    node = make_node(destinations=_tps(port), forward=["tps"], stable=0.3,
                     outbox={"backoff_seconds": 0.1, "backoff_max_seconds": 0.2, "poll_seconds": 0.1,
                             "max_attempts": 2})
    assert storescu(node.port, openkbp_series[:3]).returncode == 0
    series_uid = wait_until(lambda: next(iter(node.store.series_states()), None), 5, what="series")
    wait_until(lambda: node.store.series_states()[series_uid] == "failed", 20, what="give up")
    outbox = node.store.status()["outbox"]
    assert [o["state"] for o in outbox] == ["failed"] * 3 and all(o["attempts"] == 2 for o in outbox)
    assert len(node.store.audit_records(event="send.failed")) == 3
    out = tmp_path / "tps"
    with storescp(out, port=port):
        assert node.store.requeue(series_uid=series_uid) == 3
        wait_until(lambda: node.store.series_states()[series_uid] == "forwarded", 20, what="delivery after retry")
    assert len(_received(out)) == 3


def test_peer_refusing_instances_is_recorded_per_instance(make_node, openkbp_series, tmp_path):
    """The destination is another node that does not accept us: association rejected, recorded per row."""
    other = make_node(accept=[{"ae_title": "SOMEONE"}])
    node = make_node(destinations={"tps": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": other.port}},
                     forward=["tps"], stable=0.3, database=f"sqlite:///{tmp_path}/second.db",
                     storage=tmp_path / "second", outbox={"backoff_seconds": 5, "poll_seconds": 0.1})
    assert storescu(node.port, openkbp_series[:2]).returncode == 0
    wait_until(lambda: any(o["attempts"] for o in node.store.status()["outbox"]), 10, what="an attempt")
    assert all("association rejected" in o["last_error"] for o in node.store.status()["outbox"])


def test_resent_series_after_forwarding_sends_only_what_changed(make_node, openkbp_series, tmp_path):
    out = tmp_path / "tps"
    with storescp(out) as port:
        node = make_node(destinations=_tps(port), forward=["tps"], stable=0.5)
        assert storescu(node.port, openkbp_series[:10]).returncode == 0
        series_uid = wait_until(lambda: next(iter(node.store.series_states()), None), 5, what="series")
        wait_until(lambda: node.store.series_states()[series_uid] == "forwarded", 20, what="first delivery")
        # the sender resends the whole series plus two more slices
        assert storescu(node.port, openkbp_series[:12]).returncode == 0
        wait_until(lambda: len(_received(out)) == 12 and node.store.series_states()[series_uid] == "forwarded",
                   20, what="second delivery")
        time.sleep(0.5)
    assert set(_received(out).values()) == {1}  # nothing was delivered twice
    assert len(node.store.audit_records(event="series.reopened")) == 1


def test_a_store_response_taken_by_the_reactor_goes_back_to_the_waiting_send(openkbp_series, tmp_path):
    """pynetdicom's reactor thread can poll a C-STORE response before send_c_store() waits for it and would drop
    it (send_c_store then blocks for the whole DIMSE timeout and the instance is sent twice); the sender puts it
    back. Here the reactor's step is made by hand on a real association to storescp."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node.sender import keep_responses_for_the_caller

    header = dcmread(openkbp_series[0], stop_before_pixels=True)
    with storescp(tmp_path / "tps") as port:
        ae = AE(ae_title="DICOMNODE")
        ae.add_requested_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="TPS")
        assert assoc.is_established
        try:
            keep_responses_for_the_caller(assoc)
            response = C_STORE()
            response.MessageIDBeingRespondedTo, response.Status = 1, 0x0000
            response.AffectedSOPClassUID, response.AffectedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
            assoc._serve_request(response, 1)  # what the reactor does with any message it polls
            assert assoc.dimse.get_msg(block=False) == (1, response)
            status = assoc.send_c_store(openkbp_series[0], msg_id=2)  # the association still works
            assert status.Status == 0x0000
        finally:
            assoc.release()
