"""The storage folder: received instances written atomically, under paths built only from validated UIDs.

Layout::

    STORAGE/instances/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm
    STORAGE/outgoing/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   RTSTRUCT / SEG the node produced
    STORAGE/quarantine/<UTC time>-<random>.dcm  (+ .json with the reason)
    STORAGE/tmp/                                  (same file system, so rename is atomic)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

from dicom_node import StorageError

__all__ = ["Spool", "is_valid_uid"]

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, components without leading zeros, at most 64 characters (PS3.5 9.1)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.match(value) is not None


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.instances = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.tmp = self.root / "tmp"
        for folder in (self.instances, self.quarantine_dir, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._sweep_tmp()

    def _sweep_tmp(self) -> None:
        # Leftovers of writes interrupted by a crash: never indexed, never acknowledged, safe to drop.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """Relative path for an instance; raises ValueError unless all three are valid UIDs."""
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                          ("SOPInstanceUID", sop_instance_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"{name} is not a valid UID: {str(uid)[:80]!r}")
        return f"instances/{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def output_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """Relative path for an object the node produced (RTSTRUCT, SEG)."""
        return "outgoing/" + self.instance_path(study_uid, series_uid, sop_instance_uid).removeprefix("instances/")

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"path escapes the storage folder: {relative!r}")
        return path

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).exists()

    def write_atomic(self, relative: str, *parts: bytes | memoryview) -> None:
        """Write ``parts`` (concatenated) to a temporary file, fsync it, rename it into place, fsync the folder.

        On any OS error nothing is left behind and :class:`StorageError` is raised.
        """
        target = self.absolute(relative)
        tmp = self.tmp / f"{secrets.token_hex(8)}.part"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                views = [memoryview(p) for p in parts]
                while views:  # writev: no concatenated copy of a large data set
                    written = os.writev(fd, views)
                    while views and written >= len(views[0]):
                        written -= len(views[0])
                        views.pop(0)
                    if views:
                        views[0] = views[0][written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {relative}: {exc.strerror or exc}") from exc

    def series_folders_changed_since(self, cutoff: float | None) -> list[Path]:
        """Series folders (``instances/<study>/<series>``) whose entries changed at or after ``cutoff``."""
        found = []
        for study in self.instances.iterdir():
            for series in study.iterdir() if study.is_dir() else ():
                if series.is_dir() and (cutoff is None or series.stat().st_mtime >= cutoff):
                    found.append(series)
        return found

    def quarantine(self, data: bytes | memoryview, reason: str, context: dict[str, str]) -> Path | None:
        """Keep an unstorable dataset for inspection; returns its path, or None if even that failed."""
        stem = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
        path = self.quarantine_dir / f"{stem}.dcm"
        try:
            path.write_bytes(bytes(data))
            (self.quarantine_dir / f"{stem}.json").write_text(json.dumps({"reason": reason, **context}, indent=1))
        except OSError:
            path.unlink(missing_ok=True)
            return None
        return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
