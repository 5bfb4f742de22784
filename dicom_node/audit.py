"""The tamper-evident audit chain: each record's hash covers its content and the previous record's hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64

# The fields a record's hash covers, in order.
CHAINED_FIELDS = (
    "ts", "event", "actor", "study_uid", "series_uid", "sop_instance_uid", "patient_id", "outcome", "detail",
)


class Event:
    """Audit event types (stable strings: admins filter on them)."""

    CONFIG_LOADED = "config.loaded"
    NODE_STARTED = "node.started"
    NODE_STOPPED = "node.stopped"
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_FAILED = "instance.failed"
    INSTANCE_QUARANTINED = "instance.quarantined"
    SERIES_COMPLETE = "series.complete"
    SERIES_REOPENED = "series.reopened"
    SERIES_FORWARDED = "series.forwarded"
    SERIES_UNROUTED = "series.unrouted"
    SERIES_REROUTED = "series.rerouted"  # a structure set arrived after the series it references was routed
    RULES_LOADED = "rules.loaded"
    RULES_REJECTED = "rules.rejected"
    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_DONE = "job.done"
    JOB_RETRY = "job.retry"
    JOB_FAILED = "job.failed"
    JOB_REJECTED = "job.rejected"
    SEND_ATTEMPT = "send.attempt"
    SEND_SUCCESS = "send.success"
    SEND_FAILURE = "send.failure"
    SEND_GAVE_UP = "send.failed"
    SEND_REQUEUED = "send.requeued"


@dataclass(frozen=True)
class ChainProblem:
    record_id: int
    reason: str


def record_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """SHA-256 of the previous hash and the record's chained fields as canonical JSON."""
    payload = [prev_hash] + [record.get(name) for name in CHAINED_FIELDS]
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def verify_chain(records: Iterable[Mapping[str, Any]]) -> list[ChainProblem]:
    """Check records (ordered by id, each with ``id``, ``prev_hash``, ``hash``) link up and hash correctly."""
    problems = []
    expected_prev = GENESIS
    previous_id = 0
    for record in records:
        if record["id"] != previous_id + 1:
            problems.append(ChainProblem(record["id"], f"gap: record {previous_id + 1} missing"))
        if record["prev_hash"] != expected_prev:
            problems.append(ChainProblem(record["id"], "prev_hash does not match the previous record"))
        if record_hash(record["prev_hash"], record) != record["hash"]:
            problems.append(ChainProblem(record["id"], "content altered: hash does not match"))
        expected_prev = record["hash"]
        previous_id = record["id"]
    return problems
