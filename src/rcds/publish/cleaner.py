"""The publish service's cleanups: when they are due, and running one on a live service.

``cleanup`` plans and applies the expiry of one repository's unused CIDs; this module runs it inside the
service: with that repository's worker paused (``paused``), one cleanup at a time (``lock``), garbage
collection after it (``rcds.cvmfs.gc``), metrics and logs. Replicas of other servers' repositories are
only garbage collected (``rcds.cvmfs.replica_gc``), never while their replication thread snapshots them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..cvmfs.manifest import Manifest, ManifestError
from ..logs import fields
from ..storage import MANIFEST, ObjectMissing, ObjectStore
from .cleanup import CleanupPlan, apply_cleanup, plan_cleanup

if TYPE_CHECKING:
    from ..cvmfs.gc import GcReport
    from .service import PublishService

log = logging.getLogger("rcds.publish")

REPLICA_BUSY_WAIT = 120.0  # seconds cleanup waits for a replica another process holds (rcds repo gc)


@dataclass
class CleanupReport:
    plan: CleanupPlan
    dry_run: bool
    revision: int | None = None  # the revision that removed them (None: nothing removed)
    gc: GcReport | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "repository": self.plan.repository,
            "dry_run": self.dry_run,
            "expired": [
                {"cid": e.cid, "last_used": int(e.last_used), "source": e.source} for e in self.plan.expired
            ],
            "orphans": self.plan.orphans,
            "kept": self.plan.kept,
            "revision": self.revision,
            "gc": None if self.gc is None else dataclasses.asdict(self.gc),
            "seconds": round(self.seconds, 3),
        }


class Cleaner:
    """Runs the cleanups of one service's repositories and replicas."""

    def __init__(self, service: PublishService) -> None:
        self.service = service
        self.lock = threading.Lock()  # one cleanup at a time (daily schedule, or rcds cleanup)

    def due(self, now: float) -> list[str]:
        """Local repositories and replicas we snapshot whose daily cleanup hour is now and that were not
        cleaned today.

        Repository i (1-based, in configuration order) is cleaned in hour (gcstarthour - 1 + i) % 24, as
        the service rcds replaces did, so that one repository at a time is paused.
        """
        svc = self.service
        assert svc.state is not None
        local = time.localtime(now)
        today = time.strftime("%Y-%m-%d", local)
        due = []
        for i, rs in enumerate(svc.settings.repositories, start=1):
            if not (rs.local or rs.upstream) or (svc.settings.gcstarthour - 1 + i) % 24 != local.tm_hour:
                continue
            if svc.state.last_cleanup_day(rs.name) != today:
                due.append(rs.name)
        return due

    def run_due(self) -> None:
        """Run the cleanups ``due`` now, each recorded as done today before it runs (a cleanup that fails
        is not retried every minute)."""
        svc = self.service
        now = svc.clock()
        for name in self.due(now):
            assert svc.state is not None
            svc.state.record_cleanup_day(name, time.strftime("%Y-%m-%d", time.localtime(now)))
            self.cleanup(name)

    @contextlib.contextmanager
    def paused(self, name: str) -> Iterator[None]:
        """Stop repository ``name``'s worker taking jobs (they go to the others) and wait for its revision."""
        svc = self.service
        worker = next((w for w in svc.workers if w.repo_name == name), None)
        if worker is None:
            yield
            return
        worker.accepting.clear()
        try:
            # Ingests in flight are grafted (or given up) first: they hold the repository's ingest lock,
            # which garbage collection waits for.
            while worker.slots is not None and worker.slots.busy and worker.is_alive():
                svc._notify()
                time.sleep(0.05)
            with worker.busy:
                yield
        finally:
            worker.accepting.set()

    def cleanup(
        self, name: str, dry_run: bool = False, now: float | None = None, gc: bool = True
    ) -> CleanupReport:
        """Expire the unused CIDs of one local repository, then collect its garbage.

        Its publish worker is paused for the duration (the queue goes to the other repositories); the
        service as a whole keeps accepting uploads. For a replica of another server's repository only
        the garbage collection runs (``cleanup_replica``).
        """
        svc = self.service
        if name not in svc.repositories and name in svc.replica_locks:
            return self.cleanup_replica(name, dry_run, now, gc)
        repo = svc.repositories[name]
        now = svc.clock() if now is None else now
        started = time.monotonic()
        with self.lock, self.paused(name):
            assert svc.state is not None
            svc.flush_touches()
            storages = {r.name: svc.public(r.name) for r in svc.settings.repositories}
            plan = plan_cleanup(
                name, storages, svc.state.access_times(), svc.prefix, svc.settings.maxdays, now
            )
            report = CleanupReport(plan=plan, dry_run=dry_run)
            if not dry_run:
                report.revision = apply_cleanup(repo, plan, svc.prefix, clock=svc.clock)
                svc.refresh_presence(name, force=report.revision is not None)
                gone = [e.cid for e in plan.expired if not svc.presence.anywhere(e.cid)]
                svc.state.forget_access(gone + [c for c in plan.orphans if not svc.presence.anywhere(c)])
            if gc:
                from ..cvmfs.gc import collect_garbage

                report.gc = collect_garbage(
                    repo, horizon=svc.settings.gc_horizon_days * 86400, now=now, dry_run=dry_run
                )
        report.seconds = time.monotonic() - started
        m = svc.metrics
        if not dry_run:
            m.cids_expired.labels(name).inc(len(plan.expired))
            m.cleanup_seconds.labels(name).observe(report.seconds)
            if report.gc is not None:
                m.gc_objects_swept.labels(name).inc(report.gc.objects_swept)
                m.gc_bytes_freed.labels(name).inc(report.gc.bytes_freed)
        for e in plan.expired:
            log.info(
                "expired" if not dry_run else "would expire",
                extra=fields(repository=name, cid=e.cid, last_used=int(e.last_used), source=e.source),
            )
        log.info(
            "cleanup",
            extra=fields(
                repository=name, dry_run=dry_run, expired=len(plan.expired), orphans=len(plan.orphans),
                kept=plan.kept, revision=report.revision, seconds=round(report.seconds, 3),
                objects_swept=report.gc.objects_swept if report.gc else None,
                bytes_freed=report.gc.bytes_freed if report.gc else None,
            ),
        )  # fmt: skip
        return report

    def cleanup_replica(
        self, name: str, dry_run: bool = False, now: float | None = None, gc: bool = True
    ) -> CleanupReport:
        """Garbage-collect the replica ``name`` (the daily cleanup of a ``local = false`` repository with an
        ``upstream``). Nothing expires here: the owner removes its unused CIDs and the replica follows.

        Serialised with the replica's snapshots through ``replica_locks`` (the replication thread waits
        for the collection); a replica locked by another process (``rcds repo gc``) is waited for, up
        to ``REPLICA_BUSY_WAIT`` seconds."""
        from ..cvmfs.replica_gc import ReplicaBusy, collect_replica_garbage

        svc = self.service
        storage = svc.storage(name)
        now = svc.clock() if now is None else now
        started = time.monotonic()
        revision, collectable = 0, False
        public = svc.public(name)
        with contextlib.suppress(OSError, ManifestError, ObjectMissing):
            data = (
                public.get(MANIFEST) if isinstance(public, ObjectStore) else (public / MANIFEST).read_bytes()
            )
            manifest = Manifest.parse(data)[0]
            revision, collectable = manifest.revision, manifest.garbage_collectable
        report = CleanupReport(plan=CleanupPlan(repository=name, revision=revision), dry_run=dry_run)
        if gc and revision and not collectable:
            # The owner keeps every revision (G=no), so must its replicas; as cvmfs_server's automatic GC
            # of a stratum 1, skip it quietly rather than fail every day.
            log.info(
                "cleanup: replica not garbage-collectable (G=no), skipped", extra=fields(repository=name)
            )
        elif gc and revision:  # a replica without a first snapshot holds nothing to collect
            deadline = time.monotonic() + REPLICA_BUSY_WAIT
            with self.lock:
                while True:
                    try:
                        with svc.replica_locks[name]:
                            report.gc = collect_replica_garbage(
                                storage, horizon=svc.settings.gc_horizon_days * 86400, now=now,
                                dry_run=dry_run,
                            )  # fmt: skip
                        break
                    except ReplicaBusy:
                        if time.monotonic() > deadline or svc.stopping.is_set():
                            raise
                        time.sleep(0.5)
        report.seconds = time.monotonic() - started
        if not dry_run:
            svc.metrics.cleanup_seconds.labels(name).observe(report.seconds)
            if report.gc is not None:
                svc.metrics.gc_objects_swept.labels(name).inc(report.gc.objects_swept)
                svc.metrics.gc_bytes_freed.labels(name).inc(report.gc.bytes_freed)
        log.info(
            "cleanup",
            extra=fields(
                repository=name, replica=True, dry_run=dry_run, revision=revision,
                seconds=round(report.seconds, 3),
                objects_swept=report.gc.objects_swept if report.gc else None,
                bytes_freed=report.gc.bytes_freed if report.gc else None,
            ),
        )  # fmt: skip
        return report
