"""A real PostgreSQL server for tests, started in a temporary folder on a free loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from netutil import free_port, wait_for_port


def _as_postgres_user() -> list[str]:
    # The server refuses to run as root; drop to 'nobody' when we are root.
    return ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []


def _binary(name: str) -> str | None:
    """On PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(candidates[-1]) if candidates else None
    return found


@contextmanager
def postgres() -> Iterator[str]:
    """Yield an SQLAlchemy URL of a fresh database on a private PostgreSQL server."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Its own folder directly under /tmp: pytest's tmp folders are private to root, and the server is not root.
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    data, port = folder / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
    user = _as_postgres_user()
    subprocess.run([*user, initdb, "-D", str(data), "-U", "node", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*user, pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=on", "start"],
                   check=True, capture_output=True)
    try:
        wait_for_port(port)
        yield f"postgresql+psycopg://node@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
