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
  worker paused, then collects garbage (``cleanup``; run by ``cleaner``). Replicas of other servers'
  repositories (``upstream``) are garbage collected on the same schedule (``rcds.cvmfs.replica_gc``;
  their owners expire the CIDs), never while their replication thread (``replication``) snapshots them.

Nothing here knows about HTTP; the web layer (``rcds.web.pubapi``) is a thin face on this class.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..cvmfs.manifest import Manifest, ManifestError
from ..cvmfs.repository import Repository
from ..logs import fields
from ..storage import MANIFEST, PRIVATE_DIR, ObjectMissing, ObjectStore
from ..storage.local import fsync_path
from .cleaner import Cleaner, CleanupReport
from .config import RepositorySettings, ServiceSettings
from .early import EarlyStaging, SpoolProgress
from .lastuse import server_name
from .leases import Leases
from .metrics import ServiceMetrics
from .namespace import Namespace, NamespaceConflict, find_collisions, log_collisions
from .notify import NotificationHub
from .presence import Presence, PresenceIndex, scan_published_cids
from .replication import Replication
from .state import FAILED, PUBLISHED, PUBLISHING, QUEUED, StateDB
from .status import StatusHistory
from .touches import Touches
from .worker import RepositoryWorker

log = logging.getLogger("rcds.publish")

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
        self._collisions_warned: set[str] = set()
        self.repositories: dict[str, Repository] = {}
        self.workers: list[RepositoryWorker] = []
        self.state: StateDB | None = None
        self.leases: Leases | None = None  # on sub-paths of the local repositories (``leases``, ``slots``)
        self.running = False
        self.stopping = threading.Event()
        self._wake = threading.Condition()
        self._generation = 0
        self.touches = Touches(self)  # last-use times, written in batches
        self._housekeeper: threading.Thread | None = None
        self.known_revision: dict[str, int] = {}  # per repository: the revision the presence index shows
        self.replication = Replication(self)  # the threads that keep our replicas current
        self.cleaner = Cleaner(self)
        # The collaborators' shared pieces, under the names the rest of rcds (cli, status) knows them by.
        self.cleanup_lock = self.cleaner.lock
        self.replica_locks = self.replication.locks
        self.replica_states = self.replication.states
        self.status_history: StatusHistory | None = None  # the status page's sampled time series
        # New revisions of every repository held here, to the notification streams (rcds.web.notifications).
        self.notifications = NotificationHub(
            settings.notifications.max_subscribers,
            settings.notifications.queue,
            on_drop=lambda reason: self.metrics.notification_drops.labels(reason).inc(),
        )
        self._early_cids: set[str] = set()  # CIDs being staged as they arrive (``start_early``)
        self._early_lock = threading.Lock()

    # --- life cycle ----------------------------------------------------------------------------------

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
        self.touches.start()
        self._housekeeper = threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True)
        self._housekeeper.start()
        self.replication.start()

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
        return self.replication.store(rs)

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
        self.replication.wake_all()
        self.notifications.close()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))
        for thread in (self.touches.thread, self._housekeeper, *self.replication.threads):
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

    # --- queries -------------------------------------------------------------------------------------

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

    # --- uploads -------------------------------------------------------------------------------------

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

    # --- access times (``touches``) and cleanup (``cleaner``) ----------------------------------------
    # Thin faces on the collaborators: the workers, the cli and the tests call them on the service.

    def touch(self, cid: str) -> None:
        self.touches.touch(cid)

    def flush_touches(self) -> None:
        self.touches.flush()

    def last_used(self, cid: str) -> float | None:
        return self.touches.last_used(cid)

    def cleanup(
        self, name: str, dry_run: bool = False, now: float | None = None, gc: bool = True
    ) -> CleanupReport:
        return self.cleaner.cleanup(name, dry_run, now, gc)

    def cleanup_replica(
        self, name: str, dry_run: bool = False, now: float | None = None, gc: bool = True
    ) -> CleanupReport:
        return self.cleaner.cleanup_replica(name, dry_run, now, gc)

    def paused(self, name: str) -> AbstractContextManager[None]:
        return self.cleaner.paused(name)

    def cleanup_due(self, now: float) -> list[str]:
        return self.cleaner.due(now)

    # --- notifications and housekeeping --------------------------------------------------------------

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
                    self.cleaner.run_due()
            except Exception:
                log.exception("housekeeping failed")

    def update_gauges(self, name: str, revision: int) -> None:
        self.metrics.revision.labels(name).set(revision)
        self.metrics.cids_present.labels(name).set(self.presence.count(name))


__all__ = ["Outcome", "PublishService", "ServiceUnavailable", "SpoolFile", "UploadTooLarge"]
