"""SIGKILL the node in the middle of a series while its destination is down: after a restart nothing is lost
and every instance reaches the destination exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

from dicomutil import sop_uid
from netutil import free_port, node_process, storescp, storescu, wait_until, write_config


def _status(config) -> dict:
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--json", "--config", str(config)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_sigkill_mid_series_and_destination_down(openkbp_series, tmp_path):
    node_port, tps_port = free_port(), free_port()
    config = write_config(tmp_path / "node.yaml", {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": node_port, "storage": "./storage",
                 "database": "sqlite:///./node.db", "series_stable_seconds": 2},
        "accept": [{"ae_title": "TPS"}],
        "destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}},
        "forward": ["tps"],
        "outbox": {"backoff_seconds": 0.5, "backoff_max_seconds": 1, "poll_seconds": 0.2, "max_attempts": 1000},
    })
    first, second = openkbp_series[:64], openkbp_series[64:]
    with node_process(config, node_port) as proc:
        assert storescu(node_port, first).returncode == 0
        proc.send_signal(signal.SIGKILL)  # mid-series: the rest has not arrived yet
        proc.wait()
    status = _status(config)
    assert status["series"][0]["state"] == "receiving" and status["series"][0]["instance_count"] == 64
    with node_process(config, node_port) as proc:
        assert storescu(node_port, second).returncode == 0
        # the series completes; the destination is down, so sends fail and wait for a retry
        wait_until(lambda: _status(config)["outbox"] and all(
            o["attempts"] >= 1 for o in _status(config)["outbox"]), 30, what="failed attempts")
        proc.send_signal(signal.SIGKILL)  # now with a full outbox and the destination still down
        proc.wait()
    status = _status(config)
    assert status["series"][0]["instance_count"] == 128 and len(status["outbox"]) == 128
    out = tmp_path / "tps"
    with storescp(out, port=tps_port), node_process(config, node_port):
        wait_until(lambda: _status(config)["series"][0]["state"] == "forwarded", 60, what="delivery")
        time.sleep(1)  # nothing further may arrive
    received = Counter(sop_uid(p) for p in out.iterdir())
    assert received == Counter({sop_uid(p): 1 for p in openkbp_series})
    verify = subprocess.run([sys.executable, "-m", "dicom_node.cli", "audit", "--config", str(config), "verify"],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_instances_missing_from_the_index_are_recovered_from_storage(make_node, openkbp_series, tmp_path):
    """A power loss may roll back the newest index rows (SQLite synchronous=NORMAL); the fsync'd files are the
    truth and are re-indexed at start-up, so the series still completes and is forwarded."""
    import sqlite3

    out = tmp_path / "tps"
    with storescp(out) as port:
        destinations = {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}}
        node = make_node(stable=30, destinations=destinations, forward=["tps"])
        assert storescu(node.port, openkbp_series[:15]).returncode == 0
        snapshot = tmp_path / "snapshot.db"
        with sqlite3.connect(tmp_path / "node.db") as live, sqlite3.connect(snapshot) as copy:
            live.backup(copy)
        assert storescu(node.port, openkbp_series[15:20]).returncode == 0
        node.stop()
        # power loss: the last 5 commits never reached the disk; the database is as it was after 15
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"node.db{suffix}").unlink(missing_ok=True)
        snapshot.rename(tmp_path / "node.db")
        lost = {sop_uid(p) for p in openkbp_series[15:20]}
        node = make_node(stable=0.5, destinations=destinations, forward=["tps"])
        series_uid = next(iter(node.store.series_states()))
        assert node.store.series_info(series_uid)["instance_count"] == 20
        recovered = [r for r in node.store.audit_records(event="instance.stored") if "recovered" in r["detail"]]
        assert {r["sop_instance_uid"] for r in recovered} == lost
        wait_until(lambda: node.store.series_states()[series_uid] == "forwarded", 20, what="forwarded")
    assert len(list(out.iterdir())) == 20
