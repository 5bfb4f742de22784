"""The running node: receiver, series-completion sweep and outbox sender on one APScheduler.

Completion is a sweep over the database rather than one in-memory timer per series: the hot C-STORE path makes
no scheduler calls, and after a restart nothing needs re-arming because the state is already in the tables.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from config.node import Destination, NodeConfig
from dicom_node.audit import Event
from dicom_node.receiver import Receiver
from dicom_node.recovery import recover_unindexed
from dicom_node.sender import send_files
from dicom_node.spool import Spool
from dicom_node.store import OutboxRow, Store

__all__ = ["Node"]

log = logging.getLogger(__name__)

SEND_LEASE_SECONDS = 600


class Node:
    def __init__(self, config: NodeConfig, *, config_source: str = "<embedded defaults>"):
        self.config = config
        self.config_source = config_source
        self.store = Store(config.node.database)
        self.spool = Spool(config.node.storage)
        self.receiver = Receiver(config.node, config.accept, self.store, self.spool)
        # Jobs skip a run while the previous one is still busy; that is expected, not worth a warning each time.
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"misfire_grace_time": None})
        self._sweep_lock = threading.Lock()
        self._send_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = recover_unindexed(self.store, self.spool)
        released = self.store.release_send_leases()
        self.store.record(Event.CONFIG_LOADED, actor="node", detail={
            "source": self.config_source, "accept": [a.ae_title for a in self.config.accept],
            "destinations": sorted(self.config.destinations), "forward": self.config.forward})
        self.receiver.start()
        sweep_every = min(1.0, self.config.node.series_stable_seconds / 4)
        self.scheduler.add_job(self.sweep_series, "interval", seconds=sweep_every, id="sweep-series",
                               max_instances=1, coalesce=True)
        self.scheduler.add_job(self.drain_outbox, "interval", seconds=self.config.outbox.poll_seconds,
                               id="drain-outbox", max_instances=1, coalesce=True)
        self.scheduler.start()
        host, port = self.receiver.bound_address
        self.store.record(Event.NODE_STARTED, actor="node", detail={
            "ae_title": self.config.node.ae_title, "host": host, "port": port,
            "resumed_sends": released, "recovered_instances": recovered})

    def stop(self) -> None:
        self.receiver.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
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

    # --- jobs --------------------------------------------------------------------------------------------

    def sweep_series(self) -> int:
        """Complete every series that has been quiet for ``series_stable_seconds``; returns how many."""
        with self._sweep_lock:
            cutoff = time.time() - self.config.node.series_stable_seconds
            targets = [(name, d.ae_title, d.host, d.port) for name in self.config.forward
                       for d in [self.config.destinations[name]]]
            done = 0
            for series_uid in self.store.quiet_series(cutoff):
                try:
                    done += self.store.complete_series(series_uid, cutoff, targets)
                except Exception:
                    log.exception("could not complete a series; will try again")
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


