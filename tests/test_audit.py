"""The audit chain: appends link up; altering, deleting or reordering a record is detected (also by the CLI)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from dicom_node.audit import GENESIS, record_hash, verify_chain
from dicom_node.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path}/audit.db")
    for i in range(5):
        s.record("instance.stored", actor="TPS@127.0.0.1", series_uid="1.2.3", sop_instance_uid=f"1.2.3.{i}",
                 patient_id="P1", detail={"bytes": i})
    yield s
    s.close()


def test_chain_links_and_verifies(store):
    records = list(store.audit_chain())
    assert [r["id"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(records, records[1:]))
    assert verify_chain(records) == []


def test_altered_record_is_detected(store):
    records = list(store.audit_chain())
    records[2]["outcome"] = "failed"
    problems = verify_chain(records)
    assert [(p.record_id, p.reason) for p in problems] == [(3, "content altered: hash does not match")]


def test_deleted_record_is_detected(store):
    records = list(store.audit_chain())
    del records[1]
    assert {p.record_id for p in verify_chain(records)} == {3}


def test_rehashing_one_record_breaks_the_next_link(store):
    records = list(store.audit_chain())
    records[1]["detail"] = '{"bytes": 99}'
    records[1]["hash"] = record_hash(records[1]["prev_hash"], records[1])
    problems = verify_chain(records)
    assert [(p.record_id, p.reason) for p in problems] == [(3, "prev_hash does not match the previous record")]


def test_cli_verify_detects_tampering_in_the_database(store, tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text(f"node: {{database: 'sqlite:///{tmp_path}/audit.db', storage: {tmp_path}/s}}\n")
    cli = [sys.executable, "-m", "dicom_node.cli", "audit", "--config", str(config)]
    ok = subprocess.run(cli + ["verify"], capture_output=True, text=True)
    assert ok.returncode == 0 and "audit chain OK: 5 records" in ok.stdout
    with sqlite3.connect(tmp_path / "audit.db") as db:
        db.execute("UPDATE audit SET patient_id = 'SOMEONE-ELSE' WHERE id = 4")
    bad = subprocess.run(cli + ["verify"], capture_output=True, text=True)
    assert bad.returncode == 1 and "record 4: content altered" in bad.stderr


def test_cli_reads_back_with_filters(store, tmp_path):
    import json

    config = tmp_path / "node.yaml"
    config.write_text(f"node: {{database: 'sqlite:///{tmp_path}/audit.db', storage: {tmp_path}/s}}\n")
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "audit", "--config", str(config),
                          "--series", "1.2.3", "--event", "instance.*", "--limit", "2", "--json"],
                         capture_output=True, text=True, check=True)
    records = json.loads(out.stdout)
    assert [r["id"] for r in records] == [4, 5] and records[0]["patient_id"] == "P1"
    future = subprocess.run([sys.executable, "-m", "dicom_node.cli", "audit", "--config", str(config),
                             "--since", "2999-01-01", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(future.stdout) == []
