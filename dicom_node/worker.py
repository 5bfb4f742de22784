"""The pipeline job worker: claims queued jobs, runs the pipeline on the stored series, writes RTSTRUCT/SEG
outputs to the storage folder and queues them for sending, all recorded and audited.

Jobs run in a small thread pool, never in an association thread. Input problems (the series is not a volume,
a structure does not fit) reject the job at once; anything else is retried ``workers.max_attempts`` times.
The job row is the whole state, so a later issue can hand jobs to a distributed queue instead of this pool.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

from config.node import WorkerSettings
from dicom_node.spool import Spool
from dicom_node.studies import find_prior, structure_sets_for
from dicom_node.store import JobRow, Store
from models.threads import set_thread_count
from pipeline.base import PriorStudy, load_pipeline, load_prior, run_pipeline, validate_params
from pipeline.errors import PipelineParamsError, SeriesError, StructureError, UnknownPipelineError
from pipeline.rtstruct import build_rtstruct
from pipeline.seg import build_seg

__all__ = ["Worker", "encode", "structure_sets_for"]

log = logging.getLogger(__name__)

# Errors that say the input (or the rule) cannot work: retrying would give the same answer.
NOT_RETRIED = (SeriesError, StructureError, UnknownPipelineError, PipelineParamsError)
JOB_LEASE_SECONDS = 3600


def encode(ds: Dataset) -> bytes:
    """A built dataset as DICOM file bytes (Explicit VR Little Endian unless the builder chose otherwise)."""
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class Worker:
    def __init__(self, settings: WorkerSettings, store: Store, spool: Spool):
        self.settings = settings
        self.store = store
        self.spool = spool
        self._pool = ThreadPoolExecutor(settings.count, thread_name_prefix="job")
        self._running = 0
        self._lock = threading.Lock()

    def poll(self) -> int:
        """Claim as many due jobs as there are free workers; returns how many were started."""
        with self._lock:
            free = self.settings.count - self._running
            if free <= 0:
                return 0
            claimed = self.store.claim_jobs(time.time(), JOB_LEASE_SECONDS, free)
            self._running += len(claimed)
        for job in claimed:
            self._pool.submit(self._run_guarded, job)
        return len(claimed)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run_guarded(self, job: JobRow) -> None:
        try:
            self.run(job)
        except Exception:  # the job row stays leased; it is reclaimed when the lease runs out
            log.exception("job %d could not be recorded", job.id)
        finally:
            with self._lock:
                self._running -= 1

    def run(self, job: JobRow) -> str:
        """Run one claimed job to its recorded end state."""
        set_thread_count(self.settings.threads)
        started = time.monotonic()
        try:
            datasets = self._load_series(job.series_uid)
            pipeline = load_pipeline(job.pipeline)
            first = datasets[0]
            seeds = structure_sets_for(self.store, self.spool, str(first.get("PatientID", "")), job.series_uid,
                                       str(first.get("FrameOfReferenceUID", "")))
            prior = self._prior(job.series_uid, first) \
                if validate_params(pipeline, job.params).needs_prior_study() else None
            structure_set = run_pipeline(pipeline, datasets, job.params, structure_sets=seeds, prior=prior)
            outputs = [self._write(built) for built in self._build(job, datasets, structure_set)]
        except NOT_RETRIED as exc:
            log.warning("job %d rejected: %s", job.id, exc)
            return self.store.finish_job(job, error=f"{type(exc).__name__}: {exc}", rejected=True)
        except Exception as exc:
            log.error("job %d failed (attempt %d): %s", job.id, job.attempts, exc)
            retry = job.attempts < self.settings.max_attempts
            detail = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-3:])
            return self.store.finish_job(
                job, error=detail[-2000:],
                retry_at=time.time() + self.settings.retry_seconds if retry else None)
        result: dict[str, Any] = {
            "structures": structure_set.names(), "seconds": round(time.monotonic() - started, 2),
            "pipeline_version": pipeline.version, "formats": job.formats,
        }
        if structure_set.notes:  # what the pipeline reports beside the contours (stops, skipped seed ROIs)
            result["notes"] = dict(structure_set.notes)
        log.info("job %d done: %s on %d images -> %s in %.1fs", job.id, job.pipeline, len(datasets),
                 ", ".join(job.formats), result["seconds"])
        return self.store.finish_job(job, outputs=outputs, result=result)

    def _load_series(self, series_uid: str) -> list[Dataset]:
        rows = self.store.series_instances(series_uid)
        if not rows:
            raise SeriesError(f"no stored instances for series {series_uid}")
        return [dcmread(self.spool.absolute(r["path"])) for r in rows]

    def _prior(self, series_uid: str, first: Dataset) -> PriorStudy | None:
        found = find_prior(self.store, self.spool, self.store.series_info(series_uid) or {}, first)
        return None if found is None else load_prior(*found)

    @staticmethod
    def _build(job: JobRow, datasets: list[Dataset], structure_set: Any) -> list[Dataset]:
        built = []
        if "rtstruct" in job.formats:
            built.append(build_rtstruct(datasets, structure_set))
        if "seg" in job.formats:
            built.append(build_seg(datasets, structure_set))
        return built

    def _write(self, ds: Dataset) -> dict[str, Any]:
        data = encode(ds)
        relative = self.spool.output_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                          str(ds.SOPInstanceUID))
        self.spool.write_atomic(relative, data)
        return {"series_uid": str(ds.SeriesInstanceUID), "sop_instance_uid": str(ds.SOPInstanceUID),
                "sha256": hashlib.sha256(data).hexdigest(), "path": relative}
