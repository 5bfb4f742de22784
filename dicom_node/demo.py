"""``dicom-node demo``: the node on embedded defaults, a local 'TPS', and a real CT pushed through it.

It shows the whole path a clinic sees: the planning system stores a CT series to the node, the node stores it
durably, recognises the series as complete, routes it by a rule to the built-in ``body`` pipeline and returns an
RTSTRUCT and a DICOM SEG to the planning system, auditing every step.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from config.node import Destination, NodeConfig, NodeSettings
from dicom_node.audit import verify_chain
from dicom_node.netopts import tune_connection
from dicom_node.runtime import Node
from dicom_node.sender import send_files
from pipeline.export import ct_series

log = logging.getLogger(__name__)

_SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "openkbp" / "validation"


DEMO_RULES = """\
rules:
  - name: demo external
    match: {Modality: CT, calling_ae: DEMO-TPS}
    run: [{pipeline: body}]
    output: [both]
    send: [reply]
"""


def demo_ct() -> tuple[np.ndarray, tuple[float, float, float], str]:
    """A real head-and-neck CT from ../shared/data when present, else a simple synthetic phantom."""
    cases = sorted(_SHARED_CT.glob("*.npz")) if _SHARED_CT.is_dir() else []
    if cases:
        with np.load(cases[0]) as data:
            return data["ct"], tuple(float(v) for v in data["spacing"]), f"OpenKBP {cases[0].stem}"
    z, y, x = np.mgrid[:64, :128, :128].astype(np.float32)
    body = ((x - 64) / 50) ** 2 + ((y - 64) / 40) ** 2 <= 1
    bone = ((x - 64) / 8) ** 2 + ((y - 88) / 8) ** 2 <= 1
    ct = np.full(body.shape, -1000, np.int16)
    ct[body] = 30
    ct[bone] = 700
    return ct, (3.0, 3.0, 3.0), "synthetic phantom"


def _start_tps(folder: Path) -> tuple[object, int, list[tuple[str, str]]]:
    """A minimal storage SCP standing in for the planning system; it records what it receives."""
    folder.mkdir(parents=True, exist_ok=True)
    received: list[tuple[str, str]] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        received.append((str(ds.Modality), str(ds.SOPInstanceUID)))
        return 0

    ae = AE(ae_title="DEMO-TPS")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, tune_connection)])
    return server, server.server_address[1], received


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(folder: Path, *, keep: bool, echo: Callable[[str], None]) -> int:
    folder = folder.resolve()
    tps_server, tps_port, received = _start_tps(folder / "tps")
    folder.mkdir(parents=True, exist_ok=True)
    rules = folder / "rules.yaml"
    rules.write_text(DEMO_RULES)
    config = NodeConfig(
        node=NodeSettings(host="127.0.0.1", port=_free_port(), storage=folder / "storage",
                          database=f"sqlite:///{folder / 'node.db'}", series_stable_seconds=2),
        accept=[{"ae_title": "DEMO-TPS", "host": "127.0.0.1"}],
        destinations={"tps": Destination(ae_title="DEMO-TPS", host="127.0.0.1", port=tps_port)},
        rules=rules,
    )
    node = Node(config, config_source="embedded demo defaults")
    node.start()
    try:
        ct, spacing, source = demo_ct()
        series = ct_series(ct, spacing, patient_id="DEMO", patient_name="Demo^Patient",
                           series_description="Demo planning CT")
        out = folder / "outgoing-demo-series"
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, ds in enumerate(series):
            paths.append(out / f"CT{i:04d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        echo(f"node DICOMNODE listening on 127.0.0.1:{node.port}; storage {config.node.storage}")
        echo(f"DEMO-TPS sends a {len(paths)}-slice CT ({source}) ...")
        started = time.monotonic()
        results = send_files(Destination(ae_title="DICOMNODE", host="127.0.0.1", port=node.port), paths,
                             calling_ae="DEMO-TPS")
        stored = sum(r.ok for r in results)
        echo(f"  node stored {stored}/{len(paths)} instances durably in {time.monotonic() - started:.1f} s")
        echo(f"waiting {config.node.series_stable_seconds:g} s of quiet for the series to complete; the rule "
             "'demo external' then runs the built-in 'body' pipeline ...")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(received) < 2:
            time.sleep(0.2)
        time.sleep(0.5)
        for job in node.store.job_rows():
            echo(f"  job {job['id']}: {job['pipeline']} {job['state']} {job['error'] or ''}")
        kinds = sorted(m for m, _ in received)
        echo(f"  DEMO-TPS received: {', '.join(kinds) or 'nothing'} in {folder / 'tps'}")
        records = list(node.store.audit_chain())
        events: dict[str, int] = {}
        for record in records:
            events[record["event"]] = events.get(record["event"], 0) + 1
        echo("audit: " + ", ".join(f"{k} x{v}" for k, v in events.items()))
        problems = verify_chain(records)
        echo(f"audit chain: {'OK' if not problems else 'BROKEN'} ({len(records)} records)")
        ok = kinds == ["RTSTRUCT", "SEG"] and not problems
        echo("demo OK" if ok else "demo FAILED")
        if keep and ok:
            echo(f"node keeps running on port {node.port} (Ctrl-C to stop); try: dicom-node status --config ...")
            while True:
                time.sleep(3600)
        return 0 if ok else 1
    finally:
        node.stop()
        tps_server.shutdown()
