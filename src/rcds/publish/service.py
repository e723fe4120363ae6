"""The publish service: uploads in, signed revisions out.

* An upload is streamed into a spool file, fsynced and recorded as a queued job in the state database
  before the caller is told ``OK`` (``accept``). Acknowledged work survives crashes and restarts. A big
  one is staged in an ingest slot while it arrives (``start_early``, ``early``) and handed to the
  commit only once it is queued.
* One worker thread per local repository (``worker.RepositoryWorker``) pulls queued jobs (the free worker takes the next work, so CIDs
  go to the least busy repository). It ingests them in ``ingest_slots`` slots at once, each job under a
  lease on its own path (``leases``, ``slots``: staged without the writer lock), and grafts every ingest
  finished since its last revision into the next one (group commit, up to a job and byte budget); with
  one slot it publishes *all* jobs waiting at that moment in one transaction, as before leases. A tarball
  that is rejected fails alone; the others still publish.
* ``exists`` answers from the presence index: only CIDs in a live, signed revision are ``PRESENT``. The
  index covers replicas of other servers' repositories too, and follows revisions made outside this
  process (housekeeping thread).
* The namespace rule (``namespace``): a top-level name under the prefix is a one-level CID or a group,
  never both, across all repositories and the queue. An upload that would break it is refused before its
  body is read and again atomically with its enqueue; a worker that finds a conflict in its repository
  fails the job with the reason instead of writing.
* Last-use times (``update``, and ``publish`` of a present CID) are collected in memory and written to
  the state database in batches; a worker copies those that moved by ``share_seconds`` into its next
  revision as ts records (``lastuse``), so other servers see them.
* Once a day per repository (``cleanup_due``), cleanup removes unused CIDs with that repository's
  worker paused, then collects garbage (``cleanup``, ``rcds.cvmfs.gc``). Replicas of other servers'
  repositories (``upstream``) are garbage collected on the same schedule (``rcds.cvmfs.replica_gc``;
  their owners expire the CIDs), never while their replication thread snapshots them.

Nothing here knows about HTTP; the web layer (``rcds.web.pubapi``) is a thin face on this class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..cvmfs.manifest import Manifest, ManifestError
from ..cvmfs.repository import Repository
from ..logs import fields
from ..storage import MANIFEST, PRIVATE_DIR, ObjectMissing, ObjectStore
from ..storage.local import fsync_path
from .cleanup import CleanupPlan, apply_cleanup, plan_cleanup
from .config import RepositorySettings, ServiceSettings
from .early import EarlyStaging, SpoolProgress
from .lastuse import server_name
from .leases import Leases
from .metrics import ServiceMetrics
from .namespace import Namespace, NamespaceConflict, find_collisions, log_collisions
from .notify import NotificationHub
from .presence import Presence, PresenceIndex, scan_published_cids
from .state import FAILED, PUBLISHED, PUBLISHING, QUEUED, StateDB
from .status import ReplicaState, StatusHistory
from .worker import RepositoryWorker

if TYPE_CHECKING:
    from ..cvmfs.gc import GcReport
    from ..cvmfs.subscriber import Activity

log = logging.getLogger("rcds.publish")

REPLICA_BUSY_WAIT = 120.0  # seconds cleanup waits for a replica another process holds (rcds repo gc)
CLOCK_OFFSET_ENV = (
    "RCDS_CLOCK_OFFSET"  # tests: seconds added to the service's clock (last-use, publish times)
)


def service_clock() -> Callable[[], float]:
    """``time.time``, shifted by ``$RCDS_CLOCK_OFFSET`` seconds: how tests publish "40 days ago"."""
    offset = float(os.environ.get(CLOCK_OFFSET_ENV, "0") or 0)
    if not offset:
        return time.time
    return lambda: time.time() + offset


class UploadTooLarge(Exception):
    pass


class ServiceUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    """The answer to a publish: ``OK`` (queued) or ``PRESENT`` with the path."""

    present: Presence | None

    @property
    def body(self) -> str:
        return f"PRESENT:{self.present.path}" if self.present else "OK"


class SpoolFile:
    """An upload being received: written to ``<id>.part``, renamed to ``<id>.tar`` once complete and fsynced.

    ``progress`` tells a ``FollowingReader`` (early staging, ``early``) how far the writing is.
    """

    def __init__(self, directory: Path, limit: int) -> None:
        self.id = uuid.uuid4().hex
        self.part = directory / f"{self.id}.part"
        self.path = directory / f"{self.id}.tar"
        self.limit = limit
        self.size = 0
        self.progress = SpoolProgress()
        self.early: EarlyStaging | None = None  # set while a slot stages this upload as it arrives
        self._f: BinaryIO | None = open(self.part, "xb", buffering=0)  # noqa: SIM115 - closed in finish/discard

    def write(self, data: bytes) -> None:
        assert self._f is not None
        self.size += len(data)
        if self.size > self.limit:
            raise UploadTooLarge(f"upload exceeds the limit of {self.limit} bytes")
        view = memoryview(data)
        while view:
            n = self._f.write(view)
            view = view[n or 0 :]
        self.progress.wrote(len(data))

    def finish(self) -> None:
        """Make the complete upload durable under its final name."""
        assert self._f is not None
        self.progress.finish()  # an early staging reads the tail while the fsync runs
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.rename(self.part, self.path)
        fsync_path(self.path.parent)

    def discard(self) -> None:
        self.progress.discard()  # stops an early staging's reader
        if self.early is not None:
            self.early.abandon()
        if self._f is not None:
            self._f.close()
            self._f = None
        self.part.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


class PublishService:
    def __init__(self, settings: ServiceSettings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.clock = clock or service_clock()
        self.server_name = server_name()
        self.prefix = settings.prefix
        self.metrics = ServiceMetrics()
        self.spool_dir = settings.queue_dir / "spool"
        self.presence = PresenceIndex([r.name for r in settings.repositories], settings.prefix)
        self.namespace = Namespace(self.presence, self._active_named)
        # Held around the namespace check and the enqueue of an upload, so that two uploads of conflicting
        # kinds (G and G/x) cannot both pass the check before either is queued.
        self._enqueue_lock = threading.Lock()
        # Per repository: the CID-like directories inside its one-level CIDs (collisions, see namespace).
        self._shadowed: dict[str, list[str]] = {}
        self._replica_stores: dict[str, ObjectStore] = {}  # replicas kept in buckets, read by ``public``
        self._replica_stores_lock = threading.Lock()
        self._collisions_warned: set[str] = set()
        self.repositories: dict[str, Repository] = {}
        self.workers: list[RepositoryWorker] = []
        self.state: StateDB | None = None
        self.leases: Leases | None = None  # on sub-paths of the local repositories (``leases``, ``slots``)
        self.running = False
        self.stopping = threading.Event()
        self._wake = threading.Condition()
        self._generation = 0
        self._touches: dict[str, float] = {}
        self._touch_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._housekeeper: threading.Thread | None = None
        self._replicators: list[threading.Thread] = []
        self.known_revision: dict[str, int] = {}  # per repository: the revision the presence index shows
        self.cleanup_lock = threading.Lock()  # one cleanup at a time (daily schedule, or rcds cleanup)
        # Per replica we snapshot: held by its replication thread around each snapshot and by cleanup
        # around its garbage collection, so that neither finds the other holding the replica's lock.
        self.replica_locks = {rs.name: threading.Lock() for rs in settings.repositories if rs.upstream}
        # For the status page (``status``): what each replication thread last saw, and the sampled history.
        self.replica_states = {rs.name: ReplicaState() for rs in settings.repositories if rs.upstream}
        self.status_history: StatusHistory | None = None
        # New revisions of every repository held here, to the notification streams (rcds.web.notifications).
        self.notifications = NotificationHub(
            settings.notifications.max_subscribers,
            settings.notifications.queue,
            on_drop=lambda reason: self.metrics.notification_drops.labels(reason).inc(),
        )
        self._replica_wakes: list[threading.Event] = []  # set on stop: replication threads wait on them
        self._early_cids: set[str] = set()  # CIDs being staged as they arrive (``start_early``)
        self._early_lock = threading.Lock()

    # --- life cycle ------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the state and the repositories and build the presence index, without publishing.

        ``rcds cleanup`` uses this alone; ``start`` adds the workers and the background threads.
        """
        s = self.settings
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.state = StateDB(s.queue_dir / "state.db")
        self.leases = Leases(
            s.queue_dir / "state.db",
            process=f"{self.server_name}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            on_expire=lambda lease: self.metrics.leases_expired.labels(lease.repository).inc(),
        )
        for rs in s.local_repositories:
            self.repositories[rs.name] = self._open_repository(rs)
        for rs in s.repositories:
            self.refresh_presence(rs.name)

    def start(self) -> None:
        s = self.settings
        self.open()
        self._recover_jobs()
        self.metrics.watch_queue(self.queued_count, self.waiting_count)
        self.metrics.watch_leases(lambda: len(self.leases.list()) if self.leases is not None else 0)
        try:  # the status page's charts: nice to have, never a reason not to start (a full disk...)
            self.status_history = StatusHistory(s.queue_dir / "status.db")
            self.sample_status()  # a first point at once; then every [status] sample_seconds
        except Exception as exc:
            log.warning("status history unavailable", extra=fields(error=str(exc)))
        self.running = True
        for name, repo in self.repositories.items():
            worker = RepositoryWorker(self, name, repo)
            worker.start()
            self.workers.append(worker)
        self._flusher = threading.Thread(target=self._flush_loop, name="touch-flusher", daemon=True)
        self._flusher.start()
        self._housekeeper = threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True)
        self._housekeeper.start()
        for rs in s.repositories:
            if rs.upstream:
                thread = threading.Thread(
                    target=self._replicate_loop, args=(rs,), name=f"replica-{rs.name}", daemon=True
                )
                thread.start()
                self._replicators.append(thread)

    def storage(self, name: str) -> Path:
        return next(r.storage for r in self.settings.repositories if r.name == name)

    def public(self, name: str) -> Path | ObjectStore:
        """Where repository ``name``'s public files are read: its directory, or its bucket (ours, or a
        replica kept in a bucket: ``storage = "s3://..."`` with ``local = false``)."""
        rs = next(r for r in self.settings.repositories if r.name == name)
        if not rs.store:
            return rs.storage
        if name in self.repositories:
            return self.repositories[name].store
        with self._replica_stores_lock:
            if name not in self._replica_stores:
                from ..storage import store_from_settings

                self._replica_stores[name] = store_from_settings(rs.store)
            return self._replica_stores[name]

    def refresh_presence(self, name: str, force: bool = False) -> bool:
        """Rescan a repository's CIDs if its live revision is not the one the index shows.

        Covers revisions made outside this process (``rcds cleanup``, ``rcds repo``) and replicas of other
        servers' repositories, which change under us. Returns True if the index changed.
        """
        storage = self.public(name)
        try:
            if isinstance(storage, ObjectStore):
                manifest = storage.get(".cvmfspublished")
            else:
                if not (storage / ".cvmfspublished").exists():
                    return False
                manifest = (storage / ".cvmfspublished").read_bytes()
            revision = Manifest.parse(manifest)[0].revision
        except (OSError, ManifestError, ObjectMissing):
            return False
        if not force and self.known_revision.get(name) == revision:
            return False
        self.announce(name, manifest)  # a revision made elsewhere (rcds cleanup, a replica): live now
        started = time.monotonic()
        shadowed: list[str] = []
        cids = scan_published_cids(storage, self.prefix, shadowed=shadowed)
        self.presence.replace(name, cids, revision)
        self.known_revision[name] = revision
        self._shadowed[name] = shadowed
        log_collisions(find_collisions(self.presence, self._shadowed, only=name), self._collisions_warned)
        if name in self.repositories:
            self.update_gauges(name, revision)
        log.info(
            "presence",
            extra=fields(
                repository=name,
                revision=revision,
                cids=len(cids),
                seconds=round(time.monotonic() - started, 3),
            ),
        )
        return True

    def close(self) -> None:
        """Close what ``open`` opened (for a service that was never started)."""
        if self.leases is not None:
            self.leases.close()
        if self.state is not None:
            self.state.close()

    def stop(self, timeout: float = 600.0) -> None:
        """Stop taking work; let each worker finish its current revision; write pending access times.

        Jobs not yet taken stay queued in the state database and are published after the next start.
        """
        self.running = False
        self.stopping.set()
        self._notify()
        for wake in self._replica_wakes:
            wake.set()
        self.notifications.close()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))
        for thread in (self._flusher, self._housekeeper, *self._replicators):
            if thread is not None:
                thread.join(5)
        self.flush_touches()
        for w in self.workers:
            w.close_slots()
        if self.leases is not None:
            self.leases.close()
        if self.state is not None:
            self.state.close()
        if self.status_history is not None:
            self.status_history.close()

    def _open_repository(self, rs: RepositorySettings) -> Repository:
        if not (rs.storage / PRIVATE_DIR / "repo.json").exists():
            if not self.settings.create_missing:
                raise FileNotFoundError(f"repository {rs.name}: no repository in {rs.storage}")
            log.info("create repository", extra=fields(repository=rs.name, storage=str(rs.storage)))
            repo = Repository.create(rs.name, rs.storage, store=rs.store or None)
        else:
            repo = Repository(rs.storage)
            if repo.fqrn != rs.name:
                raise ValueError(f"{rs.storage} holds {repo.fqrn}, not {rs.name}")
            if rs.store and repo.config.store.get("url") != rs.store["url"]:
                raise ValueError(
                    f"{rs.storage} keeps {rs.name} in {repo.config.store.get('url') or 'itself'},"
                    f" not {rs.store['url']} as configured"
                )
        self.resign_if_due(repo)
        return repo

    def resign_if_due(self, repo: Repository) -> None:
        warning = repo.whitelist_warning()
        if warning is not None and repo.config.external_whitelist:  # signed elsewhere: only say so
            log.warning("whitelist", extra=fields(repository=repo.fqrn, warning=warning))
        elif warning is not None:
            with repo.lock():
                wl = repo.resign()
            log.info(
                "whitelist re-signed", extra=fields(repository=repo.fqrn, expires=wl.expires.isoformat())
            )

    def _recover_jobs(self) -> None:
        """Finish what a previous process left: interrupted jobs and stray spool files."""
        assert self.state is not None
        requeue = []
        for job in self.state.interrupted():
            where = self.presence.find(job.cid)
            if where is not None:  # committed just before the crash: the manifest is live
                self.state.mark_published([(job.id, None)], where.repository, where.revision or 0)
                Path(job.spool).unlink(missing_ok=True)
            else:
                requeue.append(job.id)
        self.state.reset_to_queued(requeue)
        if self.leases is not None:  # the previous process's ingests are gone; their jobs are requeued
            self.leases.release_other_processes()
        # Jobs that waited for the storage (a full disk) try again at once: a restart is often how an
        # operator says it is fixed.
        woken = self.state.wake_waiting()
        if woken:
            log.info("jobs waiting for the storage retried now", extra=fields(jobs=woken))
        active = self.state.active_spools()
        for f in self.spool_dir.iterdir():
            # .part files were never acknowledged; a .tar without a job was fsynced but never recorded.
            if str(f) not in active:
                f.unlink(missing_ok=True)
        if requeue:
            log.info("requeued interrupted publishes", extra=fields(jobs=len(requeue)))

    # --- queries ---------------------------------------------------------------------------------

    @property
    def repository_names(self) -> list[str]:
        return [r.name for r in self.settings.repositories]

    def exists(self, cid: str) -> Presence | None:
        return self.presence.find(cid)

    def update(self, cid: str) -> Presence | None:
        where = self.presence.find(cid)
        if where is not None:
            self.touch(cid)
        return where

    def queued_count(self) -> int:
        return self.state.queued_count() if self.state is not None else 0

    def waiting_count(self) -> int:
        return self.state.waiting_count() if self.state is not None else 0

    def status(self, cid: str) -> dict[str, object]:
        assert self.state is not None
        doc: dict[str, object] = {"cid": cid}
        where = self.presence.find(cid)
        job = self.state.latest(cid)
        if job is not None and job.state in (QUEUED, PUBLISHING):
            doc.update(state=job.state, submitted_at=job.submitted)
            if job.state == PUBLISHING:
                doc["repository"] = job.repository
            if job.reason:  # the last attempt's error, for a retried job
                doc["reason"] = job.reason
            if job.attempts:
                doc["attempts"] = job.attempts
            if job.waits:  # tries that failed on the storage (full disk...): the job waits, it is kept
                doc["waits"] = job.waits
        elif where is not None:
            doc.update(
                state="published", repository=where.repository, revision=where.revision, path=where.path
            )
            if job is not None and job.state == PUBLISHED:
                doc.update(files=job.files, published_at=job.finished)
        elif job is not None and job.state == FAILED:
            doc.update(state=FAILED, reason=job.reason, submitted_at=job.submitted, failed_at=job.finished)
        else:
            doc["state"] = "missing"
        last = self.last_used(cid)
        if last is not None:
            doc["last_used"] = last
        return doc

    # --- uploads ---------------------------------------------------------------------------------

    def before_upload(self, cid: str) -> Outcome | None:
        """The answer to give without storing the body, or None if the upload must be received.

        Raises ``NamespaceConflict`` for a CID whose top-level name has the other kind somewhere.
        """
        self._check_running()
        where = self.presence.find(cid)
        if where is not None:
            self.touch(cid)
            return Outcome(where)
        assert self.state is not None
        self.namespace.check(cid)
        if self.state.active(cid) is not None:
            return Outcome(None)  # already queued or publishing: the body is not needed
        return None

    def new_spool(self) -> SpoolFile:
        self._check_running()
        return SpoolFile(self.spool_dir, self.settings.max_upload)

    def start_early(self, cid: str, spool: SpoolFile, striplevels: int, identity: str, size: int) -> bool:
        """Start staging a big upload (``size``: expected, or received so far) while it arrives, in a free
        ingest slot of a repository whose lease on the CID's path is free (``early``). Whether it started;
        if not, the upload takes the queue's path once accepted. Blocking (SQLite): off the event loop."""
        if not self.running or self.stopping.is_set() or spool.early is not None:
            return False
        assert self.state is not None
        if self.state.queued(limit=1):  # acknowledged work first: a slot taken now would be theirs
            self.metrics.early_staging.labels("queued_work").inc()
            return False
        with self._early_lock:  # the same CID uploaded twice at once: one staging (in another repository
            if cid in self._early_cids:  # the lease would not stop the second), the other is refused later
                self.metrics.early_staging.labels("duplicate").inc()
                return False
            self._early_cids.add(cid)
        started: bool | None = False
        try:
            busy = False
            for worker in sorted(self.workers, key=lambda w: w.slots.free if w.slots else 0, reverse=True):
                try:
                    started = worker.stage_early(cid, spool, striplevels, identity, size)
                except Exception as exc:  # a locked state database, out of descriptors: the queue's path
                    log.warning("cannot stage an upload as it arrives", extra=fields(cid=cid, error=str(exc)))
                    self.metrics.early_staging.labels("error").inc()
                    return False
                if started is True:
                    return True
                busy = busy or started is None
            self.metrics.early_staging.labels("lease_busy" if busy else "no_slot").inc()
            return False
        finally:
            if started is not True:
                self.early_over(cid)

    def early_over(self, cid: str) -> None:
        """An early staging of ``cid`` is over (handed to the commit, dropped, or never started)."""
        with self._early_lock:
            self._early_cids.discard(cid)

    def accept(self, cid: str, spool: SpoolFile, striplevels: int, identity: str) -> Outcome:
        """Make a received upload durable and queue it. Blocking (fsync): call it off the event loop.

        An upload staged as it arrived (``spool.early``) is queued claimed by the repository that staged
        it, and its staged tree handed to that repository's next commit; otherwise the staging is dropped.
        """
        assert self.state is not None
        self._check_running()
        where = self.presence.find(cid)
        if where is not None:  # published while this upload was on its way
            spool.discard()
            self.touch(cid)
            return Outcome(where)
        spool.finish()  # the fsync stays outside the lock: large uploads must not hold up the others
        early = spool.early
        handing_over = False
        job_id: int | None = None
        try:
            with self._enqueue_lock:
                try:
                    self.namespace.check(cid)  # again: a conflicting upload may have been queued meanwhile
                except NamespaceConflict:
                    spool.discard()
                    raise
                handing_over = early is not None and early.begin_hand_over()
                claimed_by = early.repository if early is not None and handing_over else None
                job_id = self.state.enqueue(
                    cid, str(spool.path), spool.size, striplevels, identity, claimed_by
                )
            if early is not None and handing_over and job_id is not None:
                now = time.time()
                durable = dataclasses.replace(
                    early.provisional, id=job_id, spool=str(spool.path), size=spool.size, submitted=now
                )
                early.hand_over(durable)
        finally:
            if early is not None and not (handing_over and job_id is not None):
                early.abandon()
        if job_id is None:  # a concurrent upload of the same CID was queued first
            spool.discard()
            return Outcome(self.presence.find(cid))
        self.metrics.bytes_uploaded.inc(spool.size)
        if spool.size <= self.settings.small_publish_bytes:
            for worker in self.workers:
                if worker.slots is not None:
                    worker.slots.small_arrived = time.monotonic()
        log.info(
            "queued",
            extra=fields(cid=cid, job=job_id, bytes=spool.size, identity=identity,
                         staged_early=early.repository if handing_over and early is not None else None),
        )  # fmt: skip
        self._notify()
        return Outcome(None)

    def _active_named(self, name: str) -> list[str]:
        return self.state.active_named(name) if self.state is not None else []

    def backoff(self, failures: int) -> float:
        """Seconds before the next try after ``failures`` earlier ones: doubling, capped."""
        s = self.settings
        return float(min(s.max_retry_delay, s.retry_delay * 2 ** min(failures, 30)))

    def _check_running(self) -> None:
        if not self.running:
            raise ServiceUnavailable("Service not running")

    def _notify(self) -> None:
        with self._wake:
            self._generation += 1
            self._wake.notify_all()

    def wait_for_work(self, seen: int, timeout: float) -> None:
        with self._wake:
            if self._generation == seen and not self.stopping.is_set():
                self._wake.wait(timeout)

    @property
    def generation(self) -> int:
        return self._generation

    # --- access times ----------------------------------------------------------------------------

    def touch(self, cid: str) -> None:
        with self._touch_lock:
            self._touches[cid] = self.clock()

    def flush_touches(self) -> None:
        with self._touch_lock:
            batch, self._touches = self._touches, {}
        if batch and self.state is not None:
            self.state.record_access(batch)

    def last_used(self, cid: str) -> float | None:
        with self._touch_lock:
            pending = self._touches.get(cid)
        stored = self.state.last_used(cid) if self.state is not None else None
        known = [t for t in (pending, stored) if t is not None]
        return max(known) if known else None

    def _flush_loop(self) -> None:
        while not self.stopping.wait(self.settings.touch_flush_seconds):
            try:
                self.flush_touches()
                assert self.state is not None
                self.state.prune(time.time() - 7 * 86400)
            except Exception:
                log.exception("flushing access times failed")

    # --- cleanup ---------------------------------------------------------------------------------

    def cleanup(
        self, name: str, dry_run: bool = False, now: float | None = None, gc: bool = True
    ) -> CleanupReport:
        """Expire the unused CIDs of one local repository, then collect its garbage.

        Its publish worker is paused for the duration (the queue goes to the other repositories); the
        service as a whole keeps accepting uploads. For a replica of another server's repository only
        the garbage collection runs (``cleanup_replica``).
        """
        if name not in self.repositories and name in self.replica_locks:
            return self.cleanup_replica(name, dry_run, now, gc)
        repo = self.repositories[name]
        now = self.clock() if now is None else now
        started = time.monotonic()
        with self.cleanup_lock, self.paused(name):
            assert self.state is not None
            self.flush_touches()
            storages = {r.name: self.public(r.name) for r in self.settings.repositories}
            plan = plan_cleanup(
                name, storages, self.state.access_times(), self.prefix, self.settings.maxdays, now
            )
            report = CleanupReport(plan=plan, dry_run=dry_run)
            if not dry_run:
                report.revision = apply_cleanup(repo, plan, self.prefix, clock=self.clock)
                self.refresh_presence(name, force=report.revision is not None)
                gone = [e.cid for e in plan.expired if not self.presence.anywhere(e.cid)]
                self.state.forget_access(gone + [c for c in plan.orphans if not self.presence.anywhere(c)])
            if gc:
                from ..cvmfs.gc import collect_garbage

                report.gc = collect_garbage(
                    repo, horizon=self.settings.gc_horizon_days * 86400, now=now, dry_run=dry_run
                )
        report.seconds = time.monotonic() - started
        m = self.metrics
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

        storage = self.storage(name)
        now = self.clock() if now is None else now
        started = time.monotonic()
        revision, collectable = 0, False
        public = self.public(name)
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
            with self.cleanup_lock:
                while True:
                    try:
                        with self.replica_locks[name]:
                            report.gc = collect_replica_garbage(
                                storage, horizon=self.settings.gc_horizon_days * 86400, now=now,
                                dry_run=dry_run,
                            )  # fmt: skip
                        break
                    except ReplicaBusy:
                        if time.monotonic() > deadline or self.stopping.is_set():
                            raise
                        time.sleep(0.5)
        report.seconds = time.monotonic() - started
        if not dry_run:
            self.metrics.cleanup_seconds.labels(name).observe(report.seconds)
            if report.gc is not None:
                self.metrics.gc_objects_swept.labels(name).inc(report.gc.objects_swept)
                self.metrics.gc_bytes_freed.labels(name).inc(report.gc.bytes_freed)
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

    @contextlib.contextmanager
    def paused(self, name: str) -> Iterator[None]:
        """Stop repository ``name``'s worker taking jobs (they go to the others) and wait for its revision."""
        worker = next((w for w in self.workers if w.repo_name == name), None)
        if worker is None:
            yield
            return
        worker.accepting.clear()
        try:
            # Ingests in flight are grafted (or given up) first: they hold the repository's ingest lock,
            # which garbage collection waits for.
            while worker.slots is not None and worker.slots.busy and worker.is_alive():
                self._notify()
                time.sleep(0.05)
            with worker.busy:
                yield
        finally:
            worker.accepting.set()

    def cleanup_due(self, now: float) -> list[str]:
        """Local repositories and replicas we snapshot whose daily cleanup hour is now and that were not
        cleaned today.

        Repository i (1-based, in configuration order) is cleaned in hour (gcstarthour - 1 + i) % 24, as
        the service rcds replaces did, so that one repository at a time is paused.
        """
        assert self.state is not None
        local = time.localtime(now)
        today = time.strftime("%Y-%m-%d", local)
        due = []
        for i, rs in enumerate(self.settings.repositories, start=1):
            if not (rs.local or rs.upstream) or (self.settings.gcstarthour - 1 + i) % 24 != local.tm_hour:
                continue
            if self.state.last_cleanup_day(rs.name) != today:
                due.append(rs.name)
        return due

    def _replicate_loop(self, rs: RepositorySettings) -> None:
        """Keep the replica of another server's repository current: a snapshot every replica_interval, and
        at once when the upstream's notification stream announces a revision newer than the replica's.

        A message only wakes the loop; the snapshot verifies what it fetches, so a forged or stale message
        costs one snapshot that finds nothing new. With the stream down the interval goes on as before.
        A source that is down only delays the replica; ``exists`` goes on answering from what it holds.
        """
        from ..cvmfs.replica import snapshot
        from ..cvmfs.subscriber import NotificationSubscriber

        assert rs.public_key is not None
        m = self.metrics
        wake = threading.Event()
        self._replica_wakes.append(wake)
        lock = threading.Lock()
        served = self.known_revision.get(rs.name, -1)
        pending: list[tuple[int, float]] = []  # the newest announced revision not yet served, and when

        def on_message(message: Activity) -> None:
            revision = message.revision
            if revision <= served:
                return  # what the replica has (the message sent on subscribe, keep-alives)
            with lock:
                if not pending or revision > pending[0][0]:
                    pending[:] = [(revision, message.announced or time.time())]
            wake.set()

        def on_state(up: bool) -> None:
            m.notification_stream_up.labels(rs.name).set(1 if up else 0)
            if not up:
                m.notification_streams_lost.labels(rs.name).inc()

        subscriber = None
        if rs.notification_roots:
            m.notification_stream_up.labels(rs.name).set(0)
            subscriber = NotificationSubscriber(
                list(rs.notification_roots), rs.name, on_message, on_state=on_state,
                idle_timeout=max(100.0, 3 * self.settings.notifications.keepalive),
            ).start()  # fmt: skip
        failures, trigger = 0, "start"
        try:
            while not self.stopping.is_set():
                wake.clear()  # a message arriving during this snapshot wakes the next one
                try:
                    with self.replica_locks[rs.name]:  # never while cleanup collects its garbage
                        report = snapshot(
                            list(rs.upstream), rs.storage, public_keys=[rs.public_key], fqrn=rs.name,
                            store=rs.store or None,
                        )  # fmt: skip
                    if failures:
                        log.info(
                            "replica source back", extra=fields(repository=rs.name, after_failures=failures)
                        )
                    failures = 0
                    self.replica_states[rs.name].succeeded(report.revision, report.changed, time.time())
                    served = report.revision
                    lag = None
                    with lock:
                        announced = pending[0] if pending else None
                        if announced is not None and (announced[0] <= served or trigger == "notification"):
                            pending.clear()
                    if announced is not None and announced[0] <= served:
                        lag = max(0.0, time.time() - announced[1])
                        m.notification_lag.labels(rs.name).observe(lag)
                    elif announced is not None and trigger == "notification":
                        m.notifications_unconfirmed.labels(rs.name).inc()
                        log.warning(
                            "notification not confirmed by the snapshot",
                            extra=fields(repository=rs.name, announced=announced[0], revision=served),
                        )
                    if report.changed:
                        self.announce(rs.name)  # verified and live here: a chain of servers passes it on
                        self.refresh_presence(rs.name)
                        log.info(
                            "replicated",
                            extra=fields(
                                repository=rs.name, revision=report.revision, objects=report.objects_fetched,
                                bytes=report.bytes_fetched, seconds=round(report.seconds, 3), trigger=trigger,
                                notification_lag=None if lag is None else round(lag, 3),
                            ),
                        )  # fmt: skip
                except Exception as exc:
                    failures += 1
                    self.replica_states[rs.name].failed(f"{type(exc).__name__}: {exc}", time.time())
                    if failures == 1 or failures % 20 == 0:  # a dead peer must not flood the log
                        log.warning(
                            "replication failed",
                            extra=fields(
                                repository=rs.name, failures=failures, error=f"{type(exc).__name__}: {exc}"
                            ),
                        )
                interval = self.settings.replica_interval
                trigger = "notification" if wake.wait(interval * random.uniform(0.8, 1.2)) else "interval"
        finally:
            if subscriber is not None:
                subscriber.stop()

    def announce(self, name: str, manifest: bytes | None = None) -> bool:
        """Announce repository ``name``'s live signed manifest to its notification subscribers, once per
        revision. Call it only after the manifest is live (renamed into place, or verified by a snapshot)."""
        if manifest is None:
            worker = next((w for w in self.workers if w.repo_name == name), None)
            try:
                if worker is not None:  # ours: its store (a directory or a bucket)
                    manifest = worker.repo.store.get(MANIFEST)
                else:  # a replica: its directory or its bucket
                    public = self.public(name)
                    manifest = (
                        public.get(MANIFEST)
                        if isinstance(public, ObjectStore)
                        else (public / MANIFEST).read_bytes()
                    )
            except (OSError, ObjectMissing):
                return False
        if not self.notifications.announce(name, manifest):
            return False
        self.metrics.notifications_announced.labels(name).inc()
        return True

    def sample_status(self) -> None:
        """One sample of the status page's time series: queue depth, waiting jobs, replica lag."""
        if self.status_history is None or self.state is None:
            return
        now = time.time()
        values = {
            "queue_depth": float(self.state.queued_count()),
            "waiting": float(self.state.waiting_count()),
        }
        for name, rstate in self.replica_states.items():
            lag = rstate.lag(now)
            if lag is not None:
                values[f"replica_lag:{name}"] = lag
        self.status_history.add(now, values)

    def _housekeeping_loop(self) -> None:
        next_schedule_check = 0.0
        next_sample = 0.0
        while not self.stopping.wait(2.0):
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + self.settings.status.sample_seconds
                try:
                    self.sample_status()
                except Exception as exc:  # a full disk, say: a missing sample must not stop what follows
                    log.debug("status sample failed", extra=fields(error=str(exc)))
            try:
                if self.leases is not None:
                    self.leases.expire_due()
                for rs in self.settings.repositories:
                    if rs.name not in self.repositories or not self.cleanup_lock.locked():
                        self.refresh_presence(rs.name)
                if self.settings.auto_cleanup and time.monotonic() >= next_schedule_check:
                    next_schedule_check = time.monotonic() + 60
                    now = self.clock()
                    for name in self.cleanup_due(now):
                        assert self.state is not None
                        self.state.record_cleanup_day(name, time.strftime("%Y-%m-%d", time.localtime(now)))
                        self.cleanup(name)
            except Exception:
                log.exception("housekeeping failed")

    def update_gauges(self, name: str, revision: int) -> None:
        self.metrics.revision.labels(name).set(revision)
        self.metrics.cids_present.labels(name).set(self.presence.count(name))


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


__all__ = ["Outcome", "PublishService", "ServiceUnavailable", "SpoolFile", "UploadTooLarge"]
