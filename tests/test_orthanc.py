"""End to end with Orthanc as the PACS and as the TPS: PACS pushes a real CT to the node (C-STORE), the node
forwards the complete series to the TPS, and the TPS's REST API shows every instance."""

from __future__ import annotations

import pytest

from dicomutil import sop_uid
from netutil import wait_until
from orthanc import orthanc

pytestmark = pytest.mark.orthanc


def test_orthanc_pacs_to_node_to_orthanc_tps(make_node, openkbp_series, tmp_path):
    with orthanc(tmp_path / "tps", "TPS", {}) as tps:
        node = make_node(accept=[{"ae_title": "PACS", "host": "127.0.0.1"}],
                         destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.dicom_port}},
                         forward=["tps"], stable=1.0)
        with orthanc(tmp_path / "pacs", "PACS", {"node": ["DICOMNODE", "127.0.0.1", node.port]}) as pacs:
            ids = pacs.upload(openkbp_series)
            assert len(set(ids)) == 128
            study = pacs.get("/studies")
            assert len(study) == 1
            job = pacs.post("/modalities/node/store", {"Resources": study, "Synchronous": True}, timeout=300)
            assert job is not None
            series_uid = wait_until(lambda: next(iter(node.store.series_states()), None), 10, what="series")
            wait_until(lambda: node.store.series_states()[series_uid] == "forwarded", 60, what="forwarded")
        expected = {sop_uid(p) for p in openkbp_series}
        wait_until(lambda: len(tps.get("/instances")) == 128, 30, what="instances in TPS")
        assert tps.sop_instance_uids() == expected
    accepted = node.store.audit_records(event="association.accepted")
    assert accepted and accepted[0]["actor"].startswith("PACS@127.0.0.1")
