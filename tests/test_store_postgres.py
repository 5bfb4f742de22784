"""The node on a real PostgreSQL database (SQLAlchemy URL): receive, complete, forward, audit chain."""

from __future__ import annotations

from collections import Counter

from dicom_node.audit import verify_chain
from dicomutil import sop_uid
from netutil import storescp, storescu, wait_until
from postgres import postgres


def test_node_on_postgresql(make_node, openkbp_series, tmp_path):
    out = tmp_path / "tps"
    with postgres() as url, storescp(out) as port:
        node = make_node(database=url, stable=0.5, forward=["tps"],
                         destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}})
        assert storescu(node.port, openkbp_series[:30]).returncode == 0
        assert storescu(node.port, openkbp_series[:5]).returncode == 0  # duplicates
        series_uid = next(iter(node.store.series_states()))
        wait_until(lambda: node.store.series_states()[series_uid] == "forwarded", 30, what="forwarded")
        assert node.store.series_info(series_uid)["instance_count"] == 30
        assert verify_chain(list(node.store.audit_chain())) == []
        assert len(node.store.audit_records(event="instance.duplicate")) == 5
        node.stop()
    assert Counter(sop_uid(p) for p in out.iterdir()) == Counter({sop_uid(p): 1 for p in openkbp_series[:30]})
