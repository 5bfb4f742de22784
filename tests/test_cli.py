"""The operator commands against real peers: echo, send (files and folders), status, retry, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from netutil import free_port, storescp, wait_until

CLI = [sys.executable, "-m", "dicom_node.cli"]


def _run(*args: str, config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    extra = ["--config", str(config)] if config else []
    return subprocess.run([*CLI, *args, *extra], capture_output=True, text=True, timeout=timeout)


def _config(tmp_path: Path, tps_port: int) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(
        "node: {storage: ./storage, database: 'sqlite:///./node.db'}\n"
        f"destinations:\n  tps: {{ae_title: TPS, host: 127.0.0.1, port: {tps_port}}}\n")
    return path


def test_echo_and_send_by_name_and_by_address(openkbp_series, tmp_path):
    out = tmp_path / "tps"
    with storescp(out) as port:
        config = _config(tmp_path, port)
        assert "echo OK" in _run("echo", "tps", config=config).stdout
        assert _run("echo", f"TPS@127.0.0.1:{port}").returncode == 0
        folder = openkbp_series[0].parent
        result = _run("send", str(folder), "--to", "tps", config=config)
        assert result.returncode == 0 and "sent 128/128" in result.stdout
        result = _run("send", str(openkbp_series[0]), "--to", f"TPS@127.0.0.1:{port}")
        assert result.returncode == 0
    assert len(list(out.iterdir())) == 129


def test_echo_and_send_report_a_peer_that_is_down(openkbp_series, tmp_path):
    port = free_port()
    config = _config(tmp_path, port)
    echo = _run("echo", "tps", config=config)
    assert echo.returncode == 1 and "no association" in echo.stderr
    send = _run("send", str(openkbp_series[0]), "--to", "tps", config=config)
    assert send.returncode == 1 and "not sent" in send.stderr
    unknown = _run("send", str(openkbp_series[0]), "--to", "nowhere", config=config)
    assert unknown.returncode == 2 and "unknown destination 'nowhere'" in unknown.stderr


def test_status_and_retry_on_a_failed_send(make_node, openkbp_series, tmp_path):
    port = free_port()
    node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}},
                     forward=["tps"], stable=0.3,
                     outbox={"backoff_seconds": 0.1, "backoff_max_seconds": 0.1, "poll_seconds": 0.1,
                             "max_attempts": 1})
    from dicom_node.sender import send_files
    from config.node import Destination

    send_files(Destination(ae_title="DICOMNODE", host="127.0.0.1", port=node.port), openkbp_series[:2],
               calling_ae="TPS")
    wait_until(lambda: [o["state"] for o in node.store.status()["outbox"]] == ["failed", "failed"], 20,
               what="failed sends")
    config = tmp_path / "cli.yaml"
    config.write_text(f"node: {{database: '{node.config.node.database}', storage: {node.config.node.storage}}}\n")
    text = _run("status", config=config).stdout
    assert "failed" in text and "OUTBOX: 2 not delivered" in text and "no association" in text
    data = json.loads(_run("status", "--json", config=config).stdout)
    ids = [o["id"] for o in data["outbox"]]
    assert data["series"][0]["instance_count"] == 2
    assert _run("retry", config=config).returncode == 2  # says what to give
    with storescp(tmp_path / "tps", port=port):
        result = _run("retry", str(ids[0]), config=config)
        assert result.returncode == 0 and "requeued 1 send(s)" in result.stdout
        wait_until(lambda: len(list((tmp_path / "tps").iterdir())) == 1, 20, what="retried delivery")
        assert "requeued 1" in _run("retry", "--all-failed", config=config).stdout
        wait_until(lambda: node.store.series_states()[data["series"][0]["series_uid"]] == "forwarded", 20,
                   what="all delivered")
    assert [r["event"] for r in node.store.audit_records(event="send.requeued")] == ["send.requeued"] * 2


def test_demo_runs_end_to_end(tmp_path):
    result = _run("demo", "--folder", str(tmp_path / "demo"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout and "audit chain: OK" in result.stdout
