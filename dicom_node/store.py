"""The node's state in a real database (SQLite by default, PostgreSQL by URL): instances, series, outbox, audit.

Everything the node knows lives here or in the storage folder, so a restart loses nothing: series still
``receiving`` are completed by the sweep, ``sending`` rows whose lease ran out are sent again.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column, Connection, Float, Index, Integer, MetaData, String, Table, Text, UniqueConstraint, bindparam,
    create_engine, event, func, insert, select, update,
)
from sqlalchemy.engine import Engine

from dicom_node.audit import GENESIS, Event, record_hash

__all__ = ["Store", "SeriesState", "SendState", "JobState", "InstanceRecord", "OutboxRow", "JobRow", "utc_iso"]

metadata = MetaData()

instances = Table(
    "instances", metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("series_uid", String(64), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax", String(64), nullable=False),
    Column("path", Text, nullable=False),  # relative to the storage folder
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("calling_ae", String(16)),
)

series = Table(
    "series", metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("patient_id", String(64)),
    Column("modality", String(16)),
    Column("state", String(24), nullable=False, index=True),
    Column("instance_count", Integer, nullable=False),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("completed_at", Float),
    Column("calling_ae", String(16)),
    Column("called_ae", String(16)),
    Column("peer_host", String(64)),
    Column("detail", Text),
)

outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_uid", String(64), index=True),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("destination", String(64), nullable=False),
    Column("dest_ae", String(16), nullable=False),
    Column("dest_host", String(255), nullable=False),
    Column("dest_port", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_until", Float),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float),
    UniqueConstraint("destination", "sop_instance_uid", "sha256", name="uq_outbox_send_once"),
    Index("ix_outbox_due", "state", "next_attempt_at"),
)

audit_log = Table(
    "audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("ts", String(32), nullable=False, index=True),
    Column("event", String(48), nullable=False, index=True),
    Column("actor", Text),
    Column("study_uid", String(64)),
    Column("series_uid", String(64), index=True),
    Column("sop_instance_uid", String(64)),
    Column("patient_id", String(64)),
    Column("outcome", String(16), nullable=False),
    Column("detail", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(64), nullable=False, unique=True),
    Column("series_uid", String(64), nullable=False, index=True),
    Column("rule", String(64), nullable=False),
    Column("pipeline", String(64), nullable=False),
    Column("params", Text, nullable=False),  # JSON
    Column("formats", Text, nullable=False),  # JSON list: rtstruct, seg
    Column("send", Text, nullable=False),  # JSON list of [name, ae, host, port]
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_until", Float),
    Column("error", Text),
    Column("result", Text),  # JSON: structures and outputs
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
)

# One row holding the chain's head; locking it serialises appends across processes and databases.
audit_head = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True),
    Column("last_id", Integer, nullable=False),
    Column("last_hash", String(64), nullable=False),
)


# Statements on the per-instance hot path, built once (parameters are bound per execution).
_HEAD_FOR_UPDATE = select(audit_head.c.last_id, audit_head.c.last_hash).where(audit_head.c.id == 1).with_for_update()
_INSERT_AUDIT = insert(audit_log)
_UPDATE_HEAD = update(audit_head).where(audit_head.c.id == 1)
_INSERT_INSTANCE = insert(instances)
_INSTANCE_BY_UID = select(instances.c.sha256, instances.c.series_uid).where(
    instances.c.sop_instance_uid == bindparam("uid"))
_SERIES_STATE = select(series.c.state).where(series.c.series_uid == bindparam("uid"))
_TOUCH_SERIES = update(series).where(series.c.series_uid == bindparam("uid")).values(
    state="receiving", last_received_at=bindparam("now"),
    calling_ae=bindparam("calling_ae"), called_ae=bindparam("called_ae"), peer_host=bindparam("peer_host"),
    instance_count=series.c.instance_count + bindparam("added"))


class SeriesState:
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FORWARDING = "forwarding"
    FORWARDED = "forwarded"
    FAILED = "failed"


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # gave up after bounded retries (pipeline or model error)
    REJECTED = "rejected"  # the input cannot be processed (not a volume, bad seed ...): not retried


class SendState:
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    transfer_syntax: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class OutboxRow:
    id: int
    series_uid: str | None
    sop_instance_uid: str
    path: str
    destination: str
    dest_ae: str
    dest_host: str
    dest_port: int
    attempts: int


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    rule: str
    pipeline: str
    params: dict[str, Any]
    formats: list[str]
    send: list[tuple[str, str, str, int]]
    attempts: int


def utc_iso(epoch: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(time.time() if epoch is None else epoch, dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the 'begin' hook below issue BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process; after a power loss the last commits
        # may roll back, and Node.start re-indexes from the storage folder (files are fsync'd before any reply).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front, so concurrent writers queue instead of failing mid-way.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Store:
    """Thin access layer over the node's tables. Methods are transactions; nothing here touches files."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = _sqlite_engine(url) if self.is_sqlite else create_engine(url, pool_pre_ping=True)
        # SQLite has one writer at a time anyway; queueing in-process avoids busy-waiting on its file lock.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        metadata.create_all(self.engine)
        with self.transaction() as conn:
            if conn.execute(select(audit_head.c.id)).first() is None:
                conn.execute(insert(audit_head).values(id=1, last_id=0, last_hash=GENESIS))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    # --- audit -------------------------------------------------------------------------------------------

    def audit(self, conn: Connection, event_type: str, outcome: str = "ok", **fields: Any) -> None:
        """Append one audit record inside the caller's transaction."""
        head = conn.execute(_HEAD_FOR_UPDATE).one()
        detail = fields.pop("detail", None)
        record = {
            "ts": utc_iso(),
            "event": event_type,
            "actor": fields.pop("actor", None),
            "study_uid": fields.pop("study_uid", None),
            "series_uid": fields.pop("series_uid", None),
            "sop_instance_uid": fields.pop("sop_instance_uid", None),
            "patient_id": fields.pop("patient_id", None),
            "outcome": outcome,
            "detail": json.dumps(detail, sort_keys=True, default=str) if detail is not None else None,
        }
        if fields:
            raise TypeError(f"unknown audit fields: {sorted(fields)}")
        digest = record_hash(head.last_hash, record)
        new_id = head.last_id + 1
        conn.execute(_INSERT_AUDIT, {"id": new_id, "prev_hash": head.last_hash, "hash": digest, **record})
        conn.execute(_UPDATE_HEAD, {"last_id": new_id, "last_hash": digest})

    def record(self, event_type: str, outcome: str = "ok", **fields: Any) -> None:
        """Append one audit record in its own transaction."""
        with self.transaction() as conn:
            self.audit(conn, event_type, outcome, **fields)

    def audit_records(
        self, *, since: str | None = None, series_uid: str | None = None, event: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        query = select(audit_log).order_by(audit_log.c.id)
        if since:
            query = query.where(audit_log.c.ts >= since)
        if series_uid:
            query = query.where(audit_log.c.series_uid == series_uid)
        if event:
            query = query.where(audit_log.c.event.like(event.replace("*", "%")))
        if limit:
            query = query.order_by(None).order_by(audit_log.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = [dict(row._mapping) for row in conn.execute(query)]
        return sorted(rows, key=lambda r: r["id"])

    def audit_chain(self) -> Iterator[dict[str, Any]]:
        with self.engine.connect() as conn:
            for row in conn.execute(select(audit_log).order_by(audit_log.c.id)).yield_per(1000):
                yield dict(row._mapping)

    # --- receiving ---------------------------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(instances).where(instances.c.sop_instance_uid == sop_instance_uid)).first()
        return dict(row._mapping) if row else None

    def latest_received_at(self) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(instances.c.received_at))).scalar_one_or_none()

    def indexed_paths(self, series_uid: str) -> set[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(instances.c.path).where(instances.c.series_uid == series_uid))
            return {r.path for r in rows}

    def record_instance(
        self, rec: InstanceRecord, *, calling_ae: str, called_ae: str, peer_host: str, now: float | None = None,
        recovered: bool = False,
    ) -> str:
        """Index a durably written instance and its series, audited, in one transaction.

        Returns ``"stored"`` (new), ``"replaced"`` (same SOP Instance UID, other content) or ``"duplicate"``.
        """
        now = time.time() if now is None else now
        actor = f"{calling_ae}@{peer_host}"
        subject = dict(study_uid=rec.study_uid, series_uid=rec.series_uid, sop_instance_uid=rec.sop_instance_uid,
                       patient_id=rec.patient_id)
        with self.transaction() as conn:
            old = conn.execute(_INSTANCE_BY_UID, {"uid": rec.sop_instance_uid}).first()
            if old is not None and old.sha256 == rec.sha256 and old.series_uid == rec.series_uid:
                self.audit(conn, Event.INSTANCE_DUPLICATE, actor=actor, **subject)
                return "duplicate"
            values = dict(
                series_uid=rec.series_uid, study_uid=rec.study_uid, sop_class_uid=rec.sop_class_uid,
                transfer_syntax=rec.transfer_syntax, path=rec.path, size=rec.size, sha256=rec.sha256,
                received_at=now, calling_ae=calling_ae,
            )
            if old is None:
                conn.execute(_INSERT_INSTANCE, {"sop_instance_uid": rec.sop_instance_uid, **values})
            else:
                conn.execute(
                    update(instances).where(instances.c.sop_instance_uid == rec.sop_instance_uid).values(**values)
                )
            self._touch_series(conn, rec, now, calling_ae, called_ae, peer_host, actor, is_new=old is None)
            if old is not None and old.series_uid != rec.series_uid:
                self._recount(conn, old.series_uid)
            outcome = "stored" if old is None else "replaced"
            self.audit(conn, Event.INSTANCE_STORED, actor=actor, detail={
                "sop_class": rec.sop_class_uid, "transfer_syntax": rec.transfer_syntax, "bytes": rec.size,
                "replaced": old is not None, **({"recovered_from_storage": True} if recovered else {}),
            }, **subject)
            return outcome

    def _touch_series(
        self, conn: Connection, rec: InstanceRecord, now: float, calling_ae: str, called_ae: str, peer_host: str,
        actor: str, *, is_new: bool,
    ) -> None:
        row = conn.execute(_SERIES_STATE, {"uid": rec.series_uid}).first()
        if row is None:
            conn.execute(insert(series).values(
                series_uid=rec.series_uid, study_uid=rec.study_uid, patient_id=rec.patient_id,
                modality=rec.modality, state=SeriesState.RECEIVING, instance_count=1, first_received_at=now,
                last_received_at=now, calling_ae=calling_ae, called_ae=called_ae, peer_host=peer_host,
            ))
            return
        if row.state != SeriesState.RECEIVING:
            # More data for a series we considered complete: wait for quiet again, then process what is new.
            self.audit(conn, Event.SERIES_REOPENED, actor=actor, study_uid=rec.study_uid,
                       series_uid=rec.series_uid, patient_id=rec.patient_id, detail={"was": row.state})
        conn.execute(_TOUCH_SERIES, {"uid": rec.series_uid, "now": now, "calling_ae": calling_ae,
                                     "called_ae": called_ae, "peer_host": peer_host, "added": int(is_new)})
        if not is_new:  # a replaced instance may have moved between series: count from the index
            self._recount(conn, rec.series_uid)

    @staticmethod
    def _recount(conn: Connection, series_uid: str) -> None:
        count = select(func.count()).where(instances.c.series_uid == series_uid).scalar_subquery()
        conn.execute(update(series).where(series.c.series_uid == series_uid).values(instance_count=count))

    # --- series completion -------------------------------------------------------------------------------

    def quiet_series(self, older_than: float) -> list[str]:
        """Series still receiving whose last instance arrived before ``older_than``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(series.c.series_uid)
                .where(series.c.state == SeriesState.RECEIVING, series.c.last_received_at < older_than)
                .order_by(series.c.last_received_at)
            )
            return [r.series_uid for r in rows]

    def series_members(self, series_uid: str) -> list[tuple[str, str]]:
        """(SOP Instance UID, sha256) of every instance of a series, sorted."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(instances.c.sop_instance_uid, instances.c.sha256)
                                .where(instances.c.series_uid == series_uid))
            return sorted((r.sop_instance_uid, r.sha256) for r in rows)

    def has_structure_set(self, patient_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(series.c.series_uid).where(
                series.c.patient_id == patient_id, series.c.modality == "RTSTRUCT").limit(1)).first() is not None

    def patient_series(self, patient_id: str, modality: str | None = None) -> list[dict[str, Any]]:
        """Every series of the patient with that modality (any modality: None; any state), oldest received first."""
        with self.engine.connect() as conn:
            query = select(series).where(series.c.patient_id == patient_id)
            if modality is not None:
                query = query.where(series.c.modality == modality)
            rows = conn.execute(query.order_by(series.c.first_received_at))
            return [dict(r._mapping) for r in rows]

    def structure_set_paths(self, patient_id: str) -> list[str]:
        """Storage paths of every RTSTRUCT instance held for the patient, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(instances.c.path).join(series, series.c.series_uid == instances.c.series_uid)
                .where(series.c.patient_id == patient_id, series.c.modality == "RTSTRUCT")
                .order_by(instances.c.received_at))
            return [r.path for r in rows]

    def complete_series(
        self, series_uid: str, older_than: float, destinations: Sequence[tuple[str, str, str, int]],
        now: float | None = None, *, new_jobs: Sequence[dict[str, Any]] = (), routing: dict[str, Any] | None = None,
    ) -> bool:
        """Mark a quiet series complete and queue its instances for each (name, ae, host, port) destination.

        Returns False if the series received something new meanwhile (it stays ``receiving``). Instances already
        queued for a destination with the same content are not queued again, so a resent series sends only what
        changed.
        """
        now = time.time() if now is None else now
        with self.transaction() as conn:
            info = conn.execute(select(series).where(series.c.series_uid == series_uid)).first()
            if info is None or info.state != SeriesState.RECEIVING or info.last_received_at >= older_than:
                return False
            members = conn.execute(
                select(instances.c.sop_instance_uid, instances.c.sha256, instances.c.path)
                .where(instances.c.series_uid == series_uid)
            ).all()
            queued = 0
            for name, ae, host, port in destinations:
                done = {
                    (r.sop_instance_uid, r.sha256)
                    for r in conn.execute(
                        select(outbox.c.sop_instance_uid, outbox.c.sha256)
                        .where(outbox.c.series_uid == series_uid, outbox.c.destination == name)
                    )
                }
                rows = [
                    dict(series_uid=series_uid, sop_instance_uid=m.sop_instance_uid, sha256=m.sha256, path=m.path,
                         destination=name, dest_ae=ae, dest_host=host, dest_port=port, state=SendState.PENDING,
                         attempts=0, next_attempt_at=now, created_at=now)
                    for m in members if (m.sop_instance_uid, m.sha256) not in done
                ]
                if rows:
                    conn.execute(insert(outbox), rows)
                    queued += len(rows)
            state = SeriesState.FORWARDING if queued else SeriesState.COMPLETE
            conn.execute(update(series).where(series.c.series_uid == series_uid).values(
                state=state, completed_at=now,
            ))
            created = self._insert_jobs(conn, new_jobs, now)
            self.audit(conn, Event.SERIES_COMPLETE, actor=info.calling_ae, study_uid=info.study_uid,
                       series_uid=series_uid, patient_id=info.patient_id,
                       detail={"instances": len(members), "queued_sends": queued,
                               "destinations": [d[0] for d in destinations], "jobs": created,
                               **(routing or {})})
            return True

    def add_jobs(self, series_uid: str, new_jobs: Sequence[dict[str, Any]], reason: dict[str, Any],
                 now: float | None = None) -> list[int]:
        """Queue jobs for a series routed earlier (jobs already held, by idempotency key, are not queued again);
        a ``series.rerouted`` record says why when any is new. Returns the new job ids."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            info = conn.execute(select(series).where(series.c.series_uid == series_uid)).first()
            created = self._insert_jobs(conn, new_jobs, now)
            if created and info is not None:
                self.audit(conn, Event.SERIES_REROUTED, actor="node", study_uid=info.study_uid, series_uid=series_uid,
                           patient_id=info.patient_id, detail={"jobs": created, **reason})
            return created

    def _insert_jobs(self, conn: Connection, new_jobs: Sequence[dict[str, Any]], now: float) -> list[int]:
        created = []
        for job in new_jobs:
            exists = conn.execute(select(jobs.c.id).where(jobs.c.idempotency_key == job["idempotency_key"])).first()
            if exists is not None:  # the same series content with the same rule: nothing new to compute
                continue
            result = conn.execute(insert(jobs).values(
                idempotency_key=job["idempotency_key"], series_uid=job["series_uid"], rule=job["rule"],
                pipeline=job["pipeline"], params=json.dumps(job["params"], sort_keys=True),
                formats=json.dumps(job["formats"]), send=json.dumps(job["send"]), state=JobState.QUEUED,
                attempts=0, next_attempt_at=now, created_at=now))
            created.append(result.inserted_primary_key[0])
            self.audit(conn, Event.JOB_QUEUED, series_uid=job["series_uid"], detail={
                "job": created[-1], "rule": job["rule"], "pipeline": job["pipeline"]})
        return created

    # --- jobs --------------------------------------------------------------------------------------------

    def claim_jobs(self, now: float, lease_seconds: float, limit: int) -> list[JobRow]:
        with self.transaction() as conn:
            due = ((jobs.c.state == JobState.QUEUED) & (jobs.c.next_attempt_at <= now)) | (
                (jobs.c.state == JobState.RUNNING) & (jobs.c.lease_until < now))
            rows = conn.execute(select(jobs).where(due).order_by(jobs.c.id).limit(limit)
                                .with_for_update(skip_locked=True)).all()
            if rows:
                conn.execute(update(jobs).where(jobs.c.id.in_([r.id for r in rows])).values(
                    state=JobState.RUNNING, lease_until=now + lease_seconds, attempts=jobs.c.attempts + 1))
                for r in rows:
                    self.audit(conn, Event.JOB_STARTED, series_uid=r.series_uid, detail={
                        "job": r.id, "rule": r.rule, "pipeline": r.pipeline, "attempt": r.attempts + 1})
        return [JobRow(r.id, r.series_uid, r.rule, r.pipeline, json.loads(r.params), json.loads(r.formats),
                       [tuple(d) for d in json.loads(r.send)], r.attempts + 1) for r in rows]

    def release_job_leases(self) -> int:
        """At start-up: jobs that were running when this node died are queued again."""
        with self.transaction() as conn:
            result = conn.execute(update(jobs).where(jobs.c.state == JobState.RUNNING).values(
                state=JobState.QUEUED, lease_until=None, next_attempt_at=time.time()))
            return result.rowcount or 0

    def finish_job(
        self, job: JobRow, *, outputs: Sequence[dict[str, Any]] = (), result: dict[str, Any] | None = None,
        error: str | None = None, rejected: bool = False, retry_at: float | None = None,
        now: float | None = None,
    ) -> str:
        """Record a job's end: done (queue its outputs to every send target), rejected, retried or failed."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            if error is None:
                state = JobState.DONE
            elif rejected:
                state = JobState.REJECTED
            else:
                state = JobState.QUEUED if retry_at is not None else JobState.FAILED
            conn.execute(update(jobs).where(jobs.c.id == job.id).values(
                state=state, lease_until=None, error=error, result=json.dumps(result) if result else None,
                next_attempt_at=retry_at or now, finished_at=now if state != JobState.QUEUED else None))
            rows = [dict(series_uid=o["series_uid"], sop_instance_uid=o["sop_instance_uid"], sha256=o["sha256"],
                         path=o["path"], destination=name, dest_ae=ae, dest_host=host, dest_port=port,
                         state=SendState.PENDING, attempts=0, next_attempt_at=now, created_at=now)
                    for o in outputs for name, ae, host, port in job.send]
            if rows:
                conn.execute(insert(outbox), rows)
            event = {JobState.DONE: Event.JOB_DONE, JobState.REJECTED: Event.JOB_REJECTED,
                     JobState.QUEUED: Event.JOB_RETRY, JobState.FAILED: Event.JOB_FAILED}[state]
            outcome = {JobState.DONE: "ok", JobState.QUEUED: "retry"}.get(state, "failed")
            self.audit(conn, event, outcome, series_uid=job.series_uid, detail={
                "job": job.id, "rule": job.rule, "pipeline": job.pipeline, "attempt": job.attempts,
                "error": error, "outputs": [o["sop_instance_uid"] for o in outputs],
                "send": [d[0] for d in job.send], **(result or {})})
            return state

    def job_rows(self, limit: int = 500) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(jobs).order_by(jobs.c.id.desc()).limit(limit))]

    def series_states(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {r.series_uid: r.state for r in conn.execute(select(series.c.series_uid, series.c.state))}

    # --- outbox ------------------------------------------------------------------------------------------

    def claim_due_sends(self, now: float, lease_seconds: float, limit: int = 500) -> list[OutboxRow]:
        """Lease pending sends that are due, and sends whose lease ran out (their sender died)."""
        with self.transaction() as conn:
            due = (
                (outbox.c.state == SendState.PENDING) & (outbox.c.next_attempt_at <= now)
            ) | ((outbox.c.state == SendState.SENDING) & (outbox.c.lease_until < now))
            rows = conn.execute(
                select(outbox).where(due).order_by(outbox.c.id).limit(limit).with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            conn.execute(update(outbox).where(outbox.c.id.in_([r.id for r in rows])).values(
                state=SendState.SENDING, lease_until=now + lease_seconds,
            ))
        return [
            OutboxRow(r.id, r.series_uid, r.sop_instance_uid, r.path, r.destination, r.dest_ae, r.dest_host,
                      r.dest_port, r.attempts)
            for r in rows
        ]

    def finish_sends(
        self, results: Sequence[tuple[OutboxRow, int | None, str | None]], *, max_attempts: int,
        backoff: float, backoff_max: float, now: float | None = None,
    ) -> None:
        """Record (row, DIMSE status or None, error) results; reschedule failures with exponential backoff."""
        now = time.time() if now is None else now
        touched: set[str] = set()
        with self.transaction() as conn:
            for row, status, error in results:
                if row.series_uid:
                    touched.add(row.series_uid)
                actor = f"{row.dest_ae}@{row.dest_host}:{row.dest_port}"
                ok = status is not None and (status == 0 or status in (0xB000, 0xB006, 0xB007))
                if ok:
                    conn.execute(update(outbox).where(outbox.c.id == row.id).values(
                        state=SendState.SENT, attempts=row.attempts + 1, last_status=status, last_error=None,
                        sent_at=now, lease_until=None,
                    ))
                    continue
                attempts = row.attempts + 1
                gave_up = attempts >= max_attempts
                delay = min(backoff * 2 ** (attempts - 1), backoff_max)
                conn.execute(update(outbox).where(outbox.c.id == row.id).values(
                    state=SendState.FAILED if gave_up else SendState.PENDING, attempts=attempts,
                    next_attempt_at=now + delay, last_status=status, last_error=error, lease_until=None,
                ))
                self.audit(
                    conn, Event.SEND_GAVE_UP if gave_up else Event.SEND_FAILURE, outcome="failed" if gave_up
                    else "retry", actor=actor, series_uid=row.series_uid, sop_instance_uid=row.sop_instance_uid,
                    detail={"destination": row.destination, "attempt": attempts, "status":
                            f"0x{status:04X}" if status is not None else None, "error": error,
                            "next_attempt_in_s": None if gave_up else round(delay, 1)},
                )
            for series_uid in touched:
                self._settle_series(conn, series_uid)

    def _settle_series(self, conn: Connection, series_uid: str) -> None:
        states = {
            r.state for r in conn.execute(select(outbox.c.state).where(outbox.c.series_uid == series_uid))
        }
        info = conn.execute(select(series).where(series.c.series_uid == series_uid)).first()
        if info is None or info.state not in (SeriesState.FORWARDING, SeriesState.FAILED):
            return
        if states <= {SendState.SENT}:
            new_state = SeriesState.FORWARDED
        elif SendState.FAILED in states and not states & {SendState.PENDING, SendState.SENDING}:
            new_state = SeriesState.FAILED
        else:
            return
        if new_state == info.state:
            return
        conn.execute(update(series).where(series.c.series_uid == series_uid).values(state=new_state))
        counts = conn.execute(
            select(outbox.c.destination, outbox.c.state, func.count())
            .where(outbox.c.series_uid == series_uid).group_by(outbox.c.destination, outbox.c.state)
        ).all()
        self.audit(conn, Event.SERIES_FORWARDED, outcome="ok" if new_state == SeriesState.FORWARDED else "failed",
                   study_uid=info.study_uid, series_uid=series_uid, patient_id=info.patient_id,
                   detail={f"{d}:{s}": n for d, s, n in counts})

    def release_send_leases(self) -> int:
        """At start-up: sends leased by a previous run of this node (which died mid-send) become due again.

        One node process owns an outbox; a later multi-worker setup relies on lease expiry instead.
        """
        with self.transaction() as conn:
            result = conn.execute(update(outbox).where(outbox.c.state == SendState.SENDING).values(
                state=SendState.PENDING, lease_until=None, next_attempt_at=time.time()))
            return result.rowcount or 0

    def requeue(self, outbox_ids: Sequence[int] | None = None, *, series_uid: str | None = None) -> int:
        """Put failed sends back in the queue (by id, by series, or all failed ones); returns how many."""
        now = time.time()
        with self.transaction() as conn:
            where = outbox.c.state == SendState.FAILED
            if outbox_ids:
                where = where & outbox.c.id.in_(list(outbox_ids))
            if series_uid:
                where = where & (outbox.c.series_uid == series_uid)
            rows = conn.execute(select(outbox.c.id, outbox.c.series_uid).where(where)).all()
            if not rows:
                return 0
            conn.execute(update(outbox).where(outbox.c.id.in_([r.id for r in rows])).values(
                state=SendState.PENDING, attempts=0, next_attempt_at=now, last_error=None,
            ))
            for uid in {r.series_uid for r in rows if r.series_uid}:
                conn.execute(update(series).where(series.c.series_uid == uid, series.c.state == SeriesState.FAILED)
                             .values(state=SeriesState.FORWARDING))
            self.audit(conn, Event.SEND_REQUEUED, actor="cli", detail={"outbox_ids": [r.id for r in rows]})
            return len(rows)

    # --- status ------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            series_rows = [dict(r._mapping) for r in conn.execute(
                select(series).order_by(series.c.last_received_at.desc()).limit(500))]
            outbox_rows = [dict(r._mapping) for r in conn.execute(
                select(outbox).where(outbox.c.state != SendState.SENT).order_by(outbox.c.id).limit(1000))]
            sent = conn.execute(select(func.count()).where(outbox.c.state == SendState.SENT)).scalar_one()
            job_rows = [dict(r._mapping) for r in conn.execute(
                select(jobs).order_by(jobs.c.id.desc()).limit(200))]
        return {"series": series_rows, "outbox": outbox_rows, "sent_total": sent, "jobs": job_rows}

    def series_info(self, series_uid: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(series).where(series.c.series_uid == series_uid)).first()
        return dict(row._mapping) if row else None

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(instances).where(instances.c.series_uid == series_uid))
            return [dict(r._mapping) for r in rows]
