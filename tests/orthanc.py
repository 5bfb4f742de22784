"""A real Orthanc (Debian package) started by the test on loopback with its own config, driven by its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from netutil import free_port, stop_process, wait_for_port, wait_until

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


@dataclass
class Orthanc:
    aet: str
    dicom_port: int
    http_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes | dict | list | str, timeout: float = 120) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text else None

    def put(self, path: str, body: dict) -> None:
        request = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), method="PUT")
        urllib.request.urlopen(request, timeout=30).close()

    def download(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url(path), timeout=60) as response:
            return response.read()

    def upload(self, paths: list[Path]) -> list[str]:
        return [self.post("/instances", p.read_bytes())["ID"] for p in paths]

    def sop_instance_uids(self) -> set[str]:
        uids = set()
        for instance_id in self.get("/instances"):
            uids.add(self.get(f"/instances/{instance_id}/simplified-tags")["SOPInstanceUID"])
        return uids


@contextmanager
def orthanc(folder: Path, aet: str, modalities: dict[str, list]) -> Iterator[Orthanc]:
    """Start Orthanc with storage in ``folder``; ``modalities`` maps a name to [AET, host, port]."""
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(aet, free_port(), free_port())
    config = {
        "Name": aet, "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": server.http_port, "DicomPort": server.dicom_port, "DicomAet": aet,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
        "DicomServerEnabled": True, "DicomModalities": modalities, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True, "Plugins": [], "StableAge": 1, "ConcurrentJobs": 1,
        "DicomScuTimeout": 30, "HttpTimeout": 60,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(server.http_port, proc=proc, timeout=60)
        wait_until(lambda: _alive(server), 30, what="Orthanc REST API")
        yield server
    finally:
        stop_process(proc)
        log.close()


def _alive(server: Orthanc) -> bool:
    try:
        return "Version" in server.get("/system")
    except OSError:
        return False
