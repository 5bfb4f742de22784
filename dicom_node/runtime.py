"""The running node: receiver, series-completion sweep and outbox sender on one APScheduler.

Completion is a sweep over the database rather than one in-memory timer per series: the hot C-STORE path makes
no scheduler calls, and after a restart nothing needs re-arming because the state is already in the tables.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread

from config.node import ConfigError, Destination, NodeConfig
from config.rules import REPLY, RulesConfig, load_rules
from pipeline.identity import MANUFACTURER
from pipeline.routing import SeriesFacts, attributes_of, check_rules, route, tests_structure_set
from pipeline.seeds import references_series
from dicom_node.audit import Event
from dicom_node.receiver import Receiver
from dicom_node.recovery import recover_unindexed
from dicom_node.sender import send_files
from dicom_node.spool import Spool
from dicom_node.store import OutboxRow, SeriesState, Store
from dicom_node.worker import Worker, structure_sets_for

__all__ = ["Node", "load_checked_rules"]

log = logging.getLogger(__name__)

SEND_LEASE_SECONDS = 600
# Series that are themselves annotations or plans: never wait for a structure set to reference them.
NOT_SEEDED = {"RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "REG", "SR"}


def load_checked_rules(path: Path, config: NodeConfig) -> RulesConfig:
    """Load a rules file and check it fully: schema, destinations, pipeline names and parameters."""
    rules = load_rules(path, config)
    problems = check_rules(rules)
    if problems:
        raise ConfigError(str(path), problems)
    return rules


class Node:
    def __init__(self, config: NodeConfig, *, config_source: str = "<embedded defaults>"):
        self.config = config
        self.config_source = config_source
        # Rules are validated (schema, destinations, pipelines and their parameters) before anything binds.
        self.rules: RulesConfig | None = load_checked_rules(config.rules, config) if config.rules else None
        self._rules_mtime = config.rules.stat().st_mtime if config.rules else None
        self.store = Store(config.node.database)
        self.spool = Spool(config.node.storage)
        self.receiver = Receiver(config.node, config.accept, self.store, self.spool)
        self.worker = Worker(config.workers, self.store, self.spool)
        # Jobs skip a run while the previous one is still busy; that is expected, not worth a warning each time.
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"misfire_grace_time": None})
        self._sweep_lock = threading.Lock()
        self._stopped = False
        self._send_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = recover_unindexed(self.store, self.spool)
        released = self.store.release_send_leases()
        resumed_jobs = self.store.release_job_leases()
        self.store.record(Event.CONFIG_LOADED, actor="node", detail={
            "source": self.config_source, "accept": [a.ae_title for a in self.config.accept],
            "destinations": sorted(self.config.destinations), "forward": self.config.forward})
        if self.rules is not None:
            self.store.record(Event.RULES_LOADED, actor="node", detail={
                "source": str(self.config.rules), "rules": [r.name for r in self.rules.rules]})
        self.receiver.start()
        sweep_every = min(1.0, self.config.node.series_stable_seconds / 4)
        self.scheduler.add_job(self.sweep_series, "interval", seconds=sweep_every, id="sweep-series",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self.drain_outbox, "interval", seconds=self.config.outbox.poll_seconds,
                               id="drain-outbox", max_instances=1, coalesce=True)
        self.scheduler.add_job(self.worker.poll, "interval", seconds=0.5, id="run-jobs", max_instances=1,
                               coalesce=True)
        if self.config.rules is not None:
            self.scheduler.add_job(self.watch_rules, "interval", seconds=2, id="watch-rules", max_instances=1,
                                   coalesce=True)
        self.scheduler.start()
        host, port = self.receiver.bound_address
        self.store.record(Event.NODE_STARTED, actor="node", detail={
            "ae_title": self.config.node.ae_title, "host": host, "port": port,
            "resumed_sends": released, "resumed_jobs": resumed_jobs, "recovered_instances": recovered})

    def stop(self) -> None:
        """Stop listening, let running jobs and sends finish, record it; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self.receiver.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.worker.shutdown()
        self.store.record(Event.NODE_STOPPED, actor="node")
        self.store.close()

    @property
    def port(self) -> int:
        return self.receiver.bound_address[1]

    def reload(self, config: NodeConfig, source: str) -> None:
        """Apply a new, already validated config's peers (listener settings need a restart)."""
        self.config = self.config.model_copy(update={
            "accept": config.accept, "destinations": config.destinations, "forward": config.forward,
            "outbox": config.outbox})
        self.receiver.accept = config.accept
        self.store.record(Event.CONFIG_LOADED, actor="node", detail={"source": source, "reload": True})

    def reload_rules(self) -> bool:
        """Re-read the rules file; an invalid file is refused (audited) and the rules in force stay."""
        path = self.config.rules
        if path is None:
            return False
        try:
            self._rules_mtime = path.stat().st_mtime
            rules = load_checked_rules(path, self.config)
        except (ConfigError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error("rules reload refused, previous rules stay in force:\n%s", "\n".join(problems))
            self.store.record(Event.RULES_REJECTED, "failed", actor="node", detail={
                "source": str(path), "problems": problems})
            return False
        self.rules = rules
        self.store.record(Event.RULES_LOADED, actor="node", detail={
            "source": str(path), "rules": [r.name for r in rules.rules], "reload": True})
        log.info("rules reloaded from %s (%d rules)", path, len(rules.rules))
        return True

    def watch_rules(self) -> None:
        try:
            mtime = self.config.rules.stat().st_mtime if self.config.rules else None
        except OSError:
            mtime = None
        if mtime is not None and mtime != self._rules_mtime:
            self.reload_rules()

    # --- jobs --------------------------------------------------------------------------------------------

    def _target(self, name: str) -> tuple[str, str, str, int]:
        d = self.config.destinations[name]
        return (name, d.ae_title, d.host, d.port)

    def plan(self, series_uid: str) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
        """For a quiet series: destinations to forward it to, jobs to queue, and the routing record."""
        forward = list(self.config.forward)
        if self.rules is None:
            return forward, [], {}
        info = self.store.series_info(series_uid) or {}
        members = self.store.series_instances(series_uid)
        first = dcmread(self.spool.absolute(members[0]["path"]), stop_before_pixels=True)
        keys = [k for rule in self.rules.rules for k in rule.match]
        facts = SeriesFacts(
            attributes=attributes_of(first, keys), calling_ae=info.get("calling_ae") or "",
            called_ae=info.get("called_ae") or "", instances=len(members),
            has_structure_set=self._referenced_by_structure_set(series_uid, info, first)
            if "has_structure_set" in keys else False,
            patient_has_structure_set=self.store.has_structure_set(info.get("patient_id") or ""),
        )
        matched = route(facts, self.rules)
        if not matched:
            forward += [n for n in self.rules.unrouted.forward if n not in forward]
            return forward, [], {"rules": [], "unrouted": True}
        content = hashlib.sha256(repr(self.store.series_members(series_uid)).encode()).hexdigest()
        new_jobs, problems = [], []
        for rule in matched:
            forward += [n for n in rule.forward if n not in forward]
            send, unresolved = self._send_targets(rule.send, facts.calling_ae)
            problems += unresolved
            for step in rule.run:
                key_material = repr((series_uid, content, rule.name, step.pipeline, sorted(step.params.items()),
                                     rule.formats, send))
                new_jobs.append({
                    "idempotency_key": hashlib.sha256(key_material.encode()).hexdigest(),
                    "series_uid": series_uid, "rule": rule.name, "pipeline": step.pipeline,
                    "params": step.params, "formats": rule.formats, "send": send,
                })
        record = {"rules": [r.name for r in matched]}
        if problems:
            record["send_problems"] = problems
        return forward, new_jobs, record

    def _send_targets(self, names: list[str], calling_ae: str) -> tuple[list[tuple[str, str, str, int]], list[str]]:
        targets, problems = [], []
        for name in names:
            if name != REPLY:
                targets.append(self._target(name))
                continue
            reply = next((n for n, d in self.config.destinations.items() if d.ae_title == calling_ae), None)
            if reply is None:
                problems.append(f"reply: no destination has AE title {calling_ae!r}; results are kept, not sent")
            else:
                targets.append(self._target(reply))
        return targets, problems

    def _referenced_by_structure_set(self, series_uid: str, info: dict[str, Any], first: Any) -> bool:
        return bool(structure_sets_for(self.store, self.spool, info.get("patient_id") or "", series_uid,
                                       str(first.get("FrameOfReferenceUID", "")), full=False))

    def awaiting_structure_set(self, series_uid: str, cutoff: float) -> bool:
        """Whether a quiet image series should wait longer for an RTSTRUCT that references it: a rule tests
        has_structure_set, none is held yet, and ``structure_set_wait_seconds`` has not run out."""
        wait = self.config.node.structure_set_wait_seconds
        if wait <= 0 or self.rules is None or not tests_structure_set(self.rules):
            return False
        info = self.store.series_info(series_uid) or {}
        if info.get("modality") in NOT_SEEDED or info.get("last_received_at", 0) < cutoff - wait:
            return False
        members = self.store.series_instances(series_uid)
        first = dcmread(self.spool.absolute(members[0]["path"]), stop_before_pixels=True)
        return not self._referenced_by_structure_set(series_uid, info, first)

    def reroute_referenced(self, structure_set_uid: str) -> list[int]:
        """When an RTSTRUCT series completes after the image series it references was routed (the seed came
        late), route those series again: rules that now match (``has_structure_set``) queue their jobs, and jobs
        already held for the same series content and rule are not queued twice (idempotency key). Structure sets
        this node wrote are ignored, so a TPS that sends our results back cannot start a loop."""
        info = self.store.series_info(structure_set_uid) or {}
        if info.get("modality") != "RTSTRUCT" or self.rules is None or not tests_structure_set(self.rules):
            return []
        created: list[int] = []
        for member in self.store.series_instances(structure_set_uid):
            header = dcmread(self.spool.absolute(member["path"]), stop_before_pixels=True)
            if str(header.get("Manufacturer", "")) == MANUFACTURER:
                continue
            for row in self.store.patient_series(info.get("patient_id") or ""):
                if row["modality"] in NOT_SEEDED or row["state"] == SeriesState.RECEIVING:
                    continue  # a series still receiving is routed with the structure set when it completes
                members = self.store.series_instances(row["series_uid"])
                first = dcmread(self.spool.absolute(members[0]["path"]), stop_before_pixels=True)
                if not references_series(header, row["series_uid"], str(first.get("FrameOfReferenceUID", ""))):
                    continue
                _, new_jobs, routing = self.plan(row["series_uid"])
                created += self.store.add_jobs(row["series_uid"], new_jobs, {
                    **routing, "structure_set": str(header.SOPInstanceUID)})
        return created

    def sweep_series(self) -> int:
        """Complete every series that has been quiet for ``series_stable_seconds``; returns how many."""
        with self._sweep_lock:
            cutoff = time.time() - self.config.node.series_stable_seconds
            done = 0
            for series_uid in self.store.quiet_series(cutoff):
                try:
                    if self.awaiting_structure_set(series_uid, cutoff):
                        continue
                    forward, new_jobs, routing = self.plan(series_uid)
                    completed = self.store.complete_series(
                        series_uid, cutoff, [self._target(n) for n in forward], new_jobs=new_jobs,
                        routing=routing)
                    if completed and routing.get("unrouted"):
                        self.store.record(Event.SERIES_UNROUTED, series_uid=series_uid,
                                          detail={"forward": forward})
                    done += completed
                except Exception:
                    log.exception("could not complete a series; will try again")
                    continue
                if completed:
                    try:
                        self.reroute_referenced(series_uid)
                    except Exception:  # the structure set is stored; the series it references keeps its routing
                        log.exception("could not route again the series referenced by %s", series_uid)
            return done

    def drain_outbox(self) -> int:
        """Send everything due, one association per destination; returns how many instances were tried."""
        with self._send_lock:
            rows = self.store.claim_due_sends(time.time(), SEND_LEASE_SECONDS)
            groups: dict[tuple[str, str, str, int], list[OutboxRow]] = defaultdict(list)
            for row in rows:
                groups[(row.destination, row.dest_ae, row.dest_host, row.dest_port)].append(row)
            for (name, ae, host, port), members in groups.items():
                self._send_group(name, Destination(ae_title=ae, host=host, port=port), members)
            return len(rows)

    def _send_group(self, name: str, destination: Destination, rows: list[OutboxRow]) -> None:
        actor = str(destination)
        series = sorted({r.series_uid for r in rows if r.series_uid})
        self.store.record(Event.SEND_ATTEMPT, actor=actor, detail={
            "destination": name, "instances": len(rows), "series": series})
        by_path = {self.spool.absolute(r.path): r for r in rows}
        try:
            results = send_files(destination, list(by_path), calling_ae=self.config.node.ae_title)
            outcome = [(by_path[res.path], res.status, res.error) for res in results]
        except Exception as exc:  # never let a send crash the scheduler; the rows go back with backoff
            log.exception("send to %s failed", name)
            outcome = [(row, None, f"sender error: {exc!r}") for row in rows]
        ok = sum(1 for _, status, _ in outcome if status is not None and status in (0, 0xB000, 0xB006, 0xB007))
        settings = self.config.outbox
        self.store.finish_sends(outcome, max_attempts=settings.max_attempts, backoff=settings.backoff_seconds,
                                backoff_max=settings.backoff_max_seconds)
        if ok:
            self.store.record(Event.SEND_SUCCESS, actor=actor, detail={
                "destination": name, "sent": ok, "failed": len(outcome) - ok, "series": series})
        log.info("sent %d/%d instance(s) to %s", ok, len(outcome), name)


