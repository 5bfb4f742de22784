"""Real peers for integration tests: free loopback ports, DCMTK storescp, the node in-process or as a process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK otherwise suffers Nagle delays on loopback


def dcmtk(tool: str) -> str:
    """The path of DCMTK's ``tool`` (storescp, storescu, echoscu). pynetdicom >= 3.0.4 installs Python apps of the
    same names into the virtual environment's bin, which comes first on PATH once the environment is activated;
    their options differ, so that folder is skipped."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin)
    found = shutil.which(tool, path=path)
    if found is None:
        raise RuntimeError(f"DCMTK's {tool} is not on PATH (Debian package dcmtk)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_until(predicate, timeout: float = 30, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def complete_files(folder: Path, count: int, settle: float = 0.3) -> list[Path] | None:
    """The ``count`` files in ``folder`` once each is fully written (storescp creates a file before it writes it: a
    test that stops storescp as soon as the file appears can cut it short), else None."""
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    if len(files) != count:
        return None
    sizes = [f.stat().st_size for f in files]
    time.sleep(settle)
    if 0 in sizes or sizes != [f.stat().st_size for f in files]:
        return None
    return files


@contextmanager
def storescp(folder: Path, ae_title: str = "TPS", port: int | None = None) -> Iterator[int]:
    """DCMTK storescp accepting every transfer syntax, one uniquely named file per received instance."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", ae_title, "+xa", "+uf", "-od", str(folder), str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        stop_process(proc)


def storescu(port: int, files: list[Path], calling: str = "TPS", called: str = "DICOMNODE",
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """DCMTK storescu; proposes each file's own transfer syntax (``-xs``-free defaults + ``--propose-*``)."""
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=300,
    )


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def node_process(config: Path, port: int) -> Iterator[subprocess.Popen]:
    """``dicom-node serve`` as a real process (so tests can SIGKILL it)."""
    log = open(config.with_suffix(".log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                            cwd=config.parent, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc=proc, timeout=60)
        yield proc
    finally:
        stop_process(proc)
        log.close()
